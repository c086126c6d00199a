"""MNN plumbing shared by the on-device models: the quiet MNN import in lazy mode, parameter
creation from a seeded numpy RNG, the `Model` wrapper, training/prediction/evaluation,
self-describing `.npz` parameter files and the class-free `.mnn` inference graph.

Every choice here follows the measured MNN 3.6.1 traps (docs: shared/reference/mnn-notes.md):
lazy mode or nothing trains; raw `_F` ops because the `F.*` wrappers insert a gradient-less Cast;
one-hot matmul lookups for training because Gather has no gradient; numpy initialisation because
MNN's own RNG cannot be seeded; and a kept reference before `Var.read().copy()`."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable

import numpy as np

from walle.protos.errors import InvalidArgument

from .features import SampleArrays


def _import_mnn_quietly():
    # MNN prints a banner on C-level fd 1 at import; stdout may carry a protocol, so hide it.
    if "MNN" in sys.modules:
        return sys.modules["MNN"]
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        import MNN
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return MNN


MNN = _import_mnn_quietly()
nn, F, optim = MNN.nn, MNN.expr, MNN.optim
_F = F._F
F.lazy_eval(True)  # eager mode builds no graph, so nothing would train

FORMAT = "walle-model-1"
PRED_CHUNK = 1024


def bce_with_logits(z, t):
    """Stable mean binary cross-entropy on logits, built from ops that all have gradients."""
    return _F.reduce_mean(F.relu(z) - z * t + _F.log1p(_F.exp(-F.abs(z))), [], False)


def dense(x, w, b):
    return _F.matmul(x, w, False, False) + b


class Net(nn.Module):
    """Base for the models: raw trainable Vars created from numpy (seedable, deterministic).

    `mode` picks how embedding rows are looked up:
    * "gather": `_F.gather`, fast, no gradient (inference and export);
    * "onehot": `one_hot(ids) @ table`, gradients reach the tables inside MNN, but the cost grows
      with the vocabulary (78 steps/s at 1,683 items);
    * "sparse": the rows are gathered in numpy into fresh trainable leaves; the trainer scatters the
      leaves' gradients back into the table (the notes' large-vocabulary recipe, several times faster).
    """

    input_names: tuple[str, ...] = ()
    tables: tuple[str, ...] = ("item_emb", "cat_emb")

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.mode = "gather"
        self.leaves: list[tuple[str, np.ndarray, Any]] = []  # (table, ids, leaf Var) in sparse mode
        self.host_tables: dict[str, np.ndarray] = {}  # numpy copies of the tables in sparse mode
        self.host_ids: dict[str, np.ndarray] = {}  # numpy ids of the batch in sparse mode

    def add_param(self, name: str, value: np.ndarray) -> None:
        v = F.const(np.ascontiguousarray(value, dtype=np.float32), list(value.shape))
        v.fix_as_trainable()
        setattr(self, name, v)  # nn.Module registers Vars assigned as attributes

    def lookup(self, table: str, ids_key: str, x: dict[str, Any], vocab: int):
        if self.mode == "sparse":
            ids = self.host_ids[ids_key]
            rows = np.ascontiguousarray(self.host_tables[table][ids])
            leaf = F.const(rows, list(rows.shape))
            leaf.fix_as_trainable()
            leaf.name = f"leaf{len(self.leaves)}"
            self.leaves.append((table, ids, leaf))
            return leaf
        if self.mode == "gather":
            return _F.gather(getattr(self, table), x[ids_key])
        return _F.matmul(F.one_hot(x[ids_key], vocab), getattr(self, table), False, False)

    def forward(self, x: dict[str, Any]):  # returns logits [B, 1]
        raise NotImplementedError


def glorot(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    lim = math.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-lim, lim, (n_in, n_out)).astype(np.float32)


def embedding(rng: np.random.Generator, vocab: int, dim: int) -> np.ndarray:
    e = rng.normal(0.0, 0.05, (vocab, dim)).astype(np.float32)
    e[0] = 0.0  # id 0 is padding
    return e


def check_int(config: dict, key: str, lo: int, hi: int) -> int:
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgument(f"config {key} must be an int in [{lo}, {hi}], got {v!r}")
    return v


# Architecture registry, filled by din.py and classifier.py: arch -> (normalize_config, net class).
ARCHS: dict[str, tuple[Callable[[dict | None], dict], type]] = {}


def _arch(arch: str):
    if arch not in ARCHS:
        # Import lazily so `core` has no import cycle with the model modules.
        from . import classifier, din  # noqa: F401
    if arch not in ARCHS:
        raise InvalidArgument(f"unknown model arch {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch]


class Model:
    """An architecture, its config, the MNN net and free-form metadata (version, metrics...)."""

    def __init__(self, arch: str, config: dict[str, Any], net: Net, meta: dict | None = None):
        self.arch, self.config, self.net = arch, config, net
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.net.input_names

    def params(self) -> list[np.ndarray]:
        out = []
        for p in self.net.parameters:
            out.append(p.read().copy())  # p stays referenced by the net, so the view is valid
        return out

    def param_names(self) -> list[str]:
        return [p.name for p in self.net.parameters]

    def set_params(self, arrays: list[np.ndarray]) -> None:
        ps = self.net.parameters
        if len(arrays) != len(ps):
            raise InvalidArgument(f"{self.arch} expects {len(ps)} parameter arrays, got {len(arrays)}")
        for p, a in zip(ps, arrays):
            if tuple(a.shape) != tuple(p.shape):
                raise InvalidArgument(f"parameter {p.name}: shape {tuple(a.shape)} does not match "
                                      f"the model's {tuple(p.shape)}")
        for p, a in zip(ps, arrays):
            p.write(np.ascontiguousarray(a, dtype=np.float32))

    def copy(self) -> "Model":
        m = build(self.arch, self.config)
        m.set_params(self.params())
        m.meta = json.loads(json.dumps(self.meta))
        return m

    def to_npz_bytes(self, meta: dict | None = None) -> bytes:
        """Parameters plus a JSON header (arch, config, names, meta) in one deterministic zip:
        fixed timestamps, so equal parameters give equal bytes (content hashes stay stable)."""
        header = {"format": FORMAT, "arch": self.arch, "config": self.config,
                  "names": self.param_names(), "meta": self.meta if meta is None else meta}
        entries = {"__header__": np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)}
        for i, a in enumerate(self.params()):
            entries[f"p{i:03d}"] = a
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for key, arr in entries.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w") as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
        return buf.getvalue()


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a parameter file, without building the model."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["__header__"].tobytes().decode())
    except Exception as e:  # zip, npy or JSON damage: all mean "not a model file"
        raise InvalidArgument(f"not a walle model file: {type(e).__name__}: {e}") from None
    if header.get("format") != FORMAT:
        raise InvalidArgument(f"not a walle model file: format {header.get('format')!r}")
    return header


def from_npz_bytes(data: bytes) -> Model:
    header = read_header(data)
    model = build(header["arch"], header["config"])
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [z[f"p{i:03d}"] for i in range(len(header["names"]))]
    except Exception as e:
        raise InvalidArgument(f"damaged model file: {type(e).__name__}: {e}") from None
    if header["names"] != model.param_names():
        raise InvalidArgument(f"parameter names {header['names']} do not match {model.param_names()}")
    model.set_params(arrays)
    model.meta = header.get("meta") or {}
    return model


def build(arch: str, config: dict | None = None, seed: int = 0) -> Model:
    """A freshly initialised model; the same (arch, config, seed) gives the same parameters in any process."""
    normalize, net_cls = _arch(arch)
    cfg = normalize(config)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be an int in [0, 2^32), got {seed!r}")
    return Model(arch, cfg, net_cls(cfg, np.random.default_rng(seed)))


def check_arrays(model: Model, arrays: SampleArrays) -> None:
    """Refuse inputs the graph would mis-handle: Gather with an out-of-range id reads wild memory."""
    cfg = model.config
    if len(arrays) == 0:
        raise InvalidArgument("no samples given")
    if arrays.hist_len != cfg["hist_len"]:
        raise InvalidArgument(f"history length {arrays.hist_len} != model hist_len {cfg['hist_len']}")
    for field, vocab in (("hist_items", cfg["n_items"]), ("hist_cats", cfg["n_cats"]),
                         ("item", cfg["n_items"]), ("item_cat", cfg["n_cats"])):
        if field not in model.input_names:
            continue
        a = getattr(arrays, field)
        if a.size and int(a.max()) >= vocab:
            raise InvalidArgument(f"{field} id {int(a.max())} is out of range: the model's vocabulary "
                                  f"has ids 0..{vocab - 1}")
    if "item" in model.input_names and int(arrays.item.min()) < 1:
        raise InvalidArgument("item_id 0 is the padding id; target items must be >= 1")
    want = cfg.get("profile_dim", 0)
    if want and arrays.profile.shape[1] != want:
        raise InvalidArgument(f"profile has {arrays.profile.shape[1]} values, model expects {want}")


def _inputs(model: Model, a: SampleArrays, idx: np.ndarray | None = None,
            skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for name in model.input_names:
        if name in skip:
            continue
        arr = getattr(a, name)
        if idx is not None:
            arr = arr[idx]
        arr = np.ascontiguousarray(arr)
        dtype = F.int if arr.dtype == np.int32 else F.float
        out[name] = F.const(arr, list(arr.shape), F.NCHW, dtype)
    return out


class Adam:
    """Plain Adam over numpy arrays. MNN computes the gradients; the update lives here so sparse
    embedding gradients and dense ones follow one rule, deterministically."""

    def __init__(self, params: list[np.ndarray], lr: float, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(np.float32)


_GRAD = None


def batch_grads(model: Model, arrays: SampleArrays, idx: np.ndarray, mode: str = "sparse",
                params: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """d(mean BCE)/d(param) for every parameter on the batch `idx`, as numpy arrays in parameter
    order. Raises if any parameter got no gradient (the notes' broken-graph detector)."""
    global _GRAD
    if _GRAD is None:
        _GRAD = optim.Grad()  # a gradient engine only; its own update rule is unused
    net, ps = model.net, model.net.parameters
    names = [p.name for p in ps]
    if params is None:
        params = model.params()
    net.mode, net.leaves = mode, []
    net.host_tables = {n: a for n, a in zip(names, params) if n in net.tables}
    net.host_ids = {k: getattr(arrays, k)[idx] for k in net.input_names if k not in ("mask", "profile")}
    try:
        # Sparse lookups read the ids from numpy, so the graph needs no id inputs.
        logit = net.forward(_inputs(model, arrays, idx, tuple(net.host_ids) if mode == "sparse" else ()))
        lab = np.ascontiguousarray(arrays.label[idx].reshape(-1, 1))
        loss = bce_with_logits(logit, F.const(lab, list(lab.shape)))
        targets = [p for p in ps if not (mode == "sparse" and p.name in net.tables)]
        targets += [leaf for _, _, leaf in net.leaves]
        got_p, got_g = _GRAD.grad([loss], [F.const([1.0], [])], targets)
        by_name = {}
        for p, g in zip(got_p, got_g):
            by_name[p.name] = g.read().copy()  # `got_g` keeps the Var alive
        missing = [t.name for t in targets if t.name not in by_name]
        if missing:
            raise RuntimeError(f"{model.arch}: no gradient reached {missing}")
        grads = []
        for n, a in zip(names, params):
            if mode == "sparse" and n in net.tables:
                g = np.zeros_like(a)
                for table, ids, leaf in net.leaves:
                    if table == n:  # scatter-add: repeated ids accumulate, like one-hot^T @ grad
                        np.add.at(g, ids.reshape(-1), by_name[leaf.name].reshape(-1, a.shape[1]))
                grads.append(g)
            else:
                grads.append(by_name[n])
        return grads
    finally:
        net.mode, net.leaves, net.host_tables, net.host_ids = "gather", [], {}, {}


def train(model: Model, arrays: SampleArrays, *, epochs: int, batch_size: int = 32, lr: float,
          seed: int, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Mini-batch Adam on BCE. `on_batch(step)` runs after every step with the model updated
    (Algorithm 3's per-batch validation). Returns the final training log-loss."""
    check_arrays(model, arrays)
    rng = np.random.default_rng(seed)
    ps = model.net.parameters
    params = model.params()
    opt = Adam(params, float(lr))
    is_table = [p.name in model.net.tables for p in ps]
    n, steps, t0 = len(arrays), 0, time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            grads = batch_grads(model, arrays, order[s:s + batch_size], "sparse", params)
            opt.step(params, grads)
            # Dense params must be current in MNN for the next forward; tables are read from numpy.
            for p, a, tab in zip(ps, params, is_table):
                if not tab or on_batch is not None:
                    p.write(a)
            steps += 1
            if on_batch is not None:
                on_batch(steps)
    model.set_params(params)
    seconds = time.perf_counter() - t0
    probs = predict(model, arrays)
    return {"loss": logloss(arrays.label, probs), "steps": steps, "n": n, "epochs": epochs,
            "seconds": seconds}


def predict(model: Model, arrays: SampleArrays) -> np.ndarray:
    """P(label = 1) per sample, float32 [N], through the Gather lookup path."""
    check_arrays(model, arrays)
    model.net.mode = "gather"
    out = []
    for s in range(0, len(arrays), PRED_CHUNK):
        idx = np.arange(s, min(s + PRED_CHUNK, len(arrays)))
        prob = _F.sigmoid(model.net.forward(_inputs(model, arrays, idx)))
        out.append(prob.read().copy().reshape(-1))  # `prob` is alive while we copy
    return np.concatenate(out)


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum statistic with tied scores sharing their mean rank; None if one class."""
    y = np.asarray(labels) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    ranks = mean_rank[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    t = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def evaluate(model: Model, arrays: SampleArrays) -> dict[str, Any]:
    probs = predict(model, arrays)
    return {"auc": auc(arrays.label, probs), "logloss": logloss(arrays.label, probs), "n": len(arrays)}


def export_graph(model: Model) -> bytes:
    """A class-free inference graph: named placeholders in, `prob` out, Gather lookups."""
    # Export from a clone: F.save turns the Vars it reaches into Const, which would stop training.
    clone = build(model.arch, model.config)
    clone.set_params(model.params())
    clone.net.mode = "gather"
    L = model.config["hist_len"]
    phs = {}
    for name in model.input_names:
        if name in ("hist_items", "hist_cats"):
            ph = F.placeholder([-1, L], F.NCHW, F.int)
        elif name == "mask":
            ph = F.placeholder([-1, L], F.NCHW, F.float)
        elif name == "profile":
            ph = F.placeholder([-1, model.config["profile_dim"]], F.NCHW, F.float)
        else:
            ph = F.placeholder([-1], F.NCHW, F.int)
        ph.name = name
        phs[name] = ph
    prob = F.reshape(_F.sigmoid(clone.net.forward(phs)), [-1])
    prob.name = "prob"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.mnn")
        F.save([prob], path)
        with open(path, "rb") as f:
            return f.read()


class GraphModel:
    """Inference from an exported `.mnn` graph, without the Python model classes."""

    def __init__(self, data: bytes, input_names: tuple[str, ...] | list[str]):
        self.input_names = tuple(input_names)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.mnn")
            with open(path, "wb") as f:
                f.write(data)
            self.module = nn.load_module_from_file(path, list(self.input_names), ["prob"])

    def predict(self, arrays: SampleArrays) -> np.ndarray:
        out = []
        for s in range(0, len(arrays), PRED_CHUNK):
            idx = np.arange(s, min(s + PRED_CHUNK, len(arrays)))
            xs = []
            for name in self.input_names:
                arr = np.ascontiguousarray(getattr(arrays, name)[idx])
                xs.append(F.const(arr, list(arr.shape), F.NCHW, F.int if arr.dtype == np.int32 else F.float))
            res = self.module.forward(xs)
            out.append(res[0].read().copy().reshape(-1))  # `res` keeps the output Var alive
        return np.concatenate(out)
