"""Where the demo's wall time goes, and what the fleet's disk costs: the CoDA demo run on the system's
temp folder (the previous default) and on /dev/shm (today's default when it has room), side by side
in one run, alternating, each in its own process. Prints each phase's wall seconds (`phase_seconds`
of results.json), the total, and the CPU seconds of the demo process and its sandbox children.

    python bench/bench_demo_wall.py [--users 50] [--repeat 1]"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(users: int, work_dir: str, out: pathlib.Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "walle.platform.cli", "demo", "--users", str(users), "--days", "3",
                    "--out", str(out), "--work-dir", work_dir], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=REPO)
    res = json.loads((out / "results.json").read_text())
    return {"wall": time.perf_counter() - t0, "elapsed": res["elapsed_s"], "cpu": res["cpu_s"],
            "phases": next(iter(res["seeds"].values()))["phase_seconds"], "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if not os.path.isdir("/dev/shm"):
        sys.exit("no /dev/shm on this machine: nothing to compare")
    ways = {"temp folder": tempfile.gettempdir(), "/dev/shm": "/dev/shm"}
    got: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for way, folder in ways.items():
                got[way].append(run(args.users, folder, pathlib.Path(tmp) / f"{r}-{way.strip('/')}"))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"walle demo --users {args.users} --days 3, {args.repeat} run(s) each, alternating; "
          f"load average {mean([g['load'] for v in got.values() for g in v]):.1f}")
    print(f"{'phase (wall s)':58s}" + "".join(f"{w:>14s}" for w in ways))
    for phase in got["temp folder"][0]["phases"]:
        print(f"{phase[:58]:58s}" + "".join(f"{mean([g['phases'].get(phase, 0) for g in got[w]]):14.1f}" for w in ways))
    print(f"{'experiment total':58s}" + "".join(f"{mean([g['elapsed'] for g in got[w]]):14.1f}" for w in ways))
    print(f"{'process wall (with start-up and part 1)':58s}" + "".join(f"{mean([g['wall'] for g in got[w]]):14.1f}" for w in ways))
    for k in ("user", "sys", "children_user", "children_sys"):
        print(f"{'CPU ' + k:58s}" + "".join(f"{mean([g['cpu'][k] for g in got[w]]):14.1f}" for w in ways))


if __name__ == "__main__":
    main()
