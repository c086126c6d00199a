"""Faiss KNN user matching: exactness against numpy, self exclusion, sharded == single process
(in-process and on a dask.distributed LocalCluster), ANN recall on real MovieLens user vectors."""
from __future__ import annotations

import numpy as np
import pytest

from walle.platform.coda import matching as mt
from walle.platform.coda import movielens as ml
from walle.platform.coda import samples as sm
from walle.platform.errors import InvalidArgument


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.fixture(scope="module")
def rand():
    return np.random.default_rng(7).normal(size=(600, 24)).astype(np.float32)


@pytest.fixture(scope="module")
def ml_vectors():
    data = ml.load()
    train, _ = ml.assign_days(data.inter, 7)
    _, vec = sm.user_vectors(ml.as_raw_frame(train), data.items, key=b"matching-test-key-0123")
    return vec


def test_exact_knn_equals_numpy_brute_force(rand):
    sims, idx = mt.knn(rand * 3.0, 15)  # unnormalized input: cosine all the same
    want_s, want_i = brute_force(rand.astype(np.float64), 15)
    assert idx.shape == (600, 15) and sims.dtype == np.float32
    np.testing.assert_array_equal(idx, want_i)  # continuous random data: no ties
    np.testing.assert_allclose(sims, want_s, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_self_never_matched_even_with_duplicate_vectors(rand):
    x = np.vstack([rand[:50], rand[:50], rand[:50]])  # every vector three times: exact ties with self
    for kind in ("flat", "hnsw", "ivf"):
        _, idx = mt.knn(x, 5, index=kind)
        assert not (idx == np.arange(len(x))[:, None]).any(), kind
        assert (idx >= 0).all()
    _, idx = mt.knn(x, 2)
    twins = {(i, j) for i in range(150) for j in idx[i]}
    assert all((i, (i + 50) % 150) in twins and (i, (i + 100) % 150) in twins for i in range(150))


def test_k_is_clipped_to_n_minus_one():
    x = np.random.default_rng(1).normal(size=(5, 4))
    sims, idx = mt.knn(x, 100)
    assert idx.shape == (5, 4)
    for i in range(5):
        assert sorted(idx[i]) == [j for j in range(5) if j != i]


def test_auto_switches_to_hnsw_above_the_threshold(rand):
    exact = mt.knn(rand, 10)[1]
    auto_small = mt.knn(rand, 10, exact_threshold=10_000)[1]
    auto_hnsw = mt.knn(rand, 10, exact_threshold=100, hnsw_ef_search=16)[1]
    np.testing.assert_array_equal(auto_small, exact)
    assert 0.8 <= mt.recall_at_k(auto_hnsw, exact) <= 1.0


@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_sharded_equals_single_process(rand, n_shards):
    sims, idx = mt.knn(rand, 20, index="flat")
    s_sims, s_idx = mt.knn_sharded(rand, 20, n_shards=n_shards, query_block=128)
    np.testing.assert_allclose(s_sims, sims, atol=1e-5)
    assert [set(r) for r in s_idx] == [set(r) for r in idx]
    assert not (s_idx == np.arange(len(rand))[:, None]).any()


def test_sharded_with_ties_keeps_similarities_and_drops_self(rand):
    x = np.vstack([rand[:40]] * 3)
    sims, _ = mt.knn(x, 6, index="flat")
    s_sims, s_idx = mt.knn_sharded(x, 6, n_shards=4, query_block=32)
    np.testing.assert_allclose(s_sims, sims, atol=1e-5)
    assert not (s_idx == np.arange(len(x))[:, None]).any()


@pytest.mark.slow
def test_sharded_on_a_distributed_local_cluster(rand):
    from distributed import Client, LocalCluster

    sims, idx = mt.knn(rand, 20, index="flat")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        with Client(cluster) as client:
            c_sims, c_idx = mt.knn_sharded(rand, 20, n_shards=4, client=client, query_block=200)
        a_sims, a_idx = mt.knn_sharded(rand, 20, n_shards=3, scheduler=cluster.scheduler_address)
    for got_s, got_i in ((c_sims, c_idx), (a_sims, a_idx)):
        np.testing.assert_allclose(got_s, sims, atol=1e-5)
        assert [set(r) for r in got_i] == [set(r) for r in idx]


def test_ann_recall_on_real_movielens_user_vectors(ml_vectors):
    exact_s, exact_i = mt.knn(ml_vectors, 100, index="flat")
    assert exact_i.shape == (943, 100)
    recalls = {}
    for name, kw in {"hnsw efS128": dict(index="hnsw", hnsw_ef_search=128),
                     "ivf nprobe16": dict(index="ivf", ivf_nprobe=16),
                     "ivf nprobe4": dict(index="ivf", ivf_nprobe=4)}.items():
        recalls[name] = mt.recall_at_k(mt.knn(ml_vectors, 100, **kw)[1], exact_i)
    print("\nMovieLens-100k (943 users) recall@100 vs exact:",
          ", ".join(f"{k} {v:.3f}" for k, v in recalls.items()))
    assert recalls["hnsw efS128"] >= 0.9 and recalls["ivf nprobe16"] >= 0.9
    assert recalls["ivf nprobe4"] < recalls["ivf nprobe16"]  # fewer probed lists must cost recall


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    assert mt.recall_at_k(exact, exact) == 1.0
    assert mt.recall_at_k(np.array([[4, 3, 9, -1], [0, 5, 6, 7]]), exact) == 3 / 8
    with pytest.raises(InvalidArgument, match="row counts"):
        mt.recall_at_k(exact[:1], exact)


def test_bad_input_is_refused(rand):
    bad = rand.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        mt.knn(bad, 5)
    with pytest.raises(InvalidArgument, match="at least 2 rows"):
        mt.knn(rand[:1], 5)
    with pytest.raises(InvalidArgument, match="2-D"):
        mt.knn(rand[0], 5)
    with pytest.raises(InvalidArgument, match="'ivfpq'"):
        mt.knn(rand, 5, index="ivfpq")
    with pytest.raises(InvalidArgument, match="k must be"):
        mt.knn(rand, 0)
    with pytest.raises(InvalidArgument, match="n_shards"):
        mt.knn_sharded(rand, 5, n_shards=0)


@pytest.mark.slow
def test_ivf_distributed_on_a_local_cluster():
    from distributed import Client, LocalCluster, get_task_stream

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 16))
    x = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 16))).astype(np.float32)
    exact_s, exact_i = mt.knn(x, 15, index="flat")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        with Client(cluster) as client:
            # every list probed: the cluster join is exact
            s_all, i_all = mt.knn_ivf_distributed(x, 15, client=client, nlist=50, nprobe=50, query_block=700)
            blocks = []
            mt.knn_ivf_distributed(x, 15, client=client, nlist=50, nprobe=1, query_block=700,
                                   on_block=lambda rows, s, i: blocks.append((rows, s, i)))
            # the pipeline's call: past exact_threshold rows and given a cluster, knn matches there
            with get_task_stream(client) as on_cluster:
                via_knn = mt.knn(x, 15, exact_threshold=1000, scheduler=cluster.scheduler_address)
            fewer = mt.knn(x, 15, exact_threshold=1000, scheduler=cluster.scheduler_address, distributed_nprobe=1)
            with get_task_stream(client) as nothing:
                mt.knn(x, 15, exact_threshold=1000, scheduler="threads")  # not a cluster: in this process
        by_address = mt.knn_ivf_distributed(x, 15, scheduler=cluster.scheduler_address, nlist=50, nprobe=50)
    assert any("search_join_shard" in str(t["key"]) for t in on_cluster.data) and not nothing.data
    assert mt.recall_at_k(via_knn[1], exact_i) > 0.95 > mt.recall_at_k(fewer[1], exact_i)  # the knob reaches it
    np.testing.assert_allclose(s_all, exact_s, atol=1e-5)
    assert mt.recall_at_k(i_all, exact_i) > 0.999 and mt.recall_at_k(by_address[1], exact_i) > 0.999
    rows = np.concatenate([r for r, _, _ in blocks])
    assert len(blocks) > 2 and np.array_equal(np.sort(rows), np.arange(4000))  # every row once, nothing kept
    approx = np.empty((4000, 15), np.int64)
    approx[rows] = np.vstack([i for _, _, i in blocks])
    assert not (approx == np.arange(4000)[:, None]).any()  # never matched to itself
    assert 0.8 < mt.recall_at_k(approx, exact_i) < 1.0  # only each user's own list searched: approximate
    with pytest.raises(InvalidArgument, match="client or a scheduler"):
        mt.knn_ivf_distributed(x, 5)


def test_a_join_shard_searches_only_the_probed_lists_it_holds(monkeypatch):
    rng = np.random.default_rng(5)
    rows = mt._prepare(rng.normal(size=(10, 4)))
    ids = np.arange(100, 110)
    # the shard holds lists 3, 4, 5 with 4, 0 and 6 rows
    shard = mt.JoinShard(rows, ids, 3, np.array([0, 4, 4, 10]))
    queries = mt._prepare(rng.normal(size=(3, 4)))
    # query list A (rows 0-1) probes lists 3 and 9 (not held); query list B (row 2) probes 4 (empty) and 5
    d, i = mt.search_join_shard(shard, queries, np.array([0, 2, 3]), np.array([[3, 9], [4, 5]]), 5)
    exact_a = np.argsort(-(queries[:2] @ rows[:4].T), axis=1)
    assert np.array_equal(i[:2, :4], ids[exact_a])  # all 4 rows of list 3, best first, global ids
    assert (i[:2, 4] == -1).all() and np.isneginf(d[:2, 4]).all()  # fewer candidates than k: padded
    exact_b = np.argsort(-(queries[2:] @ rows[4:].T), axis=1)[:, :5]
    assert np.array_equal(i[2:], ids[4:][exact_b])
    np.testing.assert_allclose(d[2:], np.sort(queries[2:] @ rows[4:].T, axis=1)[:, ::-1][:, :5], atol=1e-6)
    monkeypatch.setattr(mt, "_SIMS_PER_STEP", 5)  # a list too big for one similarity matrix: row by row
    d2, i2 = mt.search_join_shard(shard, queries, np.array([0, 2, 3]), np.array([[3, 9], [4, 5]]), 5)
    assert np.array_equal(i2, i)
    np.testing.assert_allclose(d2, d, atol=1e-6)


def test_list_blocks_cover_every_user_once_and_skip_empty_lists():
    starts = np.array([0, 5, 5, 5, 30, 31, 31, 40])  # lists 1, 2 and 5 are empty; list 3 holds 25 rows
    blocks = mt._list_blocks(starts, 10)
    assert blocks == [(0, 3), (3, 4), (4, 7)]  # a list bigger than a block is one block
    assert sum(starts[b] - starts[a] for a, b in blocks) == 40
    assert mt._list_blocks(np.array([0, 0, 0]), 10) == []


def test_sampled_recall_measures_what_an_index_lost(rand):
    _, exact = mt.knn(rand, 10, index="flat")
    assert mt.sampled_recall(rand, exact, sample=50) > 0.99  # exact (two BLAS paths may round a near-tie apart)
    worse = exact.copy()
    worse[:, 5:] = (exact[:, 5:] + 1) % len(rand)  # half of each row replaced by other rows
    rows = np.sort(np.random.default_rng(0).choice(len(rand), 50, replace=False))
    assert mt.sampled_recall(rand, worse, sample=50) == mt.recall_at_k(worse[rows], exact[rows]) < 1.0
