"""Training, prediction and evaluation of a `nets.Net` on a `features.Batch`.

MNN computes the gradients (`optim.Grad`, a gradient engine only); the Adam update runs in numpy so
the sparse embedding gradients and the dense ones follow one rule, deterministically. A parameter
that gets no gradient is an error (the notes' detector for a broken graph), never a silent no-op.

A personal update may be limited to a scope (`scope`: which parameters, and which rows of the
embedding tables, may change; the rest stay bitwise equal) and regularised toward the parameters it
started from (L2-SP, `reg`: the loss gains reg * sum ||theta - theta_0||^2 over the scope)."""
import numpy as np

import MNN
from coda import metrics, nets

F = nets.F
PRED_CHUNK = 1024


class Adam:
    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = float(lr), b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads):
        self.t = self.t + 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            params[k] -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(np.float32)


def inputs(net, data, idx=None, skip=()):
    out = {}
    for name in net.input_names:
        if name not in skip:
            arr = data.get(name)
            out[name] = nets.const(arr if idx is None else arr[idx])
    return out


def batch_grads(net, engine, data, idx, params):
    """d(mean BCE)/d(param) on the rows `idx`, as {name: array} (the graph is built once per batch
    size, nets.GradGraph)."""
    graph = net.graph("grad", len(idx), lambda: nets.GradGraph(net, engine, data, idx, params))
    by_name, leaves = graph.run(data, idx, params)
    grads = {k: by_name[k] for k in net.names if k not in net.tables}
    for k in net.tables:
        if k in params:
            g = np.zeros_like(params[k])
            for table, ids, leaf in leaves:
                if table == k:  # scatter-add: repeated ids accumulate, like one-hot^T @ grad
                    np.add.at(g, ids.reshape(-1), by_name[leaf].reshape(-1, g.shape[1]))
            grads[k] = g
    return grads


SCOPES = ("all", "mlp", "last", "bias", "attention", "history")


def scope(net, spec, history_items=()):
    """What an update may change: {param name: None (all of it) | row ids of an embedding table}.

    `spec` is one of SCOPES or several joined by "+" (e.g. "last+history"):
      all        every parameter (the paper's update);
      mlp        the MLP on top of the attention (mlp_w*, mlp_b*);
      last       the MLP's output layer only;
      bias       the output bias only: a per-user calibration learned on the device;
      attention  the attention unit (att_*);
      history    the item embedding rows of `history_items` (the user's own items)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"update scope must be a non-empty string like 'all' or 'last+history', got {spec!r}")
    mlp = [k for k in net.names if k.startswith("mlp_")]
    if not mlp:
        raise ValueError(f"update scope needs a DIN-like net with mlp_* parameters, got {net.names}")
    last = max(int(k[5:]) for k in mlp)
    groups = {"all": {k: None for k in net.names}, "mlp": {k: None for k in mlp},
              "last": {f"mlp_w{last}": None, f"mlp_b{last}": None}, "bias": {f"mlp_b{last}": None},
              "attention": {k: None for k in net.names if k.startswith("att_")}}
    out = {}
    for part in spec.split("+"):
        if part == "history":
            if "item_emb" in out and out["item_emb"] is None:
                continue  # the whole table is in scope already
            rows = np.unique(np.asarray(list(history_items), dtype=np.int64))
            out["item_emb"] = rows[(rows > 0) & (rows < net.config["n_items"])]  # 0 is padding
        elif part in groups:
            out.update(groups[part])
        else:
            raise ValueError(f"unknown update scope {part!r} in {spec!r}; allowed {list(SCOPES)} joined by '+'")
    return out


def limit(grads, params, start, allowed, reg):
    """The gradients an update applies: L2-SP's 2*reg*(theta - theta_0) added, then restricted to
    `allowed` (parameters outside get none, rows outside a table's row set get zero)."""
    out = {}
    for k, rows in allowed.items():
        g = grads[k] + (2.0 * reg) * (params[k] - start[k]) if reg else grads[k]
        if rows is not None:
            kept = np.zeros_like(g)
            kept[rows] = g[rows]
            g = kept
        out[k] = g.astype(np.float32, copy=False)
    return out


def train(net, data, epochs, lr, seed, batch_size=32, on_step=None, allowed=None, reg=0.0):
    """Mini-batch Adam on BCE. `on_step(step)` runs after every step with the net updated (Algorithm
    3 validates after every mini-batch). `allowed` (see `scope`; None = everything) limits what
    changes; `reg` > 0 pulls the update toward the parameters it started from. Returns {"steps", "n"}."""
    net.check_ids(data)
    rng = np.random.default_rng(seed)
    params = net.params()
    if allowed is None:
        allowed = {k: None for k in net.names}
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    start = {k: params[k].copy() for k in allowed} if reg else None
    opt = Adam({k: params[k] for k in allowed}, lr)
    engine = MNN.optim.Grad()
    n, steps = data.n, 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            grads = batch_grads(net, engine, data, order[s:s + batch_size], params)
            opt.step(params, limit(grads, params, start, allowed, reg))
            # Dense params must be current in MNN for the next forward; tables are read from numpy.
            for k in net.names:
                if on_step is not None or k not in net.tables:
                    net.param(k).write(params[k])
            steps = steps + 1
            if on_step is not None:
                on_step(steps)
    net.set_params(params)
    return {"steps": steps, "n": n}


def predict(net, data):
    """P(label = 1) per sample, float32 [N], through the Gather lookups."""
    net.check_ids(data)
    out = []
    for s in range(0, data.n, PRED_CHUNK):
        idx = np.arange(s, min(s + PRED_CHUNK, data.n))
        out.append(net.graph("infer", len(idx), lambda: nets.InferGraph(net, data, idx)).run(data, idx))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(net, data):
    probs = predict(net, data)
    return {"auc": metrics.auc(data.label, probs), "logloss": metrics.logloss(data.label, probs), "n": data.n}
