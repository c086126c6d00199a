"""The generic model store (paper 4.4.1, Figure 6) and its host-API ops: parameter blobs plus
metadata, M / M0 / Mbuf, the write lock, rollback, quotas, scopes, and crash safety under kill -9."""
from __future__ import annotations

import os
import random
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
    with pytest.raises(AlreadyExists):
        store.create("ctr", params(2))
    got = store.begin_update("ctr")
    assert got["version"] == 1 and same(got["params"], params(1)) and store.info("ctr")["has_buffer"]
    rec = store.commit("ctr", params(2, width=6), {"arch": "din", "n": 5}, got["version"])  # shapes may change
    assert rec["version"] == 2 and rec["base_version"] == 1 and not store.info("ctr")["has_buffer"]
    now = store.load("ctr")
    assert now["served_from"] == "M" and same(now["params"], params(2, width=6)) and now["meta"]["n"] == 5
    assert same(store.load("ctr", "M0")["params"], params(1))
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


def _child_commit_forever(root: str) -> None:
    s = ModelStore(root)
    while True:
        got = s.begin_update("m")
        v = got["version"] + 1
        s.commit("m", {k: a + 1 for k, a in got["params"].items()}, {"c": v}, got["version"])


def test_kill_9_during_commits_never_loses_the_model(store):
    """SIGKILL a committing child at random moments: M always loads whole, holding exactly the
    committed version, and M0 stays the original."""
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
                _child_commit_forever(store.root)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = store.load("m", "M")
        v = got["version"]
        assert got["served_from"] == "M" and same(got["params"], {k: a + (v - 1) for k, a in base.items()})
        assert v == 1 or got["meta"] == {"c": v}
        assert same(store.load("m", "M0")["params"], base)
        seen.add(v)
    assert max(seen) > 20 and len(seen) >= 5  # the children really committed
    store.commit("m", params(9), None, store.begin_update("m")["version"])  # sweeps the killed writers' temps
    assert [f for f in os.listdir(os.path.join(store.root, "m")) if f.endswith(".tmp")] == []
