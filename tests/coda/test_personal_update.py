"""The personal update's knobs (coda_train's update_scope, reg_to_start, gate, gate_metric,
gate_margin, min_val) really change what MNN trains: parameters outside the scope stay bitwise
equal, the regularised update stays closer to where it started, and the gates keep what they say."""
from __future__ import annotations

import numpy as np
import pytest

from walle.platform.coda.tasklib import coda_module

din, features, training, gate = (coda_module(m) for m in ("din", "features", "training", "gate"))
VOCAB = {"n_items": 200, "n_cats": 11}


def synth(n, rng):
    """Item i has category i % 10 + 1; users like categories 3 and 7 and click those targets (p 0.9)."""
    out = []
    for _ in range(n):
        hist = [int(c - 1 + 10 * rng.integers(1, 19)) for c in rng.choice([3, 7], int(rng.integers(1, 30)))]
        it = int(rng.integers(1, 200))
        c = it % 10 + 1
        out.append({"item_id": it, "item_cats": [c], "hist_items": hist, "hist_cats": [h % 10 + 1 for h in hist],
                    "label": float(rng.random() < (0.9 if c in (3, 7) else 0.1))})
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    samples = synth(400, rng)
    return samples, features.batch(samples, 20)


def net():
    return din.DIN(dict(VOCAB, hist_len=20), 3)


def changed(before, after):
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("spec, expected", [
    ("all", {"item_emb", "cat_emb", "att_w1", "att_b1", "att_w2", "att_b2", "mlp_w0", "mlp_b0", "mlp_w1",
             "mlp_b1", "mlp_w2", "mlp_b2"}),
    ("mlp", {"mlp_w0", "mlp_b0", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"}),
    ("last", {"mlp_w2", "mlp_b2"}),
    ("bias", {"mlp_b2"}),
    ("attention", {"att_w1", "att_b1", "att_w2", "att_b2"}),
    ("last+history", {"mlp_w2", "mlp_b2", "item_emb"}),
])
def test_only_the_scope_changes_and_the_rest_stays_bitwise_equal(data, spec, expected):
    samples, batch = data
    m = net()
    before = m.params()
    own = gate.own_items(samples[:30])
    training.train(m, batch, 1, 0.01, 0, allowed=training.scope(m, spec, own))
    after = m.params()
    assert changed(before, after) == expected
    # The MNN side holds the same values as the returned copies (what predict and commit use).
    assert all(np.array_equal(m.param(k).read().copy(), after[k]) for k in m.names)


def test_history_scope_changes_only_the_users_own_item_rows(data):
    samples, batch = data
    m = net()
    before = m.params()["item_emb"]
    own = gate.own_items(samples[:30])
    training.train(m, batch, 1, 0.01, 0, allowed=training.scope(m, "history", own))
    after = m.params()["item_emb"]
    moved = set(np.flatnonzero(np.any(before != after, axis=1)).tolist())
    assert moved and moved <= set(own) - {0}
    others = np.setdiff1d(np.arange(VOCAB["n_items"]), own)
    assert np.array_equal(before[others], after[others])


def test_unknown_scope_is_refused_by_name():
    with pytest.raises(ValueError, match="'head'"):
        training.scope(net(), "last+head")


def test_l2_sp_keeps_the_update_closer_to_the_start_and_still_learns(data):
    _samples, batch = data
    dist = {}
    for reg in (0.0, 0.5, 50.0):
        m = net()
        start = m.params()
        training.train(m, batch, 2, 0.01, 0, reg=reg)
        end = m.params()
        dist[reg] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in m.names)
    assert dist[0.0] > dist[0.5] > dist[50.0] > 0
    with pytest.raises(ValueError, match="reg"):
        training.train(net(), batch, 1, 0.01, 0, reg=-1.0)


def test_gates_end_none_and_margin(data):
    _samples, batch = data
    train, val = batch.take(np.arange(300)), batch.take(np.arange(300, 400))
    for mode in ("step", "end"):
        m = net()
        start = m.params()
        res = gate.train_gated(m, train, val, "auc", 1, 0.01, 0, mode=mode)
        assert res["improved"] and res["after"] > res["before"]
        assert changed(start, m.params())
        m = net()
        res = gate.train_gated(m, train, val, "auc", 1, 0.01, 0, mode=mode, margin=0.99)  # cannot gain 0.99
        assert not res["improved"] and not changed(start, m.params()) and res["after"] == res["before"]
    m = net()
    start = m.params()
    flipped = train.with_labels(1.0 - train.label)  # trains only worse: "none" commits it anyway
    res = gate.train_gated(m, flipped, val, "auc", 1, 0.05, 0, mode="none")
    assert res["improved"] and res["after"] < res["before"] and res["best_step"] == res["steps"]
    res = gate.train_gated(net(), flipped, val, "auc", 1, 0.05, 0, mode="end")
    assert not res["improved"]
    with pytest.raises(ValueError, match="gate"):
        gate.train_gated(net(), train, val, "auc", 1, 0.01, 0, mode="sometimes")


def test_gate_metric_choice(data):
    _samples, batch = data
    one_class = batch.take(np.flatnonzero(batch.label == 1)[:10])
    assert gate.choose_metric(batch) == "auc" and gate.choose_metric(batch, "logloss") == "logloss"
    assert gate.choose_metric(one_class, "auc") == "logloss"  # AUC is undefined on one class
    with pytest.raises(ValueError, match="gate metric"):
        gate.choose_metric(batch, "accuracy")
