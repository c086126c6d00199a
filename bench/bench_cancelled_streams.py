"""Cancelled download streams against a live server (real gRPC on 127.0.0.1): N devices each read one
chunk of a bundle larger than one chunk (64 KB) and cancel. Prints the server process's thread count
before and after, whether every RPC kind still answers within a deadline, and how long stop() took.

Also times PullBatches' request check for a request listing 40,001 batch ids, one repeated (server CPU spent before
the request is refused)."""
import argparse
import os
import pathlib
import shutil
import tempfile
import threading
import time

import grpc

from walle.platform.auth import bearer_metadata
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, admin_pb2_grpc, bundle, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def big_task(tmp: pathlib.Path) -> pathlib.Path:
    dst = tmp / "big"
    shutil.copytree(ROOT / "tasks" / "hello", dst)
    (dst / "blob.txt").write_text(os.urandom(300 * 1024).hex()[:900 * 1024])  # ~450 KB after compression
    return dst


def probe(name, call) -> str:
    t0 = time.perf_counter()
    try:
        call()
        return f"{name}: ok in {(time.perf_counter() - t0) * 1000:.0f} ms"
    except grpc.RpcError as e:
        return f"{name}: {e.code().name} after {(time.perf_counter() - t0) * 1000:.0f} ms"


def cancelled_streams(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        p = Platform(tmp / "data")
        _m, files = validate_task_dir(big_task(tmp))
        tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"))
        p.CreateRelease(admin_pb2.CreateReleaseRequest(task=tv.name, version=tv.version))
        md = bearer_metadata(p.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone-1")).token)
        server, port, stop = build_server(p, port=0)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        dev = device_pb2_grpc.DeviceServiceStub(channel)
        tun = tunnel_pb2_grpc.TunnelServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        print(f"bundle {tv.bundle_size} bytes; threads before: {threading.active_count()}")
        got = 0
        for _ in range(n):
            call = dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest), metadata=md, timeout=5)
            try:
                next(call)
                got += 1
            except grpc.RpcError as e:
                print(f"  stream {_ + 1}: {e.code().name} before its first chunk")
            call.cancel()
        print(f"{got} of {n} streams got their first chunk")
        time.sleep(1.0)
        print(f"threads after {n} cancelled streams: {threading.active_count()} "
              f"({sorted({t.name.rsplit('_', 1)[0] for t in threading.enumerate()})})")
        for line in (
            probe("ListTasks", lambda: admin.ListTasks(admin_pb2.Empty(), timeout=5)),
            probe("EnrollDevice", lambda: admin.EnrollDevice(admin_pb2.EnrollRequest(device_id="p2"), timeout=5)),
            probe("FetchBundle", lambda: list(dev.FetchBundle(device_pb2.FetchBundleRequest(digest=tv.bundle_digest),
                                                              metadata=md, timeout=5))),
            probe("Upload", lambda: tun.Upload(iter([]), metadata=md, timeout=5)),
            probe("GetActiveTasks", lambda: dev.GetActiveTasks(device_pb2.DeviceInfo(), metadata=md, timeout=5)),
        ):
            print("  " + line)
        channel.close()
        t0 = time.perf_counter()
        done = threading.Event()
        threading.Thread(target=lambda: (stop(1.0), done.set()), daemon=True).start()
        finished = done.wait(15)
        print(f"stop(grace=1.0): {'returned in %.2f s' % (time.perf_counter() - t0) if finished else 'did not return in 15 s'}")
        from concurrent.futures import thread as cf_thread
        left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        left += [t.name for t in list(cf_thread._threads_queues) if t.is_alive()]  # joined at exit
        print(f"threads the interpreter would wait for at exit: {len(left)}")
        if left:
            os._exit(0)  # the interpreter would wait for them forever


def pull_check_cpu(n: int) -> None:
    from walle.platform.coda import sample_service
    from walle.platform.coda.kvstore import SQLiteKV
    from walle.platform.coda.mappings import Mappings
    from walle.protos import coda_pb2
    with tempfile.TemporaryDirectory() as tmp:
        m = Mappings(SQLiteKV(str(pathlib.Path(tmp) / "kv.sqlite3")))
        svc = sample_service.SampleServicer(m, lambda ctx: "dev", lambda d: "alice")
        req = coda_pb2.PullBatchesRequest(day=1, batch_ids=[f"1.{i}" for i in range(n - 1)] + ["1.0"])
        t0 = time.process_time()
        try:
            svc._select("dev", req)
            outcome = "accepted"
        except Exception as e:  # noqa: BLE001 - we print whatever refused it
            outcome = f"{type(e).__name__}: {str(e)[:90]}"
        print(f"PullBatches check of {n} batch ids: {time.process_time() - t0:.3f} s CPU ({outcome})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--ids", type=int, default=40_001)
    args = ap.parse_args()
    pull_check_cpu(args.ids)
    cancelled_streams(args.streams)
