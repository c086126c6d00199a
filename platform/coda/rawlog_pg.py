"""The raw behaviour table on PostgreSQL (psycopg 3): one table that every serving replica writes
uploads into and the pipeline process reads, on the same server as the platform state.

Why PostgreSQL and not Redis: an upload is acknowledged to the device only after it is stored,
and the device then forgets it. A COMMIT here returns after the WAL is flushed (synchronous_commit
on, the server default), so an acknowledged batch survives a crash; Redis acknowledges from
memory (AOF `everysec` loses up to a second of writes, `always` is slow). Deduplication by
(device_id, seq) is the primary key, and the pipeline's "the days lo..hi, in order" is an indexed
range scan.

A batch is one INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING: one round trip,
atomic, and the row count is the number of new records (repeats within the batch included)."""
from __future__ import annotations

import contextlib
import secrets
import threading

from walle.platform.errors import InvalidArgument, Unavailable

from .rawlog import COLUMNS, KEY_BYTES, RawLog, check_initial_key, same_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coda_raw_log (
    device_id TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    user_id   TEXT NOT NULL,
    day       INTEGER NOT NULL,
    ts        BIGINT NOT NULL,
    item_id   BIGINT NOT NULL,
    event     TEXT NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS coda_raw_log_day ON coda_raw_log(day);
CREATE TABLE IF NOT EXISTS coda_secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
"""
_INSERT = ("INSERT INTO coda_raw_log (device_id, seq, user_id, day, ts, item_id, event, value) "
           "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::int[], %s::bigint[], %s::bigint[], "
           "%s::text[], %s::float8[]) ON CONFLICT (device_id, seq) DO NOTHING")
SCHEMA_LOCK = 0x57A11F  # pg_advisory_xact_lock key: replicas starting together create the tables once


class PostgresRawLog(RawLog):
    """Safe to share between threads (one connection, used under a lock, reconnected after a
    loss); any number of processes may open the same database."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - a dependency of the package
            raise Unavailable("a PostgreSQL raw log needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg, self.url = psycopg, url
        self._lock = threading.Lock()
        self._db = None
        with self._conn() as db, db.transaction():  # CREATE ... IF NOT EXISTS races with itself across processes
            db.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)

    @contextlib.contextmanager
    def _conn(self):
        """The connection, under the lock; (re)connected when needed. A lost connection fails the
        call as Unavailable (an upload is then refused, never acknowledged) and the next call
        connects again."""
        from walle.platform.state.postgres import _redact
        psycopg = self._psycopg
        with self._lock:
            if self._db is None or self._db.closed:
                try:
                    self._db = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                except psycopg.OperationalError as e:
                    raise Unavailable(f"cannot reach PostgreSQL at {_redact(self.url)}: {str(e).strip()}") from e
                except psycopg.ProgrammingError as e:
                    raise InvalidArgument(f"bad PostgreSQL URL {_redact(self.url)}: {e}") from e
            try:
                yield self._db
            except psycopg.OperationalError as e:
                if self._db is not None and self._db.broken:
                    self._db.close()
                raise Unavailable(f"PostgreSQL raw log at {_redact(self.url)}: {str(e).strip()}") from e

    def _insert(self, rows: list[tuple]) -> int:
        columns = [list(c) for c in zip(*rows)]
        with self._conn() as db, db.transaction():
            return db.execute(_INSERT, columns).rowcount

    def max_seq(self, device_id: str) -> int:
        with self._conn() as db:
            (value,) = db.execute("SELECT MAX(seq) FROM coda_raw_log WHERE device_id = %s", [device_id]).fetchone()
        return -1 if value is None else int(value)

    def count(self) -> int:
        with self._conn() as db:
            return int(db.execute("SELECT COUNT(*) FROM coda_raw_log").fetchone()[0])

    def _rows(self, day_range: tuple[int, int] | None) -> list[tuple]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM coda_raw_log"
        params: list = []
        if day_range is not None:
            sql += " WHERE day BETWEEN %s AND %s"
            params = list(day_range)
        sql += ' ORDER BY device_id COLLATE "C", seq'  # byte order, like SQLite (not the locale's)
        with self._conn() as db:
            return db.execute(sql, params).fetchall()

    def pseudonym_key(self, initial: bytes | None = None) -> bytes:
        initial = check_initial_key(initial)
        with self._conn() as db:
            db.execute("INSERT INTO coda_secrets (name, value) VALUES ('pseudonym_key', %s) "
                       "ON CONFLICT (name) DO NOTHING", [initial or secrets.token_bytes(KEY_BYTES)])
            (key,) = db.execute("SELECT value FROM coda_secrets WHERE name = 'pseudonym_key'").fetchone()
        return same_key(bytes(key), initial, "the raw log's database")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
