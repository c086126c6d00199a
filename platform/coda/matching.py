"""K nearest users by cosine similarity with Faiss (CoDA paper Algorithm 1, lines 12-16).

Vectors are L2-normalized (a copy) and searched by inner product, so similarities are cosines.
`knn` picks the index: exact Flat for up to `exact_threshold` users (exact search costs N^2, 7 s
for all of 100k users on 2 cores), HNSW (M=32) above; IVF by name. `knn_sharded` splits the
database into shards, searches every query block on every shard and merges the top K: exact, and
the way to go when one index no longer fits one worker. Its per-shard functions run in a plain
loop in-process, or as dask.distributed tasks with each shard pinned to a worker.

A user never matches itself: we search K+1 and drop the query's own row (or, if exact ties
pushed it out, the last hit).
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable

import faiss
import numpy as np

from walle.platform.errors import InvalidArgument

QUERY_BLOCK = 16_384


def _prepare(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise InvalidArgument(f"vectors must be a 2-D array of at least 2 rows, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    if not np.isfinite(x).all():
        raise InvalidArgument("vectors contain NaN or infinite values")
    faiss.normalize_L2(x)
    return x


def _drop_self(sims: np.ndarray, idx: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Stable sort on "is self" moves the self hit (if any) to the end, keeping the order of the rest.
    order = np.argsort(idx == query_ids[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def build_index(x: np.ndarray, kind: str, *, hnsw_m: int = 32, hnsw_ef_construction: int = 40,
                hnsw_ef_search: int = 128, ivf_nlist: int | None = None, ivf_nprobe: int = 64,
                seed: int = 0) -> faiss.Index:
    """An inner-product index over already-normalized float32 rows: "flat", "hnsw" or "ivf"."""
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw_ef_construction
        index.hnsw.efSearch = hnsw_ef_search
    elif kind == "ivf":
        # ~4 sqrt(N) lists, but at least 39 training points per list (faiss warns below that).
        nlist = ivf_nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on 50 points per list and 10 iterations: 1M users train in seconds, not minutes
        # (faiss's defaults, 256 points and 25 iterations, cost 10x more for little recall).
        index.cp.niter = 10
        train = x
        if n > 50 * nlist:
            train = x[np.random.default_rng(seed).choice(n, 50 * nlist, replace=False)]
        index.train(train)
        index.nprobe = min(ivf_nprobe, nlist)
    else:
        raise InvalidArgument(f"index must be 'auto', 'flat', 'hnsw' or 'ivf', got {kind!r}")
    index.add(x)
    return index


def knn(vectors: np.ndarray, k: int = 100, *, index: str = "auto", exact_threshold: int = 300_000,
        hnsw_ef_search: int = 128, ivf_nprobe: int = 64, hnsw_m: int = 32, ivf_nlist: int | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    """For every row, its k most similar other rows: (cosine similarities [n, k] descending,
    row indices [n, k]). k is clipped to n - 1. Approximate indexes may return -1 (similarity
    -inf) where they found fewer than k neighbours."""
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    x = _prepare(vectors)
    n = x.shape[0]
    k = min(k, n - 1)
    kind = index
    if kind == "auto":
        kind = "flat" if n <= exact_threshold else "hnsw"
    idx = build_index(x, kind, hnsw_m=hnsw_m, hnsw_ef_search=max(hnsw_ef_search, k + 1),
                      ivf_nlist=ivf_nlist, ivf_nprobe=ivf_nprobe)
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for lo in range(0, n, QUERY_BLOCK):
        hi = min(n, lo + QUERY_BLOCK)
        d, i = idx.search(x[lo:hi], k + 1)
        d = np.where(i < 0, -np.inf, d).astype(np.float32)
        sims[lo:hi], ids[lo:hi] = _drop_self(d, i, np.arange(lo, hi), k)
    return sims, ids


# --- sharded exact search: three plain functions, run in a loop or as Dask tasks ---------------

def search_shard(shard: np.ndarray, offset: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries` within one database shard; ids are global (offset added)."""
    index = faiss.IndexFlatIP(shard.shape[1])
    index.add(shard)
    d, i = index.search(queries, min(k, shard.shape[0]))
    return d, i + offset


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], lo: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the shards' hits for query rows lo.. : best k by similarity (ties by lower id),
    with each query's own row removed."""
    d = np.hstack([p[0] for p in parts])
    i = np.hstack([p[1] for p in parts])
    order = np.lexsort((i, -d), axis=1)[:, : k + 1]
    d, i = np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)
    return _drop_self(d, i, np.arange(lo, lo + len(d)), k)


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    step = math.ceil(n / parts)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def knn_sharded(vectors: np.ndarray, k: int = 100, *, n_shards: int, client: object | None = None,
                scheduler: str | None = None, query_block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact KNN with the database split in `n_shards` (same result as knn(index="flat") up to the
    order of exact ties). With a dask.distributed `client` (or a `scheduler` address) each shard is
    scattered to one worker and searched there; otherwise the shards are searched in-process."""
    if n_shards < 1:
        raise InvalidArgument(f"n_shards must be >= 1, got {n_shards}")
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    x = _prepare(vectors)
    n = x.shape[0]
    k = min(k, n - 1)
    shards = _blocks(n, min(n_shards, n))
    qblocks = [(lo, min(n, lo + query_block)) for lo in range(0, n, query_block)]

    if client is None and scheduler is not None:
        from distributed import Client

        with Client(scheduler, set_as_default=False) as own:
            return _sharded_on_client(own, x, k, shards, qblocks)
    if client is not None:
        return _sharded_on_client(client, x, k, shards, qblocks)

    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for qlo, qhi in qblocks:
        parts = [search_shard(x[slo:shi], slo, x[qlo:qhi], k + 1) for slo, shi in shards]
        sims[qlo:qhi], ids[qlo:qhi] = merge_topk(parts, qlo, k)
    return sims, ids


def _sharded_on_client(client, x, k, shards, qblocks):
    workers = sorted(client.scheduler_info()["workers"]) or [None]
    # Pin shard s to worker s mod W: its searches then run where its data already is.
    shard_futs, rows = [], []
    for s, (slo, shi) in enumerate(shards):
        w = workers[s % len(workers)]
        shard_futs.append((client.scatter(x[slo:shi], workers=[w] if w else None), slo, w))
    merged = []
    for qlo, qhi in qblocks:
        q = client.scatter(x[qlo:qhi], broadcast=True)
        parts = [client.submit(search_shard, fut, slo, q, k + 1, workers=[w] if w else None, pure=False)
                 for fut, slo, w in shard_futs]
        merged.append(client.submit(merge_topk, parts, qlo, k, pure=False))
    results = client.gather(merged)
    return np.vstack([r[0] for r in results]), np.vstack([r[1] for r in results])


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours that the approximate search found."""
    a, e = np.asarray(approx_idx), np.asarray(exact_idx)
    if a.shape[0] != e.shape[0]:
        raise InvalidArgument(f"row counts differ: {a.shape[0]} vs {e.shape[0]}")
    if e.size == 0:
        return 1.0
    hits = sum(len(set(ar[ar >= 0].tolist()) & set(er.tolist())) for ar, er in zip(a, e))
    return hits / e.size


# --- approximate search past one machine: IVF lists sharded across Dask workers ----------------
#
# One coarse quantizer is trained once on a sample (spherical k-means, assignments through an HNSW
# graph so tens of thousands of lists train in seconds). The users are split into contiguous
# shards, one per worker. Each worker finds, once, the `nprobe` nearest lists of each of its users
# (the costliest step after the scan: ~40 us a user through the HNSW quantizer), adds its users to
# their nearest list in its own copy of the index, and keeps those probes: the users are also the
# queries. A block of queries is then scanned on every shard with the probes of the shard that owns
# it (search_preassigned: the quantizer is never run twice for a user) and the shards' sorted top K
# are merged in C++ (faiss.merge_knn_results). Total work is that of one index; the memory of the
# lists and probes is divided by the number of workers.

class ShardIndex:
    """One worker's part: a faiss IVF index holding rows offset.. (their global ids), and the
    probed lists (similarities, list ids) of each of those rows."""

    def __init__(self, index: faiss.Index, offset: int, probe_sims: np.ndarray, probe_lists: np.ndarray):
        self.index, self.offset, self.probe_sims, self.probe_lists = index, offset, probe_sims, probe_lists

    def __sizeof__(self) -> int:  # what Dask counts against the worker's memory
        return self.index.ntotal * (4 * self.index.d + 8) + self.probe_sims.nbytes + self.probe_lists.nbytes

    def __reduce__(self):
        return (ShardIndex._load, (faiss.serialize_index(self.index), self.offset, self.probe_sims, self.probe_lists))

    @staticmethod
    def _load(data: np.ndarray, offset: int, probe_sims: np.ndarray, probe_lists: np.ndarray) -> "ShardIndex":
        return ShardIndex(faiss.deserialize_index(data), offset, probe_sims, probe_lists)


def default_nlist(n: int) -> int:
    """~8 sqrt(N) lists (at least 39 training points each): lists stay short as N grows."""
    return max(1, min(int(8 * math.sqrt(n)), n // 39))


def train_ivf(x: np.ndarray, nlist: int, *, seed: int = 0, points_per_list: int = 40, niter: int = 10) -> bytes:
    """An empty, trained IVF-Flat inner-product index (serialized) for normalized rows `x`."""
    n, d = x.shape
    quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if nlist > 1024 else faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = niter
    index.cp.spherical = True  # centroids stay on the unit sphere, like the users
    index.cp.seed = seed
    index.cp.min_points_per_centroid = min(points_per_list, 39)
    if nlist > 1024:  # k-means assigns through an HNSW graph instead of N x nlist dot products
        index.clustering_index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_L2)
    train = x
    if n > points_per_list * nlist:
        train = x[np.sort(np.random.default_rng(seed).choice(n, points_per_list * nlist, replace=False))]
    index.train(np.ascontiguousarray(train))
    return faiss.serialize_index(index)


def _ivf_of(index: faiss.Index, nprobe: int, ef_search: int) -> faiss.IndexIVF:
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):  # enough candidates for the nprobe nearest lists
        quantizer.hnsw.efSearch = max(ef_search, nprobe)
    return ivf


def build_ivf_shard(trained: np.ndarray, shard: np.ndarray, offset: int, nprobe: int = 16,
                    ef_search: int = 16) -> ShardIndex:
    """The shard of rows offset..: each row's `nprobe` nearest lists (found once), the row added to
    the nearest of them under its global id."""
    index = faiss.deserialize_index(trained)
    ivf = _ivf_of(index, nprobe, ef_search)
    sims, lists = ivf.quantizer.search(shard, nprobe)
    ids = np.arange(offset, offset + len(shard), dtype=np.int64)
    nearest = np.ascontiguousarray(lists[:, 0])
    ivf.add_core(len(shard), faiss.swig_ptr(np.ascontiguousarray(shard)), faiss.swig_ptr(ids),
                 faiss.swig_ptr(nearest))
    return ShardIndex(index, offset, sims, lists)


def probes_of(shard: ShardIndex, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The probed lists of rows lo..hi (which this shard owns)."""
    a, b = lo - shard.offset, hi - shard.offset
    return shard.probe_sims[a:b], shard.probe_lists[a:b]


def search_ivf_shard(shard: ShardIndex, queries: np.ndarray, probes: tuple[np.ndarray, np.ndarray],
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` among this shard's rows, scanning the lists named by `probes`."""
    sims, lists = probes
    ivf = faiss.extract_index_ivf(shard.index)
    ivf.nprobe = lists.shape[1]
    d, i = ivf.search_preassigned(queries, k, lists, sims)
    d[i < 0] = -np.inf
    return d, i


def merge_sorted_topk(parts: list[tuple[np.ndarray, np.ndarray]], lo: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the shards' sorted top (k+1) lists for query rows lo.. (in C++), then drop self."""
    if len(parts) == 1:
        d, i = parts[0]
    else:
        d, i = faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                       keep_max=True)
    return _drop_self(d, i, np.arange(lo, lo + len(d)), k)


def knn_ivf_distributed(vectors: np.ndarray, k: int = 100, *, client: object | None = None,
                        scheduler: str | None = None, n_shards: int | None = None, nlist: int | None = None,
                        nprobe: int = 16, ef_search: int = 16, points_per_list: int = 20, train_iter: int = 8,
                        query_block: int = QUERY_BLOCK,
                        on_block: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                        timings: dict | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Approximate KNN (cosine) of every row, the IVF lists split over Dask workers (one shard per
    worker unless `n_shards`). With `on_block(lo, sims, ids)` each finished block of query rows is
    handed over and nothing is kept (10M users x K=100 would be 12 GB); otherwise returns the
    arrays like knn(). `client` or `scheduler` ("tcp://host:8786") picks the cluster. `ef_search`:
    the HNSW quantizer's candidates when finding the nprobe lists; `points_per_list`/`train_iter`:
    the k-means sample and iterations of the coarse quantizer. `timings` (a dict) receives the wall
    seconds of "train" (in this process), "shards" (until the first block is back: the shards are
    built then) and "search" (the rest)."""
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    if nprobe < 1:
        raise InvalidArgument(f"nprobe must be >= 1, got {nprobe}")
    if client is None:
        if scheduler is None:
            raise InvalidArgument("knn_ivf_distributed needs a dask client or a scheduler address")
        from distributed import Client

        with Client(scheduler, set_as_default=False) as own:
            return knn_ivf_distributed(vectors, k, client=own, n_shards=n_shards, nlist=nlist, nprobe=nprobe,
                                       ef_search=ef_search, points_per_list=points_per_list, train_iter=train_iter,
                                       query_block=query_block, on_block=on_block, timings=timings)
    clock = [time.perf_counter()]
    timings = {} if timings is None else timings

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now
    x = _prepare(vectors)
    n = x.shape[0]
    k = min(k, n - 1)
    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise InvalidArgument("the dask cluster has no workers")
    nlist = min(nlist or default_nlist(n), n)
    nprobe = min(nprobe, nlist)
    qblocks = [(lo, min(n, lo + query_block)) for lo in range(0, n, query_block)]
    # A shard is a run of whole query blocks, so each block's probes live on one shard.
    groups = [g for g in np.array_split(np.arange(len(qblocks)), min(n_shards or len(workers), len(qblocks))) if len(g)]
    trained = train_ivf(x, nlist, points_per_list=points_per_list, niter=train_iter)
    lap("train")
    t_fut = client.scatter(trained, broadcast=True, hash=False)
    shard_futs, owner, rows = [], {}, []
    for s, g in enumerate(groups):
        slo, shi = qblocks[g[0]][0], qblocks[g[-1]][1]
        w = [workers[s % len(workers)]]
        data = client.scatter(x[slo:shi], workers=w, hash=False)
        fut = client.submit(build_ivf_shard, t_fut, data, slo, nprobe, ef_search, workers=w, pure=False)
        shard_futs.append((fut, w))
        owner.update({int(b): (fut, w) for b in g})
        rows.append(data)  # scattered data cannot be recomputed: hold it until the shards are built
    out = None if on_block is not None else (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
    window = 2 * len(workers) + 2  # blocks in flight: bounds client and worker memory

    def submit(b: int):
        lo, hi = qblocks[b]
        q = client.scatter(x[lo:hi], broadcast=True, hash=False)
        own, w = owner[b]
        probes = client.submit(probes_of, own, lo, hi, workers=w, pure=False)
        parts = [client.submit(search_ivf_shard, f, q, probes, k + 1, workers=fw, pure=False) for f, fw in shard_futs]
        fut = client.submit(merge_sorted_topk, parts, lo, k, pure=False)
        return lo, fut, (q, probes, parts)  # held until gathered: a released scatter would be a lost dependency

    pending = iter(range(len(qblocks)))
    in_flight = collections.deque(submit(b) for _, b in zip(range(window), pending))
    while in_flight:  # oldest first: blocks come back in order, `window` of them being computed
        lo, fut, held = in_flight.popleft()
        sims, ids = client.gather(fut)
        if rows:
            lap("shards")
        rows.clear()  # every shard is built (this block needed them all): workers keep only the indexes
        del fut, held  # dropping the last reference releases them (an explicit release() would twice)
        if on_block is not None:
            on_block(lo, sims, ids)
        else:
            out[0][lo:lo + len(sims)], out[1][lo:lo + len(ids)] = sims, ids
        nxt = next(pending, None)
        if nxt is not None:
            in_flight.append(submit(nxt))
    lap("search")
    return out
