"""Matching time and recall@K for walle.platform.coda.matching.knn on synthetic user vectors.

For each size: all-users KNN (K=100, self excluded) through the real `knn` API, wall time
including index build, and recall@100 measured on 2,000 random users against exact results
(exact Flat search of those users). The full exact time at 1M is extrapolated from those 2,000
queries (brute force is linear in the number of queries); at <= 300k it is run for real. Each row waits
(up to --wait-idle s) for an idle CPU and prints the idle fraction it saw ("idle0") and the
process CPU seconds, since other work on a shared 2-core box inflates wall times.

Data: "clustered" = a mixture of 2,000 Gaussians (centres N(0, 1), spread 0.5 per axis), closer
to real user vectors; "gaussian" = isotropic N(0, 1), the worst case for approximate search.
Also prints recall on the real MovieLens-100k user vectors.

    python bench/bench_matching.py                     # 100k and 1M, clustered
    python bench/bench_matching.py --sizes 100000 --datasets clustered,gaussian

Past one machine (--dask): knn_ivf_distributed, the IVF lists split over Dask workers. A fresh
LocalCluster per size (--workers, 1 thread each), or an existing cluster (--scheduler ADDR, the
same code). Prints wall time (training included), recall@K on --queries random users against
exact search, the CPU seconds of this process and all workers together (robust when the box is
shared: on N idle cores wall ~ cpu / N), and the peak RSS of each worker process (VmHWM) and of
this process.

    python bench/bench_matching.py --dask --sizes 1000000,10000000 --workers 2 --nprobe 16
    python bench/bench_matching.py --dask --scheduler tcp://10.0.0.5:8786 --sizes 10000000

--profile: the per-user CPU of the distributed search's steps, in one process and one thread (no
Dask), the previous way and the current way side by side on the same trained quantizer: previous =
each user's nprobe lists found once, then one IVF scan per user over them (search_preassigned);
current = each user's nearest list found, then a cluster join: one matrix product per list against
the members of the nprobe lists nearest to its centroid.

    python bench/bench_matching.py --profile --sizes 1000000 --nprobe 16
"""
from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from walle.platform.coda import matching as mt

CONFIGS = {
    "flat": dict(index="flat"),
    "hnsw32-efs128": dict(index="hnsw", hnsw_m=32, hnsw_ef_search=128),
    "hnsw16-efs128": dict(index="hnsw", hnsw_m=16, hnsw_ef_search=128),
    "ivf-nprobe8": dict(index="ivf", ivf_nprobe=8),
    "ivf-nprobe16": dict(index="ivf", ivf_nprobe=16),
    "ivf-nprobe32": dict(index="ivf", ivf_nprobe=32),
}


def cpu_idle(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU idle over `seconds` (other work on these 2 cores skews timings)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = read()
    time.sleep(seconds)
    i1, t1 = read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until >= 85% of the CPU is idle; returns the last idle fraction."""
    deadline = time.monotonic() + max_wait
    idle = cpu_idle()
    while idle < 0.85 and time.monotonic() < deadline:
        time.sleep(2)
        idle = cpu_idle()
    return idle


def make_data(kind: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n, d), dtype=np.float32)
    elif kind == "clustered":
        centres = rng.standard_normal((2000, d), dtype=np.float32)
        x = centres[rng.integers(0, 2000, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    else:
        raise SystemExit(f"unknown dataset {kind!r}")
    faiss.normalize_L2(x)
    return x


def exact_for(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, i = index.search(x[queries], k + 1)
    elapsed = time.perf_counter() - t
    _, ids = mt._drop_self(np.zeros(i.shape, np.float32), i, queries, k)
    return ids, elapsed


def movielens_recall(k: int) -> None:
    from walle.platform.coda import movielens as ml
    from walle.platform.coda import samples as sm

    data = ml.load()
    train, _ = ml.assign_days(data.inter, 7)
    _, vec = sm.user_vectors(ml.as_raw_frame(train), data.items, key=b"bench-key-0123456789")
    exact = mt.knn(vec, k, index="flat")[1]
    parts = [f"mean top-10 cosine {sm.mean_topk_cosine(vec):.3f}"]
    for name in ("hnsw32-efs128", "ivf-nprobe8", "ivf-nprobe16"):
        parts.append(f"{name} {mt.recall_at_k(mt.knn(vec, k, **CONFIGS[name])[1], exact):.3f}")
    print(f"MovieLens-100k user vectors ({vec.shape[0]} x {vec.shape[1]}), recall@{k}: " + ", ".join(parts), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dask_rows(args) -> None:
    from distributed import Client, LocalCluster

    print(f"{'n':>9} {'data':<10} {'workers':>7} {'nlist':>6} {'nprobe':>6} {'ef':>4} {'wall s':>8} "
          f"{'train/assign/shards/search s':>28} {'recall@K':>9} {'cpu s':>8} {'exact q s':>9} {'worker peak MB':>22} "
          f"{'client peak MB':>14} {'load1':>6} {'idle0':>6}", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.datasets.split(","):
            x = make_data(kind, n, args.dim)
            queries = np.sort(np.random.default_rng(1).choice(n, min(args.queries, n), replace=False))
            exact_q, t_q = exact_for(x, queries, args.k)
            got = {}

            wanted = np.zeros(n, bool)
            wanted[queries] = True

            def keep(rows, sims, ids):  # keep only the sampled users' rows (all of them: 12 GB at 10M)
                for r in np.flatnonzero(wanted[rows]):
                    got[int(rows[r])] = ids[r]

            if args.scheduler:
                client, cluster = Client(args.scheduler), None
            else:
                cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit=0)
                client = Client(cluster)
            try:
                idle = wait_idle(args.wait_idle)
                cpu0 = time.process_time() + sum(client.run(time.process_time).values())
                t = time.perf_counter()
                phases = {}
                mt.knn_ivf_distributed(x, args.k, client=client, nprobe=args.nprobe, nlist=args.nlist or None,
                                       ef_search=args.ef, points_per_list=args.train_points,
                                       train_iter=args.train_iter, on_block=keep, timings=phases)
                elapsed = time.perf_counter() - t
                cpu = time.process_time() + sum(client.run(time.process_time).values()) - cpu0
                peaks = client.run(peak_rss_mb)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
            rec = mt.recall_at_k(np.stack([got[int(q)] for q in queries]), exact_q)
            nlist = args.nlist or mt.default_nlist(n)
            wpeak = "/".join(f"{v:.0f}" for v in peaks.values())
            split = "/".join(f"{phases.get(p, 0):.0f}" for p in ("train", "assign", "shards", "search"))
            print(f"{n:>9} {kind:<10} {len(peaks):>7} {nlist:>6} {args.nprobe:>6} {args.ef:>4} {elapsed:>8.1f} "
                  f"{split:>28} {rec:>9.3f} {cpu:>8.1f} {t_q:>9.1f} {wpeak:>22} {peak_rss_mb():>14.0f} "
                  f"{os.getloadavg()[0]:>6.1f} {idle:>6.2f}", flush=True)
            del x


def profile_rows(args) -> None:
    """Per-user CPU (us, one thread) of the steps of the distributed search, previous vs current way."""
    faiss.omp_set_num_threads(1)
    print(f"{'n':>9} {'nlist':>6} {'nprobe':>6} {'way':<8} {'lists us':>8} {'scan us':>8} {'total us':>8} "
          f"{'recall@K':>9}  (per user, CPU of one thread, training excluded)", flush=True)
    cpu = time.process_time
    for n in (int(v) for v in args.sizes.split(",")):
        x = make_data("clustered", n, args.dim)
        nq = min(n, args.queries * 10)
        queries = np.sort(np.random.default_rng(1).choice(n, nq, replace=False))
        nlist = args.nlist or mt.default_nlist(n)
        exact, _ = exact_for(x, queries, args.k)
        trained = mt.train_ivf(x, nlist, points_per_list=args.train_points, niter=args.train_iter)

        # previous (session 3): each user's nprobe lists found once by the quantizer, the user added
        # to the nearest; then one IVF scan per user over its own lists (search_preassigned)
        t = cpu()
        index = faiss.deserialize_index(trained)
        ivf = faiss.extract_index_ivf(index)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(args.ef, args.nprobe)
        sims, lists = quantizer.search(x, args.nprobe)
        ids, nearest = np.arange(n, dtype=np.int64), np.ascontiguousarray(lists[:, 0])  # alive during add_core
        ivf.add_core(n, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(nearest))
        lists_old = (cpu() - t) / n
        ivf.nprobe = args.nprobe
        t = cpu()
        _, i = ivf.search_preassigned(x[queries], args.k + 1, lists[queries], sims[queries])
        scan_old = (cpu() - t) / nq
        _, ids_old = mt._drop_self(np.zeros(i.shape, np.float32), i, queries, args.k)
        del index, ivf, sims, lists

        # current: each user's nearest list only, then one matrix product per list against the
        # members of the nprobe lists nearest to the list's centroid
        t = cpu()
        assigned = mt.assign_lists(trained, x, args.ef)
        probes = mt.list_probes(mt.centroids_of(trained), args.nprobe)
        order = np.argsort(assigned, kind="stable")
        starts = np.searchsorted(assigned[order], np.arange(nlist + 1))
        shard = mt.JoinShard(x[order], order, 0, starts)
        lists_new = (cpu() - t) / n
        t = cpu()
        d, i = mt.search_join_shard(shard, shard.rows, starts, probes, args.k + 1)
        scan_new = (cpu() - t) / n
        _, ids = mt.merge_sorted_topk([(d, i)], order, args.k)
        ids_new = np.empty_like(ids)
        ids_new[order] = ids
        for way, lists_us, scan, got in (("previous", lists_old, scan_old, ids_old),
                                         ("current", lists_new, scan_new, ids_new[queries])):
            print(f"{n:>9} {nlist:>6} {args.nprobe:>6} {way:<8} {lists_us * 1e6:>8.1f} {scan * 1e6:>8.1f} "
                  f"{(lists_us + scan) * 1e6:>8.1f} {mt.recall_at_k(got, exact):>9.3f}", flush=True)
        print(f"(previous: scan of {nq} sampled users; current: all {n}; load average {os.getloadavg()[0]:.1f})",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--datasets", default="clustered")
    ap.add_argument("--configs", default="flat,hnsw32-efs128,ivf-nprobe16")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--full-exact-max", type=int, default=300_000,
                    help="run exact all-users search for real up to this size, extrapolate above")
    ap.add_argument("--no-movielens", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=60.0, help="max seconds to wait for an idle CPU per row")
    ap.add_argument("--dask", action="store_true", help="run knn_ivf_distributed on Dask workers instead")
    ap.add_argument("--workers", type=int, default=2, help="--dask: LocalCluster worker processes")
    ap.add_argument("--scheduler", default="", help="--dask: an existing cluster's scheduler address")
    ap.add_argument("--nprobe", type=int, default=16, help="--dask: lists probed per query")
    ap.add_argument("--nlist", type=int, default=0, help="--dask: IVF lists (default ~8 sqrt(n))")
    ap.add_argument("--ef", type=int, default=16, help="--dask: HNSW quantizer candidates when finding the lists")
    ap.add_argument("--train-points", type=int, default=20, help="--dask: k-means sample per list")
    ap.add_argument("--train-iter", type=int, default=8, help="--dask: k-means iterations")
    ap.add_argument("--profile", action="store_true", help="per-user CPU of each step, previous vs current way")
    args = ap.parse_args()
    if args.profile:
        profile_rows(args)
        return
    if args.dask:
        print(f"faiss {faiss.__version__}, dask LocalCluster or --scheduler, dim {args.dim}, K={args.k}, "
              f"recall on {args.queries} random users", flush=True)
        dask_rows(args)
        return

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, {os.cpu_count()} cores, "
          f"dim {args.dim}, K={args.k}, recall on {args.queries} random users", flush=True)
    if not args.no_movielens:
        movielens_recall(args.k)
    print(f"{'n':>9} {'data':<10} {'config':<15} {'all-users s':>12} {'cpu s':>8} {'recall@K':>9} {'idle0':>6}  note",
          flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.datasets.split(","):
            x = make_data(kind, n, args.dim)
            queries = np.sort(np.random.default_rng(1).choice(n, min(args.queries, n), replace=False))
            exact_q, t_q = exact_for(x, queries, args.k)
            for name in args.configs.split(","):
                if name not in CONFIGS:
                    raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
                if name == "flat" and n > args.full_exact_max:
                    est = t_q * n / len(queries)
                    print(f"{n:>9} {kind:<10} {name:<15} {est:>12.1f} {'':>8} {1.0:>9.3f} {'':>6}  extrapolated from "
                          f"{len(queries)} queries in {t_q:.2f} s", flush=True)
                    continue
                idle = wait_idle(args.wait_idle)
                t, c = time.perf_counter(), time.process_time()
                _, idx = mt.knn(x, args.k, **CONFIGS[name])
                elapsed, cpu = time.perf_counter() - t, time.process_time() - c
                rec = mt.recall_at_k(idx[queries], exact_q)
                print(f"{n:>9} {kind:<10} {name:<15} {elapsed:>12.1f} {cpu:>8.1f} {rec:>9.3f} {idle:>6.2f}  "
                      "build + search, run", flush=True)
            if n <= args.full_exact_max:
                idle = wait_idle(args.wait_idle)
                t, c = time.perf_counter(), time.process_time()
                mt.knn_sharded(x, args.k, n_shards=4)
                print(f"{n:>9} {kind:<10} {'sharded-4':<15} {time.perf_counter() - t:>12.1f} "
                      f"{time.process_time() - c:>8.1f} {1.0:>9.3f} {idle:>6.2f}  exact, 4 database shards, in-process",
                      flush=True)
            del x


if __name__ == "__main__":
    main()
