"""The generic model store (paper 4.4.1, Figure 6) and its host-API ops: parameter blobs plus
metadata, M / M0 / Mbuf, the write lock, rollback, quotas, scopes, and crash safety under kill -9."""
from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import pytest

from walle.device_host.models import blob
from walle.device_host.models.ops import make_model_ops
from walle.device_host.models.store import ModelStore, ModelStores
from walle.platform.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


def params(v: float = 0.0, width: int = 4) -> dict:
    return {"w": np.full((3, width), v, np.float32), "b": np.arange(width, dtype=np.float32) + v}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_create_update_commit_rollback_keep_m0(store):
    info = store.create("ctr", params(1), {"arch": "din", "config": {"x": 1}})
    assert info["version"] == 1 and info["meta"] == {"arch": "din", "config": {"x": 1}}
    assert info["shapes"] == {"w": [3, 4], "b": [4]}
    path = lambda slot: os.path.join(store.root, "ctr", f"{slot}.blob")  # noqa: E731
    assert os.stat(path("M")).st_ino == os.stat(path("M0")).st_ino  # written once, M0 a second name of it
    with pytest.raises(AlreadyExists):
        store.create("ctr", params(2))
    got = store.begin_update("ctr")
    assert got["version"] == 1 and same(got["params"], params(1)) and store.info("ctr")["has_buffer"]
    rec = store.commit("ctr", params(2, width=6), {"arch": "din", "n": 5}, got["version"])  # shapes may change
    assert rec["version"] == 2 and rec["base_version"] == 1 and not store.info("ctr")["has_buffer"]
    now = store.load("ctr")
    assert now["served_from"] == "M" and same(now["params"], params(2, width=6)) and now["meta"]["n"] == 5
    assert same(store.load("ctr", "M0")["params"], params(1))
    assert os.stat(path("M")).st_ino != os.stat(path("M0")).st_ino  # a commit renames a new M in
    back = store.rollback("ctr")
    assert back["version"] == 3 and back["restored_from"] == 1
    assert same(store.load("ctr")["params"], params(1)) and store.load("ctr")["meta"]["config"] == {"x": 1}


def test_stale_or_missing_update_is_refused_and_discard_drops_the_buffer(store):
    store.create("m", params())
    a = store.begin_update("m")
    b = store.begin_update("m")
    store.commit("m", params(5), None, b["version"])
    with pytest.raises(FailedPrecondition, match="changed to version 2"):
        store.commit("m", params(6), None, a["version"])
    with pytest.raises(FailedPrecondition, match="begin_update"):
        store.commit("m", params(6), None, 2)
    store.begin_update("m")
    assert store.discard("m") == 2 and not store.info("m")["has_buffer"]
    assert same(store.load("m")["params"], params(5))


def test_inference_reads_m0_while_m_is_locked_or_damaged(store):
    store.create("m", params(1))
    store.commit("m", params(2), None, store.begin_update("m")["version"])
    with store.write_lock("m"):
        got = store.load("m")
        assert got["served_from"] == "M0" and same(got["params"], params(1))
    with open(os.path.join(store.root, "m", "M.blob"), "wb") as f:
        f.write(b"torn")
    assert store.load("m")["served_from"] == "M0"


def test_quota_and_bad_input_change_nothing(tmp_path):
    store = ModelStore(tmp_path, quota_bytes=4000)
    store.create("small", params())
    with pytest.raises(ResourceExhausted, match="quota"):
        store.create("big", {"w": np.zeros((30, 30), np.float32)})
    assert store.names() == ["small"]
    for bad, needle in (({"w": np.array(["x"])}, "numeric"), ({"../w": np.zeros(2)}, "parameter name"),
                        ({"w": np.array([np.nan], np.float32)}, "NaN"), ({}, "non-empty")):
        with pytest.raises(InvalidArgument, match=needle):
            store.commit("small", bad, None, store.begin_update("small")["version"])
    assert store.info("small")["version"] == 1
    with pytest.raises(InvalidArgument, match="model name"):
        store.create("../etc", params())


def test_scopes_are_isolated(tmp_path):
    stores = ModelStores(tmp_path)
    stores.scope("coda").create("ctr", params(1))
    other = make_model_ops(stores.scope("hello"))
    with pytest.raises(NotFound):
        other["model.load"](name="ctr")
    with pytest.raises(InvalidArgument):
        stores.scope("../coda")


def test_delta_commit_changes_only_what_it_names(store):
    base = {"w": np.arange(20, dtype=np.float32).reshape(5, 4), "b": np.zeros(4, np.float32),
            "c": np.ones(2, np.float32)}
    store.create("m", base, {"arch": "x"})
    got = store.begin_update("m")
    rows = np.array([3, 1], np.int32)
    rec = store.commit("m", {"w": np.full((2, 4), -1.0, np.float32), "b": np.ones(4, np.float32)}, {"arch": "y"},
                       got["version"], rows={"w": rows})
    now = store.load("m")
    want = base["w"].copy()
    want[[3, 1]] = -1.0
    assert rec["version"] == 2 and now["meta"] == {"arch": "y"}
    assert same(now["params"], {"w": want, "b": np.ones(4, np.float32), "c": base["c"]})
    assert same(store.load("m", "M0")["params"], base) and not store.info("m")["has_buffer"]
    got = store.begin_update("m")  # an empty delta: a metadata-only commit
    assert store.commit("m", {}, {"arch": "z"}, got["version"], rows={})["version"] == 3
    assert same(store.load("m")["params"], now["params"]) and store.load("m")["meta"] == {"arch": "z"}


@pytest.mark.parametrize("changed, rows, words", [
    ({"v": np.zeros(4, np.float32)}, {}, "not a parameter"),
    ({}, {"w": [1]}, "without their values"),
    ({"b": np.zeros(5, np.float32)}, {}, "shape"),
    ({"b": np.zeros(4, np.float64)}, {}, "float32"),
    ({"b": np.array([0, 1, np.nan, 0], np.float32)}, {}, "NaN"),
    ({"w": np.zeros((2, 4), np.float32)}, {"w": [1, 1]}, "distinct"),
    ({"w": np.zeros((1, 4), np.float32)}, {"w": [3]}, "distinct row numbers in [0, 3)"),
    ({"w": np.zeros((1, 4), np.float32)}, {"w": [0.5]}, "list of row numbers"),
    ({"w": np.zeros((2, 3), np.float32)}, {"w": [0, 1]}, "shape"),
    ({"w": np.zeros((1, 4), np.float32)}, "w", "objects"),
])
def test_bad_delta_commits_change_nothing(store, changed, rows, words):
    store.create("m", params(1))
    got = store.begin_update("m")
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        store.commit("m", changed, None, got["version"], rows=rows)
    assert store.info("m")["version"] == 1 and same(store.load("m")["params"], params(1))
    assert store.commit("m", params(2), None, got["version"])["version"] == 2  # the update is still open


def test_ops_create_from_a_resource_blob_and_round_trip(tmp_path):
    fetched = []
    data = blob.pack(params(3), {"arch": "din", "config": {"n_items": 10}})

    def fetch(name):
        fetched.append(name)
        return data
    ops = make_model_ops(ModelStore(tmp_path), fetch)
    info = ops["model.create"](name="ctr", resource="coda/global_model")
    assert fetched == ["coda/global_model"] and info["meta"]["config"] == {"n_items": 10}
    assert ops["model.create"](name="ctr", resource="coda/global_model", exist_ok=True)["version"] == 1
    up = ops["model.begin_update"](name="ctr")
    ops["model.commit"](name="ctr", params=params(4), base_version=up["version"], meta={"arch": "din"})
    assert same(ops["model.load"](name="ctr")["params"], params(4))
    assert ops["model.rollback"](name="ctr")["version"] == 3
    with pytest.raises(InvalidArgument, match="exactly one"):
        ops["model.create"](name="x")
    with pytest.raises(FailedPrecondition, match="tunnel"):
        make_model_ops(ModelStore(tmp_path / "b"))["model.create"](name="x", resource="r")
    with pytest.raises(InvalidArgument, match="not a walle model blob"):
        blob.unpack(b"PK junk")


def _delta(got: dict, v: int) -> tuple[dict, dict]:
    """The delta commit to version v: b + 1 whole, and 1 added to row v % 3 of w only."""
    r = v % 3
    return {"b": got["params"]["b"] + 1, "w": got["params"]["w"][[r]] + 1}, {"w": [r]}


def _expected(base: dict, v: int, mode: str) -> dict:
    if mode == "full":
        return {k: a + (v - 1) for k, a in base.items()}
    w = base["w"].copy()
    for u in range(2, v + 1):
        w[u % 3] += 1
    return {"w": w, "b": base["b"] + (v - 1)}


def _child_commit_forever(root: str, mode: str) -> None:
    s = ModelStore(root)
    while True:
        got = s.begin_update("m")
        v = got["version"] + 1
        if mode == "full":
            s.commit("m", {k: a + 1 for k, a in got["params"].items()}, {"c": v}, got["version"])
        else:
            changed, rows = _delta(got, v)
            s.commit("m", changed, {"c": v}, got["version"], rows=rows)


@pytest.mark.parametrize("mode", ["full", "delta"])
def test_kill_9_during_commits_never_loses_the_model(store, mode):
    """SIGKILL a committing child at random moments: M always loads whole, holding exactly the
    committed version (for delta commits: M's other rows with the committed rows applied), and M0
    stays the original."""
    base = params(0)
    store.create("m", base)
    rng = random.Random(0)
    seen: set[int] = set()
    i = 0
    # At least 40 kills, and on until the children have committed 20 versions (a loaded machine
    # commits less per kill); the cap only stops a store that makes no progress at all.
    while i < 40 or (max(seen) <= 20 and i < 600):
        i += 1
        pid = os.fork()
        if pid == 0:
            try:
                _child_commit_forever(store.root, mode)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = store.load("m", "M")
        v = got["version"]
        assert got["served_from"] == "M" and same(got["params"], _expected(base, v, mode))
        assert v == 1 or got["meta"] == {"c": v}
        assert same(store.load("m", "M0")["params"], base)
        seen.add(v)
    assert max(seen) > 20 and len(seen) >= 5  # the children really committed
    store.commit("m", params(9), None, store.begin_update("m")["version"])  # sweeps the killed writers' temps
    assert [f for f in os.listdir(os.path.join(store.root, "m")) if f.endswith(".tmp")] == []
