"""The personalized sample classifier (paper 3.3 / 5.1, Algorithm 2): DIN pruned to the behaviour
sequence only. It never sees the target item, so it learns what the user's *history* looks like
rather than which items they click. Output: one logit for P(local)."""

from __future__ import annotations

from typing import Any

import numpy as np

from walle.protos.errors import InvalidArgument

from .core import ARCHS, F, Net, _F, check_int, dense, embedding, glorot

DEFAULTS: dict[str, Any] = {"n_items": 1683, "n_cats": 20, "dim": 8, "hist_len": 50, "hidden": 16}


def normalize_config(config: dict | None) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    unknown = set(config or {}) - set(DEFAULTS)
    if unknown:
        raise InvalidArgument(f"unknown classifier config keys {sorted(unknown)}; "
                              f"allowed {sorted(DEFAULTS)}")
    cfg.update(config or {})
    check_int(cfg, "n_items", 2, 50_000)
    check_int(cfg, "n_cats", 2, 10_000)
    check_int(cfg, "dim", 1, 64)
    check_int(cfg, "hist_len", 1, 512)
    check_int(cfg, "hidden", 1, 256)
    return cfg


class ClassifierNet(Net):
    """[masked mean pooling, learned-query attention pooling] of the sequence -> MLP -> logit."""

    input_names = ("hist_items", "hist_cats", "mask")

    def __init__(self, cfg: dict[str, Any], rng: np.random.Generator):
        super().__init__(cfg)
        d2 = 2 * cfg["dim"]
        self.add_param("item_emb", embedding(rng, cfg["n_items"], cfg["dim"]))
        self.add_param("cat_emb", embedding(rng, cfg["n_cats"], cfg["dim"]))
        self.add_param("att_q", glorot(rng, d2, 1))
        self.add_param("w1", glorot(rng, 2 * d2, cfg["hidden"]))
        self.add_param("b1", np.zeros((1, cfg["hidden"]), np.float32))
        self.add_param("w2", glorot(rng, cfg["hidden"], 1))
        self.add_param("b2", np.zeros((1, 1), np.float32))

    def forward(self, x: dict[str, Any]):
        c = self.config
        d2, L = 2 * c["dim"], c["hist_len"]
        k = F.concat([self.lookup("item_emb", "hist_items", x, c["n_items"]),
                      self.lookup("cat_emb", "hist_cats", x, c["n_cats"])], -1)  # [B, L, 2D]
        mask = x["mask"]
        count = F.maximum(_F.reduce_sum(mask, [1], True), F.scalar(1.0))  # empty history -> 0 vector
        mean_w = mask / count
        score = F.reshape(_F.matmul(F.reshape(k, [-1, d2]), self.att_q, False, False), [-1, L])
        att_w = F.softmax(score + (mask - 1.0) * 1e9, 1) * mask
        w = F.concat([F.unsqueeze(mean_w, [1]), F.unsqueeze(att_w, [1])], 1)  # [B, 2, L]
        pooled = F.reshape(_F.matmul(w, k, False, False), [-1, 2 * d2])
        h = F.relu(dense(pooled, self.w1, self.b1))
        return dense(h, self.w2, self.b2)  # logits [B, 1]


ARCHS["classifier"] = (normalize_config, ClassifierNet)
