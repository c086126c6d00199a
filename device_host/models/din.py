"""DIN CTR model (paper section 5.1, Figure 8): item + category embeddings for the target and the
behaviour sequence, attention of the target over the (masked) sequence, and an MLP on
[interest, target, profile] giving one click logit."""

from __future__ import annotations

from typing import Any

import numpy as np

from walle.protos.errors import InvalidArgument

from .core import ARCHS, F, Net, _F, check_int, dense, embedding, glorot

# MovieLens-100k: item ids 1..1682 and 19 genres, id 0 = padding in both.
DEFAULTS: dict[str, Any] = {"n_items": 1683, "n_cats": 20, "dim": 8, "hist_len": 50,
                            "profile_dim": 0, "att_hidden": 16, "mlp": [32, 16]}


def normalize_config(config: dict | None) -> dict[str, Any]:
    """Defaults filled in and every value range-checked (one-hot training cost grows with n_items)."""
    cfg = dict(DEFAULTS)
    unknown = set(config or {}) - set(DEFAULTS)
    if unknown:
        raise InvalidArgument(f"unknown din config keys {sorted(unknown)}; allowed {sorted(DEFAULTS)}")
    cfg.update(config or {})
    check_int(cfg, "n_items", 2, 50_000)
    check_int(cfg, "n_cats", 2, 10_000)
    check_int(cfg, "dim", 1, 64)
    check_int(cfg, "hist_len", 1, 512)
    check_int(cfg, "profile_dim", 0, 256)
    check_int(cfg, "att_hidden", 1, 256)
    mlp = cfg["mlp"]
    if not isinstance(mlp, (list, tuple)) or not 1 <= len(mlp) <= 4 or not all(
            isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 512 for h in mlp):
        raise InvalidArgument(f"config mlp must be a list of 1-4 ints in [1, 512], got {mlp!r}")
    cfg["mlp"] = list(mlp)
    return cfg


class DINNet(Net):
    input_names = ("hist_items", "hist_cats", "mask", "item", "item_cat", "profile")

    def __init__(self, cfg: dict[str, Any], rng: np.random.Generator):
        super().__init__(cfg)
        if not cfg["profile_dim"]:
            self.input_names = DINNet.input_names[:-1]
        d2 = 2 * cfg["dim"]  # one field = [item embedding, category embedding]
        self.add_param("item_emb", embedding(rng, cfg["n_items"], cfg["dim"]))
        self.add_param("cat_emb", embedding(rng, cfg["n_cats"], cfg["dim"]))
        self.add_param("att_w1", glorot(rng, 4 * d2, cfg["att_hidden"]))
        self.add_param("att_b1", np.zeros((1, cfg["att_hidden"]), np.float32))
        self.add_param("att_w2", glorot(rng, cfg["att_hidden"], 1))
        self.add_param("att_b2", np.zeros((1, 1), np.float32))
        self.n_layers = len(cfg["mlp"]) + 1
        widths = [2 * d2 + cfg["profile_dim"]] + cfg["mlp"] + [1]
        for i in range(self.n_layers):
            self.add_param(f"mlp_w{i}", glorot(rng, widths[i], widths[i + 1]))
            self.add_param(f"mlp_b{i}", np.zeros((1, widths[i + 1]), np.float32))

    def field(self, x: dict[str, Any], items: str, cats: str):
        c = self.config
        return F.concat([self.lookup("item_emb", items, x, c["n_items"]),
                         self.lookup("cat_emb", cats, x, c["n_cats"])], -1)

    def forward(self, x: dict[str, Any]):
        c = self.config
        d2, L = 2 * c["dim"], c["hist_len"]
        q = self.field(x, "item", "item_cat")  # [B, 2D]
        k = self.field(x, "hist_items", "hist_cats")  # [B, L, 2D]
        qb = _F.broadcast_to(F.reshape(q, [-1, 1, d2]), _F.shape(k))
        att_in = F.reshape(F.concat([qb, k, qb - k, qb * k], -1), [-1, 4 * d2])
        h = F.relu(dense(att_in, self.att_w1, self.att_b1))
        score = F.reshape(dense(h, self.att_w2, self.att_b2), [-1, L])
        mask = x["mask"]
        # Masked softmax; the final *mask zeroes rows with an empty history (softmax would be uniform).
        w = F.softmax(score + (mask - 1.0) * 1e9, 1) * mask
        interest = F.reshape(_F.matmul(F.unsqueeze(w, [1]), k, False, False), [-1, d2])
        parts = [interest, q] + ([x["profile"]] if c["profile_dim"] else [])
        h = F.concat(parts, -1)
        for i in range(self.n_layers):
            h = dense(h, getattr(self, f"mlp_w{i}"), getattr(self, f"mlp_b{i}"))
            if i < self.n_layers - 1:
                h = F.relu(h)
        return h  # logits [B, 1]


ARCHS["din"] = (normalize_config, DINNet)
