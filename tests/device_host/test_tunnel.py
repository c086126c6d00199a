"""Up tunnel against a real platform server: at-least-once with cloud-side dedup, order, persistence
across restarts, the queue cap; down tunnel resources verified and cached by digest."""
import json
import zlib

import grpc
import pytest

from walle.device_host.tunnel import DownTunnel, TunnelError, UpTunnel, tunnel_ops
from walle.platform.auth import bearer_metadata
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, device_pb2, tunnel_pb2, tunnel_pb2_grpc


class Live:
    def __init__(self, tmp_path):
        self.platform = Platform(tmp_path / "platform")
        self.server, self.port, self.stop = build_server(self.platform, port=0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def enroll(self, device_id):
        return bearer_metadata(self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id)).token)

    def events(self, device_id):
        return [(r["seq"], r["topic"], r["payload"]) for r in self.platform.state.events(device_id)]

    def close(self):
        self.channel.close()
        self.stop(0)


def release_tunnel_task(live, tmp_path, name="reader"):
    from walle.platform.manifest import validate_task_dir
    from walle.protos import bundle
    src = tmp_path / name
    src.mkdir()
    (src / "task.toml").write_text(f'name = "{name}"\nentry = "main.py"\napis = ["tunnel"]\n')
    (src / "main.py").write_text("def main(event):\n    return 1\n")
    _m, files = validate_task_dir(src)
    tv = live.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files)))
    live.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version))


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.close()


class AckLost(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """The upload reaches the cloud, then the connection drops before the device reads the ack."""

    def intercept_stream_unary(self, continuation, details, request_iterator):
        continuation(details, request_iterator).result()  # the cloud stores the records
        raise AckLost.Lost()

    def intercept_unary_unary(self, continuation, details, request):
        got = continuation(details, request)
        if details.method.endswith("/UploadBatch"):  # the one-batch upload, a unary call
            got.result()
            raise AckLost.Lost()
        return got

    class Lost(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection lost before the ack"


def test_records_arrive_once_in_order_even_when_acks_are_lost(live, tmp_path):
    md = live.enroll("dev-1")
    db = tmp_path / "dev" / "tunnel.sqlite3"
    lossy = UpTunnel(db, grpc.intercept_channel(live.channel, AckLost()), md)
    seqs = [lossy.send("event", {"i": i}) for i in range(7)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 7
    with pytest.raises(grpc.RpcError):
        lossy.flush_once()
    assert lossy.pending() == 7  # no ack, nothing deleted
    lossy.close()

    up = UpTunnel(db, live.channel, md)  # the same queue, reopened
    more = [up.send("task.demo.metric", {"i": i}) for i in range(7, 10)]
    assert more[0] > seqs[-1]
    assert up.flush(timeout=10)
    st = up.stats()
    assert st["pending"] == 0 and st["sent"] == 10
    assert st["duplicates"] == 7 and st["acked"] == 3  # the cloud dropped the resent seven by seq
    rows = live.events("dev-1")
    assert [r[0] for r in rows] == seqs + more
    assert [json.loads(r[2])["i"] for r in rows] == list(range(10))
    up.close()


def test_a_platform_without_upload_batch_gets_streams(tmp_path):
    """A host talking to an older platform (no UploadBatch): one UNIMPLEMENTED, then Upload streams;
    and an older host's Upload stream of one batch is stored as before."""
    from walle.platform.server import LoopServer, TunnelServicer, generated_handlers, register_handlers
    platform = Platform(tmp_path / "platform")
    servicer = TunnelServicer(platform)
    service, handlers = generated_handlers(tunnel_pb2_grpc.add_TunnelServiceServicer_to_server, servicer)
    del handlers["UploadBatch"]  # what a platform from before it registers
    old = LoopServer(lambda server: register_handlers(server, service, handlers), port=0)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{old.port}")
        md = bearer_metadata(platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="dev-old")).token)
        up = UpTunnel(tmp_path / "dev" / "tunnel.sqlite3", channel, md)
        up.send("event", {"i": 1})
        assert up.flush_once() == 1 and not up._unary
        up.send("event", {"i": 2})
        assert up.flush_once() == 1
        assert [json.loads(r["payload"])["i"] for r in platform.state.events("dev-old")] == [1, 2]
        up.close()
        channel.close()
    finally:
        old.stop(0)


def test_one_batch_goes_as_a_unary_call_and_an_old_style_stream_still_works(live, tmp_path):
    md = live.enroll("dev-u")
    seen = []

    class Spy(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen.append(details.method.rsplit("/", 1)[1])
            return continuation(details, request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            seen.append(details.method.rsplit("/", 1)[1])
            return continuation(details, request_iterator)
    up = UpTunnel(tmp_path / "dev" / "tunnel.sqlite3", grpc.intercept_channel(live.channel, Spy()), md)
    up.send("event", {"i": 1})
    assert up.flush_once() == 1 and seen == ["UploadBatch"]
    up.close()
    # an older host streams its batch through Upload: stored the same way
    recs = tunnel_pb2.UpRecords(records=[tunnel_pb2.UpRecord(seq=2, topic="event", ts_ms=1, payload=b'{"i": 2}')])
    ack = tunnel_pb2_grpc.TunnelServiceStub(live.channel).Upload(iter([tunnel_pb2.UpBatch(
        zlib_records=zlib.compress(recs.SerializeToString()), count=1, epoch=up.epoch)]), metadata=md, timeout=10)
    assert (ack.accepted, ack.max_seq) == (1, 2)
    assert [json.loads(r[2])["i"] for r in live.events("dev-u")] == [1, 2]


def test_queue_survives_restart_and_seq_keeps_growing(live, tmp_path):
    md = live.enroll("dev-2")
    db = tmp_path / "dev2" / "tunnel.sqlite3"
    offline = UpTunnel(db, grpc.insecure_channel("127.0.0.1:1"), md, timeout=1)
    a = offline.send("log", {"line": "before"})
    assert offline.flush(timeout=0.5) is False  # nothing listens on port 1
    offline.close()
    up = UpTunnel(db, live.channel, md)
    assert up.pending() == 1
    assert up.flush(timeout=10)
    up.send("log", {"line": "after"})  # the highest seq was deleted; AUTOINCREMENT still moves on
    assert up.flush(timeout=10)
    up.close()
    up = UpTunnel(db, live.channel, md)
    c = up.send("log", {"line": "third"})
    assert c == a + 2
    assert up.flush(timeout=10)
    assert [r[0] for r in live.events("dev-2")] == [a, a + 1, a + 2]
    up.close()


def test_background_flusher_retries_until_the_cloud_is_back(tmp_path):
    platform = Platform(tmp_path / "p")
    md = bearer_metadata(platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="dev-3")).token)
    # Reserve a port, then stop: the device starts while the cloud is down.
    server, port, stop = build_server(platform, port=0)
    stop(0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    up = UpTunnel(tmp_path / "d" / "tunnel.sqlite3", channel, md, timeout=2)
    up.start(interval=0.1)
    for i in range(5):
        up.send("event", {"i": i})
    import time
    deadline = time.time() + 20  # wait for the first failed attempt (slow on a busy machine)
    while not up.last_error and time.time() < deadline:
        time.sleep(0.05)
    assert up.pending() == 5 and up.last_error.startswith("UNAVAILABLE")
    server, port2, stop = build_server(platform, port=port)
    try:
        deadline = time.time() + 30
        while up.pending() and time.time() < deadline:
            time.sleep(0.1)
        assert up.pending() == 0
        assert len(platform.state.events("dev-3")) == 5
    finally:
        up.close()
        channel.close()
        stop(0)


def test_queue_cap_drops_oldest_low_priority_first(tmp_path):
    up = UpTunnel(tmp_path / "t.sqlite3", None, max_records=5)
    rr = up.send("run_report", tunnel_pb2.RunReport(task="t", status="ok").SerializeToString())
    logs = [up.send("log", {"i": i}) for i in range(3)]
    ev = up.send("event", {"e": 1})
    assert up.pending() == 5
    up.send("delivery", tunnel_pb2.DeliveryReport(task="t", status="installed").SerializeToString())
    up.send("event", {"e": 2})
    kept = up.pending_records()
    assert len(kept) == 5 and up.stats()["dropped"] == 2
    assert [s for s, _ in kept][:2] == [rr, logs[2]]  # the two oldest logs went first
    assert ev in [s for s, _ in kept]
    for i in range(5):
        up.send("behavior", b"x")
    topics = [t for _, t in up.pending_records()]
    assert "log" not in topics and "event" not in topics and topics.count("run_report") == 1
    up.close()


def test_send_refuses_bad_topics_and_payloads(tmp_path):
    up = UpTunnel(tmp_path / "t.sqlite3", None)
    with pytest.raises(TunnelError, match="topic"):
        up.send("Bad Topic", b"")
    with pytest.raises(TunnelError, match="limit"):
        up.send("log", b"x" * (300 * 1024))
    with pytest.raises(TunnelError, match="JSON-able"):
        up.send("log", 3.5)
    assert up.pending() == 0
    up.close()


def test_task_ops_restrict_topics_and_read_resources(live, tmp_path):
    md = live.enroll("dev-4")
    up = UpTunnel(tmp_path / "t.sqlite3", live.channel, md)
    down = DownTunnel(tmp_path / "res", live.channel, md)
    ops = tunnel_ops("mytask", up, down)
    ops["tunnel.up"]("task.mytask.metrics", {"auc": 0.7})
    ops["tunnel.up"]("behavior", {"ts": 1, "item_id": 42, "event": "click", "value": 1.0})
    with pytest.raises(TunnelError, match="may only send"):
        ops["tunnel.up"]("task.other", {"x": 1})
    with pytest.raises(TunnelError, match="may only send"):
        ops["tunnel.up"]("run_report", {"x": 1})
    with pytest.raises(TunnelError, match="BehaviorLog"):
        ops["tunnel.up"]("behavior", {"no_such_field": 1})
    assert [t for _, t in up.pending_records()] == ["task.mytask.metrics", "behavior"]

    live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="conf/thresholds", data=b'{"t": 0.5}',
                                                                   metadata_json='{"kind": "json"}'))
    live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="blob/raw", data=b"\x00\xffraw"))
    # resources go only to devices released a task that may read them (granted the "tunnel" API)
    with pytest.raises(TunnelError, match="PERMISSION_DENIED"):
        ops["tunnel.down"]("conf/thresholds")
    release_tunnel_task(live, tmp_path)
    live.platform.active_tasks("dev-4", device_pb2.DeviceInfo(host_version="0.1.0"))
    got = ops["tunnel.down"]("conf/thresholds")
    assert got["encoding"] == "json" and got["data"] == {"t": 0.5} and got["version"] == "v1"
    assert got["metadata"] == {"kind": "json"}
    raw = ops["tunnel.down"]("blob/raw")
    assert raw["encoding"] == "base64" and raw["data"] == "AP9yYXc="
    # format "info": what a task compares to decide whether to download, without the bytes
    info = ops["tunnel.down"]("conf/thresholds", format="info")
    assert info == {"name": "conf/thresholds", "version": "v1", "digest": got["digest"], "metadata": {"kind": "json"}}
    with pytest.raises(TunnelError, match="NOT_FOUND"):
        ops["tunnel.down"]("conf/missing")
    # cached by digest: a corrupted cache file is detected and fetched again
    cached = list((tmp_path / "res").iterdir())
    assert len(cached) == 2
    target = [p for p in cached if p.read_bytes() == b'{"t": 0.5}'][0]
    target.write_bytes(b'{"t": 9.9}')
    info, data = down.fetch_resource("conf/thresholds")
    assert data == b'{"t": 0.5}'
    up.close()


def test_sandboxed_task_uses_the_tunnel_only_when_granted(live, tmp_path):
    from walle.device_host.host import DeviceHost
    from walle.device_host.identity import Credentials
    from walle.device_host.sandbox import Sandbox
    from walle.platform.manifest import validate_task_dir
    from walle.protos import bundle

    main = ("from walle import tunnel\n\ndef main(event):\n"
            "    got = tunnel.down('conf/t')\n"
            "    tunnel.up('task.{name}.metrics', {{'t': got['data']['t']}})\n"
            "    return got['version']\n")
    for name, apis in (("granted", '["tunnel"]'), ("denied", '["log"]')):
        src = tmp_path / name
        src.mkdir()
        (src / "task.toml").write_text(f'name = "{name}"\nentry = "main.py"\napis = {apis}\n')
        (src / "main.py").write_text(main.format(name=name))
        _m, files = validate_task_dir(src)
        tv = live.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files)))
        live.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=name, version=tv.version))
    live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="conf/t", data=b'{"t": 7}'))
    token = live.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="dev-5")).token
    with Sandbox() as sb:
        host = DeviceHost(tmp_path / "dev", "", attrs={}, sandbox=sb, credentials=Credentials("dev-5", token),
                          channel=live.channel)
        host.sync_now()
        ok = host.run_task("granted", {})
        assert ok.status == "ok" and ok.value == "v1"
        denied = host.run_task("denied", {})
        assert denied.status == "error" and "not an allowed API" in denied.error
        assert host.up.flush(timeout=10)
        host.close()
    rows = live.events("dev-5")
    assert [(t, json.loads(p)) for _s, t, p in rows] == [("task.granted.metrics", {"t": 7})]


def test_a_record_the_cloud_refuses_does_not_sink_its_batch(live, tmp_path):
    md = live.enroll("dev-6")
    up = UpTunnel(tmp_path / "t.sqlite3", live.channel, md)
    a = up.send("event", {"n": 1})
    up.send("metrics", {"n": 2})  # a topic this cloud has no handler for
    c = up.send("run_report", tunnel_pb2.RunReport(task="t", status="ok").SerializeToString())
    d = up.send("event", {"n": 4})
    assert up.flush(timeout=10)
    st = up.stats()
    assert st["rejected"] == 1 and st["pending"] == 0
    assert [r[0] for r in live.events("dev-6")] == [a, d]
    assert [r["seq"] for r in live.platform.state.reports("run_report", device_id="dev-6")] == [c]
    up.close()


def test_queue_is_capped_in_bytes_and_per_task_and_survives_a_restart(tmp_path):
    from walle.protos.errors import ResourceExhausted
    up = UpTunnel(tmp_path / "q.sqlite3", None, max_bytes=1_000_000, task_max_bytes=600_000)
    keep = up.send("run_report", b"r" * 100_000)
    for _ in range(3):
        up.send("task.a", b"a" * 200_000, owner="a")
    with pytest.raises(ResourceExhausted, match="share"):
        up.send("task.a", b"a" * 200_000, owner="a")
    assert up.owner_bytes("a") == 600_000
    for _ in range(3):
        up.send("task.b", b"b" * 200_000, owner="b")  # over max_bytes: the oldest task records go first
    assert up.stats()["pending_bytes"] <= 1_000_000 and up.stats()["dropped"] == 2
    assert up.owner_bytes("a") == 200_000 and up.owner_bytes("b") == 600_000
    assert up.pending_records()[0] == (keep, "run_report")
    up.close()
    again = UpTunnel(tmp_path / "q.sqlite3", None, max_bytes=1_000_000, task_max_bytes=600_000)
    assert (again.owner_bytes("a"), again.owner_bytes("b")) == (200_000, 600_000)
    again.close()
