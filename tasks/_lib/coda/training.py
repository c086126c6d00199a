"""Training, prediction and evaluation of a `nets.Net` on a `features.Batch`.

MNN computes the gradients (`optim.Grad`, a gradient engine only); the Adam update runs in numpy so
the sparse embedding gradients and the dense ones follow one rule, deterministically. A parameter
that gets no gradient is an error (the notes' detector for a broken graph), never a silent no-op."""
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
    """d(mean BCE)/d(param) on the rows `idx`, as {name: array}."""
    net.mode, net.leaves = "sparse", []
    net.host_tables = {k: params[k] for k in net.tables if k in params}
    net.host_ids = {k: data.get(k)[idx] for k in net.input_names if k not in ("mask", "profile")}
    try:
        logit = net.forward(inputs(net, data, idx, tuple(net.host_ids)))
        lab = np.ascontiguousarray(data.label[idx].reshape(-1, 1))
        loss = nets.bce_with_logits(logit, F.const(lab, list(lab.shape)))
        targets = [net.param(k) for k in net.names if k not in net.tables]
        targets = targets + [leaf for table, ids, leaf in net.leaves]
        got_p, got_g = engine.grad([loss], [F.const([1.0], [])], targets)
        by_name = dict(zip([p.name for p in got_p], nets.read_all(got_g)))
        missing = [t.name for t in targets if t.name not in by_name]
        if missing:
            raise RuntimeError(f"no gradient reached {missing}: the graph is broken")
        grads = {k: by_name[k] for k in net.names if k not in net.tables}
        for k in net.tables:
            if k in params:
                g = np.zeros_like(params[k])
                for table, ids, leaf in net.leaves:
                    if table == k:  # scatter-add: repeated ids accumulate, like one-hot^T @ grad
                        np.add.at(g, ids.reshape(-1), by_name[leaf.name].reshape(-1, g.shape[1]))
                grads[k] = g
        return grads
    finally:
        net.mode, net.leaves, net.host_tables, net.host_ids = "gather", [], {}, {}


def train(net, data, epochs, lr, seed, batch_size=32, on_step=None):
    """Mini-batch Adam on BCE. `on_step(step)` runs after every step with the net updated (Algorithm
    3 validates after every mini-batch). Returns {"steps", "n"}."""
    net.check_ids(data)
    rng = np.random.default_rng(seed)
    params = net.params()
    opt = Adam(params, lr)
    engine = MNN.optim.Grad()
    n, steps = data.n, 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            opt.step(params, batch_grads(net, engine, data, order[s:s + batch_size], params))
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
    net.mode = "gather"
    out = []
    for s in range(0, data.n, PRED_CHUNK):
        idx = np.arange(s, min(s + PRED_CHUNK, data.n))
        prob = nets.raw.sigmoid(net.forward(inputs(net, data, idx)))
        out.append(prob.read().copy().reshape(-1))  # `prob` is alive while we copy
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(net, data):
    probs = predict(net, data)
    return {"auc": metrics.auc(data.label, probs), "logloss": metrics.logloss(data.label, probs), "n": data.n}
