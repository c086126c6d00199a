"""The app interface: a running device host serves emit/ask on a Unix socket in its data folder
(owner-only), the embeddable Device does the same in-process, and `walle device emit|ask` talk to it.
Emitted events are logged in order, so a task reading the log sees every one even when its queued
runs coalesce."""
import json
import os
import stat

import grpc
import pytest
from click.testing import CliRunner

from walle.device_host.app import AppClient, AppServer, Device, socket_path
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.platform.cli import main as walle_main
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, app_pb2, app_pb2_grpc, bundle
from walle.protos.errors import InvalidArgument, NotFound, PermissionDenied

TASKS = {
    "ranker": ("""name = "ranker"
entry = "main.py"
apis = ["log"]
[limits]
wall_seconds = 20
[[triggers]]
kind = "event"
event = "page_view:home"
""", """def main(event):
    p = event["payload"]
    if p.get("spin"):
        while True:
            pass
    cands = p["candidates"]
    return {"ranking": sorted(cands, reverse=True), "event": event["name"]}
"""),
    "clicklog": ("""name = "clicklog"
entry = "main.py"
apis = ["events", "storage"]
[[triggers]]
kind = "event"
event = "click"
""", """from walle import events, storage

def main(event):
    after = storage.get("cursor", 0)
    got = events.read(after=after, names=["click"], limit=1000)
    if got:
        storage.put("cursor", got[-1]["seq"])
        storage.put("clicked", storage.get("clicked", []) + [e["payload"]["item_id"] for e in got])
    return len(got)
"""),
}


def release(platform, tmp_path, name):
    toml, main = TASKS[name]
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "task.toml").write_text(toml)
    (src / "main.py").write_text(main)
    _m, files = validate_task_dir(src)
    tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=name, author="t"))
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version, rule='os == "android"'))


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


@pytest.fixture
def device(tmp_path, sandbox):
    platform = Platform(tmp_path / "platform")
    _server, port, stop = build_server(platform, port=0)
    for name in TASKS:
        release(platform, tmp_path, name)
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token
    data = tmp_path / "dev"
    dev = Device(data, f"127.0.0.1:{port}", attrs={"user_id": "u1", "os": "android"}, sandbox=sandbox,
                 credentials=Credentials("phone-1", token), serve_socket=True)
    dev.start()
    yield dev, data
    dev.close()
    stop(0)


def test_emit_and_ask_over_the_socket(device):
    dev, data = device
    path = socket_path(data)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with AppClient(data) as app:
        reply = app.ask("page_view:home", {"candidates": [3, 9, 1]})
        assert reply.status == "ok" and reply.task == "ranker" and reply.version
        assert json.loads(reply.result_json) == {"ranking": [9, 3, 1], "event": "page_view:home"}
        seqs = [app.emit("click", {"item_id": i}).seq for i in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        assert app.emit("click", {"item_id": 5}).tasks == ["clicklog"]
        with pytest.raises(NotFound, match="no installed task is triggered by 'nope'"):
            app.ask("nope", {})
        spun = app.ask("page_view:home", {"spin": True, "candidates": []}, timeout=1.0)  # the ask's deadline
        assert spun.status == "timeout" and not spun.result_json
    engine = dev.host.triggers
    while engine.drain() or engine.pending() or engine.running():
        assert engine.wait_idle(timeout=60)
    # every click reached the task through the event log, even if its queued runs coalesced
    assert dev.host.storage.get("clicklog", "clicked") == [0, 1, 2, 3, 4, 5]
    # the embedded API answers the same
    assert dev.ask("page_view:home", {"candidates": [2, 7]})["ranking"] == [7, 2]


def test_bad_payload_is_refused_clearly(device):
    _dev, data = device
    with grpc.insecure_channel(f"unix:{socket_path(data)}") as ch:
        stub = app_pb2_grpc.AppServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Emit(app_pb2.EmitRequest(name="click", payload_json="{not json"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not JSON" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Emit(app_pb2.EmitRequest(name="", payload_json="{}"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_socket_permissions_checked(device, tmp_path):
    dev, data = device
    os.chmod(socket_path(data), 0o666)
    with pytest.raises(PermissionDenied, match="mode 0600"):
        AppClient(data)
    os.chmod(socket_path(data), 0o600)
    os.chmod(socket_path(data).parent, 0o755)
    with pytest.raises(PermissionDenied, match="0700"):
        AppClient(data)
    os.chmod(socket_path(data).parent, 0o700)
    os.chmod(data, 0o777)  # anyone could replace the socket: the host refuses to serve there
    try:
        with pytest.raises(PermissionDenied, match="writable by group or others"):
            AppServer(dev.host)
    finally:
        os.chmod(data, 0o755)
    with pytest.raises(Exception, match="no app socket"):
        AppClient(tmp_path / "elsewhere")


def test_cli_emit_and_ask(device):
    _dev, data = device
    runner = CliRunner()
    out = runner.invoke(walle_main, ["device", "emit", "click", '{"item_id": 4}', "--data-dir", str(data), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["tasks"] == ["clicklog"]
    out = runner.invoke(walle_main, ["device", "ask", "page_view:home", '{"candidates": [1, 5]}', "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["ranking"] == [5, 1]
    out = runner.invoke(walle_main, ["device", "ask", "page_view:home", '{"candidates": 3}', "--data-dir", str(data)])
    assert out.exit_code == 5 and "ranker error" in out.output  # the task failed: its error, exit 5
    out = runner.invoke(walle_main, ["device", "emit", "click", "{oops", "--data-dir", str(data)])
    assert out.exit_code == 2 and "not JSON" in out.output
    out = runner.invoke(walle_main, ["device", "ask", "nope", "--data-dir", str(data)])
    assert out.exit_code == 3


def test_event_log_reads_validate(tmp_path):
    from walle.device_host.app import AppEventLog
    log = AppEventLog(tmp_path / "ev.sqlite3")
    try:
        for i in range(3):
            log.append("click" if i != 1 else "exposure", {"i": i})
        assert [e["payload"]["i"] for e in log.read(0, ["click"])] == [0, 2]
        assert [e["seq"] for e in log.read(1)] == [2, 3]
        assert log.read(0, []) == []
        with pytest.raises(InvalidArgument, match="after"):
            log.read(-1)
        with pytest.raises(InvalidArgument, match="limit"):
            log.read(0, None, 0)
    finally:
        log.close()


@pytest.mark.slow
def test_device_run_fires_event_after_first_sync_and_serves_the_socket(tmp_path):
    """`walle device run --event hello=...` (the README's example) as a real process: the event fires
    after the first sync installed the task, so it runs; the app socket answers meanwhile."""
    import subprocess
    import sys
    import time

    from walle.platform.demo import tasks_dir
    platform = Platform(tmp_path / "platform")
    _server, port, stop = build_server(platform, port=0)
    try:
        _m, files = validate_task_dir(tasks_dir() / "hello")
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, rule="true"))
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-9")).token
        data = tmp_path / "d"
        proc = subprocess.Popen([sys.executable, "-m", "walle.platform.cli", "device", "run", "--data-dir", str(data),
                                 "--platform", f"127.0.0.1:{port}", "--token", token, "--device-id", "phone-9",
                                 "--allow-unconfined-tasks", "--event", 'hello={"who": "ann"}'],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def ran() -> int:
                rel = platform.ListReleases(admin_pb2.ReleaseFilter()).releases
                return sum(r.stats.runs for r in rel if r.task == "hello")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and ran() < 1 and proc.poll() is None:
                time.sleep(0.2)
            assert ran() >= 1, proc.stderr.read()[-3000:] if proc.poll() is not None else "no run report"
            while not socket_path(data).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            with AppClient(data) as app:
                assert app.emit("hello", {"who": "bob"}).tasks == ["hello"]
        finally:
            proc.terminate()
            proc.wait(30)
        assert not socket_path(data).exists()  # removed on the way out
    finally:
        stop(0)
