"""The raw behaviour table: every log record devices upload through the up tunnel (paper 3.1).

`RawLog` is the interface; `open_raw_log(url)` picks the implementation: `sqlite:///path` (the
embedded default, one file in WAL mode, below) or `postgresql://...` (rawlog_pg.py: one table
shared by stateless serving replicas and the pipeline process). A record is keyed by
(device_id, seq), so a device that re-sends a batch after a lost acknowledgement creates no
duplicates. A batch is validated as a whole before anything is written (here, once for every
implementation), and written in one transaction: it is either stored entirely or not at all, and
`add` returns only after the commit -- an upload is never acknowledged before it is stored.

The store also keeps the key of the user pseudonyms (`pseudonym_key`): it pseudonymizes this
table's user ids, and every process serving or processing them must use the same one.
"""
from __future__ import annotations

import abc
import math
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from walle.platform.errors import FailedPrecondition, InvalidArgument
from walle.protos.coda_pb2 import BehaviorLog

MIN_TS = 315_532_800          # 1980-01-01: older timestamps are clock bugs, not behaviour
MAX_FUTURE_S = 2 * 86_400     # tolerate device clocks up to two days fast
MAX_ID_LEN = 128
MAX_EVENT_LEN = 32
MAX_BATCH = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_log (
    device_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    user_id   TEXT NOT NULL,
    day       INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    item_id   INTEGER NOT NULL,
    event     TEXT NOT NULL,
    value     REAL NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS raw_log_day ON raw_log(day);
"""
COLUMNS = ["device_id", "user_id", "seq", "day", "ts", "item_id", "event", "value"]


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise InvalidArgument(f"{name} must be a non-empty string of at most {MAX_ID_LEN} characters, got {value!r}")
    return value


def _check_record(i: int, seq: object, log: object, now: float) -> tuple[int, int, int, str, float]:
    where = f"record {i} (seq={seq!r})"
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq >= 2**63:
        raise InvalidArgument(f"{where}: seq must be an integer >= 0")
    if not isinstance(log, BehaviorLog):
        raise InvalidArgument(f"{where}: expected a walle.v1.BehaviorLog, got {type(log).__name__}")
    if log.item_id <= 0:
        raise InvalidArgument(f"{where}: item_id must be > 0, got {log.item_id}")
    if not math.isfinite(log.value):
        raise InvalidArgument(f"{where}: value must be finite, got {log.value}")
    if not MIN_TS <= log.ts <= now + MAX_FUTURE_S:
        raise InvalidArgument(f"{where}: ts {log.ts} is outside [{MIN_TS}, now + {MAX_FUTURE_S} s]")
    if not log.event or len(log.event) > MAX_EVENT_LEN:
        raise InvalidArgument(f"{where}: event must be 1..{MAX_EVENT_LEN} characters, got {log.event!r}")
    return seq, log.ts, log.item_id, log.event, float(log.value)


DTYPES = {"device_id": object, "user_id": object, "seq": "int64", "day": "int64",
          "ts": "int64", "item_id": "int64", "event": object, "value": "float64"}
KEY_BYTES = 32


class RawLog(abc.ABC):
    """The raw behaviour table. Implementations are safe to share between threads."""

    def add(self, device_id: str, user_id: str, records: Sequence[tuple[int, BehaviorLog]], *,
            day: int = 0) -> tuple[int, int]:
        """Store one uploaded batch. `day` is the work-cycle day the cloud received it in (the
        sample generation selects by it). Returns (accepted, duplicates): records whose
        (device_id, seq) is already stored, or repeated within the batch, count as duplicates.
        Raises InvalidArgument naming the first bad record; nothing is stored then."""
        _check_id("device_id", device_id)
        _check_id("user_id", user_id)
        if not isinstance(day, int) or isinstance(day, bool) or day < 0:
            raise InvalidArgument(f"day must be an integer >= 0, got {day!r}")
        if len(records) > MAX_BATCH:
            raise InvalidArgument(f"batch has {len(records)} records; the limit is {MAX_BATCH}")
        now = time.time()
        rows = []
        for i, rec in enumerate(records):
            if not isinstance(rec, tuple) or len(rec) != 2:
                raise InvalidArgument(f"record {i}: expected a (seq, BehaviorLog) pair, got {type(rec).__name__}")
            seq, ts, item_id, event, value = _check_record(i, rec[0], rec[1], now)
            rows.append((device_id, seq, user_id, day, ts, item_id, event, value))
        if not rows:
            return 0, 0
        accepted = self._insert(rows)
        return accepted, len(rows) - accepted

    def frame(self, day_range: tuple[int, int] | None = None) -> pd.DataFrame:
        """The table (or the days lo..hi inclusive) as a DataFrame with columns COLUMNS,
        ordered by (device_id, seq) (device ids in byte order)."""
        if day_range is not None:
            lo, hi = day_range
            if lo > hi:
                raise InvalidArgument(f"day_range {day_range}: first day is after the last")
            day_range = (int(lo), int(hi))
        return pd.DataFrame.from_records(self._rows(day_range), columns=COLUMNS).astype(DTYPES)

    @abc.abstractmethod
    def _insert(self, rows: list[tuple]) -> int:
        """Store valid rows (device_id, seq, user_id, day, ts, item_id, event, value) in one
        transaction, skipping (device_id, seq) already stored; returns how many were new."""

    @abc.abstractmethod
    def _rows(self, day_range: tuple[int, int] | None) -> list[tuple]:
        """Rows in COLUMNS order, of the days lo..hi (all if None), by (device_id, seq)."""

    @abc.abstractmethod
    def max_seq(self, device_id: str) -> int:
        """Highest stored seq of a device, or -1 if it uploaded nothing (next seq = max_seq() + 1)."""

    @abc.abstractmethod
    def count(self) -> int:
        """Rows stored."""

    @abc.abstractmethod
    def pseudonym_key(self, initial: bytes | None = None) -> bytes:
        """The key of the user pseudonyms (KEY_BYTES random bytes), made on first use; every
        caller, in any process, gets the same one. `initial`: the key a NEW log starts with (a
        reproducible experiment derives it from its seed); a log that has another key refuses."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "RawLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_initial_key(initial: bytes | None) -> bytes | None:
    if initial is not None and (not isinstance(initial, bytes) or len(initial) != KEY_BYTES):
        raise InvalidArgument(f"a pseudonym key must be {KEY_BYTES} bytes")
    return initial


def same_key(key: bytes, initial: bytes | None, where: str) -> bytes:
    if initial is not None and key != initial:
        raise FailedPrecondition(f"{where} holds another pseudonym key; a raw log keeps its key")
    return key


class RawLogStore(RawLog):
    """Raw behaviour table in one SQLite file. Safe to share between threads of one process;
    other processes may open the same file (WAL + busy timeout). The pseudonym key is the file
    `pseudonym.key` (mode 0600) beside it."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses no committed-and-synced page, never corrupts
        self._db.executescript(_SCHEMA)

    def _insert(self, rows: list[tuple]) -> int:
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO raw_log (device_id, seq, user_id, day, ts, item_id, event, value)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def max_seq(self, device_id: str) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT MAX(seq) FROM raw_log WHERE device_id = ?", (device_id,)).fetchone()
        return -1 if value is None else int(value)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM raw_log").fetchone()[0])

    def _rows(self, day_range: tuple[int, int] | None) -> list[tuple]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM raw_log"
        params: tuple = ()
        if day_range is not None:
            sql += " WHERE day BETWEEN ? AND ?"
            params = day_range
        sql += " ORDER BY device_id, seq"
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def pseudonym_key(self, initial: bytes | None = None) -> bytes:
        initial = check_initial_key(initial)
        path = self.path.parent / "pseudonym.key"
        if not path.exists():  # written whole, then linked: a racing process links first or reads that one
            fd, tmp = tempfile.mkstemp(prefix=".pseudonym-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(initial or secrets.token_bytes(KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise FailedPrecondition(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key: restore it from a backup "
                                     "(a new key would orphan every stored pseudonym)")
        return same_key(key, initial, str(path))

    def close(self) -> None:
        with self._lock:
            self._db.close()



def open_raw_log(url: str) -> RawLog:
    """`sqlite:///abs/raw.sqlite3` (embedded) or `postgresql://user@host/db` (shared by replicas)."""
    from walle.platform.state.factory import split_store_url
    kind, target = split_store_url(url, "raw log", "raw.sqlite3")
    if kind == "sqlite":
        return RawLogStore(target)
    from .rawlog_pg import PostgresRawLog
    return PostgresRawLog(target)
