"""Algorithm 3's gate, lines 2-10: validate M on local samples, optimise a copy mini-batch by
mini-batch, validate after every step and keep the best snapshot; the caller commits it only if it
beats M. The metric is the caller's choice (AUC when the validation set has both classes)."""
from coda import metrics, training


def choose_metric(val):
    return "auc" if len(set(int(v >= 0.5) for v in val.label.tolist())) == 2 else "logloss"


def train_gated(net, train, val, metric, epochs, lr, seed, batch_size=32):
    """Train `net` on `train`; leave it holding the best validated parameters. Returns
    {"improved", "before", "after", "best_step", "steps", "metric"}."""
    before = metrics.score(metric, val.label, training.predict(net, val))
    best = {"score": before, "params": None, "step": 0}

    def validate(step):
        s = metrics.score(metric, val.label, training.predict(net, val))
        if metrics.better(metric, s, best["score"]):
            best["score"], best["params"], best["step"] = s, net.params(), step

    res = training.train(net, train, epochs, lr, seed, batch_size, on_step=validate)
    if best["params"] is not None:
        net.set_params(best["params"])
    return {"improved": best["params"] is not None, "before": before, "after": best["score"],
            "best_step": best["step"], "steps": res["steps"], "metric": metric}
