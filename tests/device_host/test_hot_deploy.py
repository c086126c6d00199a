"""Hot deploy end to end: a connected device host picks up each release (and a rollback) through the
WatchTasks stream within seconds and runs the new version with nothing restarted; run and delivery
reports reach the platform's release stats."""
import time

import pytest

from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

TOML = """name = "probe"
entry = "main.py"
apis = ["log", "storage"]
min_host_version = "0.1.0"
[limits]
memory_mb = 64
cpu_seconds = 2
wall_seconds = 5
[[triggers]]
kind = "event"
event = "page_view:home"
"""
MAIN = """from walle import log, storage

def main(event):
    n = storage.get("runs", 0) + 1
    storage.put("runs", n)
    log.info("probe {V} run " + str(n))
    return {"version": "{V}", "runs": n}
"""


def submit(platform, tmp, v):
    src = tmp / f"probe-{v}"
    src.mkdir()
    (src / "task.toml").write_text(TOML)
    (src / "main.py").write_text(MAIN.replace("{V}", v))
    _m, files = validate_task_dir(src)
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=v, author="t"))


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


def test_release_update_and_rollback_reach_a_running_device(tmp_path, sandbox):
    platform = Platform(tmp_path / "platform")
    server, port, stop = build_server(platform, port=0)
    token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token
    host = DeviceHost(tmp_path / "device", f"127.0.0.1:{port}", attrs={"user_id": "u1", "os": "android"},
                      sandbox=sandbox, credentials=Credentials("phone-1", token))
    try:
        host.start()
        assert wait_for(lambda: host.sync.revision != "")  # first pull done (nothing released yet)
        # The platform asks for a pull every 60 s: changes seen within seconds came through WatchTasks.
        assert host.sync.poll_after == 60
        assert host.installed() == {}

        v1 = submit(platform, tmp_path, "v1")
        r1 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v1.version,
                                                                   rule='os == "android"'))
        assert wait_for(lambda: "probe" in host.installed() and host.installed()["probe"].version == v1.version)
        assert host.run_task("probe", {}).value == {"version": "v1", "runs": 1}

        v2 = submit(platform, tmp_path, "v2")
        t0 = time.monotonic()
        r2 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v2.version,
                                                                   rule='os == "android"'))
        assert wait_for(lambda: host.installed()["probe"].version == v2.version, timeout=10)
        took = time.monotonic() - t0
        # The app's event goes through the trigger queue and runs the new version; storage carried over.
        assert host.emit("page_view:home", {"page": "home"}) == ["probe"]
        assert host.triggers.wait_idle(10)
        assert host.run_task("probe", {}).value == {"version": "v2", "runs": 3}

        r3 = platform.Rollback(admin_pb2.RollbackRequest(task="probe", actor="t"))
        assert r3.version == v1.version
        assert wait_for(lambda: host.installed()["probe"].version == v1.version, timeout=10)
        assert host.installed()["probe"].release_id == r3.id
        assert host.run_task("probe", {}).value == {"version": "v1", "runs": 4}

        assert host.up.flush(timeout=10)
        s1 = platform.GetRelease(admin_pb2.ReleaseRef(id=r1.id)).stats
        s2 = platform.GetRelease(admin_pb2.ReleaseRef(id=r2.id)).stats
        s3 = platform.GetRelease(admin_pb2.ReleaseRef(id=r3.id)).stats
        assert (s1.delivered, s1.ran, s1.runs) == (1, 1, 1)
        assert (s2.delivered, s2.ran, s2.runs) == (1, 1, 2) and s2.failed == 0
        assert (s3.delivered, s3.ran, s3.runs) == (1, 1, 1)
        triggers = [r[0] for r in platform.state.db.execute(
            "SELECT trigger FROM run_reports WHERE release_id=? ORDER BY seq", [r2.id])]
        assert triggers == ["event:page_view:home", "manual"]
        print(f"v2 reached the device {took:.2f}s after the release")
    finally:
        host.close()
        stop(0)


def test_device_run_once_cli(tmp_path):
    from click.testing import CliRunner

    from walle.device_host.cli import device_run
    platform = Platform(tmp_path / "platform")
    server, port, stop = build_server(platform, port=0)
    try:
        v1 = submit(platform, tmp_path, "v1")
        rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="probe", version=v1.version))
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="cli-phone")).token
        cred = tmp_path / "cred.json"
        Credentials("cli-phone", token, f"127.0.0.1:{port}").save(cred)
        assert oct(cred.stat().st_mode & 0o777) == "0o600"
        data = tmp_path / "dev"
        args = ["--data-dir", str(data), "--token-file", str(cred), "--attrs", "user_id=u9,os=android",
                "--once", "--event", 'page_view:home={"page": "home"}']
        res = CliRunner().invoke(device_run, args)
        assert res.exit_code == 0, res.output
        assert (data / "credentials.json").exists() and (data / "tasks" / "probe" / "current.json").exists()
        stats = platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stats
        assert (stats.delivered, stats.ran, stats.runs) == (1, 1, 1)
        bad = CliRunner().invoke(device_run, ["--data-dir", str(data), "--attrs", "colour=red", "--once"])
        assert bad.exit_code == 2 and "unknown device attribute 'colour'" in bad.output
        platform.RevokeDevice(admin_pb2.DeviceRef(device_id="cli-phone"))
        res = CliRunner().invoke(device_run, ["--data-dir", str(data), "--once"])
        assert res.exit_code == 6, res.output  # unauthenticated: the documented code
    finally:
        stop(0)
