"""Task sync against a real platform server: install, drop, local rollback, a tampered bundle refused
(the old version keeps running), offline backoff and recovery, UNAUTHENTICATED after a revoke."""
import json
import pathlib
import shutil
import time
from concurrent import futures

import grpc
import pytest

from walle.device_host.identity import HOST_VERSION, Credentials, device_info
from walle.device_host.sync import SyncError, TaskStore, TaskSync
from walle.device_host.tunnel import UpTunnel
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Live:
    def __init__(self, tmp_path, port=0):
        self.tmp = tmp_path
        self.platform = Platform(tmp_path / "platform")
        self.start(port)

    def start(self, port=0):
        self.server, self.port, self.stop_server = build_server(self.platform, port=port)
        self.address = f"127.0.0.1:{self.port}"

    def submit(self, text=""):
        src = self.tmp / "src" / "hello"
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(ROOT / "tasks" / "hello", src)
        if text:
            (src / "main.py").write_text((src / "main.py").read_text() + f"\n# {text}\n")
        _m, files = validate_task_dir(src)
        return self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))

    def release(self, version, rule=""):
        return self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=version, rule=rule))

    def enroll(self, device_id):
        r = self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id))
        return Credentials(r.device_id, r.token, self.address)


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.stop_server(0)


def make_sync(live, tmp_path, cred, channel=None, attrs=None):
    channel = channel or grpc.insecure_channel(live.address)
    up = UpTunnel(tmp_path / cred.device_id / "tunnel.sqlite3", grpc.insecure_channel(live.address), cred.metadata)
    store = TaskStore(tmp_path / cred.device_id / "tasks")
    attrs = attrs if attrs is not None else {"user_id": "u1", "os": "android", "app_version": "2.3.0"}
    sync = TaskSync(store, channel, cred.metadata, lambda: device_info(attrs, cred.device_id), report=up.send)
    return sync, store, up


def delivery_stats(live, release_id):
    return live.platform.GetRelease(admin_pb2.ReleaseRef(id=release_id)).stats


def test_install_update_drop_and_local_rollback(live, tmp_path):
    v1 = live.submit()
    r1 = live.release(v1.version, rule='os == "android"')
    cred = live.enroll("phone-1")
    sync, store, up = make_sync(live, tmp_path, cred)
    res = sync.sync_once()
    assert res.installed == [f"hello@{v1.version}"] and not res.rejected
    t = store.get("hello")
    assert t.version == v1.version and t.release_id == r1.id and t.manifest.entry == "main.py"
    assert "def main(event)" in t.files()["main.py"]
    pointer = json.loads((store.root / "hello" / "current.json").read_text())
    assert pointer["current"]["version"] == v1.version and pointer["previous"] is None
    assert sync.sync_once().installed == []  # nothing changed, nothing fetched
    assert sync.info().installed == [f"hello@{v1.version}"]

    v2 = live.submit("v2")
    r2 = live.release(v2.version, rule='os == "android"')
    assert sync.sync_once().installed == [f"hello@{v2.version}"]
    assert sorted(p.name for p in (store.root / "hello").iterdir() if p.is_dir()) == sorted([v1.version, v2.version])
    # a fresh store object reads the same state from disk
    assert TaskStore(store.root).get("hello").version == v2.version

    back = sync.rollback_local("hello")
    assert back.version == v1.version and store.get("hello").version == v1.version
    assert TaskStore(store.root).get("hello").version == v1.version

    live.platform.RevokeRelease(admin_pb2.ReleaseRef(id=r2.id))
    live.platform.RevokeRelease(admin_pb2.ReleaseRef(id=r1.id))
    res = sync.sync_once()
    assert res.dropped == [f"hello@{v1.version}"] and store.get("hello") is None
    assert not (store.root / "hello").exists()
    with pytest.raises(SyncError, match="no previous version"):
        store.rollback_local("hello")

    assert up.flush(timeout=10)
    assert delivery_stats(live, r1.id).delivered == 1 and delivery_stats(live, r2.id).delivered == 1
    assert delivery_stats(live, r1.id).rolled_back == 1
    up.close()


def test_device_outside_the_rule_gets_nothing(live, tmp_path):
    v1 = live.submit()
    live.release(v1.version, rule='os == "android"')
    sync, store, up = make_sync(live, tmp_path, live.enroll("ios-1"), attrs={"os": "ios"})
    assert sync.sync_once().installed == [] and store.installed() == {}
    up.close()


def test_leftover_tmp_from_a_crash_is_replaced(live, tmp_path):
    v1 = live.submit()
    live.release(v1.version)
    cred = live.enroll("phone-c")
    sync, store, up = make_sync(live, tmp_path, cred)
    junk = store.root / "hello" / f"{v1.version}.tmp"
    junk.mkdir(parents=True)
    (junk / "main.py").write_text("half written")
    sync.sync_once()
    assert "def main(event)" in store.get("hello").files()["main.py"]
    assert not junk.exists()
    up.close()


class TamperingProxy(device_pb2_grpc.DeviceServiceServicer):
    """A man in the middle: forwards to the platform but flips a byte in every bundle."""

    def __init__(self, upstream):
        self.up = device_pb2_grpc.DeviceServiceStub(grpc.insecure_channel(upstream))

    def GetActiveTasks(self, request, context):
        return self.up.GetActiveTasks(request, metadata=context.invocation_metadata())

    def FetchBundle(self, request, context):
        for i, chunk in enumerate(self.up.FetchBundle(request, metadata=context.invocation_metadata())):
            if i == 0:
                data = bytearray(chunk.data)
                data[len(data) // 2] ^= 0xFF
                chunk.data = bytes(data)
            yield chunk


def test_tampered_bundle_is_refused_and_the_old_version_keeps_running(live, tmp_path):
    v1 = live.submit()
    live.release(v1.version)
    cred = live.enroll("phone-t")
    sync, store, up = make_sync(live, tmp_path, cred)
    sync.sync_once()
    assert store.get("hello").version == v1.version

    proxy = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    device_pb2_grpc.add_DeviceServiceServicer_to_server(TamperingProxy(live.address), proxy)
    pport = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    try:
        # the same device (store, tunnel, identity), reached through the proxy
        bad_sync = TaskSync(store, grpc.insecure_channel(f"127.0.0.1:{pport}"), cred.metadata, sync.device_info,
                            report=up.send)
        v2 = live.submit("v2")
        r2 = live.release(v2.version)
        res = bad_sync.sync_once()
        assert res.rejected == [f"hello@{v2.version}"] and res.installed == []
        assert store.get("hello").version == v1.version  # still running v1
        assert sorted(p.name for p in (store.root / "hello").iterdir() if p.is_dir()) == [v1.version]
        again = bad_sync.sync_once()  # a download error is retried on each pull, but reported once
        assert again.rejected == [f"hello@{v2.version}"] and store.get("hello").version == v1.version
        assert up.flush(timeout=10)
        stats = delivery_stats(live, r2.id)
        assert stats.rejected == 1 and stats.delivered == 0
        reason = [r["error"] for r in live.platform.state.reports("delivery", status="rejected")
                  if r["release_id"] == r2.id][0]
        assert "digest mismatch" in reason
        # the honest path still works afterwards
        assert sync.sync_once().installed == [f"hello@{v2.version}"]
    finally:
        proxy.stop(0)
        up.close()


@pytest.mark.slow
def test_offline_backoff_then_recovery_on_the_same_port(tmp_path):
    live = Live(tmp_path)
    v1 = live.submit()
    live.release(v1.version)
    cred = live.enroll("phone-o")
    port = live.port
    live.stop_server(0)  # the platform goes away before the device starts
    sync, store, up = make_sync(live, tmp_path, cred)
    sync.timeout = 2
    sync.start(watch=True)
    try:
        deadline = time.time() + 20  # the first attempt fails fast; on a busy machine it may take a while to run
        while not sync.last_error and time.time() < deadline:
            time.sleep(0.05)
        assert store.installed() == {} and sync.last_error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        live.platform = Platform(tmp_path / "platform")  # a new server process on the same data and port
        live.start(port)
        deadline = time.time() + 20
        while (store.get("hello") is None or sync.last_error) and time.time() < deadline:
            time.sleep(0.1)
        assert store.get("hello").version == v1.version and sync.last_error == ""
    finally:
        sync.stop()
        up.close()
        live.stop_server(0)


def test_revoked_device_stops_syncing_and_keeps_its_tasks(live, tmp_path):
    v1 = live.submit()
    live.release(v1.version)
    cred = live.enroll("phone-r")
    sync, store, up = make_sync(live, tmp_path, cred)
    sync.sync_once()
    live.platform.RevokeDevice(admin_pb2.DeviceRef(device_id="phone-r"))
    sync.start(watch=True)
    deadline = time.time() + 10
    while not sync.unauthenticated and time.time() < deadline:
        time.sleep(0.05)
    assert "revoked" in sync.unauthenticated
    sync._thread.join(timeout=5)
    assert not sync._thread.is_alive()  # stopped, not retrying forever
    assert store.get("hello").version == v1.version
    with pytest.raises(grpc.RpcError) as e:
        sync.sync_once()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    sync.stop()
    up.close()


def test_model_task_refused_when_accept_says_no(live, tmp_path):
    v1 = live.submit()
    r1 = live.release(v1.version)
    cred = live.enroll("phone-m")
    sync, store, up = make_sync(live, tmp_path, cred)
    sync.accept = lambda t: "task needs MNN, which is not installed"
    res = sync.sync_once()
    assert res.rejected == [f"hello@{v1.version}"] and store.installed() == {}
    assert up.flush(timeout=10) and delivery_stats(live, r1.id).rejected == 1
    assert HOST_VERSION == "0.1.0"
    up.close()
