"""What a release guard costs on the upload path: run-report batches stored with no guard, then with a
watching guard on the same release (its figures are recomputed after every batch), side by side.

    .venv/bin/python bench/bench_guards.py [--batches 200] [--per-batch 50]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
import zlib

from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, tunnel_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def batch(release_id: str, first_seq: int, n: int) -> tunnel_pb2.UpBatch:
    recs = tunnel_pb2.UpRecords()
    for i in range(n):
        rep = tunnel_pb2.RunReport(task="hello", version="v", release_id=release_id, status="ok" if i % 10 else "error",
                                   duration_s=0.01 * (i % 7), error="" if i % 10 else "ValueError: x")
        recs.records.add(seq=first_seq + i, topic="run_report", ts_ms=1, payload=rep.SerializeToString())
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=n)


def run(guard: dict | None, batches: int, per_batch: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        p = Platform(tmp)
        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files)))
        rel = p.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version))
        if guard:  # watching, never trips: every batch pays for a full judgement
            p.SetReleaseGuard(admin_pb2.ReleaseGuard(release_id=rel.id, min_runs=1, **guard))
        times = []
        for b in range(batches):
            msg = batch(rel.id, 1 + b * per_batch, per_batch)
            t = time.perf_counter()
            p.upload(f"d{b % 20}", msg)
            times.append(time.perf_counter() - t)
        return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--per-batch", type=int, default=50)
    a = ap.parse_args()
    print(f"{a.batches} batches of {a.per_batch} run reports (one release; reports accumulate)")
    print(f"{'upload of':>14} {'p50 ms':>8} {'p90 ms':>8} {'last 20 ms':>11}")
    for label, guard in (("no guard", None), ("failure rate", {"max_failure_rate": 0.5}),
                         ("rate + p99", {"max_failure_rate": 0.5, "max_p99_seconds": 100})):
        t = run(guard, a.batches, a.per_batch)
        q = statistics.quantiles(t, n=10)
        print(f"{label:>14} {statistics.median(t) * 1e3:8.2f} {q[8] * 1e3:8.2f} "
              f"{statistics.mean(t[-20:]) * 1e3:11.2f}")


if __name__ == "__main__":
    main()
