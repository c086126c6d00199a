"""The personalized sample classifier (paper sections 3.3 and 5.1, Algorithm 2): DIN pruned to the
behaviour sequence. It never sees the target item, so it learns what the user's *history* looks
like rather than which items they click. Output: one logit for P(local).

The sequence is pooled two ways, a masked mean and an attention with a learned query, then an MLP."""
import numpy as np

from coda import nets

F, raw = nets.F, nets.raw
DEFAULTS = {"dim": 8, "hist_len": 50, "hidden": 16}


def config(given):
    return nets.model_config(DEFAULTS, given, "classifier", {"hidden": (1, 256)})


class Classifier(nets.Net):
    input_names = ("hist_items", "hist_cats", "mask")

    def __init__(self, cfg, seed=0):
        super().__init__(config(cfg))
        cfg = self.config
        rng = np.random.default_rng(seed)
        d2 = 2 * cfg["dim"]
        self.add_param("item_emb", nets.embedding(rng, cfg["n_items"], cfg["dim"]))
        self.add_param("cat_emb", nets.embedding(rng, cfg["n_cats"], cfg["dim"]))
        self.add_param("att_q", nets.glorot(rng, d2, 1))
        self.add_param("w1", nets.glorot(rng, 2 * d2, cfg["hidden"]))
        self.add_param("b1", nets.zeros(cfg["hidden"]))
        self.add_param("w2", nets.glorot(rng, cfg["hidden"], 1))
        self.add_param("b2", nets.zeros(1))

    def forward(self, x):
        c = self.config
        d2, hist_len = 2 * c["dim"], c["hist_len"]
        k = F.concat([self.lookup("item_emb", "hist_items", x, c["n_items"]),
                      self.lookup("cat_emb", "hist_cats", x, c["n_cats"])], -1)  # [B, L, 2D]
        mask = x["mask"]
        count = F.maximum(raw.reduce_sum(mask, [1], True), F.scalar(1.0))  # empty history -> 0 vector
        mean_w = mask / count
        score = F.reshape(raw.matmul(F.reshape(k, [-1, d2]), self.att_q, False, False), [-1, hist_len])
        att_w = nets.masked_softmax(score, mask)
        w = F.concat([F.unsqueeze(mean_w, [1]), F.unsqueeze(att_w, [1])], 1)  # [B, 2, L]
        pooled = F.reshape(raw.matmul(w, k, False, False), [-1, 2 * d2])
        h = F.relu(nets.dense(pooled, self.w1, self.b1))
        return nets.dense(h, self.w2, self.b2)  # logits [B, 1]
