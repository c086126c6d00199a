"""PullBatches throughput of the CoDA sample-query service on 127.0.0.1, for the SQLite and Redis stores.

Loads one day of synthetic matched samples (default 2,000 users x 12 batches x 25 samples, drawn from a
shared pool so samples are stored once), serves them from the platform's grpc.aio server (LoopServer,
in this process), and runs several client processes (grpc.aio, many streams in flight) that each pull
a device's 12 batches. Prints batches/s, per-batch latency (time from the request or the previous
batch to this batch) and server CPU per batch, for each store twice, side by side:
  - "per-request": batches assembled from the sample mapping and zlib-compressed on every pull
    (Mappings(compressed_batches=False), the way every batch was served before);
  - "stored": each batch stored compressed once by the daily job and served as stored bytes.
Each pull phase is bounded by --seconds; the load generator shares the 2 cores with the server.

    .venv/bin/python bench/bench_sample_query.py [--users 2000] [--clients 2] [--inflight 8] [--seconds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import pathlib
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import grpc

from walle.platform.coda.kvstore import RedisKV, SQLiteKV
from walle.platform.coda.mappings import Mappings
from walle.platform.coda.sample_service import SampleServicer, add_to_server, samples_from_batch
from walle.platform.errors import Unauthenticated
from walle.platform.server import LoopServer
from walle.protos import coda_pb2, coda_pb2_grpc

DAY = 20_000


def synthetic_pool(n: int, rng: random.Random) -> list[coda_pb2.Sample]:
    """Samples in runs of 20 per owner: consecutive samples of one owner share 49 of 50 history items
    (as in scale-notes section 5), ids are 12-digit and high-entropy."""
    pool = []
    for start in range(0, n, 20):
        owner = f"{rng.getrandbits(64):016x}"
        items = [rng.randrange(10**11, 10**12) for _ in range(71)]
        cats = [rng.randrange(1000) for _ in range(71)]
        profile = [rng.gauss(0, 1) for _ in range(8)]
        for j in range(min(20, n - start)):
            pool.append(coda_pb2.Sample(
                sample_id=f"{owner}_{j:06d}", user=owner, ts=1_700_000_000 + start + j, day=DAY,
                label=float(rng.random() < 0.1), item_id=items[j + 50], item_cats=[cats[j + 50], rng.randrange(1000)],
                hist_items=items[j:j + 50], hist_cats=cats[j:j + 50], profile=profile))
    return pool


def token_auth(context) -> str:
    value = dict(context.invocation_metadata()).get("authorization", "")
    if not value.startswith("Bearer tok-"):
        raise Unauthenticated("missing or unknown device token")
    return "dev-" + value[len("Bearer tok-"):]


def user_for_device(device: str) -> str:
    return "user-" + device[len("dev-"):]


async def _client_main(port: int, users: list[int], inflight: int, start: float, deadline: float, out) -> None:
    lat: list[float] = []
    batches = 0
    checked = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = coda_pb2_grpc.SampleServiceStub(channel)
        queue = list(users)

        async def worker():
            nonlocal batches, checked
            while queue and time.time() < deadline:
                u = queue.pop()
                t = time.perf_counter()
                call = stub.PullBatches(coda_pb2.PullBatchesRequest(day=DAY), metadata=[("authorization", f"Bearer tok-{u}")])
                async for batch in call:
                    now = time.perf_counter()
                    lat.append(now - t)
                    t = now
                    batches += 1
                    if checked < 20:  # spot-check the payload decodes to the announced samples
                        assert len(samples_from_batch(batch)) == batch.count == 25
                        checked += 1

        await stub.ListBatches(coda_pb2.ListBatchesRequest(day=DAY), metadata=[("authorization", "Bearer tok-0")])
        await asyncio.sleep(max(0.0, start - time.time()))  # all clients start together
        t0 = time.time()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        t1 = time.time()
    out.put((batches, lat, t0, t1))


def client_process(port: int, users: list[int], inflight: int, start: float, deadline: float, out) -> None:
    asyncio.run(_client_main(port, users, inflight, start, deadline, out))


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: apt-get install -y redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            RedisKV(url).close()
            return proc, url
        except Exception:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not answer PING")


def run(kind: str, store, args, pool, stored: bool) -> dict:
    rng = random.Random(1)
    mappings = Mappings(store, zlib_level=args.zlib_level, compressed_batches=stored)
    per_user = 12 * 25
    matched = {}
    for u in range(args.users):  # contiguous slices of a shared pool: K neighbours share samples
        start = rng.randrange(len(pool) - per_user)
        matched[f"user-{u}"] = pool[start:start + per_user]
    t0 = time.perf_counter()
    summary = mappings.put_day(DAY, matched)
    load_s = time.perf_counter() - t0

    servicer = SampleServicer(mappings, token_auth, user_for_device, daily_limit=12)
    server = LoopServer(lambda s: add_to_server(s, servicer), max_workers=args.threads)
    port = server.port

    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC
    out = ctx.Queue()
    users = list(range(args.users))
    rng.shuffle(users)
    start = time.time() + 1.5  # client processes need ~0.5-1 s to import; the clock starts after that
    deadline = start + args.seconds
    procs = [ctx.Process(target=client_process, args=(port, users[i::args.clients], args.inflight, start, deadline, out))
             for i in range(args.clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start - time.time()))
    cpu0 = time.process_time()
    results = []
    give_up = time.time() + args.seconds + 30
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > give_up:
                server.stop(0)
                sys.exit(f"client process failed (exit codes {dead}) or timed out")
    cpu = time.process_time() - cpu0
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    for p in procs:
        p.join(timeout=10)
    server.stop(0)

    total = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
    pulled_users = sum(1 for u in range(args.users) if mappings.pulls(f"dev-{u}", DAY) == 12)
    mode = "stored" if stored else "per-request"
    print(f"[{kind}, {mode}] load: {summary.users} users, {summary.batches} batches, {summary.samples} distinct "
          f"samples ({summary.sample_refs} refs) in {load_s:.2f} s; devices fully pulled: {pulled_users}", flush=True)
    return {"store": kind, "mode": mode, "batches": total, "rate": total / wall, "p50": pct(0.50), "p99": pct(0.99),
            "cpu_us": cpu / max(total, 1) * 1e6, "load_s": load_s, "load1": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=40_000, help="distinct samples the users' matches come from")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=8, help="streams in flight per client process")
    ap.add_argument("--threads", type=int, default=4, help="server pool threads (store reads): more only contend for the GIL")
    ap.add_argument("--seconds", type=float, default=3.0, help="pull phase length per store")
    ap.add_argument("--zlib-level", type=int, default=6)
    ap.add_argument("--stores", default="sqlite,redis")
    args = ap.parse_args()
    pool = synthetic_pool(args.pool, random.Random(0))
    # Other work on the box skews every figure: print the load so a reader can tell.
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; sample ~{sum(len(s.SerializeToString()) for s in pool[:100]) // 100} B protobuf")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.stores.split(","):
            if kind not in ("sqlite", "redis"):
                sys.exit(f"unknown store {kind!r}: use sqlite and/or redis")
            proc, url = start_redis(tmp) if kind == "redis" else (None, "")
            try:
                for stored in (False, True):  # before, then after, on a fresh store each
                    store = (SQLiteKV(str(pathlib.Path(tmp) / f"kv-{stored}.sqlite3")) if kind == "sqlite"
                             else RedisKV(url, namespace=b"bench:%d:" % stored))
                    rows.append(run(kind, store, args, pool, stored))
                    store.close()
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=10)
    print(f"\n{'store':<7} {'batches served as':<18} {'batches/s':>9} {'server CPU us/batch':>19} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'day load s':>10} {'load1':>6}")
    for r in rows:
        print(f"{r['store']:<7} {r['mode']:<18} {r['rate']:>9,.0f} {r['cpu_us']:>19.0f} {r['p50']:>7.2f} "
              f"{r['p99']:>7.2f} {r['load_s']:>10.2f} {r['load1']:>6.2f}")


if __name__ == "__main__":
    main()
