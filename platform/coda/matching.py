"""K nearest users by cosine similarity with Faiss (CoDA paper Algorithm 1, lines 12-16).

Vectors are L2-normalized (a copy) and searched by inner product, so similarities are cosines.
`knn` picks the index: exact Flat for up to `exact_threshold` users (exact search costs N^2, 7 s
for all of 100k users on 2 cores), HNSW (M=32) above; IVF by name. `knn_sharded` splits the
database into shards, searches every query block on every shard and merges the top K: exact, and
the way to go when one index no longer fits one worker. Its per-shard functions run in a plain
loop in-process, or as dask.distributed tasks with each shard pinned to a worker.
`knn_ivf_distributed` is the approximate search past one machine (millions of users): a cluster
join over IVF lists, the lists split across Dask workers.

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
        hnsw_ef_search: int = 128, ivf_nprobe: int = 64, hnsw_m: int = 32, ivf_nlist: int | None = None,
        scheduler: object = None, distributed_nprobe: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """For every row, its k most similar other rows: (cosine similarities [n, k] descending,
    row indices [n, k]). k is clipped to n - 1. Approximate indexes may return -1 (similarity
    -inf) where they found fewer than k neighbours. With index "auto" and a dask.distributed
    `scheduler` address ("tcp://host:port"), more than `exact_threshold` rows are matched on that
    cluster (knn_ivf_distributed, `distributed_nprobe` lists per list); otherwise in this process."""
    if k < 1:
        raise InvalidArgument(f"k must be >= 1, got {k}")
    if (index == "auto" and isinstance(scheduler, str) and "://" in scheduler
            and np.asarray(vectors).shape[0] > exact_threshold):
        return knn_ivf_distributed(vectors, k, scheduler=scheduler, nprobe=distributed_nprobe)
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


def sampled_recall(vectors: np.ndarray, ids: np.ndarray, *, sample: int = 200, seed: int = 0) -> float:
    """recall@k of `ids` (every row's k nearest other rows, as knn returns them) against exact
    search for `sample` random rows: what an approximate index lost, cheap enough to log daily
    (200 exact queries against 10M rows take seconds)."""
    x = _prepare(vectors)
    n, k = np.asarray(ids).shape
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    d, i = faiss.knn(x[rows], x, min(k + 1, n), metric=faiss.METRIC_INNER_PRODUCT)
    return recall_at_k(np.asarray(ids)[rows], _drop_self(d, i, rows, k)[1])


# --- approximate search past one machine: a cluster join over IVF lists, split across workers ---
#
# A coarse quantizer (spherical k-means) is trained once on a sample, and every user is assigned to
# its nearest list (on the workers). Users are sorted by list and the sorted rows are cut into
# contiguous shards of whole lists, one per worker. The users of one list are searched together
# against the members of the `nprobe` lists nearest to that list's centroid: one matrix product
# (BLAS) per list and a partial sort, instead of one IVF scan per user, and the quantizer runs once
# per user, for the assignment, instead of once more for the probes. A block of lists is searched
# on every shard against the candidates that shard holds, and the shards' sorted top K are merged
# in C++ (faiss.merge_knn_results). Total work is that of one index; each worker holds only its shard.
# Measured (dim 32, K = 100, one thread): 33 us of CPU per user at 1M against 87 us for one IVF
# scan per user over its own lists, same recall on clustered data; 10M users took 442 s on 2
# workers. It needs more probes than per-user scans for the same recall on less clustered vectors
# (README, bench/bench_matching.py).


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


def _load_ivf(trained: np.ndarray | bytes, ef_search: int = 16) -> tuple[faiss.Index, faiss.Index]:
    """(the deserialized index, its quantizer); keep the first alive while using the second."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = ef_search
    return index, quantizer


def centroids_of(trained: np.ndarray | bytes) -> np.ndarray:
    """The trained lists' centroids [nlist, d]."""
    index, quantizer = _load_ivf(trained)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer = faiss.downcast_index(quantizer.storage)
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def assign_lists(trained: np.ndarray | bytes, rows: np.ndarray, ef_search: int = 16) -> np.ndarray:
    """The nearest list of each (normalized) row, found by the trained quantizer."""
    index, quantizer = _load_ivf(trained, ef_search)
    _, lists = quantizer.search(np.ascontiguousarray(rows), 1)
    return lists[:, 0].astype(np.int32)


def list_probes(centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """For every list, the `nprobe` lists whose centroids are nearest to its own (itself first)."""
    _, probes = faiss.knn(centroids, centroids, min(nprobe, len(centroids)), metric=faiss.METRIC_INNER_PRODUCT)
    return probes


class JoinShard:
    """One worker's part: the rows of lists first..first+len(starts)-2, sorted by list, with their
    global ids; list first+j holds rows starts[j]..starts[j+1]."""

    def __init__(self, rows: np.ndarray, ids: np.ndarray, first: int, starts: np.ndarray):
        self.rows, self.ids, self.first, self.starts = rows, ids, first, starts

    def __sizeof__(self) -> int:  # what Dask counts against the worker's memory
        return self.rows.nbytes + self.ids.nbytes + self.starts.nbytes


def search_join_shard(shard: JoinShard, queries: np.ndarray, query_starts: np.ndarray, probes: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarity, global id) of `queries` among this shard's rows. The queries are the
    members of consecutive lists: list j's rows are queries[query_starts[j]:query_starts[j+1]],
    searched against the members of its lists `probes[j]` that this shard holds."""
    d = np.full((len(queries), k), -np.inf, np.float32)
    i = np.full((len(queries), k), -1, np.int64)
    last = shard.first + len(shard.starts) - 1
    for j, plist in enumerate(probes):
        qlo, qhi = query_starts[j], query_starts[j + 1]
        held = [p - shard.first for p in plist if shard.first <= p < last]
        spans = [(shard.starts[p], shard.starts[p + 1]) for p in held if shard.starts[p + 1] > shard.starts[p]]
        if qhi == qlo or not spans:
            continue
        cand = np.concatenate([shard.rows[a:b] for a, b in spans])
        ids = np.concatenate([shard.ids[a:b] for a, b in spans])
        kk = min(k, len(cand))  # fewer candidates than k: the rest stays -1 / -inf
        step = max(1, _SIMS_PER_STEP // len(cand))  # bounds the similarity matrix of a huge list
        for lo in range(qlo, qhi, step):
            hi = min(qhi, lo + step)
            d[lo:hi, :kk], top = _top_k(queries[lo:hi] @ cand.T, kk)
            i[lo:hi, :kk] = ids[top]
    return d, i


_SIMS_PER_STEP = 4_000_000


def _top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest values, descending, and their columns. A partition, then a sort of the
    k: at K = 101, 400 queries x 6,300 candidates, 9.6 ms against 20.9 ms for faiss's selection,
    which cost 10x the matrix product itself (1.7 ms)."""
    part = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:] if k < sims.shape[1] else \
        np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def rows_of(shard: JoinShard, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of the shard (shard positions): a block of queries, fetched where it lives."""
    return shard.rows[lo:hi]


def merge_sorted_topk(parts: list[tuple[np.ndarray, np.ndarray]], query_ids: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the shards' sorted top (k+1) lists (in C++), then drop each query's own row."""
    if len(parts) == 1:
        d, i = parts[0]
    else:
        d, i = faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                       keep_max=True)
    return _drop_self(d, i, query_ids, k)


def _list_blocks(starts: np.ndarray, query_block: int) -> list[tuple[int, int]]:
    """Runs of whole consecutive lists (la, lb) holding about `query_block` rows each."""
    blocks, la = [], 0
    nlist = len(starts) - 1
    while la < nlist:
        lb = int(np.searchsorted(starts, starts[la] + query_block, side="right")) - 1
        lb = min(max(lb, la + 1), nlist)
        if starts[lb] > starts[la]:  # lists with no users need no search
            blocks.append((la, lb))
        la = lb
    return blocks


def knn_ivf_distributed(vectors: np.ndarray, k: int = 100, *, client: object | None = None,
                        scheduler: str | None = None, n_shards: int | None = None, nlist: int | None = None,
                        nprobe: int = 16, ef_search: int = 16, points_per_list: int = 20, train_iter: int = 8,
                        query_block: int = QUERY_BLOCK,
                        on_block: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                        timings: dict | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Approximate KNN (cosine) of every row by a cluster join over IVF lists, the lists split over
    Dask workers (one shard per worker unless `n_shards`). With `on_block(rows, sims, ids)` each
    finished block is handed over (`rows`: the global indices of its query rows) and nothing is
    kept (10M users x K=100 would be 12 GB); otherwise returns the arrays like knn(). `client` or
    `scheduler` ("tcp://host:8786") picks the cluster. `nprobe`: lists searched per list of users;
    `ef_search`: the HNSW quantizer's candidates when assigning users to lists;
    `points_per_list`/`train_iter`: the k-means sample and iterations of the coarse quantizer.
    `timings` (a dict) receives the wall seconds of "train" (in this process), "assign" (on the
    workers), "shards" (sorting and placing the shards) and "search"."""
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
    trained = np.frombuffer(train_ivf(x, nlist, points_per_list=points_per_list, niter=train_iter), np.uint8)
    probes = list_probes(centroids_of(trained), min(nprobe, nlist))
    lap("train")

    t_fut = client.scatter(trained, broadcast=True, hash=False)
    chunks = _blocks(n, 4 * len(workers))
    data = [client.scatter(x[lo:hi], hash=False) for lo, hi in chunks]  # held: scattered data cannot be recomputed
    lists = np.concatenate(client.gather([client.submit(assign_lists, t_fut, c, ef_search, pure=False) for c in data]))
    del data
    lap("assign")

    order = np.argsort(lists, kind="stable")
    starts = np.searchsorted(lists[order], np.arange(nlist + 1)).astype(np.int64)
    del lists
    blocks = _list_blocks(starts, query_block)
    # A shard is a run of whole blocks, so each block's queries live on one shard.
    groups = [g for g in np.array_split(np.arange(len(blocks)), min(n_shards or len(workers), len(blocks))) if len(g)]
    shards, owner = [], {}
    for s, g in enumerate(groups):
        la, lb = blocks[g[0]][0], blocks[g[-1]][1]
        lo, hi = starts[la], starts[lb]
        w = [workers[s % len(workers)]]
        fut = client.scatter(JoinShard(x[order[lo:hi]], order[lo:hi], la, starts[la:lb + 1] - lo), workers=w,
                             hash=False)
        shards.append((fut, w))
        owner.update({int(b): (fut, w, lo) for b in g})
    del x
    lap("shards")

    out = None if on_block is not None else (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
    window = 2 * len(workers) + 2  # blocks in flight: bounds client and worker memory

    def submit(b: int):
        la, lb = blocks[b]
        own, w, base = owner[b]
        q = client.submit(rows_of, own, starts[la] - base, starts[lb] - base, workers=w, pure=False)
        qstarts, qprobes = starts[la:lb + 1] - starts[la], probes[la:lb]
        parts = [client.submit(search_join_shard, f, q, qstarts, qprobes, k + 1, workers=fw, pure=False)
                 for f, fw in shards]
        rows = order[starts[la]:starts[lb]]
        return rows, client.submit(merge_sorted_topk, parts, rows, k, pure=False)

    pending = iter(range(len(blocks)))
    in_flight = collections.deque(submit(b) for _, b in zip(range(window), pending))
    while in_flight:  # oldest first, `window` blocks being computed
        rows, fut = in_flight.popleft()
        sims, ids = client.gather(fut)
        del fut  # dropping the last reference releases the block's tasks
        if on_block is not None:
            on_block(rows, sims, ids)
        else:
            out[0][rows], out[1][rows] = sims, ids
        nxt = next(pending, None)
        if nxt is not None:
            in_flight.append(submit(nxt))
    lap("search")
    return out
