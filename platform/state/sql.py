"""PlatformState on a SQL database: the queries both implementations share, written in the SQL that
SQLite and PostgreSQL both speak. A subclass supplies the connection, the transaction (and how it
serialises release decisions), the column types and the few spellings that differ."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import ResourceExhausted, WalleError
from .base import PlatformState, Transaction, UploadWrite

SCHEMA_VERSION = 1
POLL_S = 0.2  # revision polling where changes by other processes are not pushed
LIVE_FOR_DEVICES = ("active", "fallback", "paused")
RELEASE_FIELDS = ("id", "seq", "task", "version", "rule", "rollout", "stage", "channel", "state", "created_at",
                  "created_by", "note", "bundle_digest", "allow", "deny", "salt", "config")
REPORT_COLUMNS = {
    "run_reports": ("device_id", "seq", "ts", "task", "version", "release_id", "status", "duration_s",
                    "peak_memory_kb", "error", "trigger"),
    "deliveries": ("device_id", "seq", "ts", "task", "version", "release_id", "status", "error"),
    "events": ("device_id", "seq", "ts", "topic", "payload"),
}
REPORT_TABLES = {"run_report": "run_reports", "delivery": "deliveries"}
GUARD_FIELDS = ("release_id", "max_failure_rate", "min_runs", "max_p99_seconds", "on_trip", "actor", "status",
                "trip_detail", "tripped_at", "action_release_id", "created_at")

# {int} 64-bit integer, {real} double, {serial} auto-increment key, {blob} bytes
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS releases (
        id TEXT PRIMARY KEY, seq {int} NOT NULL UNIQUE, task TEXT NOT NULL, version TEXT NOT NULL,
        rule TEXT NOT NULL, rollout {real} NOT NULL, stage TEXT NOT NULL, channel TEXT NOT NULL,
        state TEXT NOT NULL, created_at {int} NOT NULL, created_by TEXT NOT NULL, note TEXT NOT NULL,
        bundle_digest TEXT NOT NULL, allow TEXT NOT NULL, deny TEXT NOT NULL, salt TEXT NOT NULL,
        config TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS releases_task ON releases(task, channel, seq)",
    # Append-only: every change to a release (its creation, rollout, pause, ...).
    """CREATE TABLE IF NOT EXISTS release_log (
        id {serial}, release_id TEXT NOT NULL, ts {int} NOT NULL, actor TEXT NOT NULL, change TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS release_log_release ON release_log(release_id)",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, enrolled_at {int} NOT NULL,
        expires_at {int} NOT NULL, revoked {int} NOT NULL DEFAULT 0, last_seen {int} NOT NULL DEFAULT 0,
        app_version TEXT NOT NULL DEFAULT '', attrs TEXT NOT NULL DEFAULT '{{}}', user_id TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS operators (
        name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_at {int} NOT NULL,
        revoked {int} NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS audit (
        id {serial}, ts {int} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS run_reports (
        device_id TEXT NOT NULL, seq {int} NOT NULL, ts {int} NOT NULL, task TEXT NOT NULL, version TEXT NOT NULL,
        release_id TEXT NOT NULL, status TEXT NOT NULL, duration_s {real} NOT NULL, peak_memory_kb {int} NOT NULL,
        error TEXT NOT NULL, trigger TEXT NOT NULL{rowid_col}, PRIMARY KEY (device_id, seq))""",
    "CREATE INDEX IF NOT EXISTS run_reports_release ON run_reports(release_id)",
    # Guards judge a release after every batch of its reports: index-only counts and percentiles.
    "CREATE INDEX IF NOT EXISTS run_reports_release_status ON run_reports(release_id, status)",
    "CREATE INDEX IF NOT EXISTS run_reports_release_duration ON run_reports(release_id, duration_s)",
    # Health guards of releases (walle.platform.guards).
    """CREATE TABLE IF NOT EXISTS release_guards (
        release_id TEXT PRIMARY KEY, max_failure_rate {real} NOT NULL, min_runs {int} NOT NULL,
        max_p99_seconds {real} NOT NULL, on_trip TEXT NOT NULL, actor TEXT NOT NULL, status TEXT NOT NULL,
        trip_detail TEXT NOT NULL DEFAULT '', tripped_at {int} NOT NULL DEFAULT 0,
        action_release_id TEXT NOT NULL DEFAULT '', created_at {int} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS deliveries (
        device_id TEXT NOT NULL, seq {int} NOT NULL, ts {int} NOT NULL, task TEXT NOT NULL, version TEXT NOT NULL,
        release_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (device_id, seq))""",
    "CREATE INDEX IF NOT EXISTS deliveries_release ON deliveries(release_id)",
    """CREATE TABLE IF NOT EXISTS events (
        device_id TEXT NOT NULL, seq {int} NOT NULL, ts {int} NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL,
        PRIMARY KEY (device_id, seq))""",
    # Up-tunnel streams: each (device, epoch) gets a slot k; a record's stored seq is
    # k * EPOCH_SPAN + its seq, so every report table keeps its (device_id, seq) key and
    # a device that starts afresh (new epoch) never collides with what it sent before.
    """CREATE TABLE IF NOT EXISTS up_streams (
        device_id TEXT NOT NULL, epoch {int} NOT NULL, k {int} NOT NULL, hw {int} NOT NULL,
        created_at {int} NOT NULL, PRIMARY KEY (device_id, epoch), UNIQUE (device_id, k))""",
    # Which releases each device was handed: reports are accepted only for those.
    """CREATE TABLE IF NOT EXISTS device_releases (
        device_id TEXT NOT NULL, release_id TEXT NOT NULL, first_at {int} NOT NULL,
        PRIMARY KEY (device_id, release_id))""",
    # Submits between their durable intent and their confirmation (audit); see SubmitJournal.
    # `repo`: which task repository (serving replicas each open their own, and must leave the
    # submitting process's intents alone).
    """CREATE TABLE IF NOT EXISTS submit_intents (
        id {serial}, task TEXT NOT NULL, parent TEXT NOT NULL, actor TEXT NOT NULL, started_at {int} NOT NULL,
        repo TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS resources (
        name TEXT NOT NULL, version TEXT NOT NULL, seq {int} NOT NULL, digest TEXT NOT NULL, size {int} NOT NULL,
        metadata TEXT NOT NULL, created_at {int} NOT NULL, PRIMARY KEY (name, version))""",
    # Published task versions, and bundle/resource bytes by digest, for replicas without the task
    # repository or the publishing process's disk.
    """CREATE TABLE IF NOT EXISTS task_versions (
        task TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, manifest {blob} NOT NULL,
        size {int} NOT NULL, created_at {int} NOT NULL, PRIMARY KEY (task, version))""",
    "CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, data {blob} NOT NULL)",
]


def _json(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _where(select: str, **equal) -> tuple[str, list]:
    """`select` narrowed to the rows whose columns equal the non-empty values given."""
    given = {k: v for k, v in equal.items() if v}
    return select + " WHERE 1=1" + "".join(f" AND {k} = ?" for k in given), list(given.values())


def release_row(row: dict) -> dict:
    row = dict(row)
    row["allow"] = json.loads(row["allow"])
    row["deny"] = json.loads(row["deny"])
    return row


class Conn:
    """A DB-API connection with `?` placeholders and rows as dicts."""

    def __init__(self, raw, placeholder: str):
        self.raw = raw
        self.placeholder = placeholder

    def run(self, sql: str, args=()):
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        cur = self.raw.cursor()
        cur.execute(sql, list(args))
        return cur

    def many(self, sql: str, rows) -> None:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        self.raw.cursor().executemany(sql, rows)

    def dicts(self, sql: str, args=()) -> list[dict]:
        cur = self.run(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def value(self, sql: str, args=()):
        rows = self.run(sql, args).fetchall()  # fetch all: a half-read statement blocks COMMIT on SQLite
        return rows[0][0] if rows else None


class SqlTransaction(Transaction):
    def __init__(self, conn: Conn, state: "SqlState"):
        self.c = conn
        self.state = state

    def audit(self, actor: str, action: str, target: str, detail: dict | str = "") -> None:
        self.c.run("INSERT INTO audit (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                   [int(time.time()), actor or "unknown", action, target, _json(detail)])

    def bump_revision(self) -> None:
        rev = self.state._bump(self.c, "revision")
        self.state._announce(self.c, rev)
        self.state._local.bumped = True  # waiters in this process are woken after COMMIT

    def next_release_id(self) -> tuple[str, int]:
        seq = self.state._bump(self.c, "release_seq")
        return f"r{seq}", seq

    def release(self, release_id: str) -> dict | None:
        rows = self.c.dicts("SELECT * FROM releases WHERE id = ?", [release_id])
        return release_row(rows[0]) if rows else None

    def chain(self, task: str, channel: str, states: tuple[str, ...]) -> list[dict]:
        marks = ",".join("?" * len(states))
        return [release_row(r) for r in self.c.dicts(
            f"SELECT * FROM releases WHERE task=? AND channel=? AND state IN ({marks}) ORDER BY seq DESC",
            [task, channel, *states])]

    def insert_release(self, row: dict) -> None:
        row = {**row, "allow": _json(row["allow"]), "deny": _json(row["deny"])}
        self.c.run(f"INSERT INTO releases ({', '.join(RELEASE_FIELDS)}) VALUES ({','.join('?' * len(RELEASE_FIELDS))})",
                   [row[k] for k in RELEASE_FIELDS])

    def update_release(self, release_id: str, **fields) -> None:
        bad = set(fields) - set(RELEASE_FIELDS[4:])
        if bad:
            raise ValueError(f"not a changeable release field: {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        self.c.run(f"UPDATE releases SET {sets} WHERE id=?", [*fields.values(), release_id])

    def log_release_change(self, release_id: str, actor: str, change: dict) -> None:
        self.c.run("INSERT INTO release_log (release_id, ts, actor, change) VALUES (?, ?, ?, ?)",
                   [release_id, int(time.time()), actor or "unknown", _json(change)])

    def device(self, device_id: str) -> dict | None:
        rows = self.c.dicts("SELECT * FROM devices WHERE device_id = ?", [device_id])
        return rows[0] if rows else None

    def put_device(self, device_id: str, token_hash: str, enrolled_at: int, expires_at: int, user_id: str) -> None:
        self.state._bump(self.c, "credentials")
        self.c.run("""INSERT INTO devices (device_id, token_hash, enrolled_at, expires_at, revoked, user_id)
                      VALUES (?, ?, ?, ?, 0, ?)
                      ON CONFLICT(device_id) DO UPDATE SET token_hash=excluded.token_hash,
                      enrolled_at=excluded.enrolled_at, expires_at=excluded.expires_at, revoked=0,
                      user_id=excluded.user_id""", [device_id, token_hash, enrolled_at, expires_at, user_id])

    def revoke_device(self, device_id: str) -> bool:
        self.state._bump(self.c, "credentials")
        return self.c.run("UPDATE devices SET revoked = 1 WHERE device_id = ?", [device_id]).rowcount > 0

    def put_operator(self, name: str, token_hash: str, created_at: int) -> None:
        self.c.run("""INSERT INTO operators (name, token_hash, created_at) VALUES (?, ?, ?)
                      ON CONFLICT(name) DO UPDATE SET token_hash=excluded.token_hash, revoked=0""",
                   [name, token_hash, created_at])

    def revoke_operator(self, name: str) -> bool:
        return self.c.run("UPDATE operators SET revoked = 1 WHERE name = ?", [name]).rowcount > 0

    def put_guard(self, row: dict) -> None:
        self.c.run("DELETE FROM release_guards WHERE release_id = ?", [row["release_id"]])
        self.c.run(f"INSERT INTO release_guards ({', '.join(GUARD_FIELDS)}) VALUES ({','.join('?' * len(GUARD_FIELDS))})",
                   [row[k] for k in GUARD_FIELDS])

    def claim_guard(self, release_id: str, detail: str, at: int) -> bool:
        return self.c.run("UPDATE release_guards SET status = 'tripped', trip_detail = ?, tripped_at = ? "
                          "WHERE release_id = ? AND status = 'watching'", [detail, at, release_id]).rowcount > 0

    def set_guard_action(self, release_id: str, action_release_id: str, detail: str) -> None:
        self.c.run("UPDATE release_guards SET action_release_id = ?, trip_detail = ? WHERE release_id = ?",
                   [action_release_id, detail, release_id])

    def add_resource(self, name: str, digest: str, size: int, metadata: str, created_at: int) -> str:
        seq = self.c.value("SELECT COALESCE(MAX(seq), 0) + 1 FROM resources WHERE name=?", [name])
        version = f"v{seq}"
        self.c.run("INSERT INTO resources (name, version, seq, digest, size, metadata, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", [name, version, seq, digest, size, metadata, created_at])
        return version


class SqlState(PlatformState):
    placeholder = "?"
    types = {"int": "INTEGER", "real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB",
             "rowid_col": ""}
    rowid = "rowid"  # run reports in arrival order (a log cursor)
    greatest = "MAX"  # the two-argument maximum

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._rev_cache = (-1, 0.0)  # (revision, monotonic time read)
        self._changed = threading.Condition()  # notified on every change this process learns of
        self._change_seq = 0
        self._init_schema()

    # -- for subclasses -------------------------------------------------------------------------
    def _connect(self):
        raise NotImplementedError

    @contextmanager
    def _write(self, c: Conn, serialize: bool) -> Iterator[None]:
        """Run the body as one transaction; `serialize`: no other serialised one interleaves."""
        raise NotImplementedError

    def _migrate(self, c: Conn) -> None:
        """Bring an older database up to SCHEMA (inside the schema transaction)."""

    def _announce(self, c: Conn, revision: int) -> None:
        """Tell other processes, inside the transaction that made it, that the revision changed."""

    def _watch(self) -> None:
        """Start listening for other processes' changes, where the database can push them."""

    def _pushed(self) -> bool:
        """Whether other processes' changes are being pushed to this object right now."""
        return False

    def _poll_interval(self) -> float:
        """How often a waiter re-reads the revision for changes made by other processes."""
        return POLL_S

    # -- connections and transactions -----------------------------------------------------------
    @property
    def conn(self) -> Conn:
        """This thread's connection: DB-API connections are not shared across threads safely."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = Conn(self._connect(), self.placeholder)
            with self._conns_lock:
                self._conns.append(c.raw)
        return c

    @contextmanager
    def _tx(self, serialize: bool = True) -> Iterator[Conn]:
        c = self.conn
        self._local.bumped = False
        with self._write(c, serialize):
            yield c
        if self._local.bumped:  # after COMMIT, so no reader caches the old revision,
            self._local.bumped = False
            self._rev_cache = (-1, 0.0)
            self._signal_change()  # and waiters in this process learn of it at once

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        with self._tx() as c:
            yield SqlTransaction(c, self)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for raw in conns:
            try:
                raw.close()
            except Exception:
                pass
        self._local = threading.local()

    def _init_schema(self) -> None:
        with self._tx() as c:
            for stmt in SCHEMA:
                c.run(stmt.format(**self.types))
            for key, value in (("revision", "0"), ("schema", str(SCHEMA_VERSION)), ("release_seq", "0"),
                               ("credentials", "0")):
                c.run("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", [key, value])
            self._migrate(c)
            # Older releases that still serve as fallbacks were called 'superseded'.
            c.run("UPDATE releases SET state='fallback' WHERE state='superseded'")

    @staticmethod
    def _bump(c: Conn, key: str) -> int:
        c.run("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key=?", [key])
        return int(c.value("SELECT value FROM meta WHERE key=?", [key]))

    # -- revision -------------------------------------------------------------------------------
    def revision(self) -> int:
        signalled = self._change_seq
        rev = int(self.conn.value("SELECT value FROM meta WHERE key='revision'"))
        # Every fresh read refreshes the cache: once a watcher has seen a change and woken devices,
        # their pulls in this process see it too (never a stale list after the notice). A read that
        # a change signal overtook is not cached: it may predate the change.
        if rev >= self._rev_cache[0] and self._change_seq == signalled:
            self._rev_cache = (rev, time.monotonic())
        return rev

    def credentials_revision(self) -> int:
        return int(self.conn.value("SELECT value FROM meta WHERE key='credentials'"))

    def cached_revision(self, max_age: float = 0.2) -> int:
        rev, at = self._rev_cache
        if time.monotonic() - at > max_age:
            rev = self.revision()
        return rev

    def wait_revision(self, known: int, timeout: float) -> int:
        self._watch()
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._change_seq
            # Where changes are pushed, every change this process learns of (its own commits, a
            # NOTIFY) empties the cache, so it is read again then, else once per fallback interval.
            # Otherwise the revision is read afresh on every poll.
            rev = self.cached_revision(max_age=self._poll_interval()) if self._pushed() else self.revision()
            left = deadline - time.monotonic()
            if rev != known or left <= 0:
                return rev
            with self._changed:
                if self._change_seq == seen:  # nothing signalled since the read: sleep until one is
                    self._changed.wait(min(left, self._poll_interval()))

    def _signal_change(self) -> None:
        self._rev_cache = (-1, 0.0)
        with self._changed:
            self._change_seq += 1
            self._changed.notify_all()

    # -- audit and releases ---------------------------------------------------------------------
    def audit_entries(self, limit: int = 100) -> list[dict]:
        return self.conn.dicts("SELECT ts, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?", [limit])

    def release(self, release_id: str) -> dict | None:
        rows = self.conn.dicts("SELECT * FROM releases WHERE id = ?", [release_id])
        return release_row(rows[0]) if rows else None

    def releases(self, task: str = "", channel: str = "", active_only: bool = False) -> list[dict]:
        sql, args = _where("SELECT * FROM releases", task=task, channel=channel)
        if active_only:
            sql += " AND state IN ('active', 'fallback', 'paused')"  # what devices may get
        sql += " ORDER BY seq DESC"
        return [release_row(r) for r in self.conn.dicts(sql, args)]

    def release_log(self, release_id: str) -> list[dict]:
        return self.conn.dicts("SELECT ts, actor, change FROM release_log WHERE release_id = ? ORDER BY id",
                               [release_id])

    def release_stats_many(self, release_ids: list[str]) -> dict[str, dict]:
        """One grouped query per table (the dashboard asks for every release on each refresh)."""
        out = {rid: {"delivered": 0, "ran": 0, "runs": 0, "failed": 0, "p50_duration_s": 0.0, "rejected": 0,
                     "rolled_back": 0} for rid in release_ids}
        c = self.conn
        for lo in range(0, len(release_ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = release_ids[lo:lo + 500]
            marks = ",".join("?" * len(chunk))
            for rid, delivered, rejected, rolled_back in c.run(
                    f"""SELECT release_id, COUNT(DISTINCT CASE WHEN status='installed' THEN device_id END),
                               COUNT(DISTINCT CASE WHEN status='rejected' THEN device_id END),
                               COUNT(DISTINCT CASE WHEN status='rolled_back' THEN device_id END)
                        FROM deliveries WHERE release_id IN ({marks}) GROUP BY release_id""", chunk).fetchall():
                out[rid].update(delivered=delivered, rejected=rejected, rolled_back=rolled_back)
            for rid, ran, runs, failed in c.run(
                    f"""SELECT release_id, COUNT(DISTINCT device_id), COUNT(*),
                               SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END)
                        FROM run_reports WHERE release_id IN ({marks}) GROUP BY release_id""", chunk).fetchall():
                out[rid].update(ran=ran, runs=runs, failed=int(failed or 0))
            durations: dict[str, list[float]] = {}
            for rid, d in c.run(f"SELECT release_id, duration_s FROM run_reports WHERE release_id IN ({marks}) "
                                f"ORDER BY release_id, duration_s", chunk).fetchall():
                durations.setdefault(rid, []).append(d)
            for rid, ds in durations.items():
                out[rid]["p50_duration_s"] = ds[(len(ds) - 1) // 2]
        return out

    # -- devices --------------------------------------------------------------------------------
    def device(self, device_id: str) -> dict | None:
        rows = self.conn.dicts("SELECT * FROM devices WHERE device_id = ?", [device_id])
        return rows[0] if rows else None

    def devices(self) -> list[dict]:
        return self.conn.dicts("SELECT * FROM devices ORDER BY device_id")

    def device_by_token(self, token_hash: str) -> dict | None:
        rows = self.conn.dicts("SELECT * FROM devices WHERE token_hash = ?", [token_hash])
        return rows[0] if rows else None

    def touch_devices(self, seen: dict[str, tuple[int, str, str]]) -> None:
        if not seen:
            return
        with self._tx(serialize=False) as c:
            c.many("UPDATE devices SET last_seen = ?, app_version = ?, attrs = ? WHERE device_id = ?",
                   [(ts, app, attrs, device_id) for device_id, (ts, app, attrs) in sorted(seen.items())])

    def fleet_counts(self, since: int) -> dict:
        c = self.conn
        by_app = [{"app_version": a, "devices": n} for a, n in c.run(
            """SELECT app_version, COUNT(*) FROM devices WHERE revoked = 0 AND last_seen >= ?
               GROUP BY app_version ORDER BY COUNT(*) DESC, app_version""", [since]).fetchall()]
        by_task = [{"task": t, "version": v, "devices": n} for t, v, n in c.run(
            """WITH latest AS (
                   SELECT d.device_id, d.task, MAX(d.seq) AS seq FROM deliveries d
                   JOIN devices v ON v.device_id = d.device_id AND v.revoked = 0 AND v.last_seen >= ?
                   WHERE d.status = 'installed' GROUP BY d.device_id, d.task)
               SELECT d.task, d.version, COUNT(*) FROM deliveries d
               JOIN latest l ON l.device_id = d.device_id AND l.seq = d.seq
               GROUP BY d.task, d.version ORDER BY d.task, COUNT(*) DESC, d.version""", [since]).fetchall()]
        enrolled = c.value("SELECT COUNT(*) FROM devices WHERE revoked = 0")
        return {"by_app_version": by_app, "by_task": by_task, "enrolled": enrolled}

    # -- operators ------------------------------------------------------------------------------
    def operator_by_token(self, token_hash: str) -> dict | None:
        rows = self.conn.dicts("SELECT * FROM operators WHERE token_hash = ?", [token_hash])
        return rows[0] if rows else None

    def any_operator(self) -> bool:
        return bool(self.conn.run("SELECT 1 FROM operators WHERE revoked = 0 LIMIT 1").fetchall())

    # -- device reports -------------------------------------------------------------------------
    def stream_slot(self, device_id: str, epoch: int, max_streams: int) -> tuple[int, int]:
        q = "SELECT k, hw FROM up_streams WHERE device_id=? AND epoch=?"
        rows = self.conn.run(q, [device_id, epoch]).fetchall()
        if rows:
            return rows[0][0], rows[0][1]
        with self._tx() as c:
            rows = c.run(q, [device_id, epoch]).fetchall()
            if rows:
                return rows[0][0], rows[0][1]
            n, top = c.run("SELECT COUNT(*), COALESCE(MAX(k), -1) FROM up_streams WHERE device_id=?",
                           [device_id]).fetchone()
            if n >= max_streams:
                raise ResourceExhausted(f"device {device_id!r} has started {n} up-tunnel epochs; at most {max_streams} "
                                        "(a device picks a new epoch only when its data folder starts afresh)")
            c.run("INSERT INTO up_streams (device_id, epoch, k, hw, created_at) VALUES (?, ?, ?, 0, ?)",
                  [device_id, epoch, top + 1, int(time.time())])
            return top + 1, 0

    def store_uploads(self, writes: list[UploadWrite], span: int, max_streams: int) -> list:
        out: list = [None] * len(writes)
        now = int(time.time())
        with self._tx(serialize=False) as c:
            # every epoch of these devices, in one read
            slots: dict[tuple[str, int], list[int]] = {}  # (device, epoch) -> [k, hw]
            ks: dict[str, list[int]] = {}  # device -> its slots' k
            devices = sorted({w.device_id for w in writes})
            for i in range(0, len(devices), 500):
                part = devices[i:i + 500]
                for d, epoch, k, hw in c.run("SELECT device_id, epoch, k, hw FROM up_streams WHERE device_id IN "
                                             f"({','.join('?' * len(part))})", part).fetchall():
                    slots[(d, epoch)] = [k, hw]
                    ks.setdefault(d, []).append(k)
            new_slots, by_table, raised = [], {}, {}
            for i, w in enumerate(writes):
                slot = slots.get((w.device_id, w.epoch))
                if slot is None:
                    taken = ks.setdefault(w.device_id, [])
                    if len(taken) >= max_streams:
                        out[i] = ResourceExhausted(
                            f"device {w.device_id!r} has started {len(taken)} up-tunnel epochs; at most {max_streams} "
                            "(a device picks a new epoch only when its data folder starts afresh)")
                        continue
                    slot = slots[(w.device_id, w.epoch)] = [max(taken, default=-1) + 1, 0]
                    taken.append(slot[0])
                    new_slots.append((w.device_id, w.epoch, slot[0], now))
                base = slot[0] * span
                for topic, rows in w.rows.items():
                    table = REPORT_TABLES.get(topic, "events")
                    for row in rows:
                        row = (row[0], row[1] + base, *row[2:])
                        by_table.setdefault(table, []).append(
                            (i, topic, (*row[:3], topic, row[3]) if table == "events" else row))
                if w.top > slot[1]:
                    slot[1] = raised[(w.device_id, w.epoch)] = w.top
                out[i] = ({topic: 0 for topic in w.rows}, (w.device_id, w.epoch))
            # a slot another replica made meanwhile fails the whole transaction (the caller retries)
            for i in range(0, len(new_slots), 500):
                part = new_slots[i:i + 500]
                c.run("INSERT INTO up_streams (device_id, epoch, k, hw, created_at) VALUES "
                      f"{','.join(['(?, ?, ?, 0, ?)'] * len(part))}", [x for row in part for x in row])
            for table, rows in by_table.items():
                stored = self._insert_new(c, table, [r for _i, _t, r in rows])
                for i, topic, row in rows:  # a (device, seq) twice in the batch counts once
                    if (row[0], row[1]) in stored:
                        stored.discard((row[0], row[1]))
                        out[i][0][topic] += 1
            todo = [(d, epoch, hw) for (d, epoch), hw in raised.items()]
            for i in range(0, len(todo), 500):  # one statement per 500 epochs, not one per epoch
                part = todo[i:i + 500]
                c.run(f"UPDATE up_streams SET hw = {self.greatest}(up_streams.hw, v.column3) FROM (VALUES "
                      f"{','.join(['(?, CAST(? AS BIGINT), CAST(? AS BIGINT))'] * len(part))}) AS v "
                      "WHERE up_streams.device_id = v.column1 AND up_streams.epoch = v.column2",
                      [x for row in part for x in row])
        return [r if isinstance(r, WalleError) else (r[0], slots[r[1]][1]) for r in out]

    def _insert_new(self, c: Conn, table: str, rows: list[tuple]) -> set[tuple[str, int]]:
        """Insert report rows, skipping (device, seq) already stored; returns the keys stored now."""
        cols = REPORT_COLUMNS[table]
        one = f"({','.join('?' * len(cols))})"
        stored: set[tuple[str, int]] = set()
        for i in range(0, len(rows), 200):  # SQLite takes at most 32,766 parameters per statement
            part = rows[i:i + 200]
            stored.update((d, seq) for d, seq in c.run(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES {','.join([one] * len(part))} "
                "ON CONFLICT(device_id, seq) DO NOTHING RETURNING device_id, seq", [v for r in part for v in r]).fetchall())
        return stored

    def raise_stream_hw(self, device_id: str, epoch: int, seq: int) -> int:
        with self._tx(serialize=False) as c:
            c.run(f"UPDATE up_streams SET hw = {self.greatest}(hw, ?) WHERE device_id=? AND epoch=?",
                  [seq, device_id, epoch])
            return c.value("SELECT hw FROM up_streams WHERE device_id=? AND epoch=?", [device_id, epoch])

    def add_reports(self, topic: str, rows: list[tuple]) -> int:
        table = REPORT_TABLES.get(topic, "events")
        if table == "events":
            rows = [(d, seq, ts, topic, payload) for d, seq, ts, payload in rows]
        cols = REPORT_COLUMNS[table]
        new = 0
        # ON CONFLICT on the key only: any other failed constraint raises instead of passing for a duplicate.
        with self._tx(serialize=False) as c:
            for row in rows:
                new += c.run(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
                             "ON CONFLICT(device_id, seq) DO NOTHING", row).rowcount
        return new

    def reports(self, topic: str, device_id: str = "", status: str = "") -> list[dict]:
        table = REPORT_TABLES.get(topic, "events")
        sql, args = _where(f"SELECT {', '.join(REPORT_COLUMNS[table])} FROM {table}", topic=topic if table == "events" else "", device_id=device_id,
                           status=status)
        return self.conn.dicts(sql + " ORDER BY device_id, seq", args)

    def events(self, device_id: str) -> list[dict]:
        return self.conn.dicts("SELECT * FROM events WHERE device_id = ? ORDER BY seq", [device_id])

    def record_deliveries(self, pairs: set[tuple[str, str]]) -> None:
        if not pairs:
            return
        now = int(time.time())
        with self._tx(serialize=False) as c:
            c.many("INSERT INTO device_releases (device_id, release_id, first_at) VALUES (?, ?, ?) "
                   "ON CONFLICT DO NOTHING", [(d, r, now) for d, r in sorted(pairs)])

    def delivered_releases(self, device_id: str, release_ids: set[str]) -> set[str]:
        ids = sorted(release_ids)[:500]
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        return {r for (r,) in self.conn.run(
            f"SELECT release_id FROM device_releases WHERE device_id=? AND release_id IN ({marks})",
            [device_id, *ids]).fetchall()}

    # -- submits --------------------------------------------------------------------------------
    def begin_submit(self, task: str, parent: str, actor: str, repo: str = "") -> int:
        with self._tx(serialize=False) as c:
            return c.value("INSERT INTO submit_intents (task, parent, actor, started_at, repo) VALUES (?, ?, ?, ?, ?) "
                           "RETURNING id", [task, parent, actor, int(time.time()), repo])

    def pending_submits(self, repo: str = "") -> list[dict]:
        # '' also matches intents from before repositories were told apart (one folder, one repository)
        return self.conn.dicts("SELECT id, task, parent, actor, started_at FROM submit_intents "
                               "WHERE repo = ? OR repo = '' ORDER BY id", [repo])

    def end_submit(self, intent_id: int, action: str = "", target: str = "", detail: dict | None = None) -> None:
        with self.transaction() as tx:
            actor = tx.c.value("SELECT actor FROM submit_intents WHERE id=?", [intent_id])
            tx.c.run("DELETE FROM submit_intents WHERE id=?", [intent_id])
            if action:
                tx.audit(actor or "walle", action, target, detail or {})

    # -- resources and published task versions --------------------------------------------------
    def resource(self, name: str, version: str = "") -> dict | None:
        sql = "SELECT * FROM resources WHERE name=? " + ("AND version=? " if version else "") + "ORDER BY seq DESC LIMIT 1"
        rows = self.conn.dicts(sql, [name, version] if version else [name])
        return rows[0] if rows else None

    def publish_task_version(self, task: str, version: str, digest: str, manifest: bytes, bundle: bytes,
                             created_at: int) -> None:
        with self._tx(serialize=False) as c:
            c.run("INSERT INTO blobs (digest, data) VALUES (?, ?) ON CONFLICT DO NOTHING", [digest, bundle])
            c.run("INSERT INTO task_versions (task, version, digest, manifest, size, created_at) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  [task, version, digest, manifest, len(bundle), created_at])

    def published_task_version(self, task: str, version: str = "") -> dict | None:
        sql = "SELECT version, digest, manifest, size FROM task_versions WHERE task=?"
        rows = self.conn.dicts(sql + (" AND version=?" if version else " ORDER BY created_at DESC, version LIMIT 1"),
                               [task, version] if version else [task])
        if not rows:
            return None
        return {**rows[0], "manifest": bytes(rows[0]["manifest"])}

    def put_blob(self, digest: str, data: bytes) -> None:
        with self._tx(serialize=False) as c:
            c.run("INSERT INTO blobs (digest, data) VALUES (?, ?) ON CONFLICT DO NOTHING", [digest, data])

    def blob(self, digest: str) -> bytes | None:
        data = self.conn.value("SELECT data FROM blobs WHERE digest=?", [digest])
        return None if data is None else bytes(data)

    # -- release guards -------------------------------------------------------------------------
    def guard(self, release_id: str) -> dict | None:
        rows = self.conn.dicts("SELECT * FROM release_guards WHERE release_id = ?", [release_id])
        return rows[0] if rows else None

    def guards(self, release_ids: list[str], status: str = "") -> list[dict]:
        ids = sorted(release_ids)[:500]
        if not ids:
            return []
        sql, args = _where("SELECT * FROM release_guards", status=status)
        return self.conn.dicts(sql + f" AND release_id IN ({','.join('?' * len(ids))})", args + ids)

    def guard_states(self) -> dict[str, str]:
        return dict(self.conn.run("SELECT release_id, status FROM release_guards").fetchall())

    def health_figures(self, release_id: str, p99: bool = True) -> dict:
        c = self.conn
        runs, failed = c.run("SELECT COUNT(*), COALESCE(SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END), 0) "
                             "FROM run_reports WHERE release_id = ?", [release_id]).fetchone()
        failed, value = int(failed), 0.0
        if runs and p99:
            value = c.value("SELECT duration_s FROM run_reports WHERE release_id = ? ORDER BY duration_s "
                            "LIMIT 1 OFFSET ?", [release_id, min(runs - 1, int(0.99 * runs))])
        return {"runs": runs, "failed": failed, "failure_rate": failed / runs if runs else 0.0, "p99_seconds": value}

    # -- reading reports ------------------------------------------------------------------------
    def run_reports_page(self, after: int, limit: int, status: str = "", since: int = 0, **equal) -> list[dict]:
        sql, args = _where(f"SELECT {self.rowid} AS cursor, * FROM run_reports", **equal)
        sql += f" AND {self.rowid} > ?"
        args.append(after)
        if status == "failed":
            sql += " AND status != 'ok'"
        elif status:
            sql += " AND status = ?"
            args.append(status)
        if since:
            sql += " AND ts >= ?"
            args.append(since)
        return self.conn.dicts(sql + f" ORDER BY {self.rowid} DESC LIMIT ?", args + [limit])

    def log_payloads(self, device_id: str, after_seq: int, upto_seq: int) -> list[str]:
        return [p for (p,) in self.conn.run(
            "SELECT payload FROM events WHERE device_id = ? AND topic = 'log' AND seq > ? AND seq <= ? ORDER BY seq",
            [device_id, after_seq, upto_seq]).fetchall()]

    def release_failures(self, release_id: str, limit: int) -> tuple[int, list[dict]]:
        c = self.conn
        devices = c.value("SELECT COUNT(DISTINCT device_id) FROM run_reports WHERE release_id = ? AND status != 'ok'",
                          [release_id])
        rows = c.dicts(f"SELECT device_id, error, status FROM run_reports WHERE release_id = ? AND status != 'ok' "
                       f"ORDER BY {self.rowid} DESC LIMIT ?", [release_id, limit])
        return devices, rows

    def run_durations(self, release_id: str) -> list[float]:
        return [d for (d,) in self.conn.run("SELECT duration_s FROM run_reports WHERE release_id = ? "
                                            "ORDER BY duration_s", [release_id]).fetchall()]

    def installed(self, device_id: str) -> list[dict]:
        return self.conn.dicts(
            """SELECT task, version, release_id, status, ts, error FROM deliveries d
               WHERE device_id = ? AND seq = (SELECT MAX(seq) FROM deliveries
                                              WHERE device_id = d.device_id AND task = d.task)
               ORDER BY task""", [device_id])

    def device_attrs(self) -> list[str]:
        return [a for (a,) in self.conn.run(
            "SELECT attrs FROM devices WHERE revoked = 0 AND attrs != '{}'").fetchall()]

    def failed_runs_by_device(self) -> dict[str, int]:
        return dict(self.conn.run("SELECT device_id, COUNT(*) FROM run_reports WHERE status != 'ok' "
                                  "GROUP BY device_id").fetchall())

    def count_devices(self, seen_since: int = 0) -> int:
        return self.conn.value("SELECT COUNT(*) FROM devices WHERE revoked = 0 AND last_seen >= ?", [seen_since])

    def operators(self) -> list[dict]:
        return self.conn.dicts("SELECT name, created_at, revoked FROM operators ORDER BY name")

    def audit_search(self, limit: int, action: str = "", exclude_actions=(), actor: str = "", target: str = "",
                     since: int = 0) -> list[dict]:
        sql, args = _where("SELECT ts, actor, action, target, detail FROM audit", actor=actor, target=target)
        for pattern, negate in ([(action, False)] if action else []) + [(x, True) for x in exclude_actions]:
            # an exact action, or a family when the pattern ends in "." ("release." = release.create, ...)
            if pattern.endswith("."):
                like = pattern.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
                sql += f" AND {'NOT ' if negate else ''}(action LIKE ? ESCAPE '!')"
                args.append(like)
            else:
                sql += f" AND {'NOT ' if negate else ''}(action = ?)"
                args.append(pattern)
        if since:
            sql += " AND ts >= ?"
            args.append(since)
        return self.conn.dicts(sql + " ORDER BY id DESC LIMIT ?", args + [limit])
