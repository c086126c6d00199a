"""Platform state on SQLite vs PostgreSQL, side by side in one run: what the serving and operator
paths cost on each implementation.

- GetActiveTasks over real gRPC (127.0.0.1, one client thread): wall µs per request.
- revision read (what every replica's watcher polls): µs per read.
- release create (one release decision: transaction, chain settled, audit, revision): ms each.
- report batch (50 run reports stored, duplicates skipped): ms per batch.
PostgreSQL is a throwaway local cluster (initdb in a temp folder, fsync off like -F).
    .venv/bin/python bench/bench_state.py [--requests 2000] [--releases 60]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(url: str, folder: pathlib.Path, requests: int, releases: int) -> dict:
    import grpc

    from walle.platform.auth import bearer_metadata
    from walle.platform.manifest import validate_task_dir
    from walle.platform.server import build_server
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, bundle, device_pb2, device_pb2_grpc
    p = Platform(folder, state=url)
    tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(validate_task_dir(ROOT / "tasks" / "hello")[1]),
                                                  author="bench"))
    md = bearer_metadata(p.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1")).token)
    out = {}
    times = []
    for _ in range(releases):
        t = time.perf_counter()
        p.releases.create("hello", tv.version, actor="bench")
        times.append(time.perf_counter() - t)
    out["release create ms (median)"] = statistics.median(times) * 1e3
    t = time.perf_counter()
    n = 2000
    for _ in range(n):
        p.state.revision()
    out["revision read µs"] = (time.perf_counter() - t) / n * 1e6
    batches = 40
    t = time.perf_counter()
    for b in range(batches):
        rows = [("d1", b * 50 + i, 1, "hello", tv.version, "r1", "ok", 0.1, 10, "", "manual") for i in range(50)]
        p.state.add_reports("run_report", rows)
    out["report batch (50) ms"] = (time.perf_counter() - t) / batches * 1e3
    _server, port, stop = build_server(p, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            info = device_pb2.DeviceInfo(host_version="9.0.0")
            assert len(stub.GetActiveTasks(info, metadata=md, timeout=10).tasks) == 1
            t = time.perf_counter()
            for _ in range(requests):
                stub.GetActiveTasks(info, metadata=md, timeout=10)
            out["GetActiveTasks µs (gRPC, wall)"] = (time.perf_counter() - t) / requests * 1e6
    finally:
        stop(0)
        p.state.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--releases", type=int, default=60)
    args = ap.parse_args()
    from walle.platform.state.pgcluster import fresh_schema, throwaway_cluster
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-state-"))
    try:
        results = {"sqlite": run(f"sqlite:///{tmp / 's' / 'state.sqlite3'}", tmp / "s", args.requests, args.releases)}
        with throwaway_cluster() as pg:
            results["postgresql"] = run(fresh_schema(pg), tmp / "p", args.requests, args.releases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'measure':34} {'sqlite':>10} {'postgresql':>11}")
    for k in results["sqlite"]:
        print(f"{k:34} {results['sqlite'][k]:10.1f} {results['postgresql'][k]:11.1f}")


if __name__ == "__main__":
    main()
