"""Samples are born on the device and tasks pull their own batches, through the interfaces a deployment
uses: the app emits behaviour to an embedded device host; coda_samples builds the user's local samples
from the device's own event log (the same samples the cloud builds from the uploaded behaviour), keeps
their lifecycle, and uploads the behaviour aggregated and compressed; coda_fetch pulls the day's matched
batches with `tunnel.pull` into `outside`, within what fits and the 12-a-day limit, and the host fires
`batch_received`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from walle.device_host.app import Device
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.platform.coda.cloud import CodaCloud
from walle.platform.demo import tasks_dir
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, coda_pb2

PROBE = ("""name = "probe"
entry = "main.py"
apis = ["storage"]
[[triggers]]
kind = "event"
event = "batch_received"
[[triggers]]
kind = "event"
event = "batches_exhausted"
""", """from walle import storage

def main(event):
    storage.put("seen", storage.get("seen", []) + [[event["name"], event["payload"]]])
""")


def catalog_frame() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    shelves = ["jazz", "rock", "folk", "blues", "pop"]
    return pd.DataFrame({"item_id": np.arange(1, 201),
                         "categories": ["|".join(rng.choice(shelves, size=2, replace=False)) for _ in range(200)]})


def submit(platform, files, name):
    tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=name, author="t"))
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version, rule='os == "android"'))


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


@pytest.fixture
def world(tmp_path, sandbox):
    platform = Platform(tmp_path / "platform")
    coda = CodaCloud(platform, k=5)
    coda.load_catalog(catalog_frame())
    _server, port, stop = build_server(platform, port=0, extra=coda.add_services)
    for name in ("coda_samples", "coda_fetch", "coda_infer"):
        _m, files = validate_task_dir(tasks_dir() / name)
        submit(platform, files, name)
    src = tmp_path / "probe"
    src.mkdir()
    (src / "task.toml").write_text(PROBE[0])
    (src / "main.py").write_text(PROBE[1])
    submit(platform, validate_task_dir(src)[1], "probe")
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-7")).token
    dev = Device(tmp_path / "dev", f"127.0.0.1:{port}", attrs={"user_id": "listener7", "os": "android"},
                 sandbox=sandbox, credentials=Credentials("phone-7", token))
    dev.start(watch=False)
    yield platform, coda, dev
    dev.close()
    stop(0)


def behaviour(seed: int, n: int, t0: int = 1_700_000_000):
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        item = int(rng.integers(1, 201))
        kind = ["view", "click", "rate", "exposure"][j % 4]
        ts = t0 + j * 30 + (0 if j % 5 else -30)  # some equal timestamps: history takes strictly earlier ones
        if kind == "exposure":
            out.append((kind, {"items": [item, int(rng.integers(1, 201))], "ts": ts}))
        elif kind == "rate":
            out.append((kind, {"item_id": item, "value": float(rng.integers(1, 6)), "ts": ts}))
        else:
            out.append((kind, {"item_id": item, "ts": ts}))
    return out


def run_all(dev):
    """Run every queued task (here and on the host's trigger workers) until nothing is left."""
    engine = dev.host.triggers
    while True:
        engine.drain()
        assert engine.wait_idle(timeout=120)
        if not engine.pending() and not engine.running():
            return


def test_local_samples_born_from_own_behaviour(world):
    platform, coda, dev = world
    st = dev.host.storage
    dev.emit("profile", {"values": [0.5, -1.0]})
    for name, payload in behaviour(1, 60):
        dev.emit(name, payload)
    dev.emit("flush_behavior")
    run_all(dev)
    assert dev.host.up.flush(timeout=30)

    local = st.query("coda", "local", order_by="ts", limit=1000)
    behaviours = st.count("coda", "behavior")
    assert behaviours == 75  # 45 single-item events + 15 exposures of two items
    assert 0 < len(local) <= behaviours - 5
    assert all(json.loads(r["profile"]) == [0.5, -1.0] for r in local)
    assert "outside" not in st.table_names("coda")  # nothing about this user came from the cloud

    # the behaviour went up aggregated: one compressed record per flush, each behaviour stored once
    raw = coda.raw.frame()
    assert len(raw) == behaviours and sorted(raw["seq"]) == list(range(behaviours))
    assert set(raw["event"]) == {"view", "click", "rate", "exposure"}
    # ... and the cloud builds the very same samples from it
    coda.close_day()
    cloud = next(iter(coda.day_samples[1].values()))
    key = lambda s: (s["ts"], s["item_id"], s["label"], s["hist_items"], s["hist_cats"], s["item_cats"])  # noqa: E731
    device_side = sorted(key({**r, **{c: json.loads(r[c]) for c in ("hist_items", "hist_cats", "item_cats")}})
                         for r in local)
    cloud_side = sorted(key({"ts": s.ts, "item_id": s.item_id, "label": s.label, "hist_items": list(s.hist_items),
                             "hist_cats": list(s.hist_cats), "item_cats": list(s.item_cats)}) for s in cloud)
    assert device_side == cloud_side
    assert any(r["label"] == 1.0 for r in local) and any(r["label"] == 0.0 for r in local)


def test_local_lifecycle(world):
    _platform, _coda, dev = world
    st = dev.host.storage
    st.put("coda", "config", {"T_PRIME": 2, "MAX_ROWS": 20})
    st.put("coda", "samples.config", {"UPLOAD_AT": 1000})
    st.put("coda", "today", 5)
    for name, payload in behaviour(2, 12, t0=1_600_000_000):
        dev.emit(name, {**payload, "day": 1})  # older than today - T_PRIME: dropped
    run_all(dev)
    assert st.count("coda", "local") == 0 and st.count("coda", "behavior") > 0
    for name, payload in behaviour(3, 30):
        dev.emit(name, {**payload, "day": 5})
    run_all(dev)
    rows = st.query("coda", "local", order_by="ts", limit=100)
    assert 0 < len(rows) < 20  # the size limit halves the table, oldest first
    newest = max(r["ts"] for r in rows)
    assert newest == max(p.get("ts") for _n, p in behaviour(3, 30))
    # a malformed event is skipped with a warning (it must not block the log for good); the rest count
    before = st.count("coda", "behavior")
    dev.emit("click", {"item_id": "seven"})
    dev.emit("click", {"item_id": 9, "ts": 1_800_000_000, "day": 5})
    run_all(dev)
    assert st.count("coda", "behavior") == before + 1


def test_fetch_pulls_what_fits_and_the_daily_limit(world):
    platform, coda, dev = world
    st = dev.host.storage
    # other users' behaviour reached the cloud (their devices uploaded it); this device uploads its own
    for u in range(8):
        logs = [(j, coda_pb2.BehaviorLog(ts=1_700_000_000 + j * 60, item_id=1 + (u * 7 + j * 3) % 200,
                                         event="click" if j % 3 == 0 else "view", value=1.0)) for j in range(90)]
        coda.raw.add(f"other-{u}", f"user{u}", logs, day=1)
    for name, payload in behaviour(4, 40):
        dev.emit(name, payload)
    dev.emit("flush_behavior")
    run_all(dev)
    assert dev.host.up.flush(timeout=30)
    coda.close_day()
    assert coda.today == 2

    dev.emit("fetch_samples")
    run_all(dev)
    assert st.get("coda", "today") == 2  # the cloud's day
    first = st.count("coda", "outside")
    assert 150 < first <= 200  # what fits below MAX_ROWS (200)
    rows = st.query("coda", "outside", limit=1)
    assert rows[0]["state"] == "new" and rows[0]["batch_id"].startswith("1.")
    seen = st.get("probe", "seen")
    assert seen[0][0] == "batch_received" and seen[0][1]["day"] == 1 and len(seen[0][1]["batches"]) >= 6

    dev.emit("fetch_samples")  # the table is full: nothing pulled, nothing counted
    run_all(dev)
    assert st.count("coda", "outside") == first and len(st.get("probe", "seen")) == 1

    st.delete_rows("coda", "outside", {"state": "new"})  # the filter consumed them
    dev.emit("fetch_samples")
    run_all(dev)
    seen = st.get("probe", "seen")
    pulled = sum(len(p["batches"]) for name, p in seen if name == "batch_received")
    assert pulled == 12  # the daily limit
    assert seen[-1] == ["batches_exhausted", {"day": 1, "reason": "daily limit reached"}]
    dev.emit("fetch_samples")
    run_all(dev)
    assert st.get("probe", "seen") == seen  # exhausted is said once a day


def test_ask_ranks_a_home_page_from_m_or_m0_while_m_is_written(world):
    """The app asks coda_infer for a home page; while training holds M's write lock, M0 serves."""
    from walle.platform.coda.tasklib import coda_module
    din, features, training = (coda_module(m) for m in ("din", "features", "training"))
    _platform, _coda, dev = world
    store = dev.host.models.scope("coda")
    net = din.DIN({"n_items": 1683, "n_cats": 20}, 3)
    store.create("ctr", net.params(), {"arch": "din", "config": net.config})
    train = [{"item_id": i, "item_cats": [1], "hist_items": [1, 2, 3], "hist_cats": [1, 1, 1], "profile": [],
              "label": float(i % 2)} for i in range(1, 65)]
    training.train(net, features.batch(train, 50), 2, 0.005, 0)
    store.commit("ctr", net.params(), {"arch": "din", "config": net.config}, store.begin_update("ctr")["version"])
    page = {"candidates": [{"item_id": i, "item_cats": [1 + i % 4], "hist_items": [5, 6, 7], "hist_cats": [1, 2, 3],
                            "profile": []} for i in range(1, 21)]}
    fresh = dev.ask("page_view:home", page)
    assert fresh["served_from"] == "M" and sorted(fresh["ranking"]) == list(range(1, 21))
    assert fresh["scores"] == sorted(fresh["scores"], reverse=True)
    with store.write_lock("ctr"):  # what coda_train holds while it replaces M
        during = dev.ask("page_view:home", page)
    assert during["served_from"] == "M0" and during["version"] != fresh["version"]
    assert dev.ask("page_view:home", page)["served_from"] == "M"
