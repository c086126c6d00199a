"""Prometheus metrics, scraped over HTTP from a real server and a real device host: calls and their
status codes per RPC, latency histograms, open watch streams, devices seen, release health."""
import threading
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.device_host.metrics import DeviceMetrics
from walle.device_host.sandbox import Sandbox
from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.metrics import PlatformMetrics
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2, device_pb2_grpc

from .conftest import ROOT


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_platform_metrics_count_rpcs_streams_devices_and_release_health(tmp_path):
    threads_before = set(threading.enumerate())
    platform = Platform(tmp_path / "platform")
    metrics = PlatformMetrics(platform)
    _server, port, stop = build_server(platform, port=0, interceptors=(metrics.interceptor(),))
    mport, stop_metrics = metrics.serve(0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        rel = platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version))
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        md = bearer_metadata(platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token)
        info = device_pb2.DeviceInfo(user_id="u1", os="android", app_version="2.0", host_version="0.1.0")
        for _ in range(3):
            stub.GetActiveTasks(info, metadata=md, timeout=10)
        try:
            stub.GetActiveTasks(info, metadata=bearer_metadata("wrong"), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED

        # one watch stream open while we scrape, none after it is cancelled
        stream = stub.WatchTasks(device_pb2.WatchRequest(), metadata=md)
        first = next(stream)
        assert first.revision
        s = scrape(mport)
        svc = "walle.v1.DeviceService"
        assert value(s, "walle_rpc_requests_total", service=svc, method="GetActiveTasks", code="OK") == 3
        assert value(s, "walle_rpc_requests_total", service=svc, method="GetActiveTasks",
                     code="UNAUTHENTICATED") == 1
        assert value(s, "walle_rpc_latency_seconds_count", service=svc, method="GetActiveTasks") == 4
        assert value(s, "walle_rpc_latency_seconds_bucket", service=svc, method="GetActiveTasks", le="+Inf") == 4
        assert value(s, "walle_rpc_streams_open", service=svc, method="WatchTasks") == 1
        assert value(s, "walle_devices_enrolled") == 1 and value(s, "walle_devices_seen", window="5m") == 1
        stream.cancel()
        deadline = time.monotonic() + 10
        while value(scrape(mport), "walle_rpc_streams_open", service=svc, method="WatchTasks") != 0:
            assert time.monotonic() < deadline, "the cancelled watch stream is still counted as open"
            time.sleep(0.05)
        s = scrape(mport)
        assert value(s, "walle_rpc_requests_total", service=svc, method="WatchTasks", code="CANCELLED") == 1

        # release health from the device's reports (a real device host with a real sandbox)
        sandbox = Sandbox()
        device = DeviceHost(tmp_path / "dev", f"127.0.0.1:{port}", attrs={"user_id": "u2", "os": "android"},
                            sandbox=sandbox, credentials=Credentials(
                                "phone-2", platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-2")).token))
        dm = DeviceMetrics(device)
        dport, stop_device_metrics = dm.serve(0)
        try:
            device.sync_now()
            device.run_task("hello", {"name": "hello", "payload": {"who": "metrics"}})
            device.run_task("hello", {"name": "hello", "payload": {"who": "metrics"}})
            d = scrape(dport)
            assert value(d, "walle_device_runs_total", task="hello", status="ok") == 2
            assert value(d, "walle_device_run_seconds_count", task="hello") == 2
            assert value(d, "walle_device_installed_tasks") == 1
            assert value(d, "walle_device_uptunnel_pending") >= 3  # delivery + 2 run reports (+ logs)
            assert device.up.flush(timeout=10)
            assert value(scrape(dport), "walle_device_uptunnel_pending") == 0
        finally:
            stop_device_metrics()
            device.close()
            sandbox.close()
        s = scrape(mport)
        labels = {"release": rel.id, "task": "hello", "state": "active"}
        stats = platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).stats
        assert value(s, "walle_release_runs", **labels) == stats.runs == 2
        assert value(s, "walle_release_delivered_devices", **labels) == stats.delivered == 1
        assert value(s, "walle_release_failed_runs", **labels) == 0
        assert value(s, "walle_rpc_requests_total", service="walle.v1.TunnelService", method="UploadBatch",
                     code="OK") >= 1  # the report's one batch went as a unary call
    finally:
        channel.close()
        stop_metrics()
        stop(0)
    # the metrics servers and the interceptor leave no thread that would keep the process alive
    assert not [t for t in set(threading.enumerate()) - threads_before if not t.daemon]
