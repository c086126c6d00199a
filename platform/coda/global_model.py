"""Cloud-side global model training (paper 4.2.2): the DIN of the CoDA task library (the very file
the device tasks run), trained over every user's samples. The result is a model blob (parameters +
metadata with the arch and its full config, vocabularies from the catalogue) published as a
versioned resource; devices store it as is and their scripts rebuild the same net from it."""

from __future__ import annotations

from typing import Any, Sequence

from walle.device_host.models import blob
from walle.platform.errors import InvalidArgument

from .tasklib import coda_module

LIST_FIELDS = ("item_cats", "hist_items", "hist_cats", "profile")


def sample_dict(s: Any) -> dict:
    """A `Sample` message (or a dict) as the library's sample dict."""
    if isinstance(s, dict):
        return s
    d = {"item_id": int(s.item_id), "label": float(s.label)}
    for f in LIST_FIELDS:
        d[f] = list(getattr(s, f))
    return d


def catalog_config(items) -> dict[str, int]:
    """Vocabulary sizes from the item catalogue (ids and genre ids are 1-based, 0 = padding)."""
    n_cats = 1 + max((max(g) for g in items["genre_ids"] if len(g)), default=1)
    return {"n_items": int(items["item_id"].max()) + 1, "n_cats": int(n_cats)}


def train_global(samples: Sequence[Any], *, epochs: int, seed: int, catalog: dict, config: dict | None = None,
                 lr: float = 0.005, batch_size: int = 32,
                 val_samples: Sequence[Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Train DIN on `samples`. `catalog` gives n_items / n_cats, `config` the other sizes. Returns
    (model blob, metrics); the same inputs and seed give byte-identical blobs in any process."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 100:
        raise InvalidArgument(f"epochs must be an int in [1, 100], got {epochs!r}")
    if not samples:
        raise InvalidArgument("no training samples")
    din, features, training = coda_module("din"), coda_module("features"), coda_module("training")
    try:
        net = din.DIN({**(config or {}), **catalog}, seed)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    cfg = net.config
    train = features.batch([sample_dict(s) for s in samples], cfg["hist_len"], cfg["profile_dim"])
    res = training.train(net, train, epochs, lr, seed, batch_size)
    ev = training.evaluate(net, train)
    # No wall-clock figures in the metadata: it is stored in the (deterministic) blob.
    metrics: dict[str, Any] = {"n_train": train.n, "epochs": epochs, "steps": res["steps"],
                               "train_logloss": ev["logloss"], "train_auc": ev["auc"], "seed": seed}
    if val_samples:
        val = features.batch([sample_dict(s) for s in val_samples], cfg["hist_len"], cfg["profile_dim"])
        v = training.evaluate(net, val)
        metrics.update(n_val=v["n"], val_logloss=v["logloss"], val_auc=v["auc"])
    meta = {"arch": "din", "config": cfg, "source": "global", "metrics": metrics}
    return blob.pack(net.params(), meta), metrics


def load_global(data: bytes):
    """The DIN net of a global model blob (for the cloud's own evaluation)."""
    params, meta = blob.unpack(data)
    net = coda_module("din").DIN(meta["config"])
    net.set_params(params)
    return net
