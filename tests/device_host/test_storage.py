"""TaskStorage and HostAPI: namespacing, validation, quotas, and crash safety under SIGKILL."""
from __future__ import annotations

import functools
import os
import random
import signal
import sqlite3
import time

import pytest

from walle.device_host.hostapi import HostAPI
from walle.device_host.storage import Quotas, TaskStorage
from walle.platform.errors import InvalidArgument, NotFound, ResourceExhausted


@pytest.fixture
def store(tmp_path):
    s = TaskStorage(tmp_path / "device.db")
    yield s
    s.close()


def test_wal_mode_and_file(store, tmp_path):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "device.db").exists()


def test_kv_round_trip_and_task_namespaces(store):
    store.put("a", "runs", 3)
    store.put("a", "cfg", {"lr": 0.1, "layers": [8, 1]})
    store.put("b", "runs", 7)
    assert store.get("a", "runs") == 3 and store.get("b", "runs") == 7
    assert store.get("a", "cfg") == {"lr": 0.1, "layers": [8, 1]}
    assert store.get("a", "missing", "dflt") == "dflt"
    store.put("a", "runs", 4)
    assert store.keys("a") == ["cfg", "runs"] and store.keys("a", "ru") == ["runs"]
    assert store.delete("a", "runs") is True and store.delete("a", "runs") is False
    assert store.keys("a") == ["cfg"] and store.keys("b") == ["runs"]


def test_keys_prefix_is_not_a_wildcard(store):
    store.put("a", "x_1", 1)
    store.put("a", "xa1", 2)
    assert store.keys("a", "x_") == ["x_1"]


@pytest.mark.parametrize("key", ["../../etc/passwd", "a/b", "", "a..b", "'; DROP TABLE walle_kv; --", "é", 5, None])
def test_bad_keys_are_rejected(store, key):
    with pytest.raises(InvalidArgument, match="key"):
        store.put("a", key, 1)
    assert store.keys("a") == []


@pytest.mark.parametrize("task", ["Hello", "a-b", "a__b", "_a", "a b", "", "x" * 49])
def test_bad_task_names_are_rejected(store, task):
    with pytest.raises(InvalidArgument, match="task name"):
        store.put(task, "k", 1)


def test_value_checks(store):
    with pytest.raises(InvalidArgument, match="not JSON"):
        store.put("a", "k", {1, 2})
    with pytest.raises(InvalidArgument, match="not JSON"):
        store.put("a", "k", float("nan"))
    small = TaskStorage(store.path, Quotas(max_value_bytes=100, max_key_len=8))
    with pytest.raises(InvalidArgument, match="100-byte limit"):
        small.put("a", "k", "x" * 200)
    with pytest.raises(InvalidArgument, match="8-character limit"):
        small.put("a", "k" * 9, 1)
    assert store.keys("a") == []


def test_tables_insert_query_count_delete(store):
    assert store.insert("t1", "clicks", [{"item": i, "score": i / 4, "tag": "ab"[i % 2]} for i in range(8)]) == 8
    assert store.insert("t1", "clicks", [{"item": 100, "extra": True}]) == 1  # new column added
    assert store.count("t1", "clicks") == 9
    assert store.count("t1", "clicks", {"tag": "a"}) == 4
    rows = store.query("t1", "clicks", where={"score": {"ge": 1.0}, "tag": "b"}, order_by="-item", limit=10)
    assert [r["item"] for r in rows] == [7, 5]
    assert rows[0] == {"item": 7, "score": 1.75, "tag": "b", "extra": None}
    assert store.query("t1", "clicks", where={"extra": True}) == [
        {"item": 100, "score": None, "tag": None, "extra": 1}]
    assert [r["item"] for r in store.query("t1", "clicks", where={"item": {"in": [1, 2, 100]}}, order_by="item")] == [
        1, 2, 100]
    assert store.query("t1", "clicks", where={"tag": None}, limit=5)[0]["item"] == 100
    assert [r["item"] for r in store.query("t1", "clicks", order_by="item", limit=2, offset=3)] == [3, 4]
    assert store.delete_rows("t1", "clicks", {"tag": "a"}) == 4
    assert store.count("t1", "clicks") == 5
    assert store.table_names("t1") == ["clicks"] and store.table_names("t2") == []
    with pytest.raises(NotFound):
        store.query("t2", "clicks")
    assert store.delete_rows("t1", "clicks", {}) == 5
    assert store.usage_bytes("t1") == 0  # every charged byte was refunded


@pytest.mark.parametrize("table", ['x"; DROP TABLE walle_kv; --', "Clicks", "a-b", "a__b", "../x", "1abc", ""])
def test_bad_table_names(store, table):
    with pytest.raises(InvalidArgument, match="table name"):
        store.insert("t1", table, [{"a": 1}])


@pytest.mark.parametrize("row", [{'a" TEXT); DROP TABLE walle_kv; --': 1}, {"rowid": 1}, {"_x": 1}, {"a": [1]},
                                 {"a": {"b": 1}}, {"a": 1, "A": 2}, {}])
def test_bad_rows(store, row):
    with pytest.raises(InvalidArgument):
        store.insert("t1", "tbl", [row])
    assert store.table_names("t1") == []


def test_query_column_validation(store):
    store.insert("t1", "tbl", [{"a": 1}])
    for where in ({"b": 1}, {"a = 1 OR 1": 1}, {"a": {"like": "%"}}, {"a": {"in": []}}, {"a": [1]}):
        with pytest.raises(InvalidArgument):
            store.query("t1", "tbl", where=where)
    for order in ("b", "a; DROP TABLE walle_kv", "-"):
        with pytest.raises(InvalidArgument):
            store.query("t1", "tbl", order_by=order)
    with pytest.raises(InvalidArgument, match="limit"):
        store.query("t1", "tbl", limit=-1)
    assert store.query("t1", "tbl", where={"A": 1}) == [{"a": 1}]  # column names are case-insensitive


def test_physical_names_are_namespaced(store):
    store.insert("alpha", "events", [{"a": 1}])
    store.insert("beta", "events", [{"a": 2}])
    names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
    assert {"t_alpha__events", "t_beta__events"} <= names
    assert store.query("alpha", "events") == [{"a": 1}] and store.query("beta", "events") == [{"a": 2}]


def test_quotas(tmp_path):
    s = TaskStorage(tmp_path / "q.db", Quotas(max_rows_per_table=5, max_total_bytes=200, max_tables=2,
                                              max_columns=3, max_rows_per_call=4))
    s.insert("t", "a", [{"x": i} for i in range(4)])
    with pytest.raises(ResourceExhausted, match="rows"):
        s.insert("t", "a", [{"x": 9}, {"x": 10}])
    assert s.count("t", "a") == 4  # the refused insert left nothing behind
    with pytest.raises(InvalidArgument, match="limit"):
        s.insert("t", "b", [{"x": 1}] * 5)
    with pytest.raises(ResourceExhausted, match="columns"):
        s.insert("t", "a", [{"p": 1, "q": 2, "r": 3}])
    s.insert("t", "b", [{"x": 1}])
    with pytest.raises(ResourceExhausted, match="tables"):
        s.insert("t", "c", [{"x": 1}])
    with pytest.raises(ResourceExhausted, match="quota"):
        s.put("t", "big", "y" * 300)
    assert s.get("t", "big") is None
    s.put("u", "big", "y" * 150)  # quotas are per task


def test_hostapi_dispatch_and_validation(store):
    calls = []

    def train(steps: int, lr: float = 0.1) -> dict:
        calls.append((steps, lr))
        return {"loss": 0.5}

    api = HostAPI(store, "hello", extra_ops={"model.train": train})
    assert "model.train" in api.allowed_apis() and "storage.get" in api.allowed_apis()
    assert api("model.train", [3], {"lr": 0.2}) == {"loss": 0.5} and calls == [(3, 0.2)]
    api("storage.put", ["k"], {"value": [1, 2]})
    assert api("storage.get", ["k"], {}) == [1, 2] and store.get("hello", "k") == [1, 2]
    assert api("storage.insert", ["tbl", [{"a": 1}]], {}) == 1
    assert api("storage.tables", [], {}) == ["tbl"]
    api("log.warning", ["careful"], {})
    api("events.emit", ["train.done", {"loss": 0.5}], {})
    assert api.logs == [{"level": "warning", "message": "careful"}]
    assert api.events == [{"name": "train.done", "payload": {"loss": 0.5}}]
    with pytest.raises(InvalidArgument, match="unknown host API op 'storage.sql'"):
        api("storage.sql", ["SELECT 1"], {})
    with pytest.raises(InvalidArgument, match="storage.get.*unexpected keyword argument 'sql'"):
        api("storage.get", ["k"], {"sql": "x"})
    with pytest.raises(InvalidArgument, match="model.train.*missing a required argument"):
        api("model.train", [], {})
    with pytest.raises(InvalidArgument, match="event name"):
        api("events.emit", ["Bad Name"], {})
    with pytest.raises(InvalidArgument, match="not JSON"):
        api("events.emit", ["x", {1, 2}], {})
    assert calls == [(3, 0.2)]


def test_hostapi_extra_op_validation(store):
    with pytest.raises(InvalidArgument, match="group.name"):
        HostAPI(store, "t", extra_ops={"train": lambda: 1})
    with pytest.raises(InvalidArgument, match="built-in"):
        HostAPI(store, "t", extra_ops={"storage.get": lambda key: 1})
    api = HostAPI(store, "t", extra_ops={"tunnel.send": functools.partial(lambda dev, msg: (dev, msg), "dev-1")})
    assert api("tunnel.send", ["hi"], {}) == ("dev-1", "hi")


# ---------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL a writer at random moments, then check integrity and that committed data survived.

BATCH = 20


def _writer(db_path: str) -> None:  # pragma: no cover - runs in a forked child until killed
    s = TaskStorage(db_path)
    while True:
        n = s.get("crash", "batches", 0)
        # insert() and put() are one transaction each, so the counter may lag the rows by one batch
        done = "rows" in s.table_names("crash") and s.count("crash", "rows", {"batch": n}) > 0
        if not done:  # a previous writer may have died between the two transactions
            s.insert("crash", "rows", [{"batch": n, "i": i, "pad": "p" * 50} for i in range(BATCH)])
        s.put("crash", "batches", n + 1)


def _check_consistent(path: str, seen: int) -> int:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s = TaskStorage(path)
    try:
        batches = s.get("crash", "batches", 0)
        if "rows" not in s.table_names("crash"):
            assert batches == 0
            return 0
        per_batch = dict(s.db.execute('SELECT batch, count(*) FROM "t_crash__rows" GROUP BY batch').fetchall())
        # every batch is whole (insert is atomic); the counter lags the rows by at most one batch
        assert all(c == BATCH for c in per_batch.values()), per_batch
        assert sorted(per_batch) == list(range(len(per_batch)))
        assert len(per_batch) in (batches, batches + 1)
        assert s.count("crash", "rows") == len(per_batch) * BATCH
        meta = s.db.execute("SELECT rows FROM walle_tables WHERE physical='t_crash__rows'").fetchone()[0]
        assert meta == len(per_batch) * BATCH
        assert batches >= seen  # nothing committed earlier was lost
        return batches
    finally:
        s.close()


@pytest.mark.slow
def test_sigkill_mid_write_never_corrupts(tmp_path):
    path = str(tmp_path / "crash.db")
    TaskStorage(path).close()
    rng = random.Random(7)
    seen = 0
    for _ in range(60):
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            try:
                _writer(path)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen = _check_consistent(path, seen)
    assert seen > 5  # the writer made real progress between kills
