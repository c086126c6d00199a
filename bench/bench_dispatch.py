"""Sandbox dispatch figures: per-task overhead, cold start, and host API round trips from inside a task.

    .venv/bin/python bench/bench_dispatch.py [--runs 300] [--profile native|android_sim]

Targets (sandbox-notes section 1): <= 10 ms median dispatch for a trivial task (the notes measured
4.0-4.3 ms for the same zygote path); 1,000 storage.get calls in roughly 30-50 ms.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from walle.device_host.hostapi import HostAPI
from walle.device_host.sandbox import Limits, Sandbox
from walle.device_host.storage import TaskStorage

TRIVIAL = {"main.py": "def main(event):\n    return 42\n"}
GETS = {"main.py": "from walle import storage\ndef main(event):\n    n = 0\n    for i in range(event['n']):\n"
                   "        n += storage.get('k', 0)\n    return n\n"}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--profile", default="native", choices=["native", "android_sim"])
    args = ap.parse_args()
    limits = Limits()

    starts = []
    for _ in range(5):
        t = time.perf_counter()
        sb = Sandbox(profile=args.profile)
        starts.append(time.perf_counter() - t)
        sb.close()
    print(f"cold Sandbox() start (zygote import+warm-up+probe), median of 5: {statistics.median(starts) * 1e3:.1f} ms"
          f"  (min {min(starts) * 1e3:.1f}, max {max(starts) * 1e3:.1f})")

    with Sandbox(profile=args.profile) as sb:
        print("capabilities:", sb.capabilities)
        for _ in range(10):  # warm the pool and the page cache
            sb.run(TRIVIAL, "main.py", {}, limits=limits)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            res = sb.run(TRIVIAL, "main.py", {}, limits=limits)
            times.append(time.perf_counter() - t)
            assert res.value == 42, res
        print(f"dispatch of a trivial task over {args.runs} runs: median {statistics.median(times) * 1e3:.2f} ms, "
              f"p90 {pct(times, 0.90) * 1e3:.2f} ms, p99 {pct(times, 0.99) * 1e3:.2f} ms  (target <= 10 ms median)")

        with tempfile.TemporaryDirectory() as tmp:
            store = TaskStorage(Path(tmp) / "device.db")
            store.put("bench", "k", 1)
            api = HostAPI(store, "bench")
            for n in (0, 1000):  # the difference isolates the 1,000 calls from the dispatch cost
                samples = []
                for _ in range(7):
                    t = time.perf_counter()
                    res = sb.run(GETS, "main.py", {"n": n}, limits=limits, api_handler=api,
                                 allowed_apis=api.allowed_apis())
                    samples.append(time.perf_counter() - t)
                    assert res.value == n, res
                if n == 0:
                    base = statistics.median(samples)
                else:
                    total = statistics.median(samples) - base
                    print(f"1,000 storage.get calls from inside the sandbox (real SQLite via HostAPI): "
                          f"{total * 1e3:.1f} ms total, {total * 1e3:.1f} us/call (median of 7, dispatch subtracted)")
            store.close()


if __name__ == "__main__":
    main()
