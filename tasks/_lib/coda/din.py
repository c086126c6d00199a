"""The DIN CTR model (paper section 5.1, Figure 8): item + category embeddings for the target and
the behaviour sequence, attention of the target over the masked sequence, and an MLP on
[interest, target, profile] giving one click logit.

Sizes come from the caller: vocabularies from the cloud's global model resource (its catalogue),
widths from the task's config. Nothing here knows a dataset."""
import numpy as np

from coda import nets

F, raw = nets.F, nets.raw
SHAPE_KEYS = ("n_items", "n_cats", "dim", "hist_len", "profile_dim", "att_hidden", "mlp")
DEFAULTS = {"dim": 8, "hist_len": 50, "profile_dim": 0, "att_hidden": 16, "mlp": [32, 16]}


def config(given):
    """The full config: `given` must name the vocabularies (n_items, n_cats); widths default."""
    cfg = nets.model_config(DEFAULTS, given, "din", {"profile_dim": (0, 256), "att_hidden": (1, 256)})
    mlp = cfg["mlp"]
    if not isinstance(mlp, (list, tuple)) or not 1 <= len(mlp) <= 4 or not all(
            isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 512 for h in mlp):
        raise ValueError(f"din config mlp must be a list of 1-4 integers in [1, 512], got {mlp!r}")
    cfg["mlp"] = list(mlp)
    return cfg


class DIN(nets.Net):
    input_names = ("hist_items", "hist_cats", "mask", "item", "item_cat", "profile")

    def __init__(self, cfg, seed=0):
        super().__init__(config(cfg))
        cfg = self.config
        if not cfg["profile_dim"]:
            self.input_names = DIN.input_names[:-1]
        rng = np.random.default_rng(seed)
        d2 = 2 * cfg["dim"]  # one field = [item embedding, category embedding]
        self.add_param("item_emb", nets.embedding(rng, cfg["n_items"], cfg["dim"]))
        self.add_param("cat_emb", nets.embedding(rng, cfg["n_cats"], cfg["dim"]))
        self.add_param("att_w1", nets.glorot(rng, 4 * d2, cfg["att_hidden"]))
        self.add_param("att_b1", nets.zeros(cfg["att_hidden"]))
        self.add_param("att_w2", nets.glorot(rng, cfg["att_hidden"], 1))
        self.add_param("att_b2", nets.zeros(1))
        widths = [2 * d2 + cfg["profile_dim"]] + cfg["mlp"] + [1]
        self.n_layers = len(widths) - 1
        for i in range(self.n_layers):
            self.add_param(f"mlp_w{i}", nets.glorot(rng, widths[i], widths[i + 1]))
            self.add_param(f"mlp_b{i}", nets.zeros(widths[i + 1]))

    def field(self, x, items, cats):
        c = self.config
        return F.concat([self.lookup("item_emb", items, x, c["n_items"]),
                         self.lookup("cat_emb", cats, x, c["n_cats"])], -1)

    def forward(self, x):
        c = self.config
        d2, hist_len, hidden = 2 * c["dim"], c["hist_len"], c["att_hidden"]
        q = self.field(x, "item", "item_cat")  # [B, 2D]
        k = self.field(x, "hist_items", "hist_cats")  # [B, L, 2D]
        # The attention MLP's first layer on [q, k, q - k, q * k], by blocks of its weight:
        # q (Wa + Wc) + k (Wb - Wc) + (q * k) Wd, the same sum without the [B*L, 8D] input (3x cheaper).
        wa, wb, wc, wd = F.split(self.att_w1, [d2, d2, d2, d2], 0)
        qk = raw.broadcast_to(F.reshape(q, [-1, 1, d2]), raw.shape(k)) * k
        per_pos = raw.matmul(F.reshape(k, [-1, d2]), wb - wc, False, False) + \
            raw.matmul(F.reshape(qk, [-1, d2]), wd, False, False)
        per_row = raw.matmul(q, wa + wc, False, False) + self.att_b1
        z = F.reshape(per_pos, [-1, hist_len, hidden]) + F.reshape(per_row, [-1, 1, hidden])
        h = F.relu(F.reshape(z, [-1, hidden]))
        score = F.reshape(nets.dense(h, self.att_w2, self.att_b2), [-1, hist_len])
        w = nets.masked_softmax(score, x["mask"])  # an empty history pools to a 0 vector
        interest = F.reshape(raw.matmul(F.unsqueeze(w, [1]), k, False, False), [-1, d2])
        parts = [interest, q] + ([x["profile"]] if c["profile_dim"] else [])
        h = F.concat(parts, -1)
        for i in range(self.n_layers):
            h = nets.dense(h, self.param(f"mlp_w{i}"), self.param(f"mlp_b{i}"))
            if i < self.n_layers - 1:
                h = F.relu(h)
        return h  # logits [B, 1]
