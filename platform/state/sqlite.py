"""PlatformState in one SQLite file: the embedded default (one command, one folder)."""
from __future__ import annotations

import pathlib
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterator

from .sql import Conn, SqlState


class SQLiteState(SqlState):
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # BEGIN IMMEDIATE serialises writers across processes; the lock keeps this process's threads
        # queueing here instead of spinning on SQLITE_BUSY.
        self._write_lock = threading.RLock()
        super().__init__(f"sqlite:///{self.path}")

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _write(self, c: Conn, serialize: bool) -> Iterator[None]:
        with self._write_lock:  # every SQLite write transaction is serialised
            c.run("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                c.run("ROLLBACK")
                raise
            else:
                c.run("COMMIT")

    def _migrate(self, c: Conn) -> None:
        cols = {r[1] for r in c.run("PRAGMA table_info(devices)").fetchall()}
        if "user_id" not in cols:  # data folders from before users were bound at enrollment
            c.run("ALTER TABLE devices ADD COLUMN user_id TEXT NOT NULL DEFAULT ''")
