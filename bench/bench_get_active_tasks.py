"""GetActiveTasks throughput and latency: 50 releases with 2-7 clause rules, 1,000 distinct devices.

The server runs as `walle platform serve` in its own process; load comes from client processes
using grpc.aio on 127.0.0.1 (they share the 2 cores with the server, so figures are a lower bound).
Prints requests/s, p50, p99 and the rule cost per device (measured in-process). With h2load installed
it also measures, in the same run, the floor under our handler: a bare grpc.aio server whose method
returns b"" and one returning bytes the size of the reply, so the server CPU per request splits into
grpcio's own cost per unary call, the reply's bytes, and walle's handler."""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OSES = ["android", "ios", "harmony"]
REGIONS = ["cn", "sg", "us", "de", "br", "in"]
MODELS = ["SM-G991", "SM-A525", "Pixel 7", "iPhone14,2", "MI 11", "P40"]
TAGS = ["beta", "vip", "new", "churn-risk", "wifi-only"]


def random_rule(rng: random.Random) -> str:
    clauses = [
        lambda: f'os in [{", ".join(repr(o).replace(chr(39), chr(34)) for o in rng.sample(OSES, 2))}]',
        lambda: f'app_version >= "{rng.randint(1, 3)}.{rng.randint(0, 9)}.0"',
        lambda: f'region in ["{rng.choice(REGIONS)}", "{rng.choice(REGIONS)}"]',
        lambda: 'network == "wifi"',
        lambda: f'device_model startswith "{rng.choice(MODELS)[:3]}"',
        lambda: f'"{rng.choice(TAGS)}" in tags',
        lambda: f'os_version >= "{rng.randint(9, 14)}"',
        lambda: f'not (region == "{rng.choice(REGIONS)}")',
    ]
    n = rng.randint(2, 7)
    parts = [rng.choice(clauses)() for _ in range(n)]
    out = parts[0]
    for p in parts[1:]:
        out += (" and " if rng.random() < 0.75 else " or ") + p
    return out


def device(rng: random.Random, i: int):
    from walle.protos import device_pb2
    return device_pb2.DeviceInfo(
        user_id=f"user{i}", app_version=f"{rng.randint(1, 3)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
        os=rng.choice(OSES), os_version=str(rng.randint(8, 15)), device_model=rng.choice(MODELS),
        region=rng.choice(REGIONS), network=rng.choice(["wifi", "4g", "5g"]), host_version="0.1.0",
        tags=rng.sample(TAGS, rng.randint(0, 2)))


def setup(data_dir: pathlib.Path, n_rules: int, n_devices: int, seed: int):
    from walle.platform.manifest import validate_task_dir
    from walle.platform.service import Platform
    from walle.protos import admin_pb2, bundle
    rng = random.Random(seed)
    p = Platform(data_dir)
    _m, files = validate_task_dir(ROOT / "tasks" / "hello")
    for i in range(n_rules):
        f = dict(files)
        f["task.toml"] = f["task.toml"].replace(b'name = "hello"', f'name = "task{i:02d}"'.encode())
        p.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(f), message="bench"))
        p.CreateRelease(admin_pb2.CreateReleaseRequest(task=f"task{i:02d}", rule=random_rule(rng),
                                                       rollout=rng.choice([10.0, 50.0, 100.0]), has_rollout=True))
    tokens = [p.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"dev{i}")).token for i in range(n_devices)]
    devices = [device(rng, i) for i in range(n_devices)]
    for i, d in enumerate(devices):
        d.device_id = f"dev{i}"
    # rule cost per device, in-process, no gRPC
    p.releases.resolve(devices[0])
    t0 = time.perf_counter()
    hits = 0
    for _ in range(3):
        for d in devices:
            hits += len(p.releases.resolve(d)[0])
    per_device = (time.perf_counter() - t0) / (3 * len(devices))
    reply_size = len(p.active_tasks_bytes("dev0", devices[0].SerializeToString()))
    return tokens, [d.SerializeToString() for d in devices], per_device, hits / (3 * len(devices)), reply_size


def client_proc(address, tokens, devices, duration, concurrency, out_q):
    async def run():
        import grpc
        from walle.protos import device_pb2, device_pb2_grpc
        lat = []
        stop_at = time.perf_counter() + duration
        async with grpc.aio.insecure_channel(address) as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            infos = [device_pb2.DeviceInfo.FromString(d) for d in devices]

            async def worker(k):
                i = k
                while time.perf_counter() < stop_at:
                    j = i % len(infos)
                    t = time.perf_counter()
                    await stub.GetActiveTasks(infos[j], metadata=(("authorization", f"Bearer {tokens[j]}"),))
                    lat.append(time.perf_counter() - t)
                    i += concurrency
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        out_q.put(lat)
    asyncio.run(run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=50)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight per client")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--server-workers", type=int, default=8)
    ap.add_argument("--server-processes", type=int, default=1, help="walle platform serve --processes")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="walle-bench-"))
    try:
        t0 = time.perf_counter()
        tokens, devices, per_device, avg_hits, reply_size = setup(tmp / "data", args.rules, args.devices, 7)
        print(f"setup: {args.rules} tasks+releases, {args.devices} devices in {time.perf_counter() - t0:.1f}s; "
              f"avg tasks per device {avg_hits:.1f}")
        print(f"rule evaluation (resolve, in-process): {per_device * 1e6:.1f} us per device for {args.rules} releases")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "walle.platform.cli", "--data-dir", str(tmp / "data"),
                                   "platform", "serve", "--insecure", "--no-coda", "--port", str(port),
                                   "--workers", str(args.server_workers), "--processes", str(args.server_processes)],
                                  stderr=subprocess.PIPE, text=True)
        try:
            for line in server.stderr:  # wait until it listens
                if "serving on" in line:
                    break
            import grpc
            from walle.protos import device_pb2, device_pb2_grpc
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # warm up
                stub = device_pb2_grpc.DeviceServiceStub(ch)
                for i in range(50):
                    stub.GetActiveTasks(device_pb2.DeviceInfo.FromString(devices[i]),
                                        metadata=(("authorization", f"Bearer {tokens[i]}"),))
            q = mp.Queue()
            procs = []
            for c in range(args.clients):
                sl = slice(c, None, args.clients)
                procs.append(mp.Process(target=client_proc, args=(f"127.0.0.1:{port}", tokens[sl], devices[sl],
                                                                   args.duration, args.concurrency, q)))
            time.sleep(2)  # let the worker processes start listening
            cpu0 = _proc_cpu(server.pid)
            t0 = time.perf_counter()
            for pr in procs:
                pr.start()
            lat = []
            for _ in procs:
                lat.extend(q.get(timeout=args.duration + 60))
            elapsed = time.perf_counter() - t0
            for pr in procs:
                pr.join()
            cpu = _proc_cpu(server.pid) - cpu0  # the first process only

            lat.sort()
            n = len(lat)
            print(f"GetActiveTasks: {n} requests in {elapsed:.1f}s = {n / elapsed:,.0f} req/s "
                  f"({args.clients} client procs x {args.concurrency} in flight)")
            print(f"latency p50 {lat[n // 2] * 1e3:.2f} ms, p99 {lat[int(n * 0.99)] * 1e3:.2f} ms "
                  f"({args.server_processes} server process(es))")
            if args.server_processes == 1:
                print(f"server CPU {cpu / n * 1e6:.0f} us/request (the Python load generators share the 2 cores "
                      f"and cost more CPU per request than the server: they bound this figure)")
            if shutil.which("h2load"):
                h2load_phase(port, tokens[0], devices[0], server.pid, args.duration, "walle GetActiveTasks")
                for size in (0, reply_size):  # grpcio's own floor, then with the reply's bytes
                    floor_phase(tokens[0], devices[0], args.duration, size)
            else:
                print("h2load not found (Debian nghttp2-client): skipped the C load generator phase")
        finally:
            server.terminate()
            server.wait(10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def floor_phase(token: str, device: bytes, duration: float, size: int) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port), str(size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        h2load_phase(port, token, device, proc.pid, duration, f"empty grpc.aio method, {size} B reply")
    finally:
        proc.terminate()
        proc.wait(10)


def floor_server(port: int, size: int) -> None:
    """A grpc.aio server whose GetActiveTasks does nothing but return `size` bytes: the per-request
    cost of grpcio itself (bytes in and out, no protobuf, no interceptor)."""
    import grpc
    body = b"\x00" * size

    async def method(request, context):
        return body

    async def run():
        handler = grpc.unary_unary_rpc_method_handler(method)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_registered_method_handlers("walle.v1.DeviceService", {"GetActiveTasks": handler})
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    asyncio.run(run())


def h2load_phase(port: int, token: str, device: bytes, pid: int, duration: float, what: str) -> None:
    """The same server under h2load (C, raw gRPC frames): it costs far less CPU than Python
    clients, so the server, not the load generator, is what is measured. One device's request."""
    import re
    import struct
    with tempfile.NamedTemporaryFile(suffix=".bin") as body:
        body.write(b"\x00" + struct.pack(">I", len(device)) + device)
        body.flush()
        cpu0 = _proc_cpu(pid)
        out = subprocess.run(["h2load", "-n", "1000000", "-c", "8", "-m", "16", "-D", str(int(duration)),
                              "-d", body.name, "-H", "content-type: application/grpc", "-H", "te: trailers",
                              "-H", f"authorization: Bearer {token}",
                              f"http://127.0.0.1:{port}/walle.v1.DeviceService/GetActiveTasks"],
                             capture_output=True, text=True).stdout
        cpu = _proc_cpu(pid) - cpu0
    done = re.search(r"(\d+) succeeded", out)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if not (done and rate):
        print("h2load failed:\n" + out[-2000:])
        return
    n = int(done.group(1))
    print(f"h2load, {what} (8 connections x 16 streams, {duration:.0f}s): {float(rate.group(1)):,.0f} req/s, "
          f"latency mean {lat.group(3)} (min {lat.group(1)}, max {lat.group(2)}), server CPU "
          f"{cpu / max(n, 1) * 1e6:.0f} us/request")


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor-server"]:
        floor_server(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
