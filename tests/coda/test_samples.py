"""Sample generation and user vectors on MovieLens-100k, on Dask's local scheduler and on a real
dask.distributed LocalCluster (two worker processes)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from walle.platform.coda import movielens as ml
from walle.platform.coda import samples as sm
from walle.platform.errors import InvalidArgument

KEY = b"test-key-0123456789abcdef"
N_USERS = 150


@pytest.fixture(scope="module")
def data():
    return ml.load()


@pytest.fixture(scope="module")
def raw(data):
    """The first N_USERS users' training rows with identifying ids that are easy to grep for."""
    train, _ = ml.assign_days(data.inter[data.inter.user_id <= N_USERS], 5)
    raw = ml.as_raw_frame(train)
    raw["user_id"] = "person-" + raw["user_id"] + "@example.com"
    raw["device_id"] = "device-SECRET-" + raw["device_id"]
    return raw


@pytest.fixture(scope="module")
def users(data):
    u = data.users.copy()
    u["user_id"] = "person-" + u["user_id"].astype(str) + "@example.com"
    u["zip_code"] = "ZIPCODE" + u["zip_code"]
    return u


@pytest.fixture(scope="module")
def full(raw, data, users):
    return sm.generate(raw, data.items, users, key=KEY)


def serialized(gen: sm.GeneratedDay) -> dict[str, list[bytes]]:
    return {u: [s.SerializeToString(deterministic=True) for s in ss] for u, ss in gen.samples.items()}


def test_pseudonym_is_keyed_and_stable():
    p = sm.pseudonym("196", KEY)
    assert len(p) == 16 and int(p, 16) >= 0
    assert p == sm.pseudonym(196, KEY)
    assert p != sm.pseudonym("196", b"another-key-0123456789")
    assert p != sm.pseudonym("197", KEY)


def test_samples_cover_users_with_labels_and_ids(full, raw):
    assert len(full.samples) == N_USERS
    assert set(full.samples) == {sm.pseudonym(u, KEY) for u in raw["user_id"].unique()}
    ids = [s.sample_id for ss in full.samples.values() for s in ss]
    assert len(ids) == len(set(ids)) == full.n_samples
    # Each target: a rating >= 4 is a click, at least min_hist=5 strictly earlier rows.
    by_user = {sm.pseudonym(u, KEY): g for u, g in raw.groupby("user_id")}
    for user, ss in full.samples.items():
        g = by_user[user]
        assert [s.ts for s in ss] == sorted(s.ts for s in ss)
        rating = dict(zip(g.item_id, g.value))
        for s in ss:
            assert s.user == user and s.sample_id.startswith(user + "-")
            assert s.label == float(rating[s.item_id] >= 4)
            assert (g.ts < s.ts).sum() >= 5


def test_history_is_the_last_50_strictly_earlier_items(full, raw, data):
    first_cat = {i: (c[0] if c else 0) for i, c in zip(data.items.item_id, data.items.genre_ids)}
    cats = dict(zip(data.items.item_id, data.items.genre_ids))
    by_user = {sm.pseudonym(u, KEY): g.sort_values(["ts", "seq"]) for u, g in raw.groupby("user_id")}
    checked = 0
    for user, ss in list(full.samples.items())[:40]:
        g = by_user[user]
        for s in ss:
            earlier = g[g.ts < s.ts]
            assert list(s.hist_items) == earlier["item_id"].tolist()[-50:]
            assert list(s.hist_cats) == [first_cat[i] for i in s.hist_items]
            assert list(s.item_cats) == cats[s.item_id]
            assert 5 <= len(s.hist_items) <= 50
            checked += 1
    assert checked > 1000
    # Ties matter: a same-second rating never leaks into the history.
    tied = [s for ss in full.samples.values() for s in ss
            if len(s.hist_items) < 50 and len(s.hist_items) < (by_user[s.user].ts <= s.ts).sum() - 1]
    assert tied, "expected targets that share their second with other ratings"


def test_no_raw_identity_or_free_text_in_samples_or_vectors(full, data):
    blob = b"".join(b for ss in serialized(full).values() for b in ss)
    for needle in (b"person-", b"@example.com", b"SECRET", b"ZIPCODE", b"ml100k-"):
        assert needle not in blob
    titles = [t.encode() for t in data.items.title if len(t) >= 8]
    assert not any(t in blob for t in titles[:300])
    users, _ = full.user_vectors
    assert all(len(u) == 16 and "@" not in u for u in users)


def test_profile_is_standardized_and_excludes_zip(full, users):
    prof = np.array([ss[0].profile for ss in full.samples.values()])
    n_occ = users["occupation"].nunique()
    assert prof.shape[1] == 2 + n_occ
    assert set(np.unique(prof[:, 1])) <= {-1.0, 1.0}
    assert np.allclose(prof[:, 2:].sum(axis=1), 1.0)
    assert np.abs(prof[:, 0]).max() < 4


def test_day_filter_gives_that_days_subset(full, raw, data, users):
    day3 = sm.generate(raw, data.items, users, key=KEY, day=3)
    assert day3.n_samples > 0
    got = {b for ss in serialized(day3).values() for b in ss}
    want = {s.SerializeToString(deterministic=True) for ss in full.samples.values() for s in ss if s.day == 3}
    assert got == want
    assert all(s.day == 3 for ss in day3.samples.values() for s in ss)
    np.testing.assert_array_equal(day3.user_vectors[1], full.user_vectors[1])


def test_min_hist_and_hist_len_are_configurable(raw, data, full):
    gen = sm.generate(raw, data.items, None, key=KEY, hist_len=3, min_hist=0)
    assert gen.n_samples == len(raw) > full.n_samples
    assert max(len(s.hist_items) for ss in gen.samples.values() for s in ss) == 3
    assert all(len(s.profile) == 0 for ss in gen.samples.values() for s in ss)


def test_user_vectors_are_unit_length_and_discriminative(data):
    train, _ = ml.assign_days(data.inter, 5)
    raw = ml.as_raw_frame(train)
    users, vec = sm.user_vectors(raw, data.items, key=KEY)
    assert vec.shape == (943, 2 * 19 + 6) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    ours = sm.mean_topk_cosine(vec, 10)
    # Baseline the data notes warn about: raw genre histograms.
    hist = np.zeros((943, 19))
    uid = {u: i for i, u in enumerate(sorted(raw.user_id.unique()))}
    for u, item in zip(raw.user_id, raw.item_id):
        for c in data.items.genre_ids.iloc[item - 1]:
            hist[uid[u], c - 1] += 1
    hist /= np.linalg.norm(hist, axis=1, keepdims=True)
    baseline = sm.mean_topk_cosine(hist, 10)
    print(f"\nmean top-10 cosine: ours {ours:.3f}, raw genre histogram {baseline:.3f}")
    assert baseline > 0.95 and ours < 0.8


def test_result_does_not_depend_on_partitions_or_scheduler(full, raw, data, users):
    other = sm.generate(raw, data.items, users, key=KEY, scheduler="sync", npartitions=7)
    assert serialized(other) == serialized(full)
    assert other.user_vectors[0] == full.user_vectors[0]
    np.testing.assert_array_equal(other.user_vectors[1], full.user_vectors[1])


@pytest.mark.slow
def test_same_result_on_a_distributed_local_cluster(full, raw, data, users):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        dist = sm.generate(raw, data.items, users, key=KEY, scheduler=cluster.scheduler_address, npartitions=4)
    assert serialized(dist) == serialized(full)
    np.testing.assert_array_equal(dist.user_vectors[1], full.user_vectors[1])


def test_bad_input_is_refused(raw, data):
    with pytest.raises(InvalidArgument, match="key"):
        sm.generate(raw, data.items, None, key=b"short")
    with pytest.raises(InvalidArgument, match="item_id"):
        sm.generate(raw.drop(columns=["item_id"]), data.items, None, key=KEY)
    with pytest.raises(InvalidArgument, match="no 'day' column"):
        sm.generate(raw.drop(columns=["day"]), data.items, None, key=KEY, day=2)
    with pytest.raises(InvalidArgument, match="genre_ids"):
        sm.generate(raw, data.items.drop(columns=["genre_ids"]), None, key=KEY)
    empty = sm.generate(raw.iloc[:0], data.items, None, key=KEY)
    assert empty.samples == {} and empty.user_vectors[1].shape[0] == 0
