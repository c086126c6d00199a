"""The device host: one device's runtime, tying together task sync, the tunnel, triggers, the sandbox,
on-device storage and the model store.

Data folder layout:
  credentials.json   device id, token, platform address (mode 0600; identity.py)
  tasks/             installed task versions and their `current.json` pointers (sync.TaskStore)
  tunnel.sqlite3     the up-tunnel queue (tunnel.UpTunnel)
  resources/         down-tunnel resources cached by digest (tunnel.DownTunnel)
  storage.sqlite3    task storage (walle.device_host.storage.TaskStorage)
  models/<scope>/    on-device models, one scope per storage namespace (walle.device_host.models.store)
  app_events.sqlite3 the app's event log (walle.device_host.app.AppEventLog)
  app/app.sock       the app interface socket while `walle device run` serves it (app.AppServer)

`run_task` always runs the INSTALLED version at the moment the run starts, so a newly synced version is
picked up by the next run with nothing restarted (hot deploy). Every run ends in exactly one RunReport
up the tunnel, whatever the task returned, raised or printed (and even if the host failed running it);
its logs follow in one record, truncated visibly to fit the tunnel's record cap. A triggered run the
trigger engine stops (a trigger loop) is reported as a "refused" RunReport.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import threading
import time
from typing import Any, Callable, Mapping

import grpc

from walle.protos import bundle, device_pb2, tunnel_pb2
from walle.protos.datadir import keep_out_of_git
from walle.protos.namespaces import storage_scope

from .blobfetch import HttpBlobs
from .identity import Credentials, IdentityError, credentials_path, device_info
from .recovery import set_aside
from .storage import StorageCorrupt
from .sync import BundleCache, CorruptInstall, InstalledTask, SyncResult, TaskStore, TaskSync
from .triggers import TriggerEngine
from .tunnel import DownTunnel, UpTunnel, tunnel_ops

log = logging.getLogger("walle.device.host")

DEFAULT_LIMITS = {"memory_mb": 256, "cpu_seconds": 10.0, "wall_seconds": 30.0}
MAX_LOG_LINES = 200
MAX_LOG_RECORD_BYTES = 60 * 1024  # the platform keeps the first 64 KiB of a log record; under the tunnel's cap too
MAX_LOG_LINE_CHARS = 4096  # JSON-escaped (up to 6 bytes a character), one line still fits the record


class TaskNotInstalled(LookupError):
    """run_task was asked for a task this device does not have installed."""


def mnn_available() -> bool:
    return importlib.util.find_spec("MNN") is not None


class DeviceHost:
    def __init__(self, data_dir: str | os.PathLike, platform_address: str = "", *, attrs: Mapping[str, Any] | None = None,
                 sandbox: Any = None, credentials: Credentials | None = None, channel: grpc.Channel | None = None,
                 bundle_cache: BundleCache | None = None, durable: bool = True, trigger_workers: int = 1):
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        keep_out_of_git(self.data_dir)  # keys, tokens and databases live here
        self.credentials = credentials or Credentials.load(credentials_path(self.data_dir))
        self.platform_address = platform_address or self.credentials.platform
        if channel is None and not self.platform_address:
            raise IdentityError("no platform address: pass --platform HOST:PORT or put 'platform' in the credential file")
        self._own_channel = channel is None
        self.channel = channel or self.credentials.channel(self.platform_address)
        self.attrs = dict(attrs or {})
        self.sandbox = sandbox
        md = self.credentials.metadata
        self.store = TaskStore(self.data_dir / "tasks", fsync=durable)
        self.up = UpTunnel(self.data_dir / "tunnel.sqlite3", self.channel, md, durable=durable)
        if self.up.recovered:
            self._host_event("recovered", {"file": "tunnel.sqlite3", "problem": self.up.recovered})
        blob_http = HttpBlobs(self.data_dir / "downloads", md, self.credentials.ca_pem)  # used when announced
        self.down = DownTunnel(self.data_dir / "resources", self.channel, md, blob_http=blob_http)
        self._storage = None
        self._models = None
        self._app_log = None
        self._storage_lock = threading.Lock()
        self.sync = TaskSync(self.store, self.channel, md, self.device_info, report=self.up.send,
                             on_change=self._on_change, accept=self._accept, bundle_cache=bundle_cache,
                             blob_http=blob_http)
        self.triggers = TriggerEngine(self._triggered_run, self._count_rows, workers=trigger_workers,
                                      on_refused=self._report_refused)
        self.triggers.set_tasks({n: t.manifest for n, t in self.store.installed().items()})
        self.stats = {"runs": 0, "ok": 0, "failed": 0}
        self._stats_lock = threading.Lock()
        self.on_run: Callable[[str, Any], None] | None = None  # observer (tests, fleet summary)

    @property
    def device_id(self) -> str:
        return self.credentials.device_id

    def device_info(self) -> device_pb2.DeviceInfo:
        info = device_info(self.attrs, self.device_id, (t.ref for t in self.store.installed().values()))
        if self.credentials.user_id:  # the platform uses only the user it bound; say the same
            info.user_id = self.credentials.user_id
        return info

    # -- storage and models, opened on first use --------------------------------------------------
    @property
    def storage(self):
        """Opened on first use. A corrupt file is set aside and reported, and StorageCorrupt raised (the run
        that hit it fails with that message); the next use starts an empty storage."""
        with self._storage_lock:
            if self._storage is None:
                from .storage import StorageCorrupt, TaskStorage
                path = self.data_dir / "storage.sqlite3"
                try:
                    self._storage = TaskStorage(path)
                except StorageCorrupt as e:
                    account = set_aside(path, str(e))
                    self._host_event("recovered", {"file": path.name, "problem": account})
                    raise StorageCorrupt(f"{account}; task storage restarts empty") from None
            return self._storage

    def _host_event(self, kind: str, detail: dict) -> None:
        """Tell the platform what the host had to repair ("event.host.<kind>"); never raises."""
        try:
            self.up.send(f"event.host.{kind}", dict(detail, device_id=self.device_id))
        except Exception as e:  # noqa: BLE001 - e.g. a full disk; the problem is logged already
            log.error("cannot queue a host %s event: %s", kind, e)

    @property
    def models(self):
        with self._storage_lock:
            if self._models is None:
                from .models.store import ModelStores
                self._models = ModelStores(self.data_dir / "models")
            return self._models

    @property
    def app_log(self):
        with self._storage_lock:
            if self._app_log is None:
                from .app import AppEventLog
                self._app_log = AppEventLog(self.data_dir / "app_events.sqlite3")
            return self._app_log

    def _accept(self, task: device_pb2.ActiveTask) -> str | None:
        key = self.credentials.bundle_public_key
        statement = bundle.release_statement(task.bundle_digest, task.release_id, task.config_json)
        if key and not bundle.verify_signature(bytes.fromhex(key), statement, task.signature):
            # "bundle ..." reasons are retried on later pulls (the platform may re-sign and re-release)
            return ("bundle signature invalid: not signed by the platform key this device pinned at enrollment"
                    if task.signature else "bundle signature missing: this device only installs signed bundles")
        if "model" in task.manifest.apis and not mnn_available():
            return ("task needs the 'model' API, which needs MNN; MNN is not installed on this device "
                    "(no MNN wheel for this platform)")
        return None

    @staticmethod
    def namespace(manifest: device_pb2.TaskManifest) -> str:
        """The task's storage (and model) scope: its namespace, shared only with the tasks each side grants
        in namespace_members (walle.protos.namespaces; checked at submit and at install), else its own."""
        return storage_scope(manifest)

    def _count_rows(self, task: str, table: str) -> int:
        installed = self.store.get(task)
        ns = self.namespace(installed.manifest) if installed else task
        if table not in self.storage.table_names(ns):
            return 0
        return self.storage.count(ns, table)

    def _on_change(self, result: SyncResult) -> None:
        self.triggers.set_tasks({n: t.manifest for n, t in self.store.installed().items()})

    # -- running tasks ----------------------------------------------------------------------------
    def installed(self) -> dict[str, InstalledTask]:
        return self.store.installed()

    def _limits(self, manifest: device_pb2.TaskManifest):
        from .sandbox import Limits
        m = manifest.limits
        return Limits(memory_mb=m.memory_mb or DEFAULT_LIMITS["memory_mb"],
                      cpu_seconds=m.cpu_seconds or DEFAULT_LIMITS["cpu_seconds"],
                      wall_seconds=m.wall_seconds or DEFAULT_LIMITS["wall_seconds"])

    def _host_api(self, task: InstalledTask):
        from .hostapi import HostAPI
        apis = set(task.manifest.apis)
        extra: dict[str, Callable] = {}
        if "tunnel" in apis:
            extra.update(tunnel_ops(task.name, self.up, self.down))
            from .sample_client import pull_op
            extra["tunnel.pull"] = pull_op(self.storage, self.namespace(task.manifest), self.channel,
                                           self.credentials.metadata, self.emit)
        if "model" in apis:
            from .models.ops import make_model_ops
            fetch = (lambda name: self.down.fetch_resource(name)[1]) if "tunnel" in apis else None
            extra.update(make_model_ops(self.models.scope(self.namespace(task.manifest)), fetch))
        if "events" in apis:
            from .app import event_ops
            extra.update(event_ops(self.app_log))
        return HostAPI(self.storage, self.namespace(task.manifest), extra_ops=extra, config=task.config())

    def run_task(self, name: str, event: dict | None = None, *, trigger: str = "manual"):
        """Run the installed version of `name` in the sandbox and report it; returns the RunResult."""
        return self._run(name, event, trigger)[0]

    def _run(self, name: str, event: dict | None, trigger: str,
             wall_seconds: float | None = None) -> tuple[Any, list]:
        if self.sandbox is None:
            raise RuntimeError("this device host has no sandbox; pass sandbox=Sandbox(...)")
        task = self.store.get(name)
        if task is None:
            raise TaskNotInstalled(f"task {name!r} is not installed on device {self.device_id!r} "
                                   f"(installed: {', '.join(sorted(self.store.installed())) or 'none'})")
        try:
            files = task.files()
            api = self._host_api(task)
        except (CorruptInstall, StorageCorrupt) as e:
            return self._cannot_run(task, trigger, e), []
        try:
            # Only the op groups the manifest asks for: a task without "tunnel" cannot call tunnel.up.
            groups = set(task.manifest.apis) | {"config"}  # every task may read its own release's config
            allowed = {op for op in api.allowed_apis() if op.split(".", 1)[0] in groups}
            limits = self._limits(task.manifest)
            if wall_seconds is not None and wall_seconds < limits.wall_seconds:  # an app's ask deadline
                limits = dataclasses.replace(limits, wall_seconds=wall_seconds)
            result = self.sandbox.run(files, task.manifest.entry, event or {}, limits=limits,
                                      api_handler=api, allowed_apis=allowed)
        except Exception as exc:  # still this run's failure, reported like any other
            from .sandbox import RunResult
            log.exception("running %s failed in the host", name)
            status = "refused" if getattr(exc, "exit_code", 1) in (2, 5) else "crashed"
            result = RunResult(status, error=f"the host could not run the task: {type(exc).__name__}: {exc}")
        self._report_run(task, result, trigger, api.logs)
        with self._stats_lock:
            self.stats["runs"] += 1
            self.stats["ok" if result.status == "ok" else "failed"] += 1
        if self.on_run is not None:
            self.on_run(name, result)
        return result, [(e["name"], e["payload"]) for e in api.events]

    def _cannot_run(self, task: InstalledTask, trigger: str, error: Exception):
        """A run stopped before it started by a corrupt file: quarantine what can be fetched again, report
        the run as failed with the reason, and carry on (the next sync re-installs the task)."""
        from .sandbox import RunResult
        message = str(error)
        if isinstance(error, CorruptInstall):
            self.store.quarantine(task, message)
            self.sync.report_problems()
            self.sync.poke()
            message += "; the installed copy was quarantined and will be fetched again"
        result = RunResult(status="error", error=message)
        self._report_run(task, result, trigger, [])
        with self._stats_lock:
            self.stats["runs"] += 1
            self.stats["failed"] += 1
        if self.on_run is not None:
            self.on_run(task.name, result)
        return result

    def _report_run(self, task: InstalledTask, result, trigger: str, api_logs: list) -> None:
        """Queue the run's one RunReport, then its logs; never raises (a task cannot hide its own run)."""
        error = _text(result.error)[:2000]
        try:
            self._send_report(task, result.status, trigger, error, float(result.duration_s or 0.0),
                              int(result.peak_memory_kb or 0))
        except Exception:
            log.exception("could not queue the run report of %s", task.name)
        logs = [f"{e['level']}: {e['message']}" for e in api_logs] + list(result.logs or [])
        if logs:
            try:
                self.up.send("log", {"task": task.name, "version": task.version, "lines": _fit_logs(logs)})
            except Exception:
                log.exception("could not queue the logs of %s", task.name)
        if result.status == "ok":
            log.info("ran %s@%s (%s): ok in %.3fs", task.name, task.version[:12], trigger, result.duration_s)
        else:
            # the error's first line is "Type: message"; the task's own traceback follows it
            log.warning("ran %s@%s (%s): %s: %s", task.name, task.version[:12], trigger, result.status,
                        (error.strip().splitlines() or [""])[0])

    def _send_report(self, task: InstalledTask, status: str, trigger: str, error: str, duration_s: float = 0.0,
                     peak_memory_kb: int = 0) -> None:
        rep = tunnel_pb2.RunReport(task=task.name, version=task.version, release_id=task.release_id, status=status,
                                   duration_s=duration_s, peak_memory_kb=peak_memory_kb, error=error,
                                   trigger=_text(trigger)[:200])
        self.up.send("run_report", rep.SerializeToString())

    def _report_refused(self, name: str, trigger: str, reason: str) -> None:
        """The trigger engine stopped a run of `name` (a trigger loop): the platform sees a refused run."""
        task = self.store.get(name)
        if task is not None:
            self._send_report(task, "refused", trigger, _text(reason)[:2000])

    def _triggered_run(self, name: str, event: dict, trigger: str) -> list:
        try:
            return self._run(name, event, trigger)[1]
        except TaskNotInstalled:
            return []  # dropped between queueing and running

    def emit(self, event_name: str, payload: Any = None) -> list[str]:
        """An app event (e.g. "page_view:home"): queue the tasks it triggers; returns their names."""
        return self.triggers.emit(event_name, payload)

    # -- lifecycle ---------------------------------------------------------------------------------
    def sync_now(self) -> SyncResult:
        return self.sync.sync_once()

    def rollback_local(self, name: str) -> InstalledTask:
        return self.sync.rollback_local(name)

    def start(self, *, watch: bool = True) -> None:
        """Background sync (periodic + WatchTasks), up-tunnel flusher and trigger workers."""
        self.sync.start(watch=watch)
        self.up.start()
        self.triggers.start()

    def stop(self, flush_timeout: float = 2.0) -> None:
        self.triggers.stop()
        self.sync.stop()
        self.up.stop(flush_timeout=flush_timeout)

    def close(self) -> None:
        self.stop(flush_timeout=0)
        self.up.close()
        if self._storage is not None and hasattr(self._storage, "close"):
            self._storage.close()
        if self._app_log is not None:
            self._app_log.close()
        if self._own_channel:
            self.channel.close()

    def status(self) -> dict:
        return {"device_id": self.device_id, "installed": sorted(t.ref for t in self.store.installed().values()),
                "revision": self.sync.revision, "last_sync": self.sync.last_sync, "sync_error": self.sync.last_error,
                "unauthenticated": self.sync.unauthenticated or (self.up.last_error if self.up.unauthenticated else ""),
                "up_tunnel": self.up.stats(), "runs": dict(self.stats), "time": time.time()}


def _text(value: object) -> str:
    """Text that is valid UTF-8 (a task's message may hold lone surrogates, which protobuf refuses)."""
    return str(value or "").encode("utf-8", "replace").decode("utf-8")


def _fit_logs(lines: list[str]) -> list[str]:
    """The last lines that fit in one tunnel record, with a visible note of what was cut."""
    lines = [_text(line) for line in lines]
    lines = [line if len(line) <= MAX_LOG_LINE_CHARS else line[:MAX_LOG_LINE_CHARS] + " [line truncated]"
             for line in lines]
    kept, size = [], 0
    for line in reversed(lines[-MAX_LOG_LINES:]):
        cost = len(json.dumps(line)) + 1
        if size + cost > MAX_LOG_RECORD_BYTES:
            break
        kept.append(line)
        size += cost
    cut = len(lines) - len(kept)
    kept.reverse()
    if cut:
        kept.insert(0, f"[{cut} earlier log line(s) truncated: a run's logs are capped at {MAX_LOG_LINES} lines "
                       f"and {MAX_LOG_RECORD_BYTES} bytes]")
    return kept
