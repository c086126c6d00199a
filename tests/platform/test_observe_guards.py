"""Seeing what happened, and guarded rollouts, on a real server with an emulated fleet: a task that
starts failing at v2 (a KeyError on every run) trips the release's guard, which rolls it back; `walle release show`, `logs`,
`device show` and `audit` say which devices failed, with what error (the task's own traceback), and
that the guard stopped it."""
import json
import pathlib
import shutil
import zlib

import pytest
from click.testing import CliRunner

from walle.device_host.fleet import Fleet
from walle.device_host.sandbox import Sandbox
from walle.platform.cli import main
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2, tunnel_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROKEN = '''from walle import log


def main(event):
    log.info("v2 starting")
    return {"hello": event["payload"]["name"]}  # v2 expects a field the app does not send
'''


def submit(platform, tmp_path, name, main_py=None):
    src = tmp_path / name
    shutil.copytree(ROOT / "tasks" / "hello", src)
    if main_py is not None:
        (src / "main.py").write_text(main_py)
    _m, files = validate_task_dir(src)
    return platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t", message=name))


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "none.toml"))

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "platform"), "--actor", "ann", *args])
        assert res.exit_code == code, (args, res.output)
        return res
    return run


@pytest.mark.slow
def test_failing_version_trips_the_guard_which_rolls_back_and_every_view_says_why(tmp_path, cli, caplog):
    platform = Platform(tmp_path / "platform")
    _server, port, stop = build_server(platform, port=0)
    sandbox = Sandbox(workers=2)
    fleet = None
    try:
        fleet = Fleet(8, f"127.0.0.1:{port}", tmp_path / "fleet", profile={"os": {"android": 1}}, seed=1,
                      sandbox=sandbox, workers=4,
                      enroll=lambda d, u: platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=d, user_id=u)).token)
        v1 = submit(platform, tmp_path, "v1")
        r1 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version))
        fleet.sync_all()
        assert fleet.emit_all("hello", {"who": "fleet"}) == 8 and fleet.flush_all() == 0

        v2 = submit(platform, tmp_path, "v2", BROKEN)
        created = json.loads(cli("--json", "release", "create", f"hello@{v2.version[:10]}", "--max-failure-rate",
                                 "25%", "--min-runs", "4", "--on-trip", "rollback").output)
        r2 = created["release"]["id"]
        assert created["guard"]["status"] == "watching" and created["guard"]["max_failure_rate"] == 0.25
        fleet.sync_all()
        assert {d.installed()["hello"].version for d in fleet.devices} == {v2.version}
        fleet.emit_all("hello", {"who": "fleet"})
        assert fleet.flush_all() == 0
        # the device console names the real error, not the last traceback line
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "walle.device.host" and r.levelname == "WARNING"]
        assert warned and all(m.endswith("error: KeyError: 'name'") for m in warned), warned

        # The guard tripped on the reports and rolled back: a new release of v1 by "guard".
        platform.flush_seen()  # what the server does every 5 s: attributes as last reported
        shown = json.loads(cli("--json", "release", "show", r2).output)
        health, guard = shown["health"], shown["guard"]
        assert guard["status"] == "tripped" and guard["action_release_id"]
        trip = json.loads(guard["trip_detail"])
        # judged as soon as min_runs reports were in (how many arrived in that batch varies)
        assert 4 <= trip["runs"] <= 8 and trip["failed"] == trip["runs"] and trip["failure_rate"] == 1.0
        assert health["targeted"] == 8 and health["release"]["stats"]["delivered"] == 8
        assert health["failed_devices"] == 8 and health["release"]["state"] == "revoked"  # the rollback revoked it
        top = health["top_errors"][0]
        assert top["error"] == "KeyError: 'name'" and top["runs"] == 8 and top["devices"] == 8
        assert "Traceback" in top["example"] and 'event["payload"]["name"]' in top["example"]
        rollback = platform.GetRelease(admin_pb2.ReleaseRef(id=guard["action_release_id"]))
        assert rollback.version == v1.version and rollback.created_by == "guard" and r2 in rollback.note
        human = cli("release", "show", r2).output
        assert "tripped" in human and "rolled back as" in human and "KeyError: 'name'" in human

        fleet.sync_all()
        assert {d.installed()["hello"].version for d in fleet.devices} == {v1.version}

        # Logs: the failed runs with the task's own traceback and its log line before the failure.
        lines = cli("--json", "logs", "--release", r2, "--status", "failed").output.splitlines()
        entries = [json.loads(line) for line in lines]
        assert len(entries) == 8 and all(e["status"] == "error" for e in entries)
        assert all(e["error"].startswith("KeyError: 'name'") and 'main.py", line 6' in e["error"] for e in entries)
        assert all(e["lines"] == ["info: v2 starting"] for e in entries)
        assert all(isinstance(e["peak_memory_kb"], int) for e in entries)
        ok = [json.loads(line) for line in cli("--json", "logs", "--release", r1.id).output.splitlines()]
        assert len(ok) == 8 and {e["lines"][0] for e in ok} == {"info: hello fleet, run 1"}
        human = cli("logs", "--release", r2, "-n", "1").output
        assert "! KeyError: 'name'" in human and "| info: v2 starting" in human

        # One device: its installed version, last runs and errors.
        device_id = fleet.devices[0].device_id
        dev = json.loads(cli("--json", "device", "show", device_id).output)
        assert dev["installed"][0]["version"] == v1.version and dev["installed"][0]["status"] == "installed"
        assert dev["errors"][0]["release_id"] == r2 and len(dev["last_runs"]) == 2
        assert json.loads(dev["device"]["attrs_json"])["os"] == "android" and dev["user_id"]
        assert "last errors" in cli("device", "show", device_id).output

        # Audit: the trip with its figures, the rollback as a rollback, filters that find them.
        trips = json.loads(cli("--json", "audit", "--action", "release.guard_trip").output)["entries"]
        assert [(e["actor"], e["target"]) for e in trips] == [("guard", r2)]
        assert json.loads(trips[0]["detail"])["failed"] == trip["failed"]
        by_guard = json.loads(cli("--json", "audit", "--actor", "guard").output)["entries"]
        # the rollback revokes the failing release and releases v1 again
        assert {e["action"] for e in by_guard} == {"release.guard_trip", "release.rollback", "release.revoke"}
        family = json.loads(cli("--json", "audit", "--action", "release.", "--since", "1h").output)["entries"]
        assert {"release.create", "release.guard", "release.guard_trip", "release.rollback", "release.revoke"} == \
            {e["action"] for e in family}
        assert not any(e["action"].startswith("device.") for e in family)
        # after a fleet run, leave out the enrollments to see the real actions
        rest = json.loads(cli("--json", "audit", "--exclude", "device.", "--exclude", "task.submit").output)
        assert {e["action"] for e in rest["entries"]} == {e["action"] for e in family}
        assert len(json.loads(cli("--json", "audit", "--action", "device.enroll").output)["entries"]) == 8
    finally:
        if fleet is not None:
            fleet.close()
        sandbox.close()
        stop(0)


def _upload(platform, device_id, release_id, statuses, durations, first_seq=1):
    # a device reports only on releases it was handed: enroll it and let it poll first
    if device_id not in {d.device_id for d in platform.ListDevices(admin_pb2.Empty()).devices}:
        platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id))
    handed = platform.active_tasks(device_id, device_pb2.DeviceInfo(os="android", host_version="0.1.0"))
    assert release_id in {t.release_id for t in handed.tasks}
    recs = tunnel_pb2.UpRecords()
    for i, (status, d) in enumerate(zip(statuses, durations)):
        rep = tunnel_pb2.RunReport(task="hello", version="v", release_id=release_id, status=status, duration_s=d,
                                   error="" if status == "ok" else "ValueError: boom")
        recs.records.add(seq=first_seq + i, topic="run_report", ts_ms=1, payload=rep.SerializeToString())
    platform.upload(device_id, tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()),
                                                  count=len(recs.records)))


def test_guard_waits_for_min_runs_then_pauses_and_a_p99_guard_trips_on_latency(tmp_path, cli):
    platform = Platform(tmp_path / "platform")
    v1 = submit(platform, tmp_path, "v1")
    rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version))
    cli("release", "guard", rel.id, "--max-failure-rate", "10%", "--min-runs", "10")
    _upload(platform, "d1", rel.id, ["error"] * 5, [0.1] * 5)  # 100% failing, but only 5 runs: no verdict yet
    assert platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).state == "active"
    _upload(platform, "d2", rel.id, ["ok"] * 5, [0.1] * 5)  # 10 runs, 50% failed
    assert platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).state == "paused"
    g = platform.GetReleaseGuard(admin_pb2.ReleaseRef(id=rel.id))
    assert g.status == "tripped" and not g.action_release_id
    assert json.loads(g.trip_detail)["reason"].startswith("failure rate 50.0% (5/10 runs) > 10.0%")
    assert "paused" in cli("release", "show", rel.id).output

    v2 = submit(platform, tmp_path, "v2", (ROOT / "tasks" / "hello" / "main.py").read_text() + "\n# v2\n")
    rel2 = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v2.version))
    cli("release", "guard", rel2.id, "--max-p99-seconds", "1.5", "--min-runs", "3")
    _upload(platform, "d3", rel2.id, ["ok"] * 3, [0.2, 0.3, 2.5])
    g = platform.GetReleaseGuard(admin_pb2.ReleaseRef(id=rel2.id))
    assert g.status == "tripped" and "p99 duration 2.500s > 1.5s" in json.loads(g.trip_detail)["reason"]

    # Bad guard options are refused before anything is released.
    bad = cli("--json", "release", "create", "hello", "--max-failure-rate", "150%", code=2)
    assert "between 0% and 100%" in json.loads(bad.output)["error"]["message"]
    assert len(platform.ListReleases(admin_pb2.ReleaseFilter()).releases) == 2
    cli("release", "guard", "r99", "--max-failure-rate", "5%", code=3)


def test_log_cursor_returns_only_newer_runs_for_following(tmp_path, cli):
    platform = Platform(tmp_path / "platform")
    v1 = submit(platform, tmp_path, "v1")
    rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version))
    _upload(platform, "d1", rel.id, ["ok", "error"], [0.1, 0.2])
    first = platform.GetLogs(admin_pb2.LogRequest(release_id=rel.id))
    assert [e.status for e in first.entries] == ["error", "ok"]  # newest first
    assert not platform.GetLogs(admin_pb2.LogRequest(release_id=rel.id, after=first.cursor)).entries
    _upload(platform, "d2", rel.id, ["timeout"], [5.0])
    newer = platform.GetLogs(admin_pb2.LogRequest(release_id=rel.id, after=first.cursor))
    assert [(e.device_id, e.status) for e in newer.entries] == [("d2", "timeout")]
    assert int(newer.cursor) > int(first.cursor)
    failed = json.loads(cli("--json", "logs", "--status", "failed", "--device", "d1").output)
    assert failed["status"] == "error" and failed["error"] == "ValueError: boom"
    cli("logs", "--since", "yesterday-ish", code=2)
    cli("--json", "logs", "--release", rel.id, "--since", "1h")
