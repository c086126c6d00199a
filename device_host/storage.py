"""On-device task storage: one SQLite file per device (WAL), a key-value store and small tables per task.

Tasks never send SQL. Every identifier (task, table, column, key) is checked against a regex (and columns
against the table's real columns) before it is quoted into a statement; every value is a bound
parameter. Each write is one `BEGIN IMMEDIATE ... COMMIT` transaction that also updates the per-task
usage counters, so a kill -9 at any moment leaves either the old or the new state.

Physical table names are ``t_<task>__<table>``; task and table names are lowercase letters/digits with
single underscores, so that mapping is unambiguous. Values in tables are JSON scalars (str, int, float,
bool -> int, None); key-value values are any JSON (stored as JSON text).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from walle.protos.errors import InvalidArgument, NotFound, ResourceExhausted

from . import budget
from .recovery import CorruptDatabase, is_corruption

TASK_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
TABLE_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
COLUMN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
_RESERVED_COLUMNS = {"rowid", "oid"}
_OPS = {"eq": "=", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_SCALARS = (str, int, float, bool, type(None))


class StorageCorrupt(Exception):
    """The storage file cannot be opened as a sound SQLite database (the host sets it aside)."""


@dataclass(frozen=True)
class Quotas:
    max_key_len: int = 128
    max_value_bytes: int = 1 << 20
    max_name_len: int = 48
    max_tables: int = 32
    max_columns: int = 64
    max_rows_per_table: int = 100_000
    max_rows_per_call: int = 10_000
    max_total_bytes: int = 64 << 20


def _dumps(value: object) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"value is not JSON ({exc}); convert arrays with .tolist()") from None


class TaskStorage:
    """Per-device storage shared by all tasks on the device; every method takes the task name first."""

    def __init__(self, db_path: str | Path, quotas: Quotas | None = None):
        self.path = str(db_path)
        self.quotas = quotas or Quotas()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.set_progress_handler(budget.sqlite_progress, 10_000)  # a run that is over stops its SQL
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        try:
            self._init_schema()
            problem = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise CorruptDatabase(f"quick_check: {problem}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not is_corruption(exc):
                raise   # e.g. a full disk: the file is sound
            raise StorageCorrupt(f"device storage {Path(self.path).name} is corrupt: {exc}") from None

    def _init_schema(self) -> None:
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS walle_kv (task TEXT NOT NULL, key TEXT NOT NULL, "
                            "value TEXT NOT NULL, PRIMARY KEY (task, key)) WITHOUT ROWID")
            self.db.execute("CREATE TABLE IF NOT EXISTS walle_tables (physical TEXT PRIMARY KEY, task TEXT NOT NULL,"
                            " name TEXT NOT NULL, rows INTEGER NOT NULL DEFAULT 0)")
            self.db.execute("CREATE TABLE IF NOT EXISTS walle_usage (task TEXT PRIMARY KEY, bytes INTEGER NOT NULL)")

    def close(self) -> None:
        self.db.conn.close()

    # -- plumbing -----------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "TaskStorage"):
            self.store = store

        def __enter__(self) -> None:
            self.store._lock.acquire()
            self.store.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
            try:
                self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _tx(self) -> "TaskStorage._Tx":
        return TaskStorage._Tx(self)

    def _rows(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def _task(self, task: object) -> str:
        if not isinstance(task, str) or not TASK_RE.match(task) or len(task) > self.quotas.max_name_len:
            raise InvalidArgument(f"task name {task!r} is invalid: use lowercase letters and digits with single "
                                  f"underscores, at most {self.quotas.max_name_len} characters")
        return task

    def _key(self, key: object) -> str:
        if not isinstance(key, str) or not KEY_RE.match(key) or ".." in key:
            raise InvalidArgument(f"key {key!r} is invalid: use letters, digits and _ . : - (no '..', no '/')")
        if len(key) > self.quotas.max_key_len:
            raise InvalidArgument(f"key is {len(key)} characters, over the {self.quotas.max_key_len}-character limit")
        return key

    def _physical(self, task: str, table: object) -> str:
        if not isinstance(table, str) or not TABLE_RE.match(table) or len(table) > self.quotas.max_name_len:
            raise InvalidArgument(f"table name {table!r} is invalid: use lowercase letters and digits with single "
                                  f"underscores, at most {self.quotas.max_name_len} characters")
        return f"t_{self._task(task)}__{table}"

    def _usage(self, task: str) -> int:
        row = self.db.execute("SELECT bytes FROM walle_usage WHERE task = ?", [task]).fetchone()
        return row[0] if row else 0

    def _charge(self, task: str, delta: int) -> None:
        total = self._usage(task) + delta
        if delta > 0 and total > self.quotas.max_total_bytes:
            raise ResourceExhausted(f"task {task!r} storage quota exceeded: {total} bytes would be over the "
                                    f"{self.quotas.max_total_bytes}-byte limit")
        self.db.execute("INSERT INTO walle_usage (task, bytes) VALUES (?, ?) ON CONFLICT(task) DO UPDATE SET "
                        "bytes = excluded.bytes", [task, max(total, 0)])

    def usage_bytes(self, task: str) -> int:
        with self._lock:
            return self._usage(self._task(task))

    # -- key-value ----------------------------------------------------------------------------------
    def get(self, task: str, key: str, default: object = None) -> object:
        rows = self._rows("SELECT value FROM walle_kv WHERE task = ? AND key = ?", [self._task(task), self._key(key)])
        return json.loads(rows[0][0]) if rows else default

    def put(self, task: str, key: str, value: object) -> None:
        task, key, text = self._task(task), self._key(key), _dumps(value)
        if len(text) > self.quotas.max_value_bytes:
            raise InvalidArgument(f"value for key {key!r} is {len(text)} bytes of JSON, over the "
                                  f"{self.quotas.max_value_bytes}-byte limit")
        with self._tx():
            old = self.db.execute("SELECT length(value) FROM walle_kv WHERE task = ? AND key = ?", [task, key]).fetchone()
            self._charge(task, len(key) + len(text) - ((len(key) + old[0]) if old else 0))
            self.db.execute("INSERT INTO walle_kv (task, key, value) VALUES (?, ?, ?) ON CONFLICT(task, key) "
                            "DO UPDATE SET value = excluded.value", [task, key, text])

    def delete(self, task: str, key: str) -> bool:
        task, key = self._task(task), self._key(key)
        with self._tx():
            old = self.db.execute("SELECT length(value) FROM walle_kv WHERE task = ? AND key = ?", [task, key]).fetchone()
            if not old:
                return False
            self.db.execute("DELETE FROM walle_kv WHERE task = ? AND key = ?", [task, key])
            self._charge(task, -(len(key) + old[0]))
        return True

    def keys(self, task: str, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str) or (prefix and not KEY_RE.match(prefix)):
            raise InvalidArgument(f"key prefix {prefix!r} is invalid: use letters, digits and _ . : -")
        # range scan, not LIKE: '_' and '%' in a prefix must not act as wildcards
        rows = self._rows("SELECT key FROM walle_kv WHERE task = ? AND key >= ? AND key < ? ORDER BY key",
                          [self._task(task), prefix, prefix + "\U0010ffff"])
        return [r[0] for r in rows]

    # -- tables -------------------------------------------------------------------------------------
    def _columns(self, physical: str) -> dict[str, str]:
        """lowercased name -> real name of an existing table's columns."""
        return {c.name.lower(): c.name for c in self.db[physical].columns}

    def _table_exists(self, physical: str) -> bool:
        return bool(self.db.execute("SELECT 1 FROM walle_tables WHERE physical = ?", [physical]).fetchone())

    def _check_row(self, row: object, index: int) -> dict:
        if not isinstance(row, dict) or not row:
            raise InvalidArgument(f"rows[{index}] must be a non-empty object of column -> value")
        lowered = set()
        for col, value in row.items():
            if not isinstance(col, str) or not COLUMN_RE.match(col) or col.lower() in _RESERVED_COLUMNS:
                raise InvalidArgument(f"rows[{index}]: column name {col!r} is invalid: start with a letter, then "
                                      f"letters, digits or _, at most 63 characters")
            if col.lower() in lowered:
                raise InvalidArgument(f"rows[{index}]: column {col!r} appears twice (names are case-insensitive)")
            lowered.add(col.lower())
            if not isinstance(value, _SCALARS) or (isinstance(value, float) and value != value):
                raise InvalidArgument(f"rows[{index}]: column {col!r} value must be a str, int, float, bool or null "
                                      f"(store nested data as JSON text), got {type(value).__name__}")
            if isinstance(value, str) and len(value) > self.quotas.max_value_bytes:
                raise InvalidArgument(f"rows[{index}]: column {col!r} value is over {self.quotas.max_value_bytes} bytes")
        return row

    def insert(self, task: str, table: str, rows: list[dict]) -> int:
        physical = self._physical(task, table)
        if not isinstance(rows, list) or not rows:
            raise InvalidArgument("rows must be a non-empty list of objects")
        if len(rows) > self.quotas.max_rows_per_call:
            raise InvalidArgument(f"{len(rows)} rows in one insert, over the {self.quotas.max_rows_per_call} limit")
        rows = [self._check_row(r, i) for i, r in enumerate(rows)]
        # charge the row as it will read back (no nulls, bools as ints), so delete_rows refunds the same bytes
        size = sum(len(_dumps({k: int(v) if isinstance(v, bool) else v for k, v in r.items() if v is not None}))
                   for r in rows)
        with self._tx():
            exists = self._table_exists(physical)
            if not exists:
                count = self.db.execute("SELECT count(*) FROM walle_tables WHERE task = ?", [task]).fetchone()[0]
                if count >= self.quotas.max_tables:
                    raise ResourceExhausted(f"task {task!r} already has {count} tables (limit {self.quotas.max_tables})")
            columns = self._columns(physical) if exists else {}
            wanted = {c.lower(): c for r in rows for c in r}
            new = [c for low, c in wanted.items() if low not in columns]
            if len(columns) + len(new) > self.quotas.max_columns:
                raise ResourceExhausted(f"table {table!r} would have {len(columns) + len(new)} columns "
                                        f"(limit {self.quotas.max_columns})")
            if not exists:
                # untyped columns keep each value exactly as given (no affinity conversions)
                self.db.execute(f'CREATE TABLE "{physical}" ({", ".join(f"{_q(c)}" for c in new)})')
                self.db.execute("INSERT INTO walle_tables (physical, task, name, rows) VALUES (?, ?, ?, 0)",
                                [physical, task, table])
            else:
                for c in new:
                    self.db.execute(f'ALTER TABLE "{physical}" ADD COLUMN {_q(c)}')
            current = self.db.execute("SELECT rows FROM walle_tables WHERE physical = ?", [physical]).fetchone()[0]
            if current + len(rows) > self.quotas.max_rows_per_table:
                raise ResourceExhausted(f"table {table!r} would have {current + len(rows)} rows "
                                        f"(limit {self.quotas.max_rows_per_table})")
            self._charge(task, size)
            for r in rows:
                cols = list(r)
                self.db.execute(f'INSERT INTO "{physical}" ({", ".join(_q(c) for c in cols)}) VALUES '
                                f'({", ".join("?" for _ in cols)})', [int(v) if isinstance(v, bool) else v
                                                                     for v in r.values()])
            self.db.execute("UPDATE walle_tables SET rows = rows + ? WHERE physical = ?", [len(rows), physical])
        return len(rows)

    def _where(self, physical: str, table: str, where: object) -> tuple[str, list]:
        if where is None:
            return "", []
        if not isinstance(where, dict):
            raise InvalidArgument(f"where must be an object of column -> value, got {type(where).__name__}")
        columns = self._columns(physical)
        clauses, params = [], []
        for col, cond in where.items():
            real = self._column(columns, table, col)
            ops = cond if isinstance(cond, dict) else {"eq": cond}
            for op, value in ops.items():
                if op == "in":
                    if not isinstance(value, list) or not value or not all(isinstance(v, _SCALARS) for v in value):
                        raise InvalidArgument(f"where[{col!r}]['in'] must be a non-empty list of scalars")
                    clauses.append(f'{_q(real)} IN ({", ".join("?" for _ in value)})')
                    params.extend(value)
                    continue
                if op not in _OPS:
                    raise InvalidArgument(f"where[{col!r}]: unknown operator {op!r} (use {', '.join([*_OPS, 'in'])})")
                if not isinstance(value, _SCALARS):
                    raise InvalidArgument(f"where[{col!r}]: value must be a scalar, got {type(value).__name__}")
                if value is None and op in ("eq", "ne"):
                    clauses.append(f"{_q(real)} IS {'NOT ' if op == 'ne' else ''}NULL")
                else:
                    clauses.append(f"{_q(real)} {_OPS[op]} ?")
                    params.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _column(self, columns: dict[str, str], table: str, col: object) -> str:
        if not isinstance(col, str) or not COLUMN_RE.match(col):
            raise InvalidArgument(f"column name {col!r} is invalid")
        if col.lower() not in columns:
            raise InvalidArgument(f"table {table!r} has no column {col!r} (columns: {', '.join(columns.values())})")
        return columns[col.lower()]

    def _existing(self, task: str, table: str) -> str:
        physical = self._physical(task, table)
        if not self._table_exists(physical):
            raise NotFound(f"task {task!r} has no table {table!r}")
        return physical

    def query(self, task: str, table: str, where: dict | None = None, order_by: str | None = None,
              limit: int = 100, offset: int = 0) -> list[dict]:
        """Rows matching `where` (column -> value, or column -> {"gt"|"ge"|"lt"|"le"|"ne"|"eq"|"in": v});
        `order_by` is a column name, prefixed with "-" for descending."""
        for name, value, top in (("limit", limit, self.quotas.max_rows_per_call), ("offset", offset, 1 << 62)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise InvalidArgument(f"{name} must be an int in [0, {top}], got {value!r}")
        with self._lock:
            physical = self._existing(task, table)
            sql_where, params = self._where(physical, table, where)
            order = ""
            if order_by is not None:
                if not isinstance(order_by, str):
                    raise InvalidArgument(f"order_by must be a column name, got {order_by!r}")
                desc = order_by.startswith("-")
                real = self._column(self._columns(physical), table, order_by.lstrip("-"))
                order = f" ORDER BY {_q(real)}{' DESC' if desc else ''}, rowid"
            cur = self.db.execute(f'SELECT * FROM "{physical}"{sql_where}{order} LIMIT ? OFFSET ?',
                                  [*params, limit, offset])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def count(self, task: str, table: str, where: dict | None = None) -> int:
        with self._lock:
            physical = self._existing(task, table)
            sql_where, params = self._where(physical, table, where)
            return self.db.execute(f'SELECT count(*) FROM "{physical}"{sql_where}', params).fetchone()[0]

    def delete_rows(self, task: str, table: str, where: dict) -> int:
        """Delete matching rows; `where={}` deletes all rows (explicitly)."""
        if not isinstance(where, dict):
            raise InvalidArgument("where must be an object; pass {} to delete every row")
        with self._tx():
            physical = self._existing(task, table)
            sql_where, params = self._where(physical, table, where or None)
            cur = self.db.execute(f'SELECT * FROM "{physical}"{sql_where}', params)
            names = [d[0] for d in cur.description]
            doomed = [dict((n, v) for n, v in zip(names, row) if v is not None) for row in cur.fetchall()]
            if not doomed:
                return 0
            self.db.execute(f'DELETE FROM "{physical}"{sql_where}', params)
            self.db.execute("UPDATE walle_tables SET rows = rows - ? WHERE physical = ?", [len(doomed), physical])
            self._charge(task, -sum(len(_dumps(r)) for r in doomed))
        return len(doomed)

    def table_names(self, task: str) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM walle_tables WHERE task = ? ORDER BY name",
                                         [self._task(task)])]


def _q(identifier: str) -> str:
    """Quote an identifier that already passed COLUMN_RE/TABLE_RE (so it holds no quote characters)."""
    return '"' + identifier + '"'
