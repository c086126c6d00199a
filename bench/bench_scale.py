"""Cost as the fleet grows: emulated devices in several fleet processes against one platform server.

The server runs in its own process; its CPU time (utime+stime from /proc) and RSS are read around
each phase. For each fleet size it prints:
  - release -> all synced: from CreateRelease until every device installed the bundle and uploaded
    its delivery report (each fleet process shares one channel, one WatchTasks stream and one
    bundle download per digest, like `walle fleet`);
  - server CPU per GetActiveTasks: two steady rounds in which every device pulls an unchanged list;
  - server CPU for a revision change no device pulls after: the CreateRelease itself plus the
    notices on the watch streams (one stream per fleet process, as `walle fleet` does; per-device
    streams are not emulated);
  - server memory per device: RSS after enrollment and two rounds, minus RSS before, over N.
Sample batches (CoDA GetSamples) are not exercised here yet; replicas on PostgreSQL come with the
PlatformState work (branch h14a) and are not part of this run.

    python bench/bench_scale.py --devices 1000,3000 --fleets 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import shutil
import signal
import tempfile
import time

from bench_fleet_sync import serve  # the same one-process platform server

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 1800
TICK = os.sysconf("SC_CLK_TCK")


def fleet_proc(address: str, n: int, prefix: str, base: str, conn) -> None:
    """One fleet process: enroll, then run the parent's commands."""
    import grpc

    from walle.device_host.fleet import Fleet
    from walle.protos import admin_pb2, admin_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)

    def enroll(device_id: str, user_id: str) -> str:
        return admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, user_id=user_id, actor="bench"),
                                  timeout=120).token

    fleet = Fleet(n, address, base, seed=hash(prefix) % 1000, enroll=enroll, workers=32, channel=channel,
                  id_prefix=prefix)
    conn.send("ready")
    while True:
        cmd = conn.recv()
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
            got = fleet.wait_change(30)
            st = fleet.sync_all()
            left = fleet.flush_all(timeout=30)
            conn.send((got, st.installed, st.failed, left, time.time() - t0, time.time()))
        elif cmd == "notice":
            conn.send(fleet.wait_change(10))
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


def run_size(n_devices: int, n_fleets: int, tmp: pathlib.Path) -> dict:
    import grpc

    from walle.platform.manifest import validate_task_dir
    from walle.protos import admin_pb2, admin_pb2_grpc, bundle

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(str(tmp / "platform"), child), daemon=True)
    server.start()
    address = f"127.0.0.1:{parent.recv()}"
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    fleets = []
    try:
        rss0 = rss_mb(server.pid)
        per = [n_devices // n_fleets + (1 if i < n_devices % n_fleets else 0) for i in range(n_fleets)]
        for i, n in enumerate(per):
            a, b = ctx.Pipe()
            p = ctx.Process(target=fleet_proc, args=(address, n, f"f{i}", str(tmp / f"fleet{i}"), b), daemon=True)
            p.start()
            fleets.append((p, a))
        for _p, c in fleets:
            assert c.recv() == "ready"

        def all_(cmd):
            for _p, c in fleets:
                c.send(cmd)
            return [c.recv() for _p, c in fleets]

        all_("sync")  # warm: connections up, nothing released
        c0 = cpu_s(server.pid)
        rounds = 2
        for _ in range(rounds):
            res = all_("sync")
            assert sum(r[0] for r in res) == n_devices, res
        gat_us = (cpu_s(server.pid) - c0) / (rounds * n_devices) * 1e6
        rss1 = rss_mb(server.pid)

        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = admin.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="bench"), timeout=60)
        all_("watch")
        # a revision change nobody pulls after: the release write plus the notices
        c0 = cpu_s(server.pid)
        for _p, c in fleets:
            c.send("notice")
        admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, channel="nobody"),
                            timeout=60)
        noticed = sum(bool(c.recv()) for _p, c in fleets)
        change_ms = (cpu_s(server.pid) - c0) * 1e3
        assert noticed == len(fleets), f"only {noticed} of {len(fleets)} watch streams saw the change"

        c0 = cpu_s(server.pid)
        for _p, c in fleets:
            c.send("release")
        t0 = time.time()
        admin.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version), timeout=60)
        res = [c.recv() for _p, c in fleets]
        synced_s = max(r[5] for r in res) - t0
        installed = sum(r[1] for r in res)
        release_cpu = cpu_s(server.pid) - c0
        return {"devices": n_devices, "fleets": n_fleets, "installed": installed, "synced_s": synced_s,
                "gat_us": gat_us, "change_ms": change_ms, "release_cpu_ms_per_device": release_cpu / n_devices * 1e3,
                "rss_base_mb": rss0, "rss_kb_per_device": (rss1 - rss0) * 1024 / n_devices,
                "failed": sum(r[2] for r in res)}
    finally:
        for p, c in fleets:
            try:
                c.send("stop")
                c.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        channel.close()
        parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,3000")
    ap.add_argument("--fleets", type=int, default=2, help="fleet processes")
    args = ap.parse_args()
    signal.alarm(TIME_LIMIT_S)  # bounded: never hang a CI run
    print(f"{'devices':>7} {'fleets':>6} {'installed':>9} {'release->synced s':>17} {'GetActiveTasks us':>17} "
          f"{'change ms':>9} {'release ms/dev':>14} {'server KB/dev':>13} {'base MB':>7} {'load1':>5}", flush=True)
    for n in (int(s) for s in args.devices.split(",")):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-scale-"))
        try:
            r = run_size(n, args.fleets, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{r['devices']:>7} {r['fleets']:>6} {r['installed']:>9} {r['synced_s']:>17.2f} {r['gat_us']:>17.0f} "
              f"{r['change_ms']:>9.0f} {r['release_cpu_ms_per_device']:>14.2f} {r['rss_kb_per_device']:>13.1f} "
              f"{r['rss_base_mb']:>7.0f} {os.getloadavg()[0]:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
