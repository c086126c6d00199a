"""The platform's durable state in one SQLite file (through sqlite-utils): releases and their change
log, enrolled devices, the audit trail, device reports and published resources.

A `meta.revision` counter grows on every change that can alter what a device receives; servers
compare it on each request, so a CLI working on the same data folder is seen at once."""
from __future__ import annotations

import json
import pathlib
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import sqlite_utils

from .errors import ResourceExhausted

SCHEMA_VERSION = 1


class PlatformState:
    def __init__(self, db_path: str | pathlib.Path):
        self.path = pathlib.Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._rev_cache = (-1, 0.0)  # (revision, monotonic time read)
        self._init_schema()

    # One connection per thread: sqlite3 connections are not shared across threads safely.
    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (BEGIN IMMEDIATE: writers queue instead of failing mid-way)."""
        with self._write_lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
                self._rev_cache = (-1, 0.0)  # after COMMIT, so no reader caches the old revision

    def _init_schema(self) -> None:
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", [str(SCHEMA_VERSION)])
            db.execute("INSERT OR IGNORE INTO meta VALUES ('release_seq', '0')")
            db.execute("""CREATE TABLE IF NOT EXISTS releases (
                id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, task TEXT NOT NULL, version TEXT NOT NULL,
                rule TEXT NOT NULL, rollout REAL NOT NULL, stage TEXT NOT NULL, channel TEXT NOT NULL,
                state TEXT NOT NULL, created_at INTEGER NOT NULL, created_by TEXT NOT NULL, note TEXT NOT NULL,
                bundle_digest TEXT NOT NULL, allow TEXT NOT NULL, deny TEXT NOT NULL, salt TEXT NOT NULL,
                config TEXT NOT NULL DEFAULT '')""")
            if "config" not in {r[1] for r in db.execute("PRAGMA table_info(releases)").fetchall()}:
                db.execute("ALTER TABLE releases ADD COLUMN config TEXT NOT NULL DEFAULT ''")  # task config
            db.execute("CREATE INDEX IF NOT EXISTS releases_task ON releases(task, channel, seq)")
            # Append-only: every change to a release (its creation, rollout, pause, ...).
            db.execute("""CREATE TABLE IF NOT EXISTS release_log (
                id INTEGER PRIMARY KEY AUTOINCREMENT, release_id TEXT NOT NULL, ts INTEGER NOT NULL,
                actor TEXT NOT NULL, change TEXT NOT NULL)""")
            db.execute("""CREATE TABLE IF NOT EXISTS devices (
                device_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, enrolled_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, last_seen INTEGER NOT NULL DEFAULT 0,
                app_version TEXT NOT NULL DEFAULT '', attrs TEXT NOT NULL DEFAULT '{}')""")
            db.execute("""CREATE TABLE IF NOT EXISTS audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, actor TEXT NOT NULL,
                action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)""")
            db.execute("""CREATE TABLE IF NOT EXISTS run_reports (
                device_id TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, task TEXT NOT NULL,
                version TEXT NOT NULL, release_id TEXT NOT NULL, status TEXT NOT NULL, duration_s REAL NOT NULL,
                peak_memory_kb INTEGER NOT NULL, error TEXT NOT NULL, trigger TEXT NOT NULL,
                PRIMARY KEY (device_id, seq))""")
            db.execute("CREATE INDEX IF NOT EXISTS run_reports_release ON run_reports(release_id)")
            db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
                device_id TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, task TEXT NOT NULL,
                version TEXT NOT NULL, release_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL,
                PRIMARY KEY (device_id, seq))""")
            db.execute("CREATE INDEX IF NOT EXISTS deliveries_release ON deliveries(release_id)")
            db.execute("""CREATE TABLE IF NOT EXISTS events (
                device_id TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, topic TEXT NOT NULL,
                payload TEXT NOT NULL, PRIMARY KEY (device_id, seq))""")
            # Up-tunnel streams: each (device, epoch) gets a slot k; a record's stored seq is
            # k * EPOCH_SPAN + its seq, so every report table keeps its (device_id, seq) key and
            # a device that starts afresh (new epoch) never collides with what it sent before.
            db.execute("""CREATE TABLE IF NOT EXISTS up_streams (
                device_id TEXT NOT NULL, epoch INTEGER NOT NULL, k INTEGER NOT NULL, hw INTEGER NOT NULL,
                created_at INTEGER NOT NULL, PRIMARY KEY (device_id, epoch), UNIQUE (device_id, k))""")
            # Which releases each device was handed: reports are accepted only for those.
            db.execute("""CREATE TABLE IF NOT EXISTS device_releases (
                device_id TEXT NOT NULL, release_id TEXT NOT NULL, first_at INTEGER NOT NULL,
                PRIMARY KEY (device_id, release_id))""")
            # Submits between their durable intent and their confirmation (audit); see SubmitJournal.
            db.execute("""CREATE TABLE IF NOT EXISTS submit_intents (
                id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, parent TEXT NOT NULL,
                actor TEXT NOT NULL, started_at INTEGER NOT NULL)""")
            cols = {r[1] for r in db.execute("PRAGMA table_info(devices)").fetchall()}
            if "user_id" not in cols:  # data folders from before users were bound at enrollment
                db.execute("ALTER TABLE devices ADD COLUMN user_id TEXT NOT NULL DEFAULT ''")
            # Older releases that still serve as fallbacks were called 'superseded'.
            db.execute("UPDATE releases SET state='fallback' WHERE state='superseded'")
            db.execute("""CREATE TABLE IF NOT EXISTS resources (
                name TEXT NOT NULL, version TEXT NOT NULL, seq INTEGER NOT NULL, digest TEXT NOT NULL,
                size INTEGER NOT NULL, metadata TEXT NOT NULL, created_at INTEGER NOT NULL,
                PRIMARY KEY (name, version))""")

    # -- revision -------------------------------------------------------------------------------
    def revision(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    def cached_revision(self, max_age: float = 0.2) -> int:
        """The revision, read from the database at most every `max_age` seconds. Changes made
        through this object are seen at once; other processes' changes within `max_age`."""
        rev, at = self._rev_cache
        now = time.monotonic()
        if now - at > max_age:
            rev = self.revision()
            self._rev_cache = (rev, now)
        return rev

    def bump_revision(self, db: sqlite_utils.Database) -> None:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='revision'")

    @staticmethod
    def next_release_id(db: sqlite_utils.Database) -> tuple[str, int]:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='release_seq'")
        seq = int(db.execute("SELECT value FROM meta WHERE key='release_seq'").fetchone()[0])
        return f"r{seq}", seq

    # -- audit ----------------------------------------------------------------------------------
    @staticmethod
    def audit(db: sqlite_utils.Database, actor: str, action: str, target: str, detail: dict | str = "") -> None:
        if not isinstance(detail, str):
            detail = json.dumps(detail, sort_keys=True)
        db.execute("INSERT INTO audit (ts, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                   [int(time.time()), actor or "unknown", action, target, detail])

    def audit_entries(self, limit: int = 100) -> list[dict]:
        rows = self.db.execute_returning_dicts(
            "SELECT ts, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?", [limit])
        return rows

    # -- releases -------------------------------------------------------------------------------
    @staticmethod
    def _release_row(row: dict) -> dict:
        row = dict(row)
        row["allow"] = json.loads(row["allow"])
        row["deny"] = json.loads(row["deny"])
        return row

    def release(self, release_id: str) -> dict | None:
        rows = self.db.execute_returning_dicts("SELECT * FROM releases WHERE id = ?", [release_id])
        return self._release_row(rows[0]) if rows else None

    def releases(self, task: str = "", channel: str = "", active_only: bool = False) -> list[dict]:
        sql, args = "SELECT * FROM releases WHERE 1=1", []
        if task:
            sql += " AND task = ?"
            args.append(task)
        if channel:
            sql += " AND channel = ?"
            args.append(channel)
        if active_only:
            sql += " AND state IN ('active', 'fallback', 'paused')"  # what devices may get
        sql += " ORDER BY seq DESC"
        return [self._release_row(r) for r in self.db.execute_returning_dicts(sql, args)]

    def release_log(self, release_id: str) -> list[dict]:
        return self.db.execute_returning_dicts(
            "SELECT ts, actor, change FROM release_log WHERE release_id = ? ORDER BY id", [release_id])

    @staticmethod
    def log_release_change(db, release_id: str, actor: str, change: dict) -> None:
        db.execute("INSERT INTO release_log (release_id, ts, actor, change) VALUES (?, ?, ?, ?)",
                   [release_id, int(time.time()), actor or "unknown", json.dumps(change, sort_keys=True)])

    # -- reports --------------------------------------------------------------------------------
    def release_stats(self, release_id: str) -> dict:
        return self.release_stats_many([release_id])[release_id]

    def release_stats_many(self, release_ids: list[str]) -> dict[str, dict]:
        """Delivery and run figures for many releases, one grouped query per table (the dashboard
        asks for every release on each refresh)."""
        out = {rid: {"delivered": 0, "ran": 0, "runs": 0, "failed": 0, "p50_duration_s": 0.0, "rejected": 0,
                     "rolled_back": 0} for rid in release_ids}
        db = self.db
        for lo in range(0, len(release_ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = release_ids[lo:lo + 500]
            marks = ",".join("?" * len(chunk))
            for rid, delivered, rejected, rolled_back in db.execute(
                    f"""SELECT release_id, COUNT(DISTINCT CASE WHEN status='installed' THEN device_id END),
                               COUNT(DISTINCT CASE WHEN status='rejected' THEN device_id END),
                               COUNT(DISTINCT CASE WHEN status='rolled_back' THEN device_id END)
                        FROM deliveries WHERE release_id IN ({marks}) GROUP BY release_id""", chunk):
                out[rid].update(delivered=delivered, rejected=rejected, rolled_back=rolled_back)
            for rid, ran, runs, failed in db.execute(
                    f"""SELECT release_id, COUNT(DISTINCT device_id), COUNT(*),
                               SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END)
                        FROM run_reports WHERE release_id IN ({marks}) GROUP BY release_id""", chunk):
                out[rid].update(ran=ran, runs=runs, failed=failed or 0)
            durations: dict[str, list[float]] = {}
            for rid, d in db.execute(f"SELECT release_id, duration_s FROM run_reports WHERE release_id IN ({marks}) "
                                     f"ORDER BY release_id, duration_s", chunk):
                durations.setdefault(rid, []).append(d)
            for rid, ds in durations.items():
                out[rid]["p50_duration_s"] = ds[(len(ds) - 1) // 2]
        return out

    # -- up-tunnel streams ----------------------------------------------------------------------
    def stream_slot(self, device_id: str, epoch: int, max_streams: int) -> tuple[int, int]:
        """(k, high-water seq) of a device's up-tunnel epoch; a new epoch gets the next slot."""
        rows = self.db.execute("SELECT k, hw FROM up_streams WHERE device_id=? AND epoch=?",
                               [device_id, epoch]).fetchall()
        if rows:
            return rows[0][0], rows[0][1]
        with self.transaction() as db:
            rows = db.execute("SELECT k, hw FROM up_streams WHERE device_id=? AND epoch=?", [device_id, epoch]).fetchall()
            if rows:
                return rows[0][0], rows[0][1]
            n, top = db.execute("SELECT COUNT(*), COALESCE(MAX(k), -1) FROM up_streams WHERE device_id=?",
                                [device_id]).fetchone()
            if n >= max_streams:
                raise ResourceExhausted(f"device {device_id!r} has started {n} up-tunnel epochs; at most {max_streams} "
                                        "(a device picks a new epoch only when its data folder starts afresh)")
            db.execute("INSERT INTO up_streams VALUES (?, ?, ?, 0, ?)", [device_id, epoch, top + 1, int(time.time())])
            return top + 1, 0

    def raise_stream_hw(self, device_id: str, epoch: int, seq: int) -> int:
        with self.transaction() as db:
            db.execute("UPDATE up_streams SET hw = MAX(hw, ?) WHERE device_id=? AND epoch=?", [seq, device_id, epoch])
            return db.execute("SELECT hw FROM up_streams WHERE device_id=? AND epoch=?",
                              [device_id, epoch]).fetchone()[0]

    # -- what devices were handed ---------------------------------------------------------------
    def record_deliveries(self, pairs: set[tuple[str, str]]) -> None:
        if not pairs:
            return
        now = int(time.time())
        with self.transaction() as db:
            db.conn.executemany("INSERT OR IGNORE INTO device_releases VALUES (?, ?, ?)",
                           [(d, r, now) for d, r in pairs])

    def delivered_releases(self, device_id: str, release_ids: set[str]) -> set[str]:
        """Those of `release_ids` the platform ever handed to the device."""
        ids = sorted(release_ids)[:500]
        marks = ",".join("?" * len(ids))
        return {r for (r,) in self.db.execute(
            f"SELECT release_id FROM device_releases WHERE device_id=? AND release_id IN ({marks})", [device_id, *ids])}

    # -- submit intents -------------------------------------------------------------------------
    def begin_submit(self, task: str, parent: str, actor: str) -> int:
        with self.transaction() as db:
            return db.execute("INSERT INTO submit_intents (task, parent, actor, started_at) VALUES (?, ?, ?, ?)",
                              [task, parent, actor, int(time.time())]).lastrowid

    def pending_submits(self) -> list[dict]:
        return self.db.execute_returning_dicts("SELECT * FROM submit_intents ORDER BY id")

    def end_submit(self, intent_id: int, action: str = "", target: str = "", detail: dict | None = None) -> None:
        """Drop the intent and write its audit entry (if `action`), atomically."""
        with self.transaction() as db:
            row = db.execute("SELECT actor FROM submit_intents WHERE id=?", [intent_id]).fetchall()
            db.execute("DELETE FROM submit_intents WHERE id=?", [intent_id])
            if action:
                self.audit(db, row[0][0] if row else "walle", action, target, detail or {})
