"""Shared CoDA fixtures: a `kv` store fixture parametrized over both backends (SQLite file, Redis
namespace on the session's real redis-server, `redis_url` in tests/conftest.py) so one suite runs
against each."""
from __future__ import annotations

import pathlib
import uuid

import pytest

from walle.platform.coda.kvstore import RedisKV, SQLiteKV


def make_store(kind: str, tmp_path: pathlib.Path, request) -> SQLiteKV | RedisKV:
    if kind == "sqlite":
        return SQLiteKV(str(tmp_path / "kv.sqlite3"))
    url = request.getfixturevalue("redis_url")
    # A fresh namespace per test isolates tests sharing the session's server.
    return RedisKV(url, namespace=f"t{uuid.uuid4().hex[:8]}:".encode())


STORE_KINDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORE_KINDS)
def kv(request, tmp_path):
    store = make_store(request.param, tmp_path, request)
    yield store
    store.close()
