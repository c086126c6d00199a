"""How long 1,000 emulated devices take to install a new release.

The platform server runs in its own process (as in production); the fleet (one process, one shared gRPC
channel, one thread pool, one shared WatchTasks stream) enrolls N devices, syncs once, then a release
of tasks/hello is created. The clock runs from the CreateRelease call until every device has installed
the bundle and uploaded its delivery report (fleet devices skip fsync: they share one disk). Prints per-device latency (release -> installed) p50/p99,
the total, and the platform's delivered count. Target: <= 10 s for 1,000 devices on 2 cores.

    python bench/bench_fleet_sync.py [--devices 1000] [--workers 32]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import shutil
import signal
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 300


def serve(data_dir: str, conn, state: str = "", kv: str = "") -> None:
    """One platform server process: `state` a state URL (default SQLite in data_dir); `kv` a CoDA
    key-value store URL to also serve sample batches from (SampleService, the device's bound user)."""
    import functools

    from walle.platform.server import build_server, device_of
    from walle.platform.service import Platform
    platform = Platform(data_dir, state=state)
    extra = None
    if kv:
        from walle.platform.coda.kvstore import open_store
        from walle.platform.coda.mappings import Mappings
        from walle.platform.coda.sample_service import SampleServicer, add_to_server
        servicer = SampleServicer(Mappings(open_store(kv)), functools.partial(device_of, platform), platform.device_user)
        extra = functools.partial(add_to_server, servicer=servicer)
    _server, port, stop = build_server(platform, port=0, max_workers=64, extra=extra)
    conn.send(port)
    conn.recv()  # until the parent says stop
    stop(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=32)
    args = ap.parse_args()
    signal.alarm(TIME_LIMIT_S)  # bounded: never hang a CI run

    from walle.device_host.fleet import Fleet, _percentile
    from walle.platform.manifest import validate_task_dir
    from walle.protos import admin_pb2, admin_pb2_grpc, bundle

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-fleet-"))
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(str(tmp / "platform"), child), daemon=True)
    proc.start()
    port = parent.recv()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    try:
        def enroll(device_id: str, user_id: str) -> str:
            return admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, user_id=user_id, actor="bench"),
                                      timeout=60).token

        t = time.perf_counter()
        fleet = Fleet(args.devices, address, tmp / "fleet", seed=1, enroll=enroll, workers=args.workers,
                      channel=channel)
        setup_s = time.perf_counter() - t
        warm = fleet.sync_all()  # connections up, nothing released yet
        assert warm.synced == args.devices, warm.errors

        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"), timeout=60)
        fleet.start_watch()
        fleet.wait_change(10)  # the stream is live
        fleet.wait_change(0.5)  # drain the notice of the submit, if any

        t0 = time.perf_counter()
        rel = admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version), timeout=60)
        if not fleet.wait_change(10):
            sys.exit("no ListChanged within 10 s of the release")
        notice_s = time.perf_counter() - t0
        st = fleet.sync_all()
        left = fleet.flush_all(timeout=30)  # reports that did not make it in the round
        total_s = time.perf_counter() - t0
        latencies = [notice_s + x for x in st.latencies]

        installed = fleet.installed_counts().get("hello", 0)
        stats = admin.GetRelease(admin_pb2.ReleaseRef(id=rel.id), timeout=60).stats
        print(f"devices                  {args.devices} (workers {args.workers}; setup incl. enrollment {setup_s:.1f}s)")
        print(f"installed                {installed}/{args.devices}  (sync failures {st.failed} {st.errors or ''})")
        print(f"platform delivered       {stats.delivered}  (devices with reports still queued: {left})")
        print(f"release -> ListChanged   {notice_s * 1000:.0f} ms")
        print(f"per-device latency p50   {_percentile(latencies, 50) * 1000:.0f} ms")
        print(f"per-device latency p99   {_percentile(latencies, 99) * 1000:.0f} ms")
        print(f"total (all installed + reported)  {total_s:.2f} s   target <= 10 s: {'OK' if total_s <= 10 else 'MISSED'}")
        fleet.close()
    finally:
        channel.close()
        parent.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
