"""The platform decides who a device is and what it may have (issue 9, items 2-4): the user is bound
at enrollment, DeviceInfo is bounded, bundles/resources/reports only for what a device was handed,
revoked devices lose their watch stream, and up-tunnel records survive a device reset."""
import json
import math
import pathlib
import shutil
import zlib

import grpc
import pytest

from walle.device_host.tunnel import UpTunnel
from walle.platform import service as service_mod
from walle.platform.auth import bearer_metadata
from walle.protos import admin_pb2, device_pb2, tunnel_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


def info(**kw) -> device_pb2.DeviceInfo:
    kw.setdefault("host_version", "0.1.0")
    return device_pb2.DeviceInfo(**kw)


def active(live, md, **attrs):
    return live.active(md, **attrs)


def release(p, task, version="", **kw):
    return p.CreateRelease(admin_pb2.CreateReleaseRequest(task=task, version=version, has_rollout="rollout" in kw, **kw))


def enroll(live, device_id, user_id=""):
    reply = live.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, user_id=user_id, actor="tester"))
    return bearer_metadata(reply.token)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


# -- item 2: identity ---------------------------------------------------------------------------
def test_the_user_is_the_one_bound_at_enrollment(live):
    p = live.platform
    tv = live.submit(ROOT / "tasks" / "hello")
    release(p, "hello", allow=["alice"], stage="beta")
    alice, mallory, anon = enroll(live, "phone-a", "alice"), enroll(live, "phone-m", "mallory"), enroll(live, "phone-n")
    assert active(live, alice) == [f"hello@{tv.version}"]  # no user_id sent: the bound one is used
    assert active(live, alice, user_id="alice") == [f"hello@{tv.version}"]
    code, details = code_of(lambda: active(live, mallory, user_id="alice"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "enrolled for user 'mallory'" in details
    assert active(live, anon, user_id="alice") == []  # an unbound device's claim is ignored
    # uploads and the sample service ask device_user: the bound user, never the claimed one
    assert p.device_user("phone-n") == "" and p.device_user("phone-a") == "alice"
    devices = {d.device_id: d for d in p.ListDevices(admin_pb2.Empty()).devices}
    assert devices["phone-a"].user_id == "alice" and json.loads(devices["phone-n"].attrs_json).get("user_id") is None
    enrolls = [e for e in p.GetAudit(admin_pb2.AuditRequest()).entries if e.action == "device.enroll"]
    assert {e.target: json.loads(e.detail)["user_id"] for e in enrolls} == {
        "phone-a": "alice", "phone-m": "mallory", "phone-n": ""}


def test_enrollment_refuses_a_bad_user_id(live):
    from walle.platform.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="user id"):
        live.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1", user_id="bad user"))


def _raw_get_active_tasks(live, md, raw: bytes):
    call = live.channel.unary_unary("/walle.v1.DeviceService/GetActiveTasks", request_serializer=lambda b: b,
                                    response_deserializer=device_pb2.ActiveTasks.FromString)
    return call(raw, metadata=md, timeout=30)


def test_device_info_is_bounded(live):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    md = enroll(live, "phone-big")
    for attrs, needle in (({"app_version": "9" * (20 << 20)}, "app_version"),
                          ({"tags": [f"t{i}" for i in range(65)]}, "tags"),
                          ({"tags": ["no spaces allowed"]}, "tag"),
                          ({"installed": ["x" * 300]}, "installed"),
                          ({"channel": "Bad Channel"}, "channel")):
        code, details = code_of(lambda: live.devices.GetActiveTasks(info(**attrs), metadata=md, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details
    unknown = info(os="android").SerializeToString() + b"\xa2\x06\x03abc"  # field 100: not in DeviceInfo
    code, details = code_of(lambda: _raw_get_active_tasks(live, md, unknown))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not know" in details
    assert len(_raw_get_active_tasks(live, md, info(os="android").SerializeToString()).tasks) == 1
    live.platform.flush_seen()
    listed = live.platform.ListDevices(admin_pb2.Empty())
    assert listed.ByteSize() < 4096  # nothing of the refused requests was kept


def test_get_active_tasks_answers_from_bytes_decided_once(live):
    """The hot path takes the request's bytes: garbage is a clear INVALID_ARGUMENT, and a repeated
    request is answered from the memo with the same serialized reply, decided once per revision."""
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    md = enroll(live, "phone-bytes")
    code, details = code_of(lambda: _raw_get_active_tasks(live, md, b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a DeviceInfo" in details
    raw = info(os="android").SerializeToString()
    first = _raw_get_active_tasks(live, md, raw)
    decided = len(live.platform._memo[1])
    again = _raw_get_active_tasks(live, md, raw)
    assert again == first and len(first.tasks) == 1 and len(live.platform._memo[1]) == decided
    assert _raw_get_active_tasks(live, md, info(os="ios").SerializeToString()).tasks  # another key, decided anew
    assert len(live.platform._memo[1]) == decided + 1


def test_decision_memo_is_capped_in_bytes(live, monkeypatch):
    monkeypatch.setattr(service_mod, "MEMO_MAX_BYTES", 20_000)
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    md = enroll(live, "phone-memo")
    for i in range(300):
        live.platform.active_tasks("phone-memo", info(app_version=f"1.{i}.0", region="r" * 200))
        assert live.platform._memo[2] <= 20_000 + 4096
    assert active(live, md) != []


# -- item 3: devices get only what was released to them ------------------------------------------
def test_bundles_go_only_to_devices_they_were_released_to(live):
    p = live.platform
    v1 = live.submit(ROOT / "tasks" / "hello")
    release(p, "hello", v1.version, rule='os == "android"')
    droid, ios = enroll(live, "phone-droid"), enroll(live, "phone-ios")
    assert active(live, droid, os="android") == [f"hello@{v1.version}"]
    assert active(live, ios, os="ios") == []

    def fetch(md, digest):
        return b"".join(c.data for c in live.devices.FetchBundle(device_pb2.FetchBundleRequest(digest=digest),
                                                                  metadata=md, timeout=10))
    assert len(fetch(droid, v1.bundle_digest)) == v1.bundle_size
    code, details = code_of(lambda: fetch(ios, v1.bundle_digest))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not released to device 'phone-ios'" in details
    # a new version replaces v1: a download of v1 already under way still completes
    v2 = live.submit(live.hello_variant("h2", "v2"))
    release(p, "hello", v2.version, rule='os == "android"')
    assert active(live, droid, os="android") == [f"hello@{v2.version}"]
    assert len(fetch(droid, v1.bundle_digest)) == v1.bundle_size
    code, _ = code_of(lambda: fetch(ios, v2.bundle_digest))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def _batch(records, epoch=0) -> tunnel_pb2.UpBatch:
    recs = tunnel_pb2.UpRecords(records=records)
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=len(records), epoch=epoch)


def _report(seq, rel, tv, status="failed", duration=0.1):
    r = tunnel_pb2.RunReport(task="hello", version=tv.version, release_id=rel.id, status=status, duration_s=duration)
    return tunnel_pb2.UpRecord(seq=seq, topic="run_report", ts_ms=1, payload=r.SerializeToString())


def test_reports_only_for_releases_the_device_was_delivered(live):
    p = live.platform
    tv = live.submit(ROOT / "tasks" / "hello")
    rel = release(p, "hello", allow=["phone-in"], stage="beta")
    outsider, insider = enroll(live, "phone-out"), enroll(live, "phone-in")
    assert active(live, outsider) == []
    code, details = code_of(lambda: live.tunnel.Upload(iter([_batch([_report(i, rel, tv) for i in range(1, 21)])]),
                                                       metadata=outsider, timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "never delivered to device 'phone-out'" in details
    assert p.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stats.runs == 0
    assert active(live, insider) == [f"hello@{tv.version}"]
    ack = live.tunnel.Upload(iter([_batch([_report(1, rel, tv, "ok")])]), metadata=insider, timeout=10)
    assert ack.accepted == 1
    p.flush_seen()  # the delivery record is durable: a restarted platform still accepts reports
    from walle.platform.service import Platform
    assert Platform(p.data_dir).delivered_to("phone-in", {rel.id}) == {rel.id}
    assert Platform(p.data_dir).delivered_to("phone-out", {rel.id}) == set()


def test_a_revoked_device_loses_its_watch_stream(live):
    md = enroll(live, "phone-watch")
    stream = live.devices.WatchTasks(device_pb2.WatchRequest(), metadata=md, timeout=10)
    next(stream)
    live.platform.RevokeDevice(admin_pb2.DeviceRef(device_id="phone-watch"))
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- item 4: reports are never lost silently ------------------------------------------------------
def _events(live, device_id):
    return [json.loads(r["payload"]) for r in live.platform.state.reports("event", device_id=device_id)]


def test_a_reset_device_keeps_reporting(live, tmp_path):
    folder = tmp_path / "device"
    up = UpTunnel(folder / "tunnel.sqlite3", live.channel, enroll(live, "phone-reset"))
    for i in range(7):
        up.send("event", {"life": 1, "i": i})
    assert up.flush(timeout=10)
    up.close()
    shutil.rmtree(folder)  # the data folder is wiped and the device enrolled again under the same id
    up = UpTunnel(folder / "tunnel.sqlite3", live.channel, enroll(live, "phone-reset"))
    seqs = [up.send("event", {"life": 2, "i": i}) for i in range(7)]
    assert seqs == list(range(1, 8))  # sequence numbers restart...
    assert up.flush(timeout=10)
    st = up.stats()
    up.close()
    assert (st["acked"], st["duplicates"]) == (7, 0)  # ...and the cloud stores them all
    assert [(e["life"], e["i"]) for e in _events(live, "phone-reset")] == \
        [(1, i) for i in range(7)] + [(2, i) for i in range(7)]


def test_the_ack_carries_the_clouds_high_water_mark(live, tmp_path):
    md = enroll(live, "phone-hw")
    rec = lambda seq: tunnel_pb2.UpRecord(seq=seq, topic="event", payload=json.dumps({"s": seq}).encode())  # noqa: E731
    ack = live.tunnel.Upload(iter([_batch([rec(1), rec(2), rec(3)], epoch=42)]), metadata=md, timeout=10)
    assert (ack.accepted, ack.max_seq) == (3, 3)
    ack = live.tunnel.Upload(iter([_batch([rec(2)], epoch=42)]), metadata=md, timeout=10)
    assert (ack.duplicates, ack.max_seq) == (1, 3)  # what the cloud holds, not the batch's maximum
    # a device whose queue never assigned seq 50 learns the cloud holds it, and starts a new epoch
    up = UpTunnel(tmp_path / "q.sqlite3", live.channel, md)
    live.tunnel.Upload(iter([_batch([rec(50)], epoch=up.epoch)]), metadata=md, timeout=10)
    first = up.epoch
    up.send("event", {"s": "mine"})
    assert up.flush(timeout=10)
    assert up.epoch != first and up.stats()["acked"] == 1
    up.close()
    assert {"s": "mine"} in _events(live, "phone-hw")


@pytest.mark.parametrize("bad,needle", [(dict(duration=math.nan), "duration_s"),
                                        (dict(duration=-1.0), "duration_s"),
                                        (dict(status="Not A Status"), "status")])
def test_an_invalid_report_is_refused_not_acknowledged(live, bad, needle):
    tv = live.submit(ROOT / "tasks" / "hello")
    rel = release(live.platform, "hello")
    md = enroll(live, "phone-nan")
    assert active(live, md)
    code, details = code_of(lambda: live.tunnel.Upload(iter([_batch([_report(1, rel, tv, **bad)])]), metadata=md,
                                                       timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details and "seq 1" in details
    assert live.platform.state.reports("run_report") == []
    ack = live.tunnel.Upload(iter([_batch([_report(1, rel, tv, "ok", 0.5)])]), metadata=md, timeout=10)
    assert (ack.accepted, ack.duplicates) == (1, 0)  # the seq was never taken by the refused record


def test_cli_enrolls_a_device_for_a_user(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from walle.device_host.identity import Credentials
    from walle.platform.cli import main
    monkeypatch.setenv("WALLE_CONFIG", str(tmp_path / "no-config.toml"))
    data, out = tmp_path / "data", tmp_path / "cred.json"
    res = CliRunner().invoke(main, ["--data-dir", str(data), "device", "enroll", "--device-id", "p1",
                                    "--user-id", "alice", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert Credentials.load(out).user_id == "alice"
    res = CliRunner().invoke(main, ["--data-dir", str(data), "device", "enroll", "--user-id", "not ok"])
    assert res.exit_code == 2 and "user id" in res.output
    from walle.platform.service import Platform
    assert Platform(data).device_user("p1") == "alice"
