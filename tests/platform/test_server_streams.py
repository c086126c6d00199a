"""Streams that clients cancel or abandon, over real gRPC on 127.0.0.1: they must not hold server
threads, every kind of call keeps answering, stop() is bounded, and `walle platform serve` exits
on SIGTERM (a real subprocess)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import (admin_pb2, admin_pb2_grpc, bundle, device_pb2, device_pb2_grpc, tunnel_pb2,
                          tunnel_pb2_grpc)

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024
INFO = device_pb2.DeviceInfo(user_id="u1", host_version="0.1.0")  # tasks/hello needs host >= 0.1.0


def big_task(tmp: pathlib.Path) -> pathlib.Path:
    """tasks/hello plus ~450 KB of incompressible text: a bundle of several 64 KB chunks."""
    dst = tmp / "big"
    shutil.copytree(ROOT / "tasks" / "hello", dst)
    (dst / "blob.txt").write_text(os.urandom(450 * 1024).hex()[:900 * 1024])
    toml = dst / "task.toml"  # granted the tunnel API: its devices may download resources
    toml.write_text(toml.read_text().replace('apis = ["log", "storage"]', 'apis = ["log", "storage", "tunnel"]'))
    return dst


def setup_platform(p: Platform, tmp: pathlib.Path):
    """A released multi-chunk bundle, a multi-chunk resource and an enrolled device."""
    _m, files = validate_task_dir(big_task(tmp))
    tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="tester"))
    p.CreateRelease(admin_pb2.CreateReleaseRequest(task=tv.name, version=tv.version))
    p.PublishResource(admin_pb2.PublishResourceRequest(name="blobs/big", data=os.urandom(300 * 1024)))
    md = bearer_metadata(p.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token)
    p.active_tasks("phone-1", INFO)  # the device has polled: the bundle and resources are released to it
    p.flush_seen()  # and its attributes are stored, for a server in another process
    assert tv.bundle_size > 4 * CHUNK
    return tv, md


def upload_batch(seq: int) -> tunnel_pb2.UpBatch:
    recs = tunnel_pb2.UpRecords(records=[tunnel_pb2.UpRecord(seq=seq, topic="event", ts_ms=1,
                                                             payload=json.dumps({"n": seq}).encode())])
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=1)


def busy_rpc_threads() -> list[str]:
    """Server pool threads currently inside a task."""
    out = []
    for t in threading.enumerate():
        frame = sys._current_frames().get(t.ident)
        while t.name.startswith("walle-rpc") and frame is not None:
            code = frame.f_code
            if code.co_name == "run" and code.co_filename.endswith(os.path.join("futures", "thread.py")):
                out.append(t.name)
                break
            frame = frame.f_back
    return out


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def stop_within(stop, grace: float, bound: float) -> bool:
    """Run stop(grace) in a thread; True if it returned within `bound` seconds."""
    done = threading.Event()
    threading.Thread(target=lambda: (stop(grace), done.set()), daemon=True).start()
    return done.wait(bound)


def live_server(tmp_path: pathlib.Path, serve, workers: int):
    p = Platform(tmp_path / "data")
    tv, md = setup_platform(p, tmp_path)
    _s, port, stop = serve(p, port=0, max_workers=workers)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return p, tv, md, stop, channel


def test_cancelled_streams_hold_no_thread_and_every_call_still_answers(tmp_path, serve):
    p, tv, md, stop, channel = live_server(tmp_path, serve, workers=8)
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    tun = tunnel_pb2_grpc.TunnelServiceStub(channel)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    try:
        assert [t.bundle_digest for t in dev.GetActiveTasks(INFO, metadata=md, timeout=10).tasks] \
            == [tv.bundle_digest]
        # More cancelled streams than the server has pool threads (8), of both download kinds.
        for i in range(20):
            call = dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest), metadata=md, timeout=10)
            first = next(call)
            assert first.total_size == tv.bundle_size and len(first.data) == CHUNK
            call.cancel()
        for i in range(10):
            call = tun.FetchResource(tunnel_pb2.ResourceRequest(name="blobs/big"), metadata=md, timeout=10)
            assert next(call).total_size == 300 * 1024
            call.cancel()
        assert wait_until(lambda: not busy_rpc_threads()), busy_rpc_threads()

        # Every kind of call still answers (each within a deadline; before the fix they all timed out).
        assert [t.name for t in admin.ListTasks(admin_pb2.Empty(), timeout=10).tasks] == [tv.name]
        assert tun.Upload(iter([upload_batch(1)]), metadata=md, timeout=10).accepted == 1
        data = b"".join(c.data for c in dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest),
                                                         metadata=md, timeout=10))
        assert bundle.digest(data) == tv.bundle_digest
        assert admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-2"), timeout=10).device_id == "phone-2"
        assert len(dev.GetActiveTasks(INFO, metadata=md, timeout=10).tasks) == 1
    finally:
        channel.close()
    assert stop_within(stop, grace=1.0, bound=1.0 + 5)
    assert not busy_rpc_threads()


def test_stop_is_bounded_with_streams_still_open(tmp_path, serve):
    p, tv, md, stop, channel = live_server(tmp_path, serve, workers=2)
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    try:
        # Devices that stop reading a download far larger than flow control lets through, but keep
        # their streams open; and a watch stream (it never ends by itself).
        p.PublishResource(admin_pb2.PublishResourceRequest(name="blobs/huge", data=os.urandom(16 << 20)))
        tun = tunnel_pb2_grpc.TunnelServiceStub(channel)
        held = []
        for _ in range(4):
            call = tun.FetchResource(tunnel_pb2.ResourceRequest(name="blobs/huge"), metadata=md)
            next(call)
            held.append(call)
        watch = dev.WatchTasks(device_pb2.WatchRequest(), metadata=md)
        next(watch)
        assert stop_within(stop, grace=0.5, bound=0.5 + 5)
        # Every stream has ended: a held download either got all of its data into the client's
        # buffers before the cancel or ends cancelled; the watch stream ends cancelled.
        for call in held:
            try:
                assert sum(len(c.data) for c in call) > 0
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.RpcError) as e:
            next(watch)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        channel.close()
    assert not busy_rpc_threads()
    assert not [t.name for t in threading.enumerate() if t.name == "walle-grpc-loop"]


def walle(*args: str, cwd: pathlib.Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walle.platform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def start_serving(args: list[str], cwd: pathlib.Path, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`walle ... platform serve` as a real process; returns it and the port it announced."""
    proc = subprocess.Popen([sys.executable, "-m", "walle.platform.cli", *args], cwd=cwd, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"serving on [^:]+:(\d+)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, int(m.group(1))
    proc.wait(30)
    raise AssertionError(f"server did not start (exit {proc.returncode}):\n{''.join(lines)}")


@pytest.mark.slow
def test_serve_exits_promptly_on_sigterm_after_cancelled_streams(tmp_path):
    data = tmp_path / "wd"
    res = walle("--data-dir", str(data), "platform", "init", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    p = Platform(data)
    tv, md = setup_platform(p, tmp_path)
    proc, port = start_serving(["--data-dir", str(data), "platform", "serve", "--port", "0", "--no-coda"], tmp_path)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=(data / "pki" / "ca.pem").read_bytes())
        channel = grpc.secure_channel(f"localhost:{port}", creds)
        dev = device_pb2_grpc.DeviceServiceStub(channel)
        for _ in range(12):  # more than the server's 8 pool threads
            call = dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest), metadata=md, timeout=10)
            next(call)
            call.cancel()
        held = dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest), metadata=md)
        next(held)  # and one device that stops reading but keeps its stream open
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("walle platform serve did not exit within 30 s of SIGTERM")
        assert rc == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
