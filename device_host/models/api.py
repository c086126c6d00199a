"""Host-API model ops for sandboxed task scripts. Scripts never touch model files: they call these
ops (through the host) with JSON-able arguments; samples travel as lists of dicts with `Sample`
field names. Every argument is validated and a refusal leaves the store unchanged.

`make_model_ops(store)` returns the op table {"model.create": fn, ...}; each fn takes keyword
arguments only, so unknown kwargs raise TypeError."""

from __future__ import annotations

import base64
import binascii
import math
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable

from walle.protos.errors import FailedPrecondition, InvalidArgument

from . import core
from .features import SampleArrays
from .store import ModelStore, check_name

MAX_SAMPLES = 2000
MAX_EPOCHS = 20
MAX_PARAMS_B64 = 8 * 1024 * 1024
METRICS = {"auc": +1, "logloss": -1}  # +1: higher is better


def _int(v: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgument(f"{field} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(v: Any, field: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise InvalidArgument(f"{field} must be a number in ({lo}, {hi}], got {v!r}")
    return float(v)


def _which(v: Any) -> str:
    if v not in ("M", "M0"):
        raise InvalidArgument(f"which must be 'M' or 'M0', got {v!r}")
    return v


def _arrays(store: ModelStore, name: str, samples: Any, field: str = "samples",
            labels: Any = None) -> SampleArrays:
    if not isinstance(samples, list):
        raise InvalidArgument(f"{field} must be a list of sample dicts, got {type(samples).__name__}")
    if not samples:
        raise InvalidArgument(f"{field} is empty")
    if len(samples) > MAX_SAMPLES:
        raise InvalidArgument(f"{field} has {len(samples)} samples; at most {MAX_SAMPLES} per call")
    if not all(isinstance(s, dict) for s in samples):
        raise InvalidArgument(f"{field} must contain only dicts")
    cfg = store.info(name)["config"]
    try:
        arrays = SampleArrays.from_samples(samples, cfg["hist_len"], cfg.get("profile_dim", 0))
    except InvalidArgument as e:
        raise InvalidArgument(f"{field}: {e.message}") from None
    if labels is not None:
        if not isinstance(labels, list):
            raise InvalidArgument(f"labels must be a list of numbers, got {type(labels).__name__}")
        arrays = arrays.with_labels(labels)
    return arrays


def _check_inputs(model: core.Model, arrays: SampleArrays, field: str) -> None:
    try:
        core.check_arrays(model, arrays)
    except InvalidArgument as e:
        raise InvalidArgument(f"{field}: {e.message}") from None


def model_create(store: ModelStore, *, name: str, arch: str, config: dict | None = None,
                 seed: int = 0, params_b64: str | None = None, exist_ok: bool = False) -> dict:
    """Create a model (random init from `seed`, or base64 parameter-file bytes such as the global
    model). With exist_ok, an existing model of the same arch is returned unchanged."""
    check_name(name)
    if arch not in ("din", "classifier"):
        raise InvalidArgument(f"arch must be 'din' or 'classifier', got {arch!r}")
    if config is not None and not isinstance(config, dict):
        raise InvalidArgument(f"config must be a dict, got {type(config).__name__}")
    _int(seed, "seed", 0, 2**31 - 1)
    if not isinstance(exist_ok, bool):
        raise InvalidArgument(f"exist_ok must be true or false, got {exist_ok!r}")
    if store.exists(name) and exist_ok:
        info = store.info(name)
        if info["arch"] != arch:
            raise FailedPrecondition(f"model {name!r} exists with arch {info['arch']!r}, not {arch!r}")
        return _public_info(info)
    data = None
    if params_b64 is not None:
        if not isinstance(params_b64, str) or len(params_b64) > MAX_PARAMS_B64:
            raise InvalidArgument(f"params_b64 must be a base64 string of at most {MAX_PARAMS_B64} chars")
        try:
            data = base64.b64decode(params_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidArgument(f"params_b64 is not valid base64: {e}") from None
    return _public_info(store.create(name, arch, config, data, seed=seed))


def model_train(store: ModelStore, *, name: str, samples: list, epochs: int = 1, lr: float = 0.005,
                seed: int = 0, batch_size: int = 32, labels: list | None = None) -> dict:
    """Train M on the samples (labels override per-sample labels, e.g. local=1 / outside=0 for the
    sample classifier) and commit unconditionally."""
    _int(epochs, "epochs", 1, MAX_EPOCHS)
    _float(lr, "lr", 0.0, 1.0)
    _int(seed, "seed", 0, 2**31 - 1)
    _int(batch_size, "batch_size", 1, 512)
    arrays = _arrays(store, check_name(name), samples, labels=labels)
    model = store.begin_update(name)
    try:
        _check_inputs(model, arrays, "samples")
        res = core.train(model, arrays, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    except BaseException:
        store.discard(name)
        raise
    meta = store.commit(name, model, {"train_loss": res["loss"], "n_train": res["n"]})
    return {"loss": res["loss"], "steps": res["steps"], "n": res["n"], "version": meta["version"]}


def model_predict(store: ModelStore, *, name: str, samples: list, which: str = "M") -> dict:
    """Scores from M (or M0 while M is being replaced)."""
    arrays = _arrays(store, check_name(name), samples)
    model = store.load(name, _which(which))
    _check_inputs(model, arrays, "samples")
    probs = core.predict(model, arrays)
    return {"probs": [float(p) for p in probs], "version": model.meta["version"],
            "served_from": model.meta["slot"]}


def model_evaluate(store: ModelStore, *, name: str, samples: list, which: str = "M") -> dict:
    arrays = _arrays(store, check_name(name), samples)
    model = store.load(name, _which(which))
    _check_inputs(model, arrays, "samples")
    return {**core.evaluate(model, arrays), "version": model.meta["version"],
            "served_from": model.meta["slot"]}


def model_commit_if_better(store: ModelStore, *, name: str, train_samples: list, val_samples: list,
                           epochs: int = 1, lr: float = 0.005, seed: int = 0, batch_size: int = 32,
                           metric: str = "auc") -> dict:
    """Algorithm 3: train a copy of M (in Mbuf) and validate it on local samples after every
    mini-batch; keep the best snapshot and commit it only if it beats M's validation metric."""
    _int(epochs, "epochs", 1, MAX_EPOCHS)
    _float(lr, "lr", 0.0, 1.0)
    _int(seed, "seed", 0, 2**31 - 1)
    _int(batch_size, "batch_size", 1, 512)
    if metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    check_name(name)
    train_arr = _arrays(store, name, train_samples, "train_samples")
    val_arr = _arrays(store, name, val_samples, "val_samples")
    if metric == "auc" and len(set(val_arr.label >= 0.5)) < 2:
        raise InvalidArgument("val_samples must contain both clicks and non-clicks for metric auc")
    sign = METRICS[metric]
    model = store.begin_update(name)
    try:
        _check_inputs(model, train_arr, "train_samples")
        _check_inputs(model, val_arr, "val_samples")
        before = core.evaluate(model, val_arr)[metric]
        best = {"score": before, "params": None, "step": 0}

        def validate(step: int) -> None:
            score = core.evaluate(model, val_arr)[metric]
            if sign * (score - best["score"]) > 0:
                best.update(score=score, params=model.params(), step=step)

        res = core.train(model, train_arr, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         on_batch=validate)
    except BaseException:
        store.discard(name)
        raise
    out = {"committed": best["params"] is not None, "before": before, "after": best["score"],
           "metric": metric, "best_step": best["step"], "steps": res["steps"]}
    if best["params"] is None:
        store.discard(name)
        out["version"] = store.info(name)["M"]["version"]
        return out
    model.set_params(best["params"])
    meta = store.commit(name, model, {f"val_{metric}": best["score"], f"val_{metric}_before": before,
                                      "n_train": len(train_arr), "n_val": len(val_arr)})
    out["version"] = meta["version"]
    return out


def model_rollback(store: ModelStore, *, name: str) -> dict:
    """Restore the backup M0 into M."""
    meta = store.rollback(check_name(name))
    return {"version": meta["version"], "restored_from": meta["restored_from"]}


def _public_info(info: dict) -> dict:
    # The directory path is the host's business, not the script's.
    return {k: v for k, v in info.items() if k != "dir"}


def model_info(store: ModelStore, *, name: str) -> dict:
    return _public_info(store.info(check_name(name)))


_OPS: dict[str, Callable[..., Any]] = {
    "model.create": model_create, "model.train": model_train, "model.predict": model_predict,
    "model.evaluate": model_evaluate, "model.commit_if_better": model_commit_if_better,
    "model.rollback": model_rollback, "model.info": model_info}


def _run_op(root: str, op: str, kwargs: dict) -> Any:
    """One op in a model worker process (the store's file locks make that safe)."""
    return _OPS[op](ModelStore(root), **kwargs)


def make_model_ops(store: ModelStore, pool: Executor | None = None) -> dict[str, Callable[..., Any]]:
    """The op table to register in the host API.

    `pool`: a process pool of trusted model workers shared by many devices (an emulated fleet).
    MNN holds the GIL while it computes, so one host process trains one model at a time; the pool
    lets devices train in parallel. Without it (a phone), ops run in the host process."""
    def bind(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if pool is None:
            def op(**kwargs: Any) -> Any:
                return fn(store, **kwargs)
        else:
            def op(**kwargs: Any) -> Any:
                return pool.submit(_run_op, store.root, name, kwargs).result()
        op.__name__ = op.__qualname__ = fn.__name__
        op.__doc__ = fn.__doc__
        return op

    return {name: bind(name, fn) for name, fn in _OPS.items()}


def model_pool(workers: int = 2) -> ProcessPoolExecutor:
    """Model workers started from a fork server that preloads numpy and MNN (never from a forked
    copy of a host that may hold threads or a raised MNN thread count: mnn-notes section 5).
    As with any forkserver pool, a script that creates one needs an `if __name__ == "__main__":`
    guard: the workers import the main module."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["walle.device_host.models.api"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


__all__ = ["make_model_ops", "model_pool", "MAX_SAMPLES", "model_create", "model_train", "model_predict",
           "model_evaluate", "model_commit_if_better", "model_rollback", "model_info"]
