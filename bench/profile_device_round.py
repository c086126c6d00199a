"""Where one on-device CoDA round (coda_filter + coda_train) spends its time, child side and host side.

The child side runs in this process (the same TaskRuntime, RestrictedPython policy, host client and
framed-JSON channel a forked task child uses; no fork, no seccomp) under one cProfile, and the host
side (the real HostAPI over a SQLite TaskStorage and a ModelStore) answers on a thread under another,
as runner.py does. Then the same round runs through the real Sandbox for its wall and CPU figures.
The device holds one MovieLens user's local samples and 300 matched outside samples (12 batches of
25) with the demo's release config (t = 1, t' = 3, the Local arm on), as on a demo device-day.

    python bench/profile_device_round.py [--user ID] [--top 25] [--repeat 5]"""
from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import socket
import statistics
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
NS = "coda"
FIELDS = ["sample_id", "day", "ts", "label", "item_id", "item_cats", "hist_items", "hist_cats", "profile"]
DEMO_CONFIG = {"t": 1, "t_prime": 3, "max_rows": 300, "seed": 0, "local_arm": True}


def world(user: int):
    """(local samples, outside samples, global model blob) from real MovieLens users."""
    import numpy as np

    from walle.platform.coda import movielens
    from walle.platform.coda import samples as gen
    from walle.platform.coda.global_model import catalog_config, train_global
    ml = movielens.load()
    if not user:  # the user with the median number of ratings
        counts = ml.inter["user_id"].value_counts().sort_values(kind="stable")
        user = int(counts.index[len(counts) // 2])
    others = [u for u in sorted(ml.inter["user_id"].unique()) if u != user][:40]
    inter = ml.inter[ml.inter["user_id"].isin([user, *others])]
    train, _test = movielens.assign_days(inter, 4)
    day = gen.generate(movielens.as_raw_frame(train), ml.items, ml.users, key=b"profile-device-round", scheduler="sync")
    own = gen.pseudonym(str(user), b"profile-device-round")
    local = [s for s in day.samples[own] if s.day >= 1]
    outside = [s for u, ss in day.samples.items() if u != own for s in ss]
    outside = [outside[i] for i in np.random.default_rng(3).permutation(len(outside))]
    blob, _m = train_global(outside[300:1500], epochs=1, seed=5, catalog=catalog_config(ml.items))
    return user, local, outside[:300], blob


class Device:
    def __init__(self, root: pathlib.Path, local, outside, blob):
        from walle.device_host.models.ops import make_model_ops
        from walle.device_host.models.store import ModelStore
        from walle.device_host.sample_client import item_row
        from walle.device_host.storage import TaskStorage
        root.mkdir(parents=True)
        self.storage = TaskStorage(root / "storage.sqlite3")
        self.models = ModelStore(root / "models")
        self.ops = make_model_ops(self.models, lambda name: blob)
        today = max(s.day for s in local) + 1
        self.storage.put(NS, "today", today)
        self.storage.insert(NS, "local", [item_row(s, FIELDS) for s in local])
        for b in range(12):
            self.storage.insert(NS, "outside", [item_row(s, FIELDS, {"batch_id": f"{today}.{b}", "state": "new",
                                                                     "score": None})
                                                for s in outside[25 * b:25 * b + 25]])

    def api(self, task: str):
        from walle.device_host.hostapi import HostAPI
        from walle.platform import taskconfig
        from walle.platform.manifest import validate_task_dir
        manifest, files = validate_task_dir(TASKS / task)
        cfg = taskconfig.resolve(manifest.config, {k: v for k, v in DEMO_CONFIG.items()
                                                   if k in {p.name for p in manifest.config}}, task)
        api = HostAPI(self.storage, NS, extra_ops=self.ops, config=cfg)
        allowed = {op for op in api.allowed_apis() if op.split(".", 1)[0] in set(manifest.apis) | {"config"}}
        return manifest, {p: b.decode() for p, b in files.items() if p.endswith(".py")}, api, allowed


def run_inline(dev: Device, task: str, event: dict, child_prof: cProfile.Profile, host_prof: cProfile.Profile,
               counts: dict) -> object:
    """One run with the child's side in this thread and the host's on another."""
    from walle.device_host.sandbox import child, protocol
    manifest, files, api, allowed = dev.api(task)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host_ch, child_ch = protocol.Channel(ours), protocol.Channel(theirs)

    def host() -> None:
        host_prof.enable()
        try:
            task_bytes = protocol.encode({"files": files, "entry": manifest.entry, "event": event,
                                          "allowed_apis": sorted(allowed)})
            counts["bytes"] += len(task_bytes)
            host_ch.send_bytes(task_bytes)
            while True:
                msg = host_ch.recv()
                if "call" not in msg:
                    return
                try:
                    reply = protocol.encode({"ok": api(msg["call"], msg["args"], msg["kwargs"])})
                except Exception as e:  # noqa: BLE001  (handed back to the task, as runner.py does)
                    reply = protocol.encode({"error": {"type": type(e).__name__, "message": str(e)}})
                counts["bytes"] += len(reply)
                counts["calls"][msg["call"]] = counts["calls"].get(msg["call"], 0) + 1
                host_ch.send_bytes(reply)
        finally:
            host_prof.disable()
    t = threading.Thread(target=host)
    t.start()
    child_prof.enable()
    try:
        req = child_ch.recv()
        client = child.HostClient(child_ch, frozenset(req["allowed_apis"]))
        value = child.TaskRuntime(req["files"], client, child.LogSink(child_ch)).run_entry(req["entry"], req["event"])
        child_ch.send({"result": value})
    finally:
        child_prof.disable()
    t.join()
    ours.close()
    theirs.close()
    return value


def run_sandboxed(dev: Device, sandbox, task: str, event: dict):
    from walle.device_host.sandbox import Limits
    manifest, files, api, allowed = dev.api(task)
    lim = manifest.limits
    return sandbox.run(files, manifest.entry, event, api_handler=api, allowed_apis=allowed,
                       limits=Limits(memory_mb=lim.memory_mb, cpu_seconds=lim.cpu_seconds,
                                     wall_seconds=lim.wall_seconds))


ROUND = (("coda_filter", {"name": "batch_received", "payload": {}}),
         ("coda_train", {"name": "batches_exhausted", "payload": {}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--user", type=int, default=0, help="MovieLens user id (default: the median user)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from walle.device_host.sandbox import Sandbox, policy
    policy.warm_up()
    user, local, outside, blob = world(args.user)
    print(f"user {user}: {len(local)} local samples, {len(outside)} outside samples")
    child_prof, host_prof = cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)  # CPU, not wall: the machine is shared
    counts = {"bytes": 0, "calls": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            dev = Device(pathlib.Path(tmp) / f"inline{i}", local, outside, blob)
            for task, event in ROUND:
                value = run_inline(dev, task, event, child_prof, host_prof, counts)
            dev.storage.close()
        print(f"last round's train result: { {k: {kk: v[kk] for kk in ('committed', 'n_train', 'n_val')} for k, v in value.items()} }")
        print(f"per round: {counts['bytes'] / args.repeat / 1024:.1f} KB host->child replies + task; host ops "
              f"{ {k: v // args.repeat for k, v in sorted(counts['calls'].items())} }")
        for name, prof in (("CHILD", child_prof), ("HOST (ops)", host_prof)):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
            print(f"==== {name} side, {args.repeat} rounds, by cumulative CPU time")
            print(out.getvalue()[-12000:])
        walls, cpus = {t: [] for t, _ in ROUND}, {t: [] for t, _ in ROUND}
        with Sandbox(workers=1) as sb:
            for i in range(args.repeat):
                dev = Device(pathlib.Path(tmp) / f"sandbox{i}", local, outside, blob)
                for task, event in ROUND:
                    t0 = time.perf_counter()
                    res = run_sandboxed(dev, sb, task, event)
                    assert res.status == "ok", res.error
                    walls[task].append(time.perf_counter() - t0)
                    cpus[task].append(res.cpu_s + res.host_cpu_s)
                dev.storage.close()
        for task, _ in ROUND:
            print(f"sandboxed {task}: wall median {statistics.median(walls[task]):.3f} s, CPU (child + host ops) "
                  f"median {statistics.median(cpus[task]):.3f} s")
        rounds = [sum(walls[t][i] for t, _ in ROUND) for i in range(args.repeat)]
        print(f"sandboxed round (filter + train): wall median {statistics.median(rounds):.3f} s")


if __name__ == "__main__":
    main()
