"""Run a task folder once, locally, in the real device sandbox with the real host API: Walle's
"simulation test" before a task is submitted (`walle task run DIR --event NAME=JSON`).

What differs from a device: storage is a local SQLite file (temporary unless given, optionally
seeded from JSON), `tunnel.up` records are queued in a local up-tunnel that is never uploaded, and
`tunnel.down` has no platform to read from. `host_api` is also the reference the authoring guide
(docs/tasks.md) is checked against (`op_signatures`)."""
from __future__ import annotations

import inspect
import json
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from walle.protos.errors import InvalidArgument

from walle.platform import taskconfig

from .app import AppEventLog
from .hostapi import HostAPI
from .storage import TaskStorage
from .tunnel import UpTunnel, tunnel_ops


def host_api(storage: TaskStorage, namespace: str, up: UpTunnel, models_dir: pathlib.Path | None = None,
             app_log=None, config: dict | None = None) -> HostAPI:
    """A host API with every op a task can be granted, as a device host builds it: the built-in ops,
    the tunnel ops (no down tunnel; `tunnel.pull` says it has no platform), `events.read` when an app
    event log is given and, when `models_dir` is given, the model ops."""
    from .sample_client import pull_op
    extra: dict[str, Callable] = dict(tunnel_ops(namespace, up, None))
    extra["tunnel.pull"] = pull_op(storage, namespace, None, (), lambda _name, _payload: None)
    if app_log is not None:
        from .app import event_ops
        extra.update(event_ops(app_log))
    if models_dir is not None:
        from .models.ops import make_model_ops
        from .models.store import ModelStores
        extra.update(make_model_ops(ModelStores(models_dir).scope(namespace)))
    return HostAPI(storage, namespace, extra_ops=extra, config=config)


def _arguments(params) -> str:
    """`(key, default=None)`: names and defaults as a task writes the call (annotations left out)."""
    out, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return "(" + ", ".join(out) + ")"


def op_signatures() -> dict[str, str]:
    """op -> "(arguments)" for every host-API op, from the functions themselves (model ops from the
    functions they bind, without the store the host passes)."""
    with tempfile.TemporaryDirectory(prefix="walle-ops-") as tmp:
        storage = TaskStorage(pathlib.Path(tmp) / "s.sqlite3")
        up = UpTunnel(pathlib.Path(tmp) / "up.sqlite3", None)
        app_log = AppEventLog(pathlib.Path(tmp) / "app_events.sqlite3")
        try:
            api = host_api(storage, "t", up, pathlib.Path(tmp) / "models", app_log)
            out = {op: _arguments(inspect.signature(fn).parameters.values()) for op, fn in api.ops.items()}
        finally:
            app_log.close()
            up.close()
            storage.close()
    return out


def trigger_event(name: str, payload: Any, manifest) -> tuple[dict, str]:
    """The event `main` gets for NAME, shaped as the device's triggers shape it, and the trigger label."""
    if name == "schedule":
        every = next((t.every_seconds for t in manifest.triggers if t.kind == "schedule"), 0.0)
        if isinstance(payload, dict) and "every_seconds" in payload:
            every = float(payload["every_seconds"])
        return {"name": "schedule", "every_seconds": every}, f"schedule:{every:g}s"
    if name == "table_rows":
        spec = next((t for t in manifest.triggers if t.kind == "table_rows"), None)
        event = {"name": "table_rows", "table": spec.table if spec else "", "rows": spec.min_rows if spec else 0,
                 "min_rows": spec.min_rows if spec else 0}
        if isinstance(payload, dict):
            event.update({k: v for k, v in payload.items() if k in ("table", "rows", "min_rows")})
        return event, f"table_rows:{event['table']}"
    return ({"name": name, "payload": payload if payload is not None else {}, "ts_ms": int(time.time() * 1000)},
            f"event:{name}")


def seed_storage(storage: TaskStorage, namespace: str, path: str | pathlib.Path) -> None:
    """Load `{"kv": {key: value}, "tables": {table: [row, ...]}}` into the task's storage."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"--storage-from {path}: {e}") from None
    if not isinstance(data, dict) or set(data) - {"kv", "tables"}:
        raise InvalidArgument(f"--storage-from {path}: expected a JSON object with 'kv' and/or 'tables'")
    for key, value in (data.get("kv") or {}).items():
        storage.put(namespace, key, value)
    for table, rows in (data.get("tables") or {}).items():
        storage.insert(namespace, table, rows)


@dataclass
class LocalRun:
    status: str
    value: Any
    error: str
    duration_s: float
    peak_memory_kb: int
    logs: list[str]
    events: list[dict]
    trigger: str
    event: dict
    uploads: int
    storage_keys: list[str] = field(default_factory=list)
    storage_tables: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_task_dir(task_dir: str | pathlib.Path, event_name: str, payload: Any = None, *,
                 storage_path: str | pathlib.Path | None = None, storage_from: str | None = None,
                 allow_unconfined: bool = False) -> LocalRun:
    """Check the task folder as submit does, then run its entry once in a fresh sandbox."""
    from walle.platform.manifest import validate_task_dir
    from walle.platform.runnable import check_runnable

    from .sandbox import Limits, Sandbox
    manifest, files = validate_task_dir(task_dir)
    check_runnable(files, manifest.entry)  # what submit refuses, refused here too
    event, trigger = trigger_event(event_name, payload, manifest)
    warnings = []
    kinds = {(t.kind, t.event) for t in manifest.triggers}
    if event_name not in ("schedule", "table_rows") and ("event", event_name) not in kinds:
        warnings.append(f"no trigger of this task listens to event {event_name!r}: on a device it would never run "
                        f"for it (triggers: {', '.join(t.event or t.kind for t in manifest.triggers) or 'none'})")
    elif event_name in ("schedule", "table_rows") and not any(t.kind == event_name for t in manifest.triggers):
        warnings.append(f"the task has no {event_name} trigger: on a device it would never run this way")
    scripts = {p: data.decode("utf-8") for p, data in files.items() if p.endswith(".py")}
    ns = manifest.storage_namespace
    with tempfile.TemporaryDirectory(prefix="walle-taskrun-") as tmp:
        tmp_path = pathlib.Path(tmp)
        storage = TaskStorage(storage_path or tmp_path / "storage.sqlite3")
        up = UpTunnel(tmp_path / "up.sqlite3", None)
        app_log = AppEventLog(tmp_path / "app_events.sqlite3")
        sandbox = Sandbox(allow_unconfined=allow_unconfined)
        try:
            if storage_from:
                seed_storage(storage, ns, storage_from)
            models = tmp_path / "models" if "model" in manifest.apis else None
            config = taskconfig.resolve(manifest.config, None, f"task {manifest.name}")
            api = host_api(storage, ns, up, models, app_log, config)
            allowed = {op for op in api.allowed_apis() if op.split(".", 1)[0] in set(manifest.apis)}
            limits = Limits(memory_mb=manifest.limits.memory_mb, cpu_seconds=manifest.limits.cpu_seconds,
                            wall_seconds=manifest.limits.wall_seconds)
            res = sandbox.run(scripts, manifest.entry, event, limits=limits, api_handler=api, allowed_apis=allowed)
            return LocalRun(status=res.status, value=res.value, error=res.error or "",
                            duration_s=float(res.duration_s or 0.0), peak_memory_kb=int(res.peak_memory_kb or 0),
                            logs=[f"{e['level']}: {e['message']}" for e in api.logs] + list(res.logs or []),
                            events=api.events, trigger=trigger, event=event, uploads=up.pending(),
                            storage_keys=storage.keys(ns, ""),
                            storage_tables={t: storage.count(ns, t) for t in storage.table_names(ns)},
                            warnings=warnings)
        finally:
            sandbox.close()
            app_log.close()
            up.close()
            storage.close()
