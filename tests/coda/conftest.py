"""Shared CoDA fixtures: a real redis-server for the session, and a `kv` store fixture parametrized
over both backends (SQLite file, Redis namespace) so one suite runs against each."""
from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis

from walle.platform.coda.kvstore import RedisKV, SQLiteKV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """redis://127.0.0.1:<port>/0 of a private redis-server started for this session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; the store tests need a real one: "
                    "apt-get install -y redis-server (or `make system-deps`)", pytrace=False)
    workdir: pathlib.Path = tmp_path_factory.mktemp("redis")
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            last_error = (proc.stderr.read().decode(errors="replace") if proc.poll() is not None else "no PING reply")
            log = workdir / "redis.log"
            last_error += log.read_text(errors="replace")[-500:] if log.exists() else ""
            proc.kill()
            proc.wait()
            continue
        client.close()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    pytest.fail(f"redis-server did not start: {last_error}", pytrace=False)


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
