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

import math

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
    shard_futs = []
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
