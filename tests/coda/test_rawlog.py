"""Raw behaviour table: idempotent uploads, whole-batch validation, day filter, persistence."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from walle.platform.coda.rawlog import RawLogStore
from walle.platform.errors import InvalidArgument
from walle.protos.coda_pb2 import BehaviorLog

TS = 881_250_949


def recs(seqs, item=10, value=4.0):
    return [(s, BehaviorLog(ts=TS + s, item_id=item + s, event="rate", value=value)) for s in seqs]


@pytest.fixture
def store(tmp_path):
    with RawLogStore(tmp_path / "raw.sqlite3") as s:
        yield s


def test_add_is_idempotent_by_device_and_seq(store):
    assert store.max_seq("d1") == -1
    assert store.add("d1", "u1", recs(range(5)), day=1) == (5, 0)
    assert store.add("d1", "u1", recs(range(5)), day=1) == (0, 5)
    assert store.add("d1", "u1", recs(range(3, 8)), day=2) == (3, 2)
    assert store.add("d2", "u2", recs(range(3)), day=2) == (3, 0)  # same seqs, other device
    assert store.count() == 11
    assert store.max_seq("d1") == 7 and store.max_seq("d2") == 2


def test_duplicate_seq_within_one_batch_counts_once(store):
    batch = recs([0, 1]) + recs([1])
    assert store.add("d1", "u1", batch) == (2, 1)


def test_frame_columns_values_and_day_filter(store):
    store.add("d1", "u1", recs(range(3)), day=1)
    store.add("d1", "u1", recs(range(3, 5)), day=2)
    store.add("d2", "u2", recs(range(2), value=2.5), day=3)
    df = store.frame()
    assert list(df.columns) == ["device_id", "user_id", "seq", "day", "ts", "item_id", "event", "value"]
    assert len(df) == 7
    row = df[(df.device_id == "d2") & (df.seq == 1)].iloc[0]
    assert (row.user_id, row.day, row.ts, row.item_id, row.event, row.value) == ("u2", 3, TS + 1, 11, "rate", 2.5)
    assert sorted(store.frame(day_range=(2, 3))["day"].unique()) == [2, 3]
    assert len(store.frame(day_range=(1, 1))) == 3
    assert store.frame(day_range=(9, 9)).empty
    with pytest.raises(InvalidArgument, match="day_range"):
        store.frame(day_range=(3, 1))


@pytest.mark.parametrize("bad, match", [
    (BehaviorLog(ts=TS, item_id=0, event="rate", value=4), "item_id must be > 0"),
    (BehaviorLog(ts=TS, item_id=-3, event="rate", value=4), "item_id must be > 0"),
    (BehaviorLog(ts=TS, item_id=5, event="rate", value=float("nan")), "value must be finite"),
    (BehaviorLog(ts=TS, item_id=5, event="rate", value=float("inf")), "value must be finite"),
    (BehaviorLog(ts=0, item_id=5, event="rate", value=4), "ts 0 is outside"),
    (BehaviorLog(ts=int(time.time()) + 30 * 86400, item_id=5, event="rate", value=4), "is outside"),
    (BehaviorLog(ts=TS, item_id=5, event="", value=4), "event"),
])
def test_bad_record_refuses_whole_batch_and_names_it(store, bad, match):
    store.add("d1", "u1", recs(range(2)))
    batch = recs(range(2, 5)) + [(5, bad)] + recs(range(6, 8))
    with pytest.raises(InvalidArgument, match=match) as err:
        store.add("d1", "u1", batch)
    assert "record 3 (seq=5)" in str(err.value)
    assert store.count() == 2 and store.max_seq("d1") == 1


@pytest.mark.parametrize("args, match", [
    (("", "u1", []), "device_id"),
    (("d1", "", []), "user_id"),
    (("d1", "u1", [(-1, BehaviorLog(ts=TS, item_id=1, event="rate", value=1))]), "seq must be"),
    (("d1", "u1", [(0, "not a log")]), "BehaviorLog"),
    (("d1", "u1", [BehaviorLog(ts=TS, item_id=1, event="rate", value=1)]), r"\(seq, BehaviorLog\) pair"),
])
def test_bad_arguments_are_refused(store, args, match):
    with pytest.raises(InvalidArgument, match=match):
        store.add(*args)
    assert store.count() == 0


def test_reopen_keeps_rows_and_uses_wal(tmp_path):
    path = tmp_path / "raw.sqlite3"
    with RawLogStore(path) as s:
        s.add("d1", "u1", recs(range(4)), day=1)
    with RawLogStore(path) as s:
        assert s.count() == 4 and s.max_seq("d1") == 3
        assert s.add("d1", "u1", recs(range(4))) == (0, 4)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_uploads_from_threads(store):
    def upload(dev):
        for start in range(0, 200, 20):
            store.add(dev, f"user-{dev}", recs(range(start, start + 25)))  # overlapping re-sends
    threads = [threading.Thread(target=upload, args=(f"d{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 6 * 205
    assert all(store.max_seq(f"d{i}") == 204 for i in range(6))
