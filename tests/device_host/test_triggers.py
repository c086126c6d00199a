"""Triggers: real tasks released by a real platform and run in the sandbox on event, table_rows and
schedule triggers; the run queue never runs a task twice at once and coalesces pending runs."""
import threading
import time

import pytest

from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.device_host.triggers import TriggerEngine
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2

TOML = """name = "{name}"
entry = "main.py"
apis = ["log", "storage", "events"]
min_host_version = "0.1.0"
[limits]
memory_mb = 64
cpu_seconds = 2
wall_seconds = 5
{triggers}
"""

COLLECTOR = """from walle import storage, events

def main(event):
    if event["name"] == "batch_received":
        storage.insert("samples", [{"x": event["payload"]["x"]}])
        return {"rows": storage.count("samples")}
    # table_rows: consume the batch
    n = storage.count("samples")
    storage.delete_rows("samples", {"x": {"ge": 0}})
    storage.put("trained", storage.get("trained", 0) + 1)
    events.emit("model_updated", {"rows": n})
    return {"trained_on": n}
"""

FOLLOWER = """from walle import storage

def main(event):
    seen = storage.get("seen", [])
    seen.append(event["payload"])
    storage.put("seen", seen)
    return {"seen": len(seen)}
"""

TICKER = """from walle import storage

def main(event):
    storage.put("ticks", storage.get("ticks", 0) + 1)
    return event["name"]
"""


def trig(kind, **kw):
    lines = ["[[triggers]]", f'kind = "{kind}"'] + [f"{k} = {v!r}".replace("'", '"') for k, v in kw.items()]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


@pytest.fixture
def device(tmp_path, sandbox):
    platform = Platform(tmp_path / "platform")
    server, port, stop = build_server(platform, port=0)
    tasks = {
        "collector": (COLLECTOR, trig("event", event="batch_received") + "\n" + trig("table_rows", table="samples", min_rows=3)),
        "follower": (FOLLOWER, trig("event", event="model_updated")),
        "ticker": (TICKER, trig("schedule", every_seconds=1)),
    }
    for name, (main, triggers) in tasks.items():
        src = tmp_path / "src" / name
        src.mkdir(parents=True)
        (src / "task.toml").write_text(TOML.format(name=name, triggers=triggers))
        (src / "main.py").write_text(main)
        _m, files = validate_task_dir(src)
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version))
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone")).token
    host = DeviceHost(tmp_path / "device", f"127.0.0.1:{port}", attrs={"user_id": "u"}, sandbox=sandbox,
                      credentials=Credentials("phone", token))
    runs = []
    host.on_run = lambda name, result: runs.append((name, result.status, result.value))
    host.runs = runs
    assert sorted(host.sync_now().installed) == sorted(f"{n}@{platform.repo.get(n).version}" for n in tasks)
    yield host
    host.close()
    stop(0)


def test_event_and_table_rows_triggers_and_emitted_events(device):
    assert device.emit("batch_received", {"x": 1}) == ["collector"]
    assert device.emit("no_such_event", {}) == []
    assert device.triggers.drain() == 1
    assert device.runs == [("collector", "ok", {"rows": 1})]
    device.emit("batch_received", {"x": 2})
    device.triggers.drain()
    assert device.storage.count("collector", "samples") == 2
    device.emit("batch_received", {"x": 3})
    # The third row reaches min_rows: the table_rows run follows, and its emitted event runs the follower
    # only after the emitting run ended.
    assert device.triggers.drain() == 3
    assert [r[0] for r in device.runs] == ["collector"] * 4 + ["follower"]
    assert device.runs[3] == ("collector", "ok", {"trained_on": 3})
    assert device.runs[4] == ("follower", "ok", {"seen": 1})
    assert device.storage.count("collector", "samples") == 0
    assert device.storage.get("follower", "seen") == [{"rows": 3}]
    # Nothing changed since: a timer check does not fire again.
    assert device.triggers.check_tables() == []


def test_schedule_trigger_runs_on_the_timer(device):
    device.start(watch=False)
    deadline = time.monotonic() + 6
    while device.storage.get("ticker", "ticks", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    device.stop()
    assert device.storage.get("ticker", "ticks", 0) >= 2
    assert all(r[0] == "ticker" and r[2] == "schedule" for r in device.runs)


def test_a_task_never_runs_twice_at_once_and_pending_runs_coalesce():
    active, peak, seen = {}, {}, []
    lock = threading.Lock()
    gate = threading.Event()

    def runner(task, event, trigger):
        with lock:
            active[task] = active.get(task, 0) + 1
            peak[task] = max(peak.get(task, 0), active[task])
        if event["payload"] == 0:
            gate.wait(5)  # the first run of "a" blocks while more events arrive
        else:
            time.sleep(0.01)
        with lock:
            active[task] -= 1
            seen.append((task, event["payload"]))
        return []

    eng = TriggerEngine(runner, workers=3, tick=0.05)
    manifest = lambda ev: device_pb2.TaskManifest(triggers=[device_pb2.Trigger(kind="event", event=ev)])
    eng.set_tasks({"a": manifest("go"), "b": manifest("other")})
    eng.start()
    try:
        eng.emit("go", 0)
        deadline = time.monotonic() + 5
        while "a" not in eng.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 6):
            eng.emit("go", i)  # "a" is running: one pending run, keeping the latest event
        eng.emit("other", 100)
        assert eng.pending() == ["a", "b"] or eng.pending() == ["a"]
        time.sleep(0.2)  # idle workers must not start a second "a"
        assert peak["a"] == 1 and "a" in eng.pending()
        gate.set()
        assert eng.wait_idle(5)
    finally:
        eng.stop()
    assert [p for t, p in seen if t == "a"] == [0, 5]
    assert ("b", 100) in seen and peak == {"a": 1, "b": 1}


def test_set_tasks_drops_queued_runs_of_removed_tasks():
    ran = []
    eng = TriggerEngine(lambda t, e, tr: ran.append(t) or [], workers=1)
    m = device_pb2.TaskManifest(triggers=[device_pb2.Trigger(kind="event", event="x")])
    eng.set_tasks({"a": m, "b": m})
    assert eng.emit("x") == ["a", "b"]
    eng.set_tasks({"b": m})
    assert eng.pending() == ["b"]
    assert eng.drain() == 1 and ran == ["b"]
