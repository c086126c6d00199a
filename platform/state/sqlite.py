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

    def cached_revision(self, max_age: float = 0.2) -> int:
        # A read costs a few microseconds here (a local file in the page cache), so it is always
        # fresh: a change made through another object or process (the CLI) is seen by the next call.
        return self.revision()

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
        # Columns newer than some data folders: users bound at enrollment, task config of a release,
        # intents per repository.
        for table, column in (("devices", "user_id"), ("releases", "config"), ("submit_intents", "repo")):
            cols = {r[1] for r in c.run(f"PRAGMA table_info({table})").fetchall()}
            if column not in cols:
                c.run(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
