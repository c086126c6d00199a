"""The raw behaviour table: every log record devices upload through the up tunnel (paper 3.1).

One SQLite file in WAL mode. A record is keyed by (device_id, seq), so a device that re-sends a
batch after a lost acknowledgement creates no duplicates. A batch is validated as a whole before
anything is written, and written in one transaction: it is either stored entirely or not at all.
"""
from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from walle.platform.errors import InvalidArgument
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


class RawLogStore:
    """Raw behaviour table in one SQLite file. Safe to share between threads of one process;
    other processes may open the same file (WAL + busy timeout)."""

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses no committed-and-synced page, never corrupts
        self._db.executescript(_SCHEMA)

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
            accepted = self._db.total_changes - before
        return accepted, len(rows) - accepted

    def max_seq(self, device_id: str) -> int:
        """Highest stored seq of a device, or -1 if it uploaded nothing (next seq = max_seq() + 1)."""
        with self._lock:
            (value,) = self._db.execute("SELECT MAX(seq) FROM raw_log WHERE device_id = ?", (device_id,)).fetchone()
        return -1 if value is None else int(value)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM raw_log").fetchone()[0])

    def frame(self, day_range: tuple[int, int] | None = None) -> pd.DataFrame:
        """The table (or the days lo..hi inclusive) as a DataFrame with columns COLUMNS,
        ordered by (device_id, seq)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM raw_log"
        params: tuple = ()
        if day_range is not None:
            lo, hi = day_range
            if lo > hi:
                raise InvalidArgument(f"day_range {day_range}: first day is after the last")
            sql += " WHERE day BETWEEN ? AND ?"
            params = (int(lo), int(hi))
        sql += " ORDER BY device_id, seq"
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        df = pd.DataFrame.from_records(rows, columns=COLUMNS)
        return df.astype({"device_id": object, "user_id": object, "seq": "int64", "day": "int64",
                          "ts": "int64", "item_id": "int64", "event": object, "value": "float64"})

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "RawLogStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
