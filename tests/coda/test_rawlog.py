"""Raw behaviour table: idempotent uploads, whole-batch validation, day filter, persistence, the
pseudonym key. One suite, run against both implementations (SQLite file, PostgreSQL schema)."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from walle.platform.coda.rawlog import KEY_BYTES, RawLogStore, open_raw_log
from walle.platform.errors import FailedPrecondition, InvalidArgument, Unavailable
from walle.protos.coda_pb2 import BehaviorLog

TS = 881_250_949


def recs(seqs, item=10, value=4.0):
    return [(s, BehaviorLog(ts=TS + s, item_id=item + s, event="rate", value=value)) for s in seqs]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def raw_url(request, tmp_path):
    """One raw log URL per implementation: every test taking `store` or `raw_url` runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'raw.sqlite3'}"
    return request.getfixturevalue("pg_state_url")  # a fresh schema on the session's PostgreSQL


@pytest.fixture
def store(raw_url):
    with open_raw_log(raw_url) as s:
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


def test_reopen_keeps_rows(raw_url):
    with open_raw_log(raw_url) as s:
        s.add("d1", "u1", recs(range(4)), day=1)
    with open_raw_log(raw_url) as s:
        assert s.count() == 4 and s.max_seq("d1") == 3
        assert s.add("d1", "u1", recs(range(4))) == (0, 4)


def test_two_handles_share_rows_and_one_pseudonym_key(raw_url):
    """What two replicas (or a replica and the pipeline) see: one table and one key."""
    with open_raw_log(raw_url) as a, open_raw_log(raw_url) as b:
        assert a.add("d1", "u1", recs(range(3)), day=1) == (3, 0)
        assert b.add("d1", "u1", recs(range(2, 5)), day=1) == (2, 1)  # seq 2 came through `a`
        assert list(a.frame()["seq"]) == [0, 1, 2, 3, 4]
        key = a.pseudonym_key()
        assert len(key) == KEY_BYTES and b.pseudonym_key() == key and a.pseudonym_key() == key
    with open_raw_log(raw_url) as c:  # kept: a new key would orphan every stored pseudonym
        assert c.pseudonym_key() == key


def test_a_new_log_takes_an_injected_key_and_refuses_another(raw_url):
    """A reproducible experiment injects its key; a log that already has one never changes it."""
    key = bytes(range(KEY_BYTES))
    with open_raw_log(raw_url) as a:
        assert a.pseudonym_key(key) == key and a.pseudonym_key() == key
        with pytest.raises(FailedPrecondition, match="another pseudonym key"):
            a.pseudonym_key(bytes(KEY_BYTES))
        with pytest.raises(InvalidArgument, match=f"must be {KEY_BYTES} bytes"):
            a.pseudonym_key(b"short")
    with open_raw_log(raw_url) as b:
        assert b.pseudonym_key() == key


def test_key_made_by_racing_processes_is_one(raw_url):
    """Handles opened at once in threads (each its own connection/file handle) agree on the key."""
    keys, errors = [], []

    def get():
        try:
            with open_raw_log(raw_url) as s:
                keys.append(s.pseudonym_key())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(keys) == 4 and len(set(keys)) == 1


def test_device_ids_come_in_byte_order(store):
    for dev in ("b", "B", "a", "_x", "a-1", "a1"):
        store.add(dev, "u", recs([0]))
    assert list(store.frame()["device_id"]) == sorted(["b", "B", "a", "_x", "a-1", "a1"])


def test_batch_at_the_limits_round_trips(store):
    big = [(2**63 - 1, BehaviorLog(ts=TS, item_id=2**62, event="e" * 32, value=-2.0 ** 100))]
    assert store.add("d" * 128, "u" * 128, big, day=2**31 - 1) == (1, 0)
    row = store.frame().iloc[0]
    assert (row.seq, row.item_id, row.event, row.value, row.day) == (2**63 - 1, 2**62, "e" * 32, -2.0 ** 100, 2**31 - 1)


@pytest.mark.parametrize("url, match", [
    ("", "non-empty"), ("sqlite://", "no file path"), ("mysql://h/db", "use sqlite:///"),
])
def test_bad_url_is_refused(url, match):
    with pytest.raises(InvalidArgument, match=match):
        open_raw_log(url)


def test_unreachable_postgres_is_unavailable():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(Unavailable, match="cannot reach PostgreSQL"):
        open_raw_log(f"postgresql://walle@127.0.0.1:{port}/postgres?connect_timeout=2")


@pytest.mark.postgres
def test_postgres_connection_lost_refuses_the_batch_then_reconnects(pg_state_url):
    import psycopg
    with open_raw_log(pg_state_url) as store:
        store.add("d1", "u1", recs(range(2)))
        pid = store._db.info.backend_pid
        with psycopg.connect(pg_state_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(Unavailable, match="PostgreSQL raw log"):
            store.add("d1", "u1", recs(range(2, 4)))  # refused: the device keeps it and re-sends
        assert store.add("d1", "u1", recs(range(2, 4))) == (2, 0)  # a new connection; nothing was half-stored
        assert store.count() == 4


def test_sqlite_reopen_uses_wal_and_keeps_the_key_file(tmp_path):
    path = tmp_path / "raw.sqlite3"
    with RawLogStore(path) as s:
        s.add("d1", "u1", recs(range(4)), day=1)
    with RawLogStore(path) as s:
        assert s.count() == 4 and s.max_seq("d1") == 3
        assert s.add("d1", "u1", recs(range(4))) == (0, 4)
        key = s.pseudonym_key()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "pseudonym.key").read_bytes() == key
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o777 == 0o600


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
