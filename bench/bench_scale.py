"""Cost as the fleet grows: emulated devices in several fleet processes against 1 or 2 platform
server processes (replicas), on SQLite (one process) or PostgreSQL (stateless replicas, each with its
own scratch folder; a throwaway cluster is started in a temp folder; sample batches in Redis).

Each server runs in its own process; its CPU time (utime+stime from /proc) and RSS are read around
each phase and summed over the replicas. Fleet process i talks to replica i % R. For each row it prints:
  - release -> all synced: from CreateRelease (made through replica 0) until every device installed
    the bundle and uploaded its delivery report (each fleet process shares one channel, one WatchTasks
    stream and one bundle download per digest, like `walle fleet`); devices on replica 1 hear of the
    release through PostgreSQL (LISTEN/NOTIFY);
  - server CPU per GetActiveTasks: two steady rounds in which every device pulls an unchanged list;
  - server CPU per watch notice: a revision change no device pulls after (the CreateRelease itself
    plus one notice per watch stream), divided by the streams (one per fleet process; per-device
    streams are not emulated) -- so it includes the release write;
  - server CPU per sample batch: --sample-devices devices (the same number at every size) each pull
    their day's --batches CoDA sample batches in one PullBatches stream (12 = the daily limit), the
    batches stored compressed once when the day was prepared;
  - server memory per device: RSS after enrollment and two rounds, minus RSS before, over N.

    python bench/bench_scale.py --devices 1000,3000 --fleets 4 --configs sqlite:1,postgresql:1,postgresql:2
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import pathlib
import random
import shutil
import signal
import tempfile
import time

from bench_fleet_sync import serve  # the same one-process platform server
from bench_sample_query import start_redis, synthetic_pool

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 3600
TICK = os.sysconf("SC_CLK_TCK")
DAY = 20_000


def fleet_proc(address: str, n: int, prefix: str, base: str, conn) -> None:
    """One fleet process: enroll, then run the parent's commands."""
    import grpc

    from walle.device_host.fleet import Fleet
    from walle.protos import admin_pb2, admin_pb2_grpc, coda_pb2, coda_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)

    def enroll(device_id: str, user_id: str) -> str:
        return admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, user_id=user_id, actor="bench"),
                                  timeout=300).token

    fleet = Fleet(n, address, base, seed=hash(prefix) % 1000, enroll=enroll, workers=32, channel=channel,
                  id_prefix=prefix)
    conn.send(sorted({d.credentials.user_id for d in fleet.devices}))
    while True:
        cmd, *arg = conn.recv()
        if cmd == "sync":
            st = fleet.sync_all()
            conn.send((st.synced, st.installed, st.failed, dict(st.errors)))
        elif cmd == "watch":
            fleet.start_watch()
            fleet.wait_change(10)
            fleet.wait_change(0.5)
            conn.send("ok")
        elif cmd == "release":  # wait for the notice, then converge
            t0 = time.time()
            got = fleet.wait_change(60)
            st = fleet.sync_all()
            left = fleet.flush_all(timeout=60)
            conn.send((got, st.installed, st.failed, left, time.time() - t0, time.time()))
        elif cmd == "notice":
            conn.send(fleet.wait_change(30))
        elif cmd == "samples":
            stub = coda_pb2_grpc.SampleServiceStub(channel)

            def pull(d) -> int:
                req = coda_pb2.PullBatchesRequest(day=DAY, max_batches=arg[0])
                return sum(1 for b in stub.PullBatches(req, metadata=d.credentials.metadata, timeout=120) if b.count)
            conn.send(sum(fleet.pool.map(pull, fleet.devices[:arg[1]])))
        elif cmd == "stop":
            fleet.close()
            channel.close()
            conn.send("bye")
            return


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_samples(kv_url: str, users: set[str], batches: int) -> None:
    """One prepared day: `batches` batches of 25 samples per user, stored compressed once."""
    from walle.platform.coda.kvstore import open_store
    from walle.platform.coda.mappings import Mappings
    rng = random.Random(3)
    pool = synthetic_pool(20_000, rng)
    store = open_store(kv_url)
    per_user = 25 * batches
    matched = {}
    for u in sorted(users):
        start = rng.randrange(len(pool) - per_user)
        matched[u] = pool[start:start + per_user]
    Mappings(store).put_day(DAY, matched)
    store.close()


@contextlib.contextmanager
def profiled(pids: dict[str, int], out: str):
    """py-spy (a dev tool, not a dependency) sampling each process while the block runs: collapsed
    stacks in <out>/<name>.txt (only with --profile)."""
    if not out:
        yield
        return
    import subprocess
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen(["py-spy", "record", "--nonblocking", "--gil", "--format", "raw", "--rate", "200", "--pid",
                               str(pid), "--output", f"{out}/{name}.txt"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]
    time.sleep(1.0)  # attached before the phase starts
    try:
        yield
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)
        for s in spies:
            s.wait(timeout=60)


def run_size(n_devices: int, n_fleets: int, replicas: int, state: str, kv: str, batches: int,
             sample_devices: int, tmp: pathlib.Path, profile: str = "") -> dict:
    import grpc

    from walle.platform.manifest import validate_task_dir
    from walle.protos import admin_pb2, admin_pb2_grpc, bundle

    ctx = mp.get_context("spawn")
    servers, addresses, pipes = [], [], []
    for r in range(replicas):
        parent, child = ctx.Pipe()
        # SQLite: state and sample store in the server's folder; PostgreSQL: shared, no shared folder
        proc = ctx.Process(target=serve, args=(str(tmp / f"platform{r}"), child, state,
                                               kv or f"sqlite:///{tmp / 'platform0' / 'kv.sqlite3'}"), daemon=True)
        proc.start()
        servers.append(proc)
        pipes.append(parent)
        addresses.append(f"127.0.0.1:{parent.recv()}")
    pids = [p.pid for p in servers]
    cpu = lambda: sum(cpu_s(p) for p in pids)  # noqa: E731
    channel = grpc.insecure_channel(addresses[0], options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    fleets = []
    try:
        rss0 = sum(rss_mb(p) for p in pids)
        per = [n_devices // n_fleets + (1 if i < n_devices % n_fleets else 0) for i in range(n_fleets)]
        for i, n in enumerate(per):
            a, b = ctx.Pipe()
            p = ctx.Process(target=fleet_proc, args=(addresses[i % replicas], n, f"f{i}", str(tmp / f"fleet{i}"), b),
                            daemon=True)
            p.start()
            fleets.append((p, a))
        fleet_cpu = lambda: sum(cpu_s(p.pid) for p, _c in fleets)  # noqa: E731
        users: set[str] = set()
        for _p, c in fleets:
            users.update(c.recv())

        def all_(*cmd):
            for _p, c in fleets:
                c.send(cmd)
            return [c.recv() for _p, c in fleets]

        all_("sync")  # warm: connections up, nothing released
        c0 = cpu()
        rounds = 2
        for _ in range(rounds):
            res = all_("sync")
            assert sum(r[0] for r in res) == n_devices, res
        gat_us = (cpu() - c0) / (rounds * n_devices) * 1e6
        rss1 = sum(rss_mb(p) for p in pids)

        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"), timeout=60)
        all_("watch")
        # a revision change nobody pulls after: the release write plus the notices
        c0 = cpu()
        for _p, c in fleets:
            c.send(("notice",))
        admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, channel="nobody"),
                            timeout=60)
        noticed = sum(bool(c.recv()) for _p, c in fleets)
        notice_ms = (cpu() - c0) * 1e3 / len(fleets)
        assert noticed == len(fleets), f"only {noticed} of {len(fleets)} watch streams saw the change"

        spied = {**{f"server{i}": p for i, p in enumerate(pids)}, **{f"fleet{i}": p.pid for i, (p, _c) in enumerate(fleets)}}
        with profiled(spied, profile):
            c0, f0 = cpu(), fleet_cpu()
            for _p, c in fleets:
                c.send(("release",))
            t0 = time.time()
            admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version), timeout=60)
            res = [c.recv() for _p, c in fleets]
            synced_s = max(r[5] for r in res) - t0
            installed = sum(r[1] for r in res)
            release_cpu, release_fleet_cpu = cpu() - c0, fleet_cpu() - f0

        load_samples(kv or f"sqlite:///{tmp / 'platform0' / 'kv.sqlite3'}", users, batches)
        pullers = [min(n, sample_devices // n_fleets + (1 if i < sample_devices % n_fleets else 0))
                   for i, n in enumerate(per)]
        for (_p, c), k in zip(fleets, pullers):
            c.send(("samples", batches, k))
        c0 = cpu()
        served = sum(c.recv() for _p, c in fleets)
        batch_us = (cpu() - c0) / max(served, 1) * 1e6
        assert served == sum(pullers) * batches, f"{served} batches served, {sum(pullers) * batches} expected"
        return {"devices": n_devices, "fleets": n_fleets, "installed": installed, "synced_s": synced_s,
                "gat_us": gat_us, "notice_ms": notice_ms, "release_cpu_ms_per_device": release_cpu / n_devices * 1e3,
                "fleet_cpu_ms_per_device": release_fleet_cpu / n_devices * 1e3,
                "batch_us": batch_us, "rss_base_mb": rss0, "rss_kb_per_device": (rss1 - rss0) * 1024 / n_devices,
                "failed": sum(r[2] for r in res)}
    finally:
        for p, c in fleets:
            try:
                c.send(("stop",))
                c.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        channel.close()
        for parent, proc in zip(pipes, servers):
            try:
                parent.send("stop")
            except (OSError, BrokenPipeError):
                pass
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()


@contextlib.contextmanager
def backend(kind: str, tmp: pathlib.Path):
    """(state URL, KV URL) for one row: SQLite in the server's folder, or a PostgreSQL schema and Redis."""
    if kind == "sqlite":
        yield "", ""
        return
    from walle.platform.state.pgcluster import fresh_schema, throwaway_cluster
    proc, redis_url = start_redis(str(tmp))
    try:
        with throwaway_cluster() as pg:
            yield fresh_schema(pg), redis_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,3000")
    ap.add_argument("--fleets", type=int, default=4, help="fleet processes")
    ap.add_argument("--configs", default="sqlite:1,postgresql:1,postgresql:2",
                    help="state:replicas per row (sqlite serves from one process only)")
    ap.add_argument("--batches", type=int, default=12, help="sample batches each pulling device pulls")
    ap.add_argument("--sample-devices", type=int, default=1000, help="devices that pull sample batches")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="sample every server and fleet process with py-spy during the release round")
    args = ap.parse_args()
    signal.alarm(TIME_LIMIT_S)  # bounded: never hang a CI run
    print(f"{'state':<10} {'repl':>4} {'devices':>7} {'installed':>9} {'release->synced s':>17} "
          f"{'GetActiveTasks us':>17} {'notice ms':>9} {'release ms/dev':>14} {'fleet ms/dev':>12} {'batch us':>8} "
          f"{'server KB/dev':>13} {'base MB':>7} {'load1':>5}", flush=True)
    for config in args.configs.split(","):
        kind, replicas = config.split(":")
        if kind not in ("sqlite", "postgresql") or (kind == "sqlite" and replicas != "1"):
            raise SystemExit(f"bad config {config!r}: sqlite:1, postgresql:1 or postgresql:2")
        for n in (int(s) for s in args.devices.split(",")):
            tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-scale-"))
            try:
                with backend(kind, tmp) as (state, kv):
                    r = run_size(n, args.fleets, int(replicas), state, kv, args.batches, args.sample_devices, tmp,
                                 f"{args.profile}/{kind}{replicas}-{n}" if args.profile else "")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"{kind:<10} {replicas:>4} {r['devices']:>7} {r['installed']:>9} {r['synced_s']:>17.2f} "
                  f"{r['gat_us']:>17.0f} {r['notice_ms']:>9.1f} {r['release_cpu_ms_per_device']:>14.2f} "
                  f"{r['fleet_cpu_ms_per_device']:>12.2f} {r['batch_us']:>8.0f} {r['rss_kb_per_device']:>13.1f} {r['rss_base_mb']:>7.0f} "
                  f"{os.getloadavg()[0]:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
