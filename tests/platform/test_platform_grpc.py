"""Submit -> release -> what devices receive over real gRPC; rollout, pause, revoke, rollback, auth."""
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from walle.platform import errors
from walle.platform.rules import in_rollout
from walle.protos import admin_pb2, bundle, device_pb2, tunnel_pb2

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def info(**kw) -> device_pb2.DeviceInfo:
    kw.setdefault("host_version", "0.1.0")  # tasks/hello needs host >= 0.1.0
    return device_pb2.DeviceInfo(**kw)


def active(live, md, **attrs) -> list[str]:
    return live.active(md, **attrs)


def snapshot(p):
    """Everything an invalid request must leave unchanged."""
    return (p.state.revision(), [r["id"] + r["state"] + str(r["rollout"]) for r in p.state.releases()],
            len(p.state.audit_entries(10_000)), [v.version for v in p.repo.list_tasks()])


def release(p, task, version="", **kw):
    has = "rollout" in kw
    return p.CreateRelease(admin_pb2.CreateReleaseRequest(task=task, version=version, has_rollout=has, **kw))


def test_submit_release_and_devices_receive_by_rule(live):
    v1 = live.submit(ROOT / "tasks" / "hello", "v1")
    assert v1.created and len(v1.version) == 40
    rel = release(live.platform, "hello", v1.version[:8], rule='os == "android" and app_version >= "2.0"')
    assert rel.state == "active" and rel.stage == "full" and rel.rollout == 100
    md_a, md_b = live.enroll("phone-a"), live.enroll("phone-b")
    assert active(live, md_a, user_id="a", os="android", app_version="2.3.1") == [f"hello@{v1.version}"]
    assert active(live, md_b, user_id="b", os="ios", app_version="2.3.1") == []
    assert active(live, md_b, user_id="b", os="android", app_version="1.9") == []
    # the bundle downloads by digest and verifies
    t = live.devices.GetActiveTasks(info(user_id="a", os="android", app_version="2.3.1"), metadata=md_a).tasks[0]
    data = b"".join(c.data for c in live.devices.FetchBundle(device_pb2.FetchBundleRequest(digest=t.bundle_digest),
                                                              metadata=md_a))
    files = bundle.unpack(data, t.bundle_digest)
    assert "task.toml" in files and t.manifest.entry in files


def test_identical_submit_creates_no_version(live):
    v1 = live.submit(ROOT / "tasks" / "hello")
    again = live.submit(ROOT / "tasks" / "hello")
    assert not again.created and again.version == v1.version
    assert len(live.platform.GetTaskHistory(admin_pb2.TaskRef(name="hello")).versions) == 1


def test_rollout_growth_keeps_devices_in(live):
    live.submit(ROOT / "tasks" / "hello")
    p = live.platform
    rel = release(p, "hello", rollout=10.0)
    assert rel.stage == "gray"
    users = [f"user{i}" for i in range(1000)]

    def inside():
        return {u for u in users if p.Preview(info(user_id=u)).tasks}
    at10 = inside()
    assert 50 <= len(at10) <= 150  # ~10% of 1000
    p.SetRollout(admin_pb2.SetRolloutRequest(id=rel.id, rollout=50))
    at50 = inside()
    assert at10 <= at50 and 400 <= len(at50) <= 600
    with pytest.raises(errors.FailedPrecondition, match="only grow"):
        p.SetRollout(admin_pb2.SetRolloutRequest(id=rel.id, rollout=20))
    assert inside() == at50
    p.SetRollout(admin_pb2.SetRolloutRequest(id=rel.id, rollout=100))
    assert p.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stage == "full"
    assert len(inside()) == 1000


def test_gray_release_falls_back_to_previous_version(live):
    p = live.platform
    v1 = live.submit(ROOT / "tasks" / "hello")
    v2 = live.submit(live.hello_variant("h2", "v2"))
    release(p, "hello", v1.version)
    gray = release(p, "hello", v2.version, rollout=30.0)
    got = {u: p.Preview(info(user_id=u)).tasks[0].version for u in (f"u{i}" for i in range(300))}
    # exactly the users whose sticky bucket (random salt per release) is in the 30% get v2
    assert got == {u: v2.version if in_rollout(30.0, "hello", gray.salt, u) else v1.version for u in got}
    share = sum(v == v2.version for v in got.values()) / len(got)
    assert 0.15 < share < 0.45  # about 30% (5 standard deviations either side for 300 users)


def test_pause_resume_revoke_and_rollback(live):
    p = live.platform
    md = live.enroll("phone-1")
    v1 = live.submit(ROOT / "tasks" / "hello")
    v2 = live.submit(live.hello_variant("h2", "v2"))
    r1 = release(p, "hello", v1.version)
    r2 = release(p, "hello", v2.version)
    state = lambda r: p.GetRelease(admin_pb2.ReleaseRef(id=r.id)).state  # noqa: E731
    assert (state(r2), state(r1)) == ("active", "fallback")
    assert active(live, md, user_id="u") == [f"hello@{v2.version}"]
    p.PauseRelease(admin_pb2.ReleaseRef(id=r2.id))
    assert active(live, md, user_id="u") == [f"hello@{v1.version}"]  # falls back while paused
    assert (state(r2), state(r1)) == ("paused", "active")  # and says so
    p.ResumeRelease(admin_pb2.ReleaseRef(id=r2.id))
    assert active(live, md, user_id="u") == [f"hello@{v2.version}"]
    assert (state(r2), state(r1)) == ("active", "fallback")
    rb = p.Rollback(admin_pb2.RollbackRequest(task="hello"))
    assert rb.version == v1.version and rb.id not in (r1.id, r2.id) and "rollback of " + r2.id in rb.note
    assert active(live, md, user_id="u") == [f"hello@{v1.version}"]
    history = p.ListReleases(admin_pb2.ReleaseFilter(task="hello")).releases
    assert [r.id for r in history] == [rb.id, r2.id, r1.id]  # nothing rewritten
    assert history[1].version == v2.version and history[1].state == "revoked"  # what was rolled back
    p.RevokeRelease(admin_pb2.ReleaseRef(id=rb.id))
    assert active(live, md, user_id="u") == [f"hello@{v1.version}"]  # never back to the rolled-back v2
    with pytest.raises(errors.FailedPrecondition):
        p.RevokeRelease(admin_pb2.ReleaseRef(id=rb.id))


def test_beta_allow_and_deny_lists(live):
    p = live.platform
    live.submit(ROOT / "tasks" / "hello")
    release(p, "hello", allow=["tester1"], stage="beta", deny=["bad"])
    assert p.Preview(info(user_id="tester1")).tasks
    assert not p.Preview(info(user_id="someone")).tasks
    release(p, "hello", deny=["bad"])
    assert not p.Preview(info(user_id="bad")).tasks
    assert p.Preview(info(user_id="good")).tasks


def test_preview_explains_decision(live):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello", rule='region in ["sg"]')
    reply = live.platform.Preview(info(user_id="x", region="cn"))
    assert not reply.tasks and any("rule is false" in line for line in reply.explanation)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(task="nope"), errors.NotFound, "unknown task"),
    (dict(task="hello", version="ffffffff"), errors.NotFound, "no version"),
    (dict(task="hello", rule='os == '), errors.InvalidArgument, "column"),
    (dict(task="hello", rule='os === "a"'), errors.InvalidArgument, "column"),
    (dict(task="hello", rollout=150.0), errors.InvalidArgument, "between 0 and 100"),
    (dict(task="hello", stage="beta"), errors.InvalidArgument, "allow-list"),
    (dict(task="hello", channel="Bad Channel"), errors.InvalidArgument, "channel"),
])
def test_bad_release_requests_are_refused_and_change_nothing(live, kwargs, exc, text):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    before = snapshot(live.platform)
    with pytest.raises(exc, match=text):
        release(live.platform, **kwargs)
    assert snapshot(live.platform) == before


def test_bad_requests_over_grpc_get_status_codes(live):
    from walle.platform.client import RemoteAdmin
    admin = RemoteAdmin(grpc.insecure_channel(live.address))
    live.submit(ROOT / "tasks" / "hello")
    with pytest.raises(errors.InvalidArgument, match="column"):
        admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", rule="os == ("))
    with pytest.raises(errors.NotFound):
        admin.GetRelease(admin_pb2.ReleaseRef(id="r999"))
    broken = live.tmp / "broken"
    broken.mkdir()
    (broken / "task.toml").write_text('name = "broken"\nentry = "main.py"\n[limits]\nmemory_mb = 0\n')
    (broken / "main.py").write_text("def main(event):\n    return 1\n")
    files = {p.name: p.read_bytes() for p in broken.iterdir()}
    before = snapshot(live.platform)
    with pytest.raises(errors.InvalidArgument, match="memory_mb"):
        admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files)))
    assert snapshot(live.platform) == before
    admin.close()


def test_device_calls_need_a_valid_credential(live):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    for md in [(), (("authorization", "Bearer wdt1.forged"),)]:
        with pytest.raises(grpc.RpcError) as e:
            live.devices.GetActiveTasks(info(user_id="u"), metadata=md, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    md = live.enroll("phone-x")
    assert active(live, md, user_id="u")
    live.platform.RevokeDevice(admin_pb2.DeviceRef(device_id="phone-x"))
    for call in (lambda: live.devices.GetActiveTasks(info(user_id="u"), metadata=md, timeout=5),
                 lambda: list(live.devices.FetchBundle(device_pb2.FetchBundleRequest(digest="sha256:00"), metadata=md)),
                 lambda: live.tunnel.GetResource(tunnel_pb2.ResourceRequest(name="x"), metadata=md)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_device_id_comes_from_the_credential(live):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello", allow=["phone-z"], stage="beta")
    md = live.enroll("phone-y")
    # claiming another device's id in the request does not get its allow-listed release
    assert active(live, md, device_id="phone-z") == []


def test_tampered_or_unknown_bundle_is_refused(live):
    tv = live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    md = live.enroll("phone-t")
    assert active(live, md) == [f"hello@{tv.version}"]
    with pytest.raises(grpc.RpcError) as e:
        list(live.devices.FetchBundle(device_pb2.FetchBundleRequest(digest="sha256:" + "0" * 64), metadata=md))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # not released to it (nor to anyone)
    # flip one byte of the cached bundle on disk: the platform never serves the corrupt bytes
    # (it re-verifies and rebuilds the bundle from git), and a device refuses tampered bytes
    cache = next(live.platform.repo.root.glob("bundles/sha256/*"))
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 1
    cache.write_bytes(bytes(data))
    fresh = platform_after_restart(live)
    served = b"".join(c.data for c in live.devices.FetchBundle(
        device_pb2.FetchBundleRequest(digest=tv.bundle_digest), metadata=md))
    assert bundle.digest(served) == tv.bundle_digest
    assert fresh.blob(tv.bundle_digest) == served
    with pytest.raises(bundle.BundleError):
        bundle.unpack(bytes(data), tv.bundle_digest)


def platform_after_restart(live):
    from walle.platform.service import Platform
    return Platform(live.platform.data_dir)  # no in-memory cache: reads the tampered file first


def test_watch_stream_announces_release_changes(live):
    live.submit(ROOT / "tasks" / "hello")
    md = live.enroll("phone-w")
    stream = live.devices.WatchTasks(device_pb2.WatchRequest(), metadata=md, timeout=10)
    first = next(stream)
    release(live.platform, "hello")
    second = next(stream)
    assert second.revision != first.revision
    stream.cancel()


def _batch(records) -> tunnel_pb2.UpBatch:
    recs = tunnel_pb2.UpRecords(records=records)
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=len(records))


def test_run_reports_aggregate_per_release_and_duplicates_are_dropped(live):
    tv = live.submit(ROOT / "tasks" / "hello")
    rel = release(live.platform, "hello")
    md = live.enroll("phone-r")
    assert active(live, md) == [f"hello@{tv.version}"]  # delivered: the device may report on it

    def rep(seq, status, d):
        r = tunnel_pb2.RunReport(task="hello", version=tv.version, release_id=rel.id, status=status, duration_s=d)
        return tunnel_pb2.UpRecord(seq=seq, topic="run_report", ts_ms=1, payload=r.SerializeToString())
    delivery = tunnel_pb2.DeliveryReport(task="hello", version=tv.version, release_id=rel.id, status="installed")
    batch = _batch([tunnel_pb2.UpRecord(seq=1, topic="delivery", payload=delivery.SerializeToString()),
                    rep(2, "ok", 0.1), rep(3, "ok", 0.3), rep(4, "error", 0.2)])
    ack = live.tunnel.Upload(iter([batch]), metadata=md, timeout=10)
    assert (ack.accepted, ack.duplicates, ack.max_seq) == (4, 0, 4)
    ack = live.tunnel.Upload(iter([batch]), metadata=md, timeout=10)  # re-sent after a lost ack
    assert (ack.accepted, ack.duplicates) == (0, 4)
    stats = live.platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stats
    assert (stats.delivered, stats.ran, stats.runs, stats.failed) == (1, 1, 3, 1)
    assert stats.p50_duration_s == pytest.approx(0.2)


def test_malformed_uploads_are_refused(live):
    md = live.enroll("phone-m")
    bad = [tunnel_pb2.UpBatch(zlib_records=b"not zlib", count=1),
           tunnel_pb2.UpBatch(zlib_records=zlib.compress(b"\xff\xff\xff"), count=1),
           _batch([tunnel_pb2.UpRecord(seq=1, topic="run_report", payload=b"x")]),
           tunnel_pb2.UpBatch(zlib_records=_batch([tunnel_pb2.UpRecord(seq=1, topic="event")]).zlib_records, count=5),
           _batch([tunnel_pb2.UpRecord(seq=0, topic="event")]),
           _batch([tunnel_pb2.UpRecord(seq=1, topic="nonsense")])]
    for b in bad:
        with pytest.raises(grpc.RpcError) as e:
            live.tunnel.Upload(iter([b]), metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_health_service_reports_serving(live):
    stub = health_pb2_grpc.HealthStub(live.channel)
    for svc in ("", "walle.v1.DeviceService", "walle.v1.AdminService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING


def test_audit_trail_records_operator_actions(live):
    live.submit(ROOT / "tasks" / "hello")
    rel = release(live.platform, "hello", actor="alice")
    live.platform.PauseRelease(admin_pb2.ReleaseRef(id=rel.id, actor="bob"))
    entries = live.platform.GetAudit(admin_pb2.AuditRequest()).entries
    actions = [(e.actor, e.action, e.target) for e in entries]
    assert ("alice", "release.create", rel.id) in actions and ("bob", "release.pause", rel.id) in actions
    assert any(a == "task.submit" for _, a, _ in actions)


def test_min_host_version_is_enforced(live):
    live.submit(ROOT / "tasks" / "hello")
    release(live.platform, "hello")
    assert live.platform.Preview(info(user_id="u", host_version="0.1.0")).tasks
    reply = live.platform.Preview(device_pb2.DeviceInfo(user_id="u", host_version="0.0.9"))
    assert not reply.tasks and any("host_version >= 0.1.0" in line for line in reply.explanation)
