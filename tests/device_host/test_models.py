"""The CoDA task library's models (tasks/_lib/coda), imported as the cloud imports them: gradients
reach every parameter, the sparse training lookups equal one-hot ones, the models learn, migration
keeps what fits. The same files run in the sandbox in tests/coda/test_coda_tasks.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from walle.platform.coda.tasklib import coda_module

din, classifier, features = coda_module("din"), coda_module("classifier"), coda_module("features")
training, metrics, nets, gate = coda_module("training"), coda_module("metrics"), coda_module("nets"), coda_module("gate")
VOCAB = {"n_items": 200, "n_cats": 11}


def synth(n, rng, liked_fixed=None):
    """Item i has category i % 10 + 1; a user likes 2 categories and clicks those targets (p 0.9)."""
    out = []
    for _ in range(n):
        liked = liked_fixed if liked_fixed is not None else rng.choice(np.arange(1, 11), 2, replace=False)
        hist = [int(c - 1 + 10 * rng.integers(1, 19)) for c in rng.choice(liked, int(rng.integers(1, 30)))]
        it = int(rng.integers(1, 200))
        c = it % 10 + 1
        out.append({"item_id": it, "item_cats": [c], "hist_items": hist, "hist_cats": [h % 10 + 1 for h in hist],
                    "label": float(rng.random() < (0.9 if c in liked else 0.1))})
    return out


def test_features_pad_truncate_and_reject_bad_samples():
    b = features.batch([{"item_id": 3, "item_cats": [2], "hist_items": [1, 2, 3], "hist_cats": [4, 5, 6], "label": 1.0}], 2)
    assert b.get("hist_items").tolist() == [[2, 3]] and b.get("mask").tolist() == [[1.0, 1.0]]
    assert b.get("item_cat").tolist() == [2] and b.n == 1
    for bad, needle in (({"hist_items": [1], "hist_cats": []}, "hist_cats"), ({"item_id": -1}, "item_id"),
                        ({"label": 2.0}, "label"), ({"hist_items": "12"}, "must be a list")):
        with pytest.raises(ValueError, match=needle):
            features.batch([bad], 5)


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(float)
    s = rng.integers(0, 5, 60).astype(float)
    pairs = [1.0 if sp > sn else 0.5 if sp == sn else 0.0 for sp, sn in itertools.product(s[y == 1], s[y == 0])]
    assert metrics.auc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert metrics.auc(np.ones(5), np.arange(5)) is None
    assert metrics.better("logloss", 0.3, 0.4) and not metrics.better("auc", 0.5, 0.5)


@pytest.mark.parametrize("make", [lambda: din.DIN(dict(VOCAB, profile_dim=2, hist_len=20), 1),
                                  lambda: classifier.Classifier(dict(VOCAB, hist_len=20), 1)])
def test_gradients_reach_every_parameter_and_sparse_equals_onehot(make):
    rng = np.random.default_rng(0)
    samples = synth(40, rng)
    for s in samples:
        s["profile"] = [float(rng.normal()), float(rng.normal())]
    net = make()
    data = features.batch(samples, 20, net.config.get("profile_dim", 0))
    idx = np.arange(40)
    # The notes' detector: MNN's Grad returns exactly the parameters that got a gradient.
    net.mode = "onehot"
    loss = nets.bce_with_logits(net.forward(training.inputs(net, data, idx)),
                                nets.F.const(data.label.reshape(-1, 1).copy(), [40, 1]))
    ps, gs = nets.MNN.optim.Grad().grad([loss], [nets.F.const([1.0], [])], [net.param(k) for k in net.names])
    onehot = {p.name: g.read().copy() for p, g in zip(ps, gs)}
    assert sorted(onehot) == sorted(net.names)
    net.mode = "gather"
    sparse = training.batch_grads(net, nets.MNN.optim.Grad(), data, idx, net.params())
    for k in net.names:
        assert np.abs(onehot[k]).max() > 0, f"{k} got a zero gradient"
        np.testing.assert_allclose(sparse[k], onehot[k], atol=1e-6, err_msg=k)


def test_din_learns_and_the_gate_keeps_only_improvements():
    rng = np.random.default_rng(1)
    train, test = (features.batch(synth(n, rng), 50) for n in (3000, 800))
    net = din.DIN(VOCAB, 2)
    before = training.evaluate(net, test)["auc"]
    res = gate.train_gated(net, train, test, "auc", 2, 0.005, 0)
    after = training.evaluate(net, test)["auc"]
    assert res["improved"] and res["steps"] == 188 and after == pytest.approx(res["after"])
    assert after > 0.6 and after > before + 0.1
    again = gate.train_gated(net, train.take(np.arange(32)), test, "auc", 1, 0.0, 0)  # lr 0: nothing can improve
    assert not again["improved"] and training.evaluate(net, test)["auc"] == pytest.approx(after)


def test_classifier_separates_local_from_outside_sequences():
    rng = np.random.default_rng(3)
    local, outside = synth(300, rng, liked_fixed=np.array([3, 7])), synth(600, rng)
    data = features.batch(local + outside, 50).with_labels([1.0] * 300 + [0.0] * 600)
    perm = rng.permutation(900)
    net = classifier.Classifier(VOCAB, 0)
    training.train(net, data.take(perm[:600]), 4, 0.01, 0)
    test = data.take(perm[600:])
    p = training.predict(net, test)
    assert metrics.auc(test.label, p) > 0.9 and p[test.label == 1].mean() > p[test.label == 0].mean() + 0.3


def test_empty_history_scores_finite_and_out_of_vocabulary_ids_are_refused():
    net = din.DIN(VOCAB, 0)
    assert np.isfinite(training.predict(net, features.batch([{"item_id": 5, "item_cats": [2]}], 50))).all()
    with pytest.raises(ValueError, match="vocabulary"):
        training.predict(net, features.batch([{"item_id": 500}], 50))


def test_sizes_come_from_the_caller_and_migration_keeps_what_fits():
    with pytest.raises(ValueError, match="n_items"):
        din.DIN({"n_cats": 5})  # no vocabulary default: it comes from the catalogue
    with pytest.raises(ValueError, match="unknown din config"):
        din.DIN(dict(VOCAB, width=3))
    v1 = din.DIN(VOCAB, 1)
    v2 = din.DIN(dict(VOCAB, mlp=[64, 16, 8]), 2)
    fresh = v2.adopt(v1.params())
    assert fresh == ["mlp_w0", "mlp_b0", "mlp_w1", "mlp_w2", "mlp_b2", "mlp_w3", "mlp_b3"]  # mlp_b1 still fits
    np.testing.assert_array_equal(v2.params()["item_emb"], v1.params()["item_emb"])
    same = din.DIN(VOCAB, 3)
    assert same.adopt(v1.params()) == []
    data = features.batch(synth(20, np.random.default_rng(0)), 50)
    np.testing.assert_array_equal(training.predict(same, data), training.predict(v1, data))


def test_a_commit_sends_only_the_rows_training_touched():
    """nets.delta: after training on a few samples, only their items' and categories' embedding rows
    differ from the stored model; the store's delta commit rebuilds exactly the trained parameters."""
    from walle.device_host.models.store import apply_delta
    rng = np.random.default_rng(4)
    samples = synth(40, rng)
    net = din.DIN(dict(VOCAB, hist_len=20), 1)
    base = net.params()
    training.train(net, features.batch(samples, 20), 1, 0.05, 0)
    params = net.params()
    changed, rows = nets.delta(params, base)
    used = sorted({s["item_id"] for s in samples} | {i for s in samples for i in s["hist_items"][-20:]})
    assert rows["item_emb"].tolist() == used and changed["item_emb"].shape == (len(used), 8)
    assert set(changed) == set(params)  # every dense parameter moved too
    rebuilt = apply_delta(base, changed, rows)
    assert all(np.array_equal(rebuilt[k], params[k]) for k in params)
    assert nets.delta({**params, "extra": np.zeros(1, np.float32)}, base) is None  # a migration: in full
    same_changed, same_rows = nets.delta(params, params)  # nothing trained: nothing to send
    assert same_changed == {"item_emb": same_changed["item_emb"], "cat_emb": same_changed["cat_emb"]}
    assert [len(v) for v in same_rows.values()] == [0, 0] and same_changed["item_emb"].shape == (0, 8)
