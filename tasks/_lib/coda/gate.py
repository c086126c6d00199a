"""Algorithm 3's gate, lines 2-10: validate M on local samples, optimise a copy mini-batch by
mini-batch, validate after every step and keep the best snapshot; the caller commits it only if it
beats M. The metric is the caller's choice (AUC when the validation set has both classes).

Other gates, for validation sets of a handful of samples where picking the best of many steps
mostly picks noise: "end" compares only the fully trained update with M, "none" always keeps it.
`margin` asks the gate's metric to improve by more than that."""
from coda import metrics, training

GATES = ("step", "end", "none")
GATE_METRICS = ("auto", "auc", "logloss")


def choose_metric(val, wanted="auto"):
    """`wanted`, or with "auto" AUC when the validation labels hold both classes, else logloss. AUC
    asked for on one class falls back to logloss (it is undefined there)."""
    if wanted not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {list(GATE_METRICS)}, got {wanted!r}")
    both = len(set(int(v >= 0.5) for v in val.label.tolist())) == 2
    if wanted == "logloss" or not both:
        return "logloss"
    return "auc"


def beats(metric, new, old, margin):
    if not metrics.better(metric, new, old):
        return False
    if old is None or not margin:
        return True
    return (new - old if metrics.HIGHER_IS_BETTER[metric] else old - new) > margin


def train_gated(net, train, val, metric, epochs, lr, seed, batch_size=32, allowed=None, reg=0.0,
                mode="step", margin=0.0):
    """Train `net` on `train`; leave it holding the parameters to keep (the best validated ones for
    "step", the final ones for "end" and "none"), or M's when nothing passed. `allowed` and `reg` as
    in training.train. Returns {"improved", "before", "after", "best_step", "steps", "metric"}."""
    if mode not in GATES:
        raise ValueError(f"gate must be one of {list(GATES)}, got {mode!r}")
    start = net.params()
    before = metrics.score(metric, val.label, training.predict(net, val))
    best = {"score": before, "params": None, "step": 0}

    def validate(step):
        s = metrics.score(metric, val.label, training.predict(net, val))
        if beats(metric, s, best["score"], margin if best["params"] is None else 0.0):
            best["score"], best["params"], best["step"] = s, net.params(), step

    res = training.train(net, train, epochs, lr, seed, batch_size, validate if mode == "step" else None,
                         allowed, reg)
    if mode != "step":
        after = metrics.score(metric, val.label, training.predict(net, val))
        if mode == "none" or beats(metric, after, before, margin):
            best = {"score": after, "params": net.params(), "step": res["steps"]}
    net.set_params(best["params"] if best["params"] is not None else start)
    return {"improved": best["params"] is not None, "before": before, "after": best["score"],
            "best_step": best["step"], "steps": res["steps"], "metric": metric}


def own_items(samples):
    """The user's own items: the targets and histories of their local samples (the "history" scope)."""
    items = set()
    for s in samples:
        items.add(s.get("item_id") or 0)
        items.update(s.get("hist_items") or [])
    return sorted(items)


def train_update(net, train, val, cfg, history_items=()):
    """Algorithm 3 with the release's update settings (coda_train's config): the gate metric, what
    the update may change (update_scope), L2-SP toward the starting model (reg_to_start), lr,
    epochs, batch size, gate and margin."""
    metric = choose_metric(val, cfg["gate_metric"])
    allowed = training.scope(net, cfg["update_scope"], history_items)
    return train_gated(net, train, val, metric, cfg["epochs"], cfg["lr"], cfg["seed"], cfg["batch_size"],
                       allowed, cfg["reg_to_start"], cfg["gate"], cfg["gate_margin"])
