"""A small byte key-value store interface with two real backends: SQLite (embedded, one file, WAL)
and Redis (shared, several hosts). The CoDA batch and sample mappings live on it.

Both backends store counters written by `incr` as ASCII decimal bytes (b"12"), so `get` of a counter
reads the same on either. `scan_prefix` is sorted by key on SQLite and unordered on Redis (SCAN).
"""
from __future__ import annotations

import sqlite3
import threading
import urllib.parse
from typing import Iterable, Iterator, Protocol, runtime_checkable

import redis

from walle.platform.errors import FailedPrecondition, InvalidArgument, Unavailable

_REDIS_CHUNK = 1000  # keys per MSET / MGET / DEL command: bounded request size, few round trips


@runtime_checkable
class KVStore(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def mget(self, keys: list[bytes]) -> list[bytes | None]: ...
    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None: ...
    def delete_many(self, keys: Iterable[bytes]) -> int: ...
    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...
    def incr(self, key: bytes, amount: int = 1) -> int: ...
    def close(self) -> None: ...


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or not key:
        raise InvalidArgument(f"key must be non-empty bytes (got {type(key).__name__} {key!r:.60})")
    return key


def _check_items(items: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Validate everything before writing anything, so bad input leaves the store unchanged."""
    out = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidArgument(f"put_many expects (key, value) pairs (got {item!r:.60})")
        key, value = item
        _check_key(key)
        if not isinstance(value, bytes):
            raise InvalidArgument(f"value for key {key!r:.60} must be bytes (got {type(value).__name__})")
        out.append((key, value))
    return out


def _check_amount(amount: object) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidArgument(f"incr amount must be an int (got {amount!r})")
    return amount


class SQLiteKV:
    """One table `kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID` in WAL mode.

    Each thread gets its own connection (sqlite3 connections are not shareable); writes inside this
    process go through one lock so threads queue in Python instead of in SQLite's sleeping busy
    handler. Other processes on the same file are handled by busy_timeout.
    """

    def __init__(self, path: str):
        if not path:
            raise InvalidArgument("SQLite store path is empty")
        self.path = str(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        with self._write_lock:
            conn.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise FailedPrecondition(f"SQLite store {self.path} is closed")
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as e:
                raise Unavailable(f"cannot open SQLite store {self.path}: {e}") from e
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoint, never corrupt
            conn.execute("PRAGMA busy_timeout=30000")
            # Reads dominate (one 25-key MGET per served batch) and each thread has its own
            # connection: map the file instead of a read() per page, and keep more pages per connection.
            conn.execute("PRAGMA mmap_size=268435456")
            conn.execute("PRAGMA cache_size=-16384")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def get(self, key: bytes) -> bytes | None:
        row = self._conn().execute("SELECT v FROM kv WHERE k = ?", (_check_key(key),)).fetchone()
        return None if row is None else row[0]  # sqlite3 returns BLOBs as bytes already

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        keys = [_check_key(k) for k in keys]
        found: dict[bytes, bytes] = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i:i + 500]
            sql = f"SELECT k, v FROM kv WHERE k IN ({','.join('?' * len(chunk))})"
            found.update(conn.execute(sql, chunk).fetchall())
        return [found.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = _check_items(items)
        if not items:
            return
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", items)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def delete_many(self, keys: Iterable[bytes]) -> int:
        keys = [(_check_key(k),) for k in keys]
        if not keys:
            return 0
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.executemany("DELETE FROM kv WHERE k = ?", keys)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return cur.rowcount

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Sorted by key. Reads in pages so a long scan neither holds a read snapshot nor all rows."""
        if not isinstance(prefix, bytes):
            raise InvalidArgument(f"prefix must be bytes (got {type(prefix).__name__})")
        upper = _prefix_upper_bound(prefix)
        conn = self._conn()
        last = None
        while True:
            if last is None:
                sql, args = "SELECT k, v FROM kv WHERE k >= ?", [prefix]
            else:
                sql, args = "SELECT k, v FROM kv WHERE k > ?", [last]
            if upper is not None:
                sql += " AND k < ?"
                args.append(upper)
            rows = conn.execute(sql + " ORDER BY k LIMIT 1000", args).fetchall()
            yield from rows
            if len(rows) < 1000:
                return
            last = rows[-1][0]

    def incr(self, key: bytes, amount: int = 1) -> int:
        _check_key(key)
        amount = _check_amount(amount)
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
                current = 0 if row is None else _parse_counter(key, bytes(row[0]))
                value = current + amount
                conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, str(value).encode()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return value

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


def _parse_counter(key: bytes, raw: bytes) -> int:
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise FailedPrecondition(f"key {key!r:.60} holds {raw!r:.30}, not an integer counter") from None


def _prefix_upper_bound(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with prefix (None: no upper bound)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


def _glob_escape(raw: bytes) -> bytes:
    """Escape Redis MATCH glob characters so a prefix matches literally."""
    out = bytearray()
    for b in raw:
        if b in b"*?[]\\^-":
            out += b"\\"
        out.append(b)
    return bytes(out)


class RedisKV:
    """Keys live under `namespace` in one Redis database; redis-py's pool makes it thread-safe.

    put_many is one MULTI/EXEC transaction of MSETs (all or nothing as far as Redis transactions go:
    no other client sees a partial write). scan_prefix uses SCAN MATCH, so order is unspecified and
    it walks the whole keyspace: use it for daily maintenance, not per request.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", namespace: bytes = b"walle:"):
        if not isinstance(namespace, bytes):
            raise InvalidArgument(f"namespace must be bytes (got {type(namespace).__name__})")
        self.url = url
        self.namespace = namespace
        try:
            self._r = redis.Redis.from_url(url, decode_responses=False, socket_timeout=30)
            self._r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise Unavailable(f"cannot reach Redis at {url}: {e}") from e
        except ValueError as e:
            raise InvalidArgument(f"bad Redis URL {url!r}: {e}") from e

    def _k(self, key: bytes) -> bytes:
        return self.namespace + _check_key(key)

    def get(self, key: bytes) -> bytes | None:
        return self._r.get(self._k(key))

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        full = [self._k(k) for k in keys]
        if not full:
            return []
        if len(full) <= _REDIS_CHUNK:
            return self._r.mget(full)
        pipe = self._r.pipeline(transaction=False)
        for i in range(0, len(full), _REDIS_CHUNK):
            pipe.mget(full[i:i + _REDIS_CHUNK])
        return [v for part in pipe.execute() for v in part]

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = _check_items(items)
        if not items:
            return
        if len(items) <= _REDIS_CHUNK:
            self._r.mset({self.namespace + k: v for k, v in items})
            return
        pipe = self._r.pipeline(transaction=True)
        for i in range(0, len(items), _REDIS_CHUNK):
            pipe.mset({self.namespace + k: v for k, v in items[i:i + _REDIS_CHUNK]})
        pipe.execute()

    def delete_many(self, keys: Iterable[bytes]) -> int:
        full = [self._k(k) for k in keys]
        if not full:
            return 0
        pipe = self._r.pipeline(transaction=True)
        for i in range(0, len(full), _REDIS_CHUNK):
            pipe.delete(*full[i:i + _REDIS_CHUNK])
        return sum(pipe.execute())

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Unordered. A key is reported at most once; keys deleted during the scan may be missed."""
        if not isinstance(prefix, bytes):
            raise InvalidArgument(f"prefix must be bytes (got {type(prefix).__name__})")
        pattern = _glob_escape(self.namespace + prefix) + b"*"
        seen: set[bytes] = set()  # SCAN may return a key twice (rehashing)
        cut = len(self.namespace)
        cursor = 0
        while True:
            cursor, keys = self._r.scan(cursor=cursor, match=pattern, count=1000)
            keys = [k for k in keys if k not in seen]
            seen.update(keys)
            if keys:
                for k, v in zip(keys, self._r.mget(keys)):
                    if v is not None:
                        yield k[cut:], v
            if cursor == 0:
                return

    def incr(self, key: bytes, amount: int = 1) -> int:
        amount = _check_amount(amount)
        try:
            return self._r.incrby(self._k(key), amount)
        except redis.ResponseError as e:
            raise FailedPrecondition(f"key {key!r:.60} is not an integer counter: {e}") from e

    def close(self) -> None:
        self._r.close()
        self._r.connection_pool.disconnect()


def open_store(url: str) -> KVStore:
    """`sqlite://<path>` (so `sqlite:///abs/kv.sqlite3` is absolute, `sqlite://rel.sqlite3` relative),
    or `redis://host:port/db` / `rediss://...`, optionally with `?namespace=<prefix>`."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"store URL must be a non-empty string (got {url!r})")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise InvalidArgument(f"store URL {url!r} has no file path (use sqlite:///abs/path/kv.sqlite3)")
        return SQLiteKV(path)
    if url.startswith(("redis://", "rediss://")):
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        namespace = query.pop("namespace", ["walle:"])[-1].encode()
        rest = urllib.parse.urlencode(query, doseq=True)
        return RedisKV(urllib.parse.urlunsplit(parts._replace(query=rest)), namespace=namespace)
    raise InvalidArgument(f"unsupported store URL {url!r}: use sqlite:///path/kv.sqlite3 or redis://host:port/db")
