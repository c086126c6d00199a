"""Rollbacks raced by several operators: how many were decided from an out-of-date release list.

Three operator processes share one data folder and, as fast as they can, either release one of
three versions of a task or roll it back. Afterwards the audit trail (in commit order) is replayed:
a rollback is stale when the release it says it rolls back ("rollback of rN") was no longer the
newest live release of the chain when the rollback was written.
    .venv/bin/python bench/bench_rollback_race.py [--operators 3] [--ops 60]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import random
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def operator(data: str, versions: list[str], ops: int, seed: int, out) -> None:
    from walle.platform.errors import WalleError
    from walle.platform.service import Platform
    from walle.protos import admin_pb2
    p = Platform(data)
    rng = random.Random(seed)
    done = refused = 0
    for _ in range(ops):
        try:
            if rng.random() < 0.5:
                p.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=rng.choice(versions)))
            else:
                p.Rollback(admin_pb2.RollbackRequest(task="hello"))
            done += 1
        except WalleError:
            refused += 1
    out.put((done, refused))


def replay(p) -> tuple[int, int]:
    """(rollbacks, stale rollbacks) from the audit trail in commit order."""
    import json
    notes = {r["id"]: r["note"] for r in p.state.db.execute_returning_dicts("SELECT id, note FROM releases")}
    entries = p.state.db.execute_returning_dicts("SELECT action, target, detail FROM audit ORDER BY id")
    live: list[int] = []
    snapshot = None
    rollbacks = stale = 0
    for e in entries:
        if e["action"] == "release.revoke":
            detail = json.loads(e["detail"] or "{}")
            if str(detail.get("why", "")).startswith("rolled back") and snapshot is None:
                snapshot = max(live) if live else None  # the head the rollback decided on
            seq = int(e["target"][1:])
            if seq in live:
                live.remove(seq)
        elif e["action"] == "release.create":
            note = notes.get(e["target"], "")
            if note.startswith("rollback of "):
                rollbacks += 1
                head = snapshot if snapshot is not None else (max(live) if live else None)
                if head is None or f"r{head}" != note.split()[2]:
                    stale += 1
            snapshot = None
            live.append(int(e["target"][1:]))
    return rollbacks, stale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operators", type=int, default=3)
    ap.add_argument("--ops", type=int, default=60)
    args = ap.parse_args()
    from walle.platform.manifest import validate_task_dir
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, bundle
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-race-"))
    try:
        p = Platform(tmp / "data")
        versions = []
        for i in range(3):
            src = tmp / f"v{i}"
            shutil.copytree(ROOT / "tasks" / "hello", src)
            (src / "main.py").write_text((src / "main.py").read_text() + f"\n# v{i}\n")
            tv = p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(validate_task_dir(src)[1])))
            versions.append(tv.version)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=operator, args=(str(tmp / "data"), versions, args.ops, i, out))
                 for i in range(args.operators)]
        for pr in procs:
            pr.start()
        results = [out.get(timeout=600) for _ in procs]
        for pr in procs:
            pr.join(timeout=60)
        rollbacks, stale = replay(p)
        print(f"{args.operators} operators x {args.ops} operations: {sum(d for d, _ in results)} done, "
              f"{sum(r for _, r in results)} refused; {rollbacks} rollbacks, {stale} decided from an out-of-date list")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
