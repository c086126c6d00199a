"""Batch and sample mappings on both KV backends: batching rules, storing each sample once,
idempotent day re-runs, 7-day expiry that never leaves a dangling or orphan sample, pull records."""
from __future__ import annotations

import random
import threading
import zlib

import pytest

from walle.platform.coda.mappings import Mappings, split_batches
from walle.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from walle.protos.coda_pb2 import Sample, SampleBatch, SampleList


def sample(sid: str, day: int = 1, owner: str = "u-owner") -> Sample:
    n = sum(map(ord, sid))
    return Sample(sample_id=sid, user=owner, ts=1_600_000_000 + n, day=day, label=float(n % 2),
                  item_id=n * 7, item_cats=[n % 5, 3], hist_items=[n, n + 1, n + 2], hist_cats=[1, 2, 3],
                  profile=[0.5, -1.25])


def snapshot(kv) -> dict[bytes, bytes]:
    return dict(kv.scan_prefix(b""))


def sample_keys(kv) -> set[str]:
    return {k[2:].decode() for k, _ in kv.scan_prefix(b"s:")}


def referenced(kv) -> set[str]:
    return {k.split(b":x:", 1)[1].decode() for k, _ in kv.scan_prefix(b"d:") if b":x:" in k}


@pytest.mark.parametrize("n, sizes", [
    (0, []), (1, [1]), (24, [24]), (25, [25]), (26, [26]), (40, [40]), (41, [25, 16]), (49, [25, 24]),
    (50, [25, 25]), (65, [25, 40]), (66, [25, 25, 16]), (300, [25] * 12), (310, [25] * 11 + [35]),
])
def test_split_batches(n, sizes):
    got = split_batches(n)
    assert got == sizes
    assert sum(got) == n


def test_split_batches_other_sizes():
    assert split_batches(13, batch_size=5, max_batch=8) == [5, 8]
    assert split_batches(14, batch_size=5, max_batch=8) == [5, 5, 4]
    assert split_batches(7, batch_size=5, max_batch=5) == [5, 2]
    with pytest.raises(InvalidArgument, match="max_batch"):
        Mappings(None, batch_size=25, max_batch=20)


def test_samples_stored_once_and_batches_round_trip(kv):
    m = Mappings(kv)
    pool = [sample(f"s{i:03d}") for i in range(100)]
    matched = {"alice": pool[:65], "bob": pool[10:60], "carol": pool[90:100]}
    summary = m.put_day(3, matched)
    assert (summary.users, summary.batches, summary.sample_refs, summary.samples) == (3, 2 + 2 + 1, 125, 75)
    assert sample_keys(kv) == {s.sample_id for s in pool[:65] + pool[90:]}  # 75 keys, not 125
    assert m.list_batches("alice", 3) == [("3.0", 25), ("3.1", 40)]
    assert m.list_batches("bob", 3) == [("3.0", 25), ("3.1", 25)]
    assert m.list_batches("carol", 3) == [("3.0", 10)]
    assert m.list_batches("nobody", 3) == []
    got = [Sample.FromString(b) for b in m.get_batch("alice", 3, "3.1")]
    assert got == pool[25:65]
    assert [Sample.FromString(b) for b in m.get_batch("bob", 3, "3.0")] == pool[10:35]
    with pytest.raises(NotFound, match="'3.2'"):
        m.get_batch("alice", 3, "3.2")
    with pytest.raises(NotFound):
        m.get_batch("alice", 4, "3.0")
    assert m.has_day(3) and not m.has_day(4)


def test_duplicates_within_a_user_are_kept_once(kv):
    m = Mappings(kv)
    s = [sample(f"d{i}") for i in range(30)]
    m.put_day(1, {"u": s + s[:5]})
    assert m.list_batches("u", 1) == [("1.0", 30)]


def test_bad_input_is_refused_and_leaves_store_unchanged(kv):
    m = Mappings(kv)
    m.put_day(1, {"u": [sample("a"), sample("b")]})
    before = snapshot(kv)
    changed = sample("a")
    changed.label = 0.75
    with pytest.raises(InvalidArgument, match="'a' is given with two different contents"):
        m.put_day(1, {"u": [sample("a")], "v": [changed]})
    with pytest.raises(InvalidArgument, match="user pseudonym"):
        m.put_day(1, {"": [sample("a")]})
    with pytest.raises(InvalidArgument, match="not a Sample"):
        m.put_day(1, {"u": [b"raw bytes"]})
    with pytest.raises(InvalidArgument, match="sample_id"):
        m.put_day(1, {"u": [Sample(user="x")]})
    with pytest.raises(InvalidArgument, match="day must be"):
        m.put_day(-1, {"u": [sample("c")]})
    assert snapshot(kv) == before


def test_rerun_of_a_day_is_idempotent_and_cleans_up(kv):
    m = Mappings(kv)
    pool = [sample(f"r{i}") for i in range(80)]
    m.put_day(2, {"x": pool[:30]})          # another day shares r0..r29
    day5 = {"alice": pool[:50], "bob": pool[40:80]}
    m.put_day(5, day5)
    first = snapshot(kv)
    again = m.put_day(5, day5)
    assert snapshot(kv) == first
    assert again.removed_samples == 0

    # A different result for day 5: bob is gone, alice shrinks to r0..r9.
    summary = m.put_day(5, {"alice": pool[:10]})
    assert m.list_batches("bob", 5) == []
    assert m.list_batches("alice", 5) == [("5.0", 10)]
    assert summary.removed_samples == 50          # r30..r79: no day references them now
    assert sample_keys(kv) == {f"r{i}" for i in range(30)}  # r10..r29 survive through day 2
    assert sample_keys(kv) == referenced(kv)


def served_batches(kv) -> dict[bytes, bytes]:
    return {k: v for k, v in kv.scan_prefix(b"d:") if b":z:" in k}


def test_batches_are_stored_compressed_once_as_served(kv):
    """Each user's batch is stored as the SampleBatch a device pulls; the bytes hold exactly the
    batch's samples; a re-run drops batches it no longer has; a store written without them builds
    the same message on request."""
    m = Mappings(kv)
    pool = [sample(f"c{i}") for i in range(90)]
    m.put_day(4, {"alice": pool[:65], "bob": pool[10:35]})
    assert len(served_batches(kv)) == 3  # alice 2, bob 1
    chosen = m.user_batches("alice", 4)
    got = [SampleBatch.FromString(b) for b in m.batch_messages("alice", 4, chosen)]
    assert [(b.batch_id, b.day, b.count) for b in got] == [("4.0", 4, 25), ("4.1", 4, 40)]
    assert list(SampleList.FromString(zlib.decompress(got[1].zlib_samples)).samples) == pool[25:65]

    m.put_day(4, {"alice": pool[:10]})  # bob gone, alice down to one batch
    assert [k.rsplit(b":z:", 1)[1] for k in served_batches(kv)] == [b"alice\x004.0"]
    one = SampleBatch.FromString(m.batch_messages("alice", 4, m.user_batches("alice", 4))[0])
    assert one.count == 10 and list(SampleList.FromString(zlib.decompress(one.zlib_samples)).samples) == pool[:10]

    lean = Mappings(kv, compressed_batches=False)  # what an older writer left: no stored messages
    lean.put_day(5, {"carol": pool[40:90]})
    assert [k for k in served_batches(kv) if b"%010d" % 5 in k] == []
    built = lean.batch_messages("carol", 5, lean.user_batches("carol", 5))
    m.put_day(6, {"carol": pool[40:90]})
    stored = m.batch_messages("carol", 6, m.user_batches("carol", 6))
    assert [SampleBatch.FromString(b).zlib_samples for b in built] == \
        [SampleBatch.FromString(b).zlib_samples for b in stored]  # the same samples, the same bytes
    m.expire(100)
    assert snapshot(kv) == {}


def test_expire_keeps_last_seven_days_and_exact_sample_set(kv):
    m = Mappings(kv)
    rng = random.Random(7)
    pool = [sample(f"e{i}") for i in range(120)]
    for day in range(1, 11):
        users = {f"user{u}": rng.sample(pool, rng.randint(1, 45)) for u in range(4)}
        m.put_day(day, users)
        m.record_pull("dev-1", day)
        m.mark_pulled("dev-1", day, [f"{day}.0"])
    assert sample_keys(kv) == referenced(kv)
    deleted = m.expire(10)
    assert deleted > 0
    assert [d for d in range(1, 11) if m.has_day(d)] == [4, 5, 6, 7, 8, 9, 10]
    for day in (1, 2, 3):
        assert m.list_batches("user0", day) == []
        assert m.pulls("dev-1", day) == 0
        assert m.pulled("dev-1", day, [f"{day}.0"]) == set()
        assert list(kv.scan_prefix(b"d:%010d:" % day)) == []
    assert m.pulls("dev-1", 4) == 1 and m.pulled("dev-1", 4, ["4.0"]) == {"4.0"}
    # Every stored sample is referenced by a kept day, and every referenced sample is stored.
    assert sample_keys(kv) == referenced(kv)
    for day in range(4, 11):
        for user in ("user0", "user3"):
            for bid, _count in m.list_batches(user, day):
                assert all(Sample.FromString(b).sample_id for b in m.get_batch(user, day, bid))
    assert m.expire(10) == 0
    m.expire(100)
    assert snapshot(kv) == {}


def test_expire_removes_pull_only_days(kv):
    m = Mappings(kv)
    m.record_pull("dev", 1)   # a device pulled on a day with no data
    m.expire(20)
    assert snapshot(kv) == {}


def test_pull_counter_reserve_release_and_marks(kv):
    m = Mappings(kv, daily_limit=3)
    assert m.pulls("dev", 9) == 0
    assert [m.reserve_pulls("dev", 9) for _ in range(4)] == [1, 1, 1, 0]
    assert m.pulls("dev", 9) == 3
    m.release_pulls("dev", 9)
    assert m.pulls("dev", 9) == 2
    assert m.reserve_pulls("dev", 9, 5) == 1           # only one left of 3
    assert m.pulls("dev", 9) == 3
    assert m.reserve_pulls("dev", 9, 2, limit=10) == 2
    assert m.record_pull("other", 9) == 1
    assert m.reserve_pulls("other", 9, 2) == 2
    assert m.pulls("dev", 10) == 0
    m.mark_pulled("dev", 9, ["9.0", "9.2"])
    assert m.pulled("dev", 9, ["9.0", "9.1", "9.2"]) == {"9.0", "9.2"}
    assert m.pulled("other", 9, ["9.0"]) == set()
    with pytest.raises(InvalidArgument, match="device id"):
        m.record_pull("", 9)
    with pytest.raises(InvalidArgument, match="reserve"):
        m.reserve_pulls("dev", 9, 0)


def test_reserve_pulls_limit_is_exact_under_threads(kv):
    m = Mappings(kv, daily_limit=12)
    got: list[int] = []
    lock = threading.Lock()

    def work():
        for _ in range(10):
            r = m.reserve_pulls("racer", 1, 2)
            with lock:
                got.append(r)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 12 and all(0 <= r <= 2 for r in got)
    assert m.pulls("racer", 1) == 12


def test_missing_sample_is_reported_not_hidden(kv):
    m = Mappings(kv)
    m.put_day(1, {"u": [sample("a"), sample("b")]})
    kv.delete_many([b"s:b"])
    with pytest.raises(FailedPrecondition, match="sample 'b'"):
        m.get_batch("u", 1, "1.0")
