"""The host API: the fixed table of operations a sandboxed task may call, run in the host process.

Use one HostAPI per task run::

    api = HostAPI(storage, "hello", extra_ops={"model.train": train_fn})
    result = sandbox.run(files, "main.py", event, limits=Limits(), api_handler=api, allowed_apis=api.allowed_apis())
    api.events, api.logs   # what the task emitted

Built-in ops (the task name is bound here, never passed by the task):
  storage.get(key, default=None)        storage.put(key, value)         storage.delete(key)
  storage.keys(prefix="")               storage.insert(table, rows)     storage.tables()
  storage.query(table, where=None, order_by=None, limit=100, offset=0)
  storage.count(table, where=None)      storage.delete_rows(table, where)
  log.info(message)  log.warning(message)  events.emit(name, payload=None)
  config.get(key)    config.all()         (the release's task config: its value, else the schema default)

Other components register ops through `extra_ops`: a dict of "group.name" -> callable taking exactly the
task-visible arguments (bind the task or device yourself, e.g. with functools.partial or a closure). The
arguments arrive JSON-decoded (numpy arrays sent by the task arrive as numpy arrays); the return value
must be JSON-able (arrays allowed). Raise walle.protos.errors types for bad input: the task sees
`HostAPIError("host API model.train failed: InvalidArgument: <message>")`.
Calls are checked against inspect.signature before running: unknown ops, unknown or missing arguments
are refused with InvalidArgument naming the op.

Host work is charged to the run (walle.device_host.budget): an op called after the run's budget is spent
is refused, and an op that declares its cost (`budget.declare_cost(fn, estimate)`) is refused with
ResourceExhausted before it starts when the estimate is over the run's remaining CPU, wall time or memory.
Events are capped per run in count and in bytes (MAX_EVENTS, MAX_RUN_EVENT_BYTES).
"""
from __future__ import annotations

import inspect
import json
import re
from typing import Callable, Mapping

from walle.protos.errors import InvalidArgument, ResourceExhausted

from . import budget
from .storage import TaskStorage

OP_RE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
EVENT_RE = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
MAX_EVENTS = 1000
MAX_LOG_LINES = 1000
MAX_EVENT_BYTES = 64 * 1024
MAX_RUN_EVENT_BYTES = 1 << 20  # all events of one run together
MAX_LOG_CHARS = 4096


_SIGNATURES: dict[tuple, inspect.Signature] = {}


def _signature(fn: Callable) -> inspect.Signature:
    """inspect.signature, remembered per code object and defaults: each run makes its ops afresh as
    closures of the same functions, and inspecting them all cost more than a short task's work."""
    code = getattr(fn, "__code__", None)
    key = None
    if code is not None:
        key = (code, inspect.ismethod(fn), getattr(fn, "__defaults__", None),
               tuple(sorted((getattr(fn, "__kwdefaults__", None) or {}).items())))
    try:
        cached = _SIGNATURES.get(key) if key is not None else None
    except TypeError:  # an unhashable default
        key, cached = None, None
    if cached is None:
        cached = inspect.signature(fn)
        if key is not None:
            _SIGNATURES[key] = cached
    return cached


class HostAPI:
    """Callable as `api_handler(op, args, kwargs)` for Sandbox.run."""

    def __init__(self, storage: TaskStorage, task_name: str, extra_ops: Mapping[str, Callable] | None = None,
                 config: Mapping[str, object] | None = None):
        """`config`: the task's resolved config (every declared parameter with its release value or default)."""
        self.storage, self.task = storage, task_name
        self.config = dict(config or {})
        self.events: list[dict] = []
        self.event_bytes = 0
        self.logs: list[dict] = []
        s, t = storage, task_name

        def get(key: str, default: object = None) -> object:
            return s.get(t, key, default)

        def put(key: str, value: object) -> None:
            s.put(t, key, value)

        def delete(key: str) -> bool:
            return s.delete(t, key)

        def keys(prefix: str = "") -> list[str]:
            return s.keys(t, prefix)

        def insert(table: str, rows: list) -> int:
            return s.insert(t, table, rows)

        def query(table: str, where: dict | None = None, order_by: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[dict]:
            return s.query(t, table, where, order_by, limit, offset)

        def count(table: str, where: dict | None = None) -> int:
            return s.count(t, table, where)

        def delete_rows(table: str, where: dict) -> int:
            return s.delete_rows(t, table, where)

        def tables() -> list[str]:
            return s.table_names(t)

        self.ops: dict[str, Callable] = {
            "storage.get": get, "storage.put": put, "storage.delete": delete, "storage.keys": keys,
            "storage.insert": insert, "storage.query": query, "storage.count": count,
            "storage.delete_rows": delete_rows, "storage.tables": tables,
            "log.info": lambda message: self._log("info", message),
            "log.warning": lambda message: self._log("warning", message),
            "events.emit": self._emit,
            "config.get": self._config_get, "config.all": lambda: dict(self.config),
        }
        for op, fn in (extra_ops or {}).items():
            if not isinstance(op, str) or not OP_RE.match(op):
                raise InvalidArgument(f"extra op name {op!r} must look like 'group.name' (lowercase)")
            if op in self.ops:
                raise InvalidArgument(f"extra op {op!r} would replace a built-in op")
            if not callable(fn):
                raise InvalidArgument(f"extra op {op!r} is not callable")
            self.ops[op] = fn
        self._signatures: dict[str, inspect.Signature] = {}  # filled as ops are called

    def allowed_apis(self) -> set[str]:
        return set(self.ops)

    def __call__(self, op: str, args: list, kwargs: dict) -> object:
        fn = self.ops.get(op)
        if fn is None:
            raise InvalidArgument(f"unknown host API op {op!r} (known: {', '.join(sorted(self.ops))})")
        sig = self._signatures.get(op)
        if sig is None:
            sig = self._signatures[op] = _signature(fn)
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"bad arguments for {op}: {exc} (signature {op}{sig})") from None
        run = budget.current()
        if run is not None:
            run.check()
            estimate = budget.cost_of(fn)
            if estimate is not None:
                run.admit(op, estimate(*args, **kwargs))
        return fn(*args, **kwargs)

    def _config_get(self, key: str) -> object:
        if key not in self.config:  # no silent fallback: a typo must not run with a made-up value
            declared = ", ".join(sorted(self.config)) or "none: task.toml has no [config]"
            raise InvalidArgument(f"config key {key!r} is not declared in task.toml (declared: {declared})")
        return self.config[key]

    def _log(self, level: str, message: object) -> None:
        if len(self.logs) >= MAX_LOG_LINES:
            raise ResourceExhausted(f"more than {MAX_LOG_LINES} log lines in one run")
        self.logs.append({"level": level, "message": str(message)[:MAX_LOG_CHARS]})

    def _emit(self, name: str, payload: object = None) -> None:
        if not isinstance(name, str) or not EVENT_RE.match(name):
            raise InvalidArgument(f"event name {name!r} must be lowercase letters, digits, '_', '.', '-' (max 64)")
        try:
            size = len(json.dumps(payload, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"event {name!r} payload is not JSON: {exc}") from None
        if size > MAX_EVENT_BYTES:
            raise ResourceExhausted(f"event {name!r} payload is {size} bytes (limit {MAX_EVENT_BYTES})")
        if len(self.events) >= MAX_EVENTS:
            raise ResourceExhausted(f"more than {MAX_EVENTS} events in one run")
        if self.event_bytes + size > MAX_RUN_EVENT_BYTES:
            raise ResourceExhausted(f"event {name!r} would bring this run's events to {self.event_bytes + size} bytes "
                                    f"(limit {MAX_RUN_EVENT_BYTES} per run)")
        self.event_bytes += size
        self.events.append({"name": name, "payload": payload})
