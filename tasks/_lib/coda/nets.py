"""MNN building blocks for the CoDA models, following the measured MNN 3.6.1 traps
(shared/reference/mnn-notes.md): lazy mode or nothing trains; the raw ops `F._F` because the `F.*`
wrappers insert a Cast that has no gradient; numpy initialisation because MNN's own RNG cannot be
seeded; and a kept reference to a Var before `read().copy()`.

A `Net` holds its parameters as named trainable Vars created from numpy. Embedding rows are looked
up three ways: "gather" (fast, no gradient: inference), or "sparse" for training: the rows of the
batch are gathered in numpy into fresh trainable leaves and their gradients are scattered back into
the tables (the notes' large-vocabulary recipe; one-hot lookups cost grows with the vocabulary)."""
import math

import MNN
import numpy as np

F = MNN.expr
nn = MNN.nn
raw = F._F
F.lazy_eval(True)  # eager mode builds no graph, so nothing would train


def bce_with_logits(z, t):
    """Stable mean binary cross-entropy on logits, built only from ops that have gradients."""
    return raw.reduce_mean(F.relu(z) - z * t + raw.log1p(raw.exp(-F.abs(z))), [], False)


def dense(x, w, b):
    return raw.matmul(x, w, False, False) + b


def glorot(rng, n_in, n_out):
    lim = math.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-lim, lim, (n_in, n_out)).astype(np.float32)


def embedding(rng, vocab, dim):
    e = rng.normal(0.0, 0.05, (vocab, dim)).astype(np.float32)
    e[0] = 0.0  # id 0 is padding
    return e


def zeros(n):
    return np.zeros((1, n), np.float32)


def const(arr):
    arr = np.ascontiguousarray(arr)
    dtype = F.int if arr.dtype == np.int32 else F.float
    return F.const(arr, list(arr.shape), F.NCHW, dtype)


def read_all(variables):
    """The values of several Vars from ONE graph execution: each `read()` runs its own subgraph, so
    reading a backward pass's gradients one by one re-runs the shared parts (2-3x slower per step)."""
    shapes = [list(v.shape) for v in variables]
    flat = F.concat([F.reshape(v, [-1]) for v in variables], 0)
    data = flat.read().copy()  # `flat` is alive while we copy
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape)) if shape else 1
        out.append(data[at:at + n].reshape(shape))
        at = at + n
    return out


def check_int(cfg, key, lo, hi):
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"model config {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


SIZE_RANGES = {"n_items": (2, 100000), "n_cats": (2, 10000), "dim": (1, 64), "hist_len": (1, 512)}


def model_config(defaults, given, name, ranges):
    """`defaults` overridden by `given` (unknown keys refused by name), each integer size checked.
    The vocabularies (n_items, n_cats) have no default: they come from the cloud's catalogue."""
    defaults = dict(defaults, n_items=None, n_cats=None)
    given = given or {}
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
        raise ValueError(f"unknown {name} config keys {unknown}; allowed {sorted(defaults)}")
    cfg = dict(defaults)
    cfg.update(given)
    for key, (lo, hi) in dict(SIZE_RANGES, **ranges).items():
        check_int(cfg, key, lo, hi)
    return cfg


class Net(nn.Module):
    """Named float32 parameters (in creation order) plus the lookup modes described above."""

    tables = ("item_emb", "cat_emb")
    input_names = ()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.names = []
        self.mode = "gather"
        self.leaves = []  # (table, ids, leaf Var) of the current sparse batch
        self.host_tables = {}
        self.host_ids = {}

    def add_param(self, name, value):
        v = F.const(np.ascontiguousarray(value, dtype=np.float32), list(value.shape))
        v.fix_as_trainable()
        v.name = name
        setattr(self, name, v)  # nn.Module registers Vars assigned as attributes
        self.names.append(name)

    def param(self, name):
        return getattr(self, name)

    def lookup(self, table, ids_key, x, vocab):
        if self.mode == "sparse":
            ids = self.host_ids[ids_key]
            rows = np.ascontiguousarray(self.host_tables[table][ids])
            leaf = F.const(rows, list(rows.shape))
            leaf.fix_as_trainable()
            leaf.name = "leaf" + str(len(self.leaves))
            self.leaves.append((table, ids, leaf))
            return leaf
        if self.mode == "onehot":
            return raw.matmul(F.one_hot(x[ids_key], vocab), self.param(table), False, False)
        return raw.gather(self.param(table), x[ids_key])

    def params(self):
        """{name: float32 array}, copies (the Var stays referenced by the net while copying)."""
        out = {}
        for name in self.names:
            out[name] = self.param(name).read().copy()
        return out

    def shapes(self):
        return {name: list(self.param(name).shape) for name in self.names}

    def set_params(self, arrays):
        for name in self.names:
            if name not in arrays:
                raise ValueError(f"parameter {name!r} is missing")
            a = np.asarray(arrays[name], dtype=np.float32)
            if list(a.shape) != list(self.param(name).shape):
                raise ValueError(f"parameter {name!r} has shape {list(a.shape)}, the model needs "
                                 f"{list(self.param(name).shape)}")
        for name in self.names:
            self.param(name).write(np.ascontiguousarray(arrays[name], dtype=np.float32))

    def adopt(self, arrays):
        """Migration: take every parameter whose name and shape match, keep the fresh init for the
        rest. Returns the names kept fresh (empty = a full load)."""
        fresh = []
        for name in self.names:
            a = arrays.get(name)
            if a is not None and list(np.shape(a)) == list(self.param(name).shape):
                self.param(name).write(np.ascontiguousarray(a, dtype=np.float32))
            else:
                fresh.append(name)
        return fresh

    def check_ids(self, batch):
        """Gather with an out-of-range id reads wild memory: refuse such inputs."""
        cfg = self.config
        for field, vocab in (("hist_items", cfg["n_items"]), ("hist_cats", cfg["n_cats"]),
                             ("item", cfg["n_items"]), ("item_cat", cfg["n_cats"])):
            if field in self.input_names:
                a = batch.get(field)
                if a.size and (int(a.max()) >= vocab or int(a.min()) < 0):
                    raise ValueError(f"{field} id {int(a.max())} is outside the model's vocabulary 0..{vocab - 1}")
        if batch.hist_len != cfg["hist_len"]:
            raise ValueError(f"history length {batch.hist_len} != model hist_len {cfg['hist_len']}")

    def forward(self, x):  # logits [B, 1]
        raise NotImplementedError
