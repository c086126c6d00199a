"""Cloud-side global model training (paper 4.2.2): the same DIN as on the device, trained over
every user's samples. Its parameter file initialises each device's CTR model (published by the
platform as a versioned resource) and its class-free `.mnn` graph serves plain inference."""

from __future__ import annotations

from typing import Any, Sequence

from walle.device_host.models import core
from walle.device_host.models.features import SampleArrays
from walle.platform.errors import InvalidArgument


def train_global(samples: Sequence[Any], *, epochs: int, seed: int, config: dict | None = None,
                 lr: float = 0.005, batch_size: int = 32,
                 val_samples: Sequence[Any] | None = None) -> tuple[bytes, bytes, dict[str, Any]]:
    """Train DIN on `samples` (Sample messages or dicts). Returns (parameter file, inference graph,
    metrics). The same inputs and seed give byte-identical parameter files in any process."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 100:
        raise InvalidArgument(f"epochs must be an int in [1, 100], got {epochs!r}")
    if not samples:
        raise InvalidArgument("no training samples")
    model = core.build("din", config, seed)
    cfg = model.config
    train = SampleArrays.from_samples(samples, cfg["hist_len"], cfg["profile_dim"])
    res = core.train(model, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    ev = core.evaluate(model, train)
    # No wall-clock figures in the metrics: they are stored in the (deterministic) parameter file.
    metrics: dict[str, Any] = {"n_train": len(train), "epochs": epochs, "steps": res["steps"],
                               "train_logloss": ev["logloss"], "train_auc": ev["auc"], "seed": seed}
    if val_samples:
        val = SampleArrays.from_samples(val_samples, cfg["hist_len"], cfg["profile_dim"])
        v = core.evaluate(model, val)
        metrics.update(n_val=v["n"], val_logloss=v["logloss"], val_auc=v["auc"])
    model.meta = {"source": "global", "metrics": metrics}
    return model.to_npz_bytes(), core.export_graph(model), metrics
