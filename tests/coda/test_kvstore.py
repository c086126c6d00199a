"""One behaviour suite for both KV backends (the `kv` fixture runs each test on SQLite and Redis)."""
from __future__ import annotations

import threading

import pytest

from walle.platform.coda.kvstore import KVStore, RedisKV, SQLiteKV, open_store
from walle.platform.errors import FailedPrecondition, InvalidArgument


def test_implements_protocol(kv):
    assert isinstance(kv, KVStore)


def test_get_put_overwrite_and_missing(kv):
    assert kv.get(b"a") is None
    kv.put_many([(b"a", b"1"), (b"b", b"\x00\xff binary")])
    assert kv.get(b"a") == b"1"
    assert kv.get(b"b") == b"\x00\xff binary"
    kv.put_many([(b"a", b"2")])
    assert kv.get(b"a") == b"2"
    kv.put_many([(b"e", b"")])  # empty values are values, not absence
    assert kv.get(b"e") == b""


def test_mget_keeps_order_and_reports_missing(kv):
    kv.put_many((f"k{i}".encode(), f"v{i}".encode()) for i in range(1500))  # > one chunk
    keys = [b"k7", b"nope", b"k3", b"k1499", b"k7"]
    assert kv.mget(keys) == [b"v7", None, b"v3", b"v1499", b"v7"]
    many = [f"k{i}".encode() for i in reversed(range(1500))]
    assert kv.mget(many) == [f"v{i}".encode() for i in reversed(range(1500))]
    assert kv.mget([]) == []


def test_put_many_rejects_bad_items_without_writing_any(kv):
    with pytest.raises(InvalidArgument, match="must be bytes"):
        kv.put_many([(b"x1", b"ok"), (b"x2", "not bytes")])
    with pytest.raises(InvalidArgument, match="non-empty bytes"):
        kv.put_many([(b"x1", b"ok"), (b"", b"v")])
    with pytest.raises(InvalidArgument, match="pairs"):
        kv.put_many([(b"x1", b"ok"), b"x2"])
    assert kv.mget([b"x1", b"x2"]) == [None, None]


def test_put_many_large_batch_is_all_visible(kv):
    kv.put_many((f"big{i:05d}".encode(), bytes([i % 256]) * 100) for i in range(5000))
    got = kv.mget([f"big{i:05d}".encode() for i in range(5000)])
    assert all(v == bytes([i % 256]) * 100 for i, v in enumerate(got))


def test_delete_many_counts_only_existing(kv):
    kv.put_many([(b"d1", b"1"), (b"d2", b"2"), (b"d3", b"3")])
    assert kv.delete_many([b"d1", b"d3", b"missing"]) == 2
    assert kv.mget([b"d1", b"d2", b"d3"]) == [None, b"2", None]
    assert kv.delete_many([]) == 0
    assert kv.delete_many(iter([b"d2"])) == 1


def test_scan_prefix_is_literal_and_complete(kv):
    # Glob characters in the prefix must match literally on Redis.
    items = {b"p*[x]?/1": b"a", b"p*[x]?/2": b"b", b"p*[y]?/3": b"c", b"pz[x]a/4": b"d",
             b"q/1": b"e", b"p\\*/5": b"f"}
    kv.put_many(items.items())
    assert dict(kv.scan_prefix(b"p*[x]?/")) == {b"p*[x]?/1": b"a", b"p*[x]?/2": b"b"}
    assert dict(kv.scan_prefix(b"p\\*")) == {b"p\\*/5": b"f"}
    assert dict(kv.scan_prefix(b"nothing")) == {}
    assert dict(kv.scan_prefix(b"")) == items


def test_scan_prefix_many_keys_once_each(kv):
    kv.put_many((f"s/{i:05d}".encode(), str(i).encode()) for i in range(2500))
    kv.put_many([(b"s0", b"not under s/"), (b"s/\xff\xff", b"high")])
    got = list(kv.scan_prefix(b"s/"))
    keys = [k for k, _ in got]
    assert len(keys) == len(set(keys)) == 2501
    assert dict(got)[b"s/01234"] == b"1234"
    assert dict(got)[b"s/\xff\xff"] == b"high"


def test_sqlite_scan_is_sorted(tmp_path):
    kv = SQLiteKV(str(tmp_path / "kv.sqlite3"))
    kv.put_many([(b"\xff\xff", b"1"), (b"\xff\xfe", b"2"), (b"\xff", b"3"), (b"a", b"4")])
    assert [k for k, _ in kv.scan_prefix(b"\xff")] == [b"\xff", b"\xff\xfe", b"\xff\xff"]
    assert [k for k, _ in kv.scan_prefix(b"")] == [b"a", b"\xff", b"\xff\xfe", b"\xff\xff"]
    kv.close()


def test_incr_counts_and_reads_as_decimal(kv):
    assert kv.incr(b"c") == 1
    assert kv.incr(b"c") == 2
    assert kv.incr(b"c", 10) == 12
    assert kv.incr(b"c", -3) == 9
    assert kv.get(b"c") == b"9"
    kv.put_many([(b"notnum", b"abc")])
    with pytest.raises(FailedPrecondition, match="not an integer"):
        kv.incr(b"notnum")
    assert kv.get(b"notnum") == b"abc"
    with pytest.raises(InvalidArgument, match="amount"):
        kv.incr(b"c", 1.5)
    assert kv.get(b"c") == b"9"


def test_incr_is_atomic_across_threads(kv):
    def work():
        for _ in range(200):
            kv.incr(b"shared")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kv.get(b"shared") == b"800"


def test_keys_must_be_bytes(kv):
    with pytest.raises(InvalidArgument, match="key must be"):
        kv.get("str key")
    with pytest.raises(InvalidArgument, match="key must be"):
        kv.mget([b"a", 3])


@pytest.mark.redis
def test_redis_namespaces_are_isolated(redis_url):
    a = RedisKV(redis_url, namespace=b"iso-a:")
    b = RedisKV(redis_url, namespace=b"iso-b:")
    try:
        a.put_many([(b"k", b"from a")])
        assert b.get(b"k") is None
        assert dict(b.scan_prefix(b"")) == {}
        assert dict(a.scan_prefix(b"")) == {b"k": b"from a"}
    finally:
        a.delete_many([b"k"])
        a.close()
        b.close()


def test_sqlite_data_survives_reopen_and_is_shared_across_connections(tmp_path):
    path = str(tmp_path / "kv.sqlite3")
    one = SQLiteKV(path)
    one.put_many([(b"k", b"v")])
    two = open_store(f"sqlite://{path}")
    assert two.get(b"k") == b"v"
    two.incr(b"n", 5)
    assert one.get(b"n") == b"5"
    one.close()
    two.close()
    three = SQLiteKV(path)
    assert three.mget([b"k", b"n"]) == [b"v", b"5"]
    assert three._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    three.close()


@pytest.mark.redis
def test_open_store_redis_url_with_namespace(redis_url):
    store = open_store(redis_url + "?namespace=ns-open:")
    try:
        assert isinstance(store, RedisKV) and store.namespace == b"ns-open:"
        store.put_many([(b"x", b"1")])
        assert RedisKV(redis_url, namespace=b"ns-open:").get(b"x") == b"1"
    finally:
        store.delete_many([b"x"])
        store.close()


def test_open_store_rejects_unknown_urls(tmp_path):
    with pytest.raises(InvalidArgument, match="unsupported store URL"):
        open_store("lmdb:///tmp/x")
    with pytest.raises(InvalidArgument, match="no file path"):
        open_store("sqlite://")


def test_redis_unreachable_is_unavailable():
    from walle.platform.errors import Unavailable
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
        RedisKV(f"redis://127.0.0.1:{port}/0")
