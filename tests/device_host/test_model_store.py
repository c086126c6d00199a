"""The on-device model store (M / M0 / Mbuf version control) and the host-API model ops,
including a kill -9 crash loop over commits."""
from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from walle.device_host.models import core
from walle.device_host.models.api import MAX_SAMPLES, make_model_ops
from walle.device_host.models.store import ModelStore
from walle.platform.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SMALL = {"n_items": 60, "n_cats": 6, "dim": 4, "hist_len": 10}


def params_equal(a: core.Model, b: core.Model | list) -> bool:
    pb = b if isinstance(b, list) else b.params()
    return all(np.array_equal(x, y) for x, y in zip(a.params(), pb))


def samples(n: int, rng: np.random.Generator, liked=(1, 2)) -> list[dict]:
    """Item i has category i % 5 + 1; liked-category targets are clicked with p=0.9, others 0.1."""
    out = []
    for _ in range(n):
        hist = [int(x) for x in rng.integers(1, 60, int(rng.integers(1, 12)))]
        it = int(rng.integers(1, 60))
        c = it % 5 + 1
        out.append({"hist_items": hist, "hist_cats": [h % 5 + 1 for h in hist], "item_id": it,
                    "item_cats": [c], "label": float(rng.random() < (0.9 if c in liked else 0.1))})
    return out


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


# ---- store ----------------------------------------------------------------------------------

def test_create_commit_rollback_keep_m0_untouched(store):
    info = store.create("ctr", "din", SMALL, seed=3)
    assert info["M"]["version"] == info["M0"]["version"] == 1 and not info["has_buffer"]
    m0_bytes = open(os.path.join(info["dir"], "M0.npz"), "rb").read()
    initial = store.load("ctr")
    assert initial.meta["slot"] == "M" and params_equal(initial, store.load("ctr", "M0"))

    upd = store.begin_update("ctr")
    assert store.info("ctr")["has_buffer"] and params_equal(store.load("ctr", "Mbuf"), initial)
    upd.set_params([p + 1.0 for p in upd.params()])
    meta = store.commit("ctr", upd, {"auc": 0.7})
    assert meta["version"] == 2 and meta["base_version"] == 1
    cur = store.load("ctr")
    assert params_equal(cur, upd) and cur.meta["metrics"] == {"auc": 0.7}
    info = store.info("ctr")
    assert not info["has_buffer"] and info["M"]["version"] == 2 and info["M0"]["version"] == 1

    back = store.rollback("ctr")
    assert back["version"] == 3 and back["restored_from"] == 1
    assert params_equal(store.load("ctr"), initial)
    assert open(os.path.join(info["dir"], "M0.npz"), "rb").read() == m0_bytes  # never modified


def test_stale_update_is_refused_and_discard_drops_the_buffer(store):
    store.create("ctr", "din", SMALL)
    a, b = store.begin_update("ctr"), store.begin_update("ctr")
    store.commit("ctr", a)
    b.set_params([p * 0 for p in b.params()])
    with pytest.raises(FailedPrecondition, match="changed to version 2"):
        store.commit("ctr", b)
    assert params_equal(store.load("ctr"), a)
    store.begin_update("ctr")
    store.discard("ctr")
    assert not store.info("ctr")["has_buffer"]
    with pytest.raises(NotFound):
        store.load("ctr", "Mbuf")


def test_inference_reads_m0_while_m_is_locked_or_damaged(store):
    store.create("ctr", "din", SMALL)
    upd = store.begin_update("ctr")
    upd.set_params([p + 0.5 for p in upd.params()])
    store.commit("ctr", upd)
    with store.write_lock("ctr"):
        assert store.is_locked("ctr")
        served = store.load("ctr")
        assert served.meta["slot"] == "M0" and served.meta["version"] == 1
    assert not store.is_locked("ctr") and store.load("ctr").meta["version"] == 2
    path = store.info("ctr")["dir"] + "/M.npz"
    with open(path, "r+b") as f:  # a torn M (what atomic rename prevents) still serves M0
        f.truncate(100)
    assert store.load("ctr").meta["slot"] == "M0"
    with pytest.raises(InvalidArgument, match="not a walle model file"):
        store.load("ctr", fallback=False)


def test_create_validates_and_accepts_a_parameter_file(store):
    with pytest.raises(InvalidArgument, match="model name"):
        store.create("../evil", "din")
    with pytest.raises(InvalidArgument, match="unknown model arch"):
        store.create("x", "lstm")
    with pytest.raises(InvalidArgument, match="config n_items"):
        store.create("x", "din", {"n_items": -1})
    with pytest.raises(NotFound):
        store.load("nothing")
    g = core.build("din", SMALL, seed=9)
    g.meta = {"source": "global", "metrics": {"val_auc": 0.7}}
    store.create("ctr", "din", None, g.to_npz_bytes())
    assert params_equal(store.load("ctr"), g) and store.info("ctr")["M"]["metrics"] == {"val_auc": 0.7}
    with pytest.raises(AlreadyExists):
        store.create("ctr", "din", SMALL)
    with pytest.raises(InvalidArgument, match="is a 'din' model"):
        store.create("clf", "classifier", None, g.to_npz_bytes())
    assert store.names() == ["ctr"]



def _child_commit_forever(root: str, base: list[np.ndarray]) -> None:
    store = ModelStore(root)
    while True:
        m = store.begin_update("ctr")
        c = m.meta["base_version"] + 1
        m.set_params([p + c for p in base])  # version c holds base + c
        store.commit("ctr", m, {"c": c})


@pytest.mark.slow
def test_kill_9_during_commits_never_loses_the_model(store):
    """SIGKILL a committing child at random moments; every time, M itself must load and hold
    exactly one committed version (never torn), and M0 must stay the original."""
    store.create("ctr", "din", SMALL, seed=1)
    base = store.load("ctr").params()
    rng = random.Random(0)
    versions_seen: set[int] = set()
    i = 0
    # At least 60 kills, and on until the children have committed 60 versions (a loaded machine
    # commits less per kill); the cap only stops a store that makes no progress at all.
    while i < 60 or (max(versions_seen) <= 60 and i < 400):
        i += 1
        pid = os.fork()  # the parent never raised MNN's thread count, so forking is safe
        if pid == 0:
            try:
                _child_commit_forever(store.root, base)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        m = store.load("ctr", fallback=False)
        v = m.meta["version"]
        expect = base if v == 1 else [p + v for p in base]
        assert params_equal(m, expect), f"iteration {i}: M version {v} is not what was committed"
        assert m.meta["version"] == 1 or m.meta["metrics"] == {"c": v}
        assert params_equal(store.load("ctr", "M0"), base)
        versions_seen.add(v)
    assert max(versions_seen) > 60 and len(versions_seen) >= 10  # the children really committed
    # Temp files of the killed writers are swept by the next commit.
    store.commit("ctr", store.begin_update("ctr"))
    leftovers = [f for f in os.listdir(store.info("ctr")["dir"]) if f.endswith(".tmp")]
    assert leftovers == []


# ---- host-API ops ---------------------------------------------------------------------------

def test_ops_train_predict_evaluate_info(store):
    ops = make_model_ops(store)
    assert set(ops) == {"model.create", "model.train", "model.predict", "model.evaluate",
                        "model.commit_if_better", "model.rollback", "model.info"}
    rng = np.random.default_rng(0)
    tr, te = samples(300, rng), samples(200, rng)
    info = ops["model.create"](name="ctr", arch="din", config=SMALL, seed=1)
    assert info["M"]["version"] == 1 and "dir" not in info
    before = ops["model.evaluate"](name="ctr", samples=te)
    res = ops["model.train"](name="ctr", samples=tr, epochs=3, lr=0.02, seed=0)
    assert res["version"] == 2 and res["steps"] == 30
    after = ops["model.evaluate"](name="ctr", samples=te)
    assert after["auc"] > before["auc"] + 0.2 and after["version"] == 2
    pred = ops["model.predict"](name="ctr", samples=te[:5])
    assert len(pred["probs"]) == 5 and pred["served_from"] == "M"
    assert ops["model.predict"](name="ctr", samples=te[:5], which="M0")["version"] == 1
    assert ops["model.rollback"](name="ctr") == {"version": 3, "restored_from": 1}
    assert ops["model.evaluate"](name="ctr", samples=te)["auc"] == before["auc"]
    assert ops["model.info"](name="ctr")["M"]["source"] == "rollback"
    # exist_ok returns the existing model unchanged
    assert ops["model.create"](name="ctr", arch="din", exist_ok=True)["M"]["version"] == 3


def test_commit_if_better_gate(store):
    ops = make_model_ops(store)
    rng = np.random.default_rng(1)
    tr, val = samples(400, rng), samples(150, rng)
    ops["model.create"](name="ctr", arch="din", config=SMALL, seed=2)
    good = ops["model.commit_if_better"](name="ctr", train_samples=tr, val_samples=val, epochs=2,
                                         lr=0.02, seed=0)
    assert good["committed"] and good["after"] > good["before"] + 0.2 and good["version"] == 2
    # An update on shuffled labels cannot beat a model that already learned the task.
    shuffled = [dict(s, label=float(lab)) for s, lab in
                zip(tr, np.random.default_rng(2).permutation([s["label"] for s in tr]))]
    kept = store.load("ctr").params()
    bad = ops["model.commit_if_better"](name="ctr", train_samples=shuffled, val_samples=val, epochs=2,
                                        lr=0.05, seed=0)
    assert not bad["committed"] and bad["after"] == bad["before"] == good["after"]
    assert bad["version"] == 2 and params_equal(store.load("ctr"), kept)
    assert not store.info("ctr")["has_buffer"]


def test_classifier_via_ops_with_label_override(store):
    ops = make_model_ops(store)
    rng = np.random.default_rng(2)
    local, outside = samples(150, rng, liked=(1, 2)), samples(150, rng, liked=(3, 4))
    for s in local:  # the local user's history is made of categories 1 and 2 only
        s["hist_items"] = [h for h in s["hist_items"] if h % 5 + 1 in (1, 2)] or [5]
        s["hist_cats"] = [h % 5 + 1 for h in s["hist_items"]]
    ops["model.create"](name="clf", arch="classifier", config=SMALL, seed=0)
    ops["model.train"](name="clf", samples=local[:100] + outside[:100], epochs=5, lr=0.02, seed=0,
                       labels=[1.0] * 100 + [0.0] * 100)
    p_local = ops["model.predict"](name="clf", samples=local[100:])["probs"]
    p_out = ops["model.predict"](name="clf", samples=outside[100:])["probs"]
    assert np.mean(p_local) > np.mean(p_out) + 0.3


@pytest.mark.parametrize("op, kwargs, needle", [
    ("model.train", {"name": "ctr", "samples": [], "epochs": 1}, "samples is empty"),
    ("model.train", {"name": "ctr", "samples": "x"}, "samples must be a list"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 1}] * (MAX_SAMPLES + 1)}, "at most 2000"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 1}], "epochs": 0}, "epochs must be"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 1}], "lr": -1}, "lr must be"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 1}], "lr": float("nan")}, "lr must be"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 999}]}, "item id 999 is out of range"),
    ("model.train", {"name": "ctr", "samples": [{"item_id": 1}], "labels": [1, 0]}, "labels has 2"),
    ("model.train", {"name": "ctr/../x", "samples": [{"item_id": 1}]}, "model name"),
    ("model.predict", {"name": "ctr", "samples": [{"item_id": 1}], "which": "Mbuf"}, "which must be"),
    ("model.commit_if_better", {"name": "ctr", "train_samples": [{"item_id": 1}],
                                "val_samples": [{"item_id": 1, "label": 1.0}]}, "both clicks"),
    ("model.commit_if_better", {"name": "ctr", "train_samples": [{"item_id": 1}],
                                "val_samples": [{"item_id": 1}], "metric": "acc"}, "metric must be"),
    ("model.create", {"name": "new", "arch": "din", "params_b64": "!!"}, "not valid base64"),
    ("model.create", {"name": "new", "arch": "rnn"}, "arch must be"),
])
def test_ops_reject_bad_arguments_and_leave_state_unchanged(store, op, kwargs, needle):
    ops = make_model_ops(store)
    ops["model.create"](name="ctr", arch="din", config=SMALL)
    before = store.info("ctr")
    with pytest.raises(InvalidArgument) as e:
        ops[op](**kwargs)
    assert needle in str(e.value)
    after = store.info("ctr")
    assert after["M"] == before["M"] and not after["has_buffer"] and store.names() == ["ctr"]


def test_ops_reject_unknown_kwargs_and_missing_models(store):
    ops = make_model_ops(store)
    with pytest.raises(TypeError):
        ops["model.info"](name="ctr", path="/etc/passwd")
    with pytest.raises(NotFound):
        ops["model.info"](name="ctr")
