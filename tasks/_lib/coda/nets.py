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


def masked_softmax(score, mask):
    """Softmax over axis 1 of `score` [B, L] where mask is 1, 0 elsewhere (and an all-zero row for an
    empty history). Built from raw ops: its backward costs about a third of F.softmax's. The max only
    shifts the exponent (softmax ignores a shift, so no gradient flows through it)."""
    z = score + (mask - 1.0) * 1e9
    e = raw.exp(z - raw.reduce_max(z, [1], True)) * mask
    return e / F.maximum(raw.reduce_sum(e, [1], True), F.scalar(1e-30))


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


class Flat:
    """Several Vars read with ONE graph execution: each `read()` runs its own subgraph, so reading a
    backward pass's gradients one by one re-runs the shared parts (2-3x slower per step)."""

    def __init__(self, variables):
        self.variables = list(variables)  # keeps the graph alive
        self.shapes = [list(v.shape) for v in self.variables]
        self.var = F.concat([F.reshape(v, [-1]) for v in self.variables], 0)

    def read(self):
        data = self.var.read().copy()  # `self.var` is alive while we copy
        out, at = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape)) if shape else 1
            out.append(data[at:at + n].reshape(shape))
            at = at + n
        return out


def read_all(variables):
    return Flat(variables).read()


def columns(net, data, idx, names):
    return {k: np.ascontiguousarray(data.get(k)[idx]) for k in names}


class GradGraph:
    """d(mean BCE)/d(dense parameters and gathered embedding rows) for batches of one size, built
    once and re-run per step: writing a Var (an input, a parameter, a leaf) makes what depends on it
    run again, so a step only writes values and reads (building the graph was half of a step).

    The embedding rows of a batch are trainable leaves (the sparse recipe of the notes); `run`
    returns their gradients with the ids they belong to, for the caller to scatter-add."""

    def __init__(self, net, engine, data, idx, params):
        net.mode, net.leaves = "sparse", []
        net.host_tables = {k: params[k] for k in net.tables if k in params}
        net.host_ids = columns(net, data, idx, [k for k in net.input_names if k not in ("mask", "profile")])
        try:
            self.inputs = {k: const(v) for k, v in columns(net, data, idx, [
                k for k in net.input_names if k not in net.host_ids]).items()}
            logit = net.forward(self.inputs)
            self.label = const(np.ascontiguousarray(data.label[idx].reshape(-1, 1)))
            loss = bce_with_logits(logit, self.label)
            self.leaves = list(net.leaves)  # (table, ids column, leaf Var)
            targets = [net.param(k) for k in net.names if k not in net.tables]
            targets = targets + [leaf for table, key, leaf in self.leaves]
            got_p, got_g = engine.grad([loss], [F.const([1.0], [])], targets)
            self.names = [p.name for p in got_p]
            missing = [t.name for t in targets if t.name not in self.names]
            if missing:
                raise RuntimeError(f"no gradient reached {missing}: the graph is broken")
            self.flat = Flat(got_g)
        finally:
            net.mode, net.leaves, net.host_tables, net.host_ids = "gather", [], {}, {}

    def run(self, data, idx, params):
        """({name: gradient}, [(table, ids, leaf name)]) on the rows `idx` with `params`' tables."""
        for k, v in columns(None, data, idx, list(self.inputs)).items():
            self.inputs[k].write(v)
        self.label.write(np.ascontiguousarray(data.label[idx].reshape(-1, 1)))
        used = []
        for table, key, leaf in self.leaves:
            ids = data.get(key)[idx]
            leaf.write(np.ascontiguousarray(params[table][ids]))
            used.append((table, ids, leaf.name))
        return dict(zip(self.names, self.flat.read())), used


class InferGraph:
    """P(label = 1) through the Gather lookups for batches of one size, built once (see GradGraph);
    the net's parameters are read where they are, so a trained net is scored as it is now."""

    def __init__(self, net, data, idx):
        net.mode = "gather"
        self.inputs = {k: const(v) for k, v in columns(net, data, idx, net.input_names).items()}
        self.prob = raw.sigmoid(net.forward(self.inputs))

    def run(self, data, idx):
        for k, v in columns(None, data, idx, list(self.inputs)).items():
            self.inputs[k].write(v)
        return self.prob.read().copy().reshape(-1)  # `self.prob` is alive while we copy


def delta(params, base, tables=("item_emb", "cat_emb")):
    """What a commit must send when `params` grew out of `base` (the stored model's parameters, same
    architecture): the arrays that changed, and of the embedding `tables` only the changed rows.
    Returns (changed {name: array}, rows {table: row numbers}), or None when the names or shapes
    differ (a migrated model commits in full)."""
    if sorted(params) != sorted(base):
        return None
    changed, rows = {}, {}
    for name in params:
        a, b = params[name], np.asarray(base[name])
        if list(a.shape) != list(b.shape):
            return None
        if name in tables and a.ndim == 2:
            ids = np.flatnonzero(np.any(a != b, axis=1)).astype(np.int32)
            changed[name], rows[name] = a[ids], ids
        elif not np.array_equal(a, b):
            changed[name] = a
    return changed, rows


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


MAX_GRAPHS = 6  # cached graphs per net (each holds its intermediate buffers)


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
        self.graphs = {}  # ("grad" | "infer", batch size) -> GradGraph | InferGraph

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
            self.leaves.append((table, ids_key, leaf))
            return leaf
        if self.mode == "onehot":
            return raw.matmul(F.one_hot(x[ids_key], vocab), self.param(table), False, False)
        return raw.gather(self.param(table), x[ids_key])

    def graph(self, kind, n, build):
        """The cached graph of `kind` for batches of n rows (`build()` makes it the first time)."""
        key = (kind, n)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:  # scoring pages of many sizes: keep the newest few
                del self.graphs[next(iter(self.graphs))]
            self.graphs[key] = build()
        return self.graphs[key]

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
