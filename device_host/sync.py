"""Keeping a device's installed tasks equal to what the platform says it should run.

`TaskStore` is the on-disk install: `tasks/<name>/<version>/` holds a version's files and
`tasks/<name>/current.json` says which version runs (and which one ran before it). A new version is
extracted to `<version>.tmp`, fsynced and renamed, then `current.json` is switched with os.replace, so
a crash at any moment leaves either the old or the new version in place, never a half-written one.
The previous version is kept for a fast local rollback (`rollback_local`).

`TaskSync` pulls the active list (GetActiveTasks with the device's attributes, host version and
installed list), drops tasks no longer listed, downloads new bundles by digest (FetchBundle) and
verifies them (walle.protos.bundle.unpack checks the sha256 first). A bundle that fails verification
is refused: a DeliveryReport "rejected" with the reason goes up the tunnel and the installed version
keeps running. Each install is reported as "installed".

Staying in sync (`run`): a periodic pull every poll_after_seconds +/- 20% jitter, and a pull at once
whenever `poke()` is called (the WatchTasks stream does that on each ListChanged). Offline
(UNAVAILABLE / DEADLINE_EXCEEDED) the device keeps running what is installed and retries with
exponential backoff and jitter (capped at 60 s). UNAUTHENTICATED stops syncing and says so.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from google.protobuf import json_format

from walle.protos import bundle, device_pb2, device_pb2_grpc, tunnel_pb2

from .blobfetch import HttpBlobs, HttpDownloadError
from .tunnel import backoff_delay

log = logging.getLogger("walle.device.sync")

CURRENT_FILE = "current.json"
OFFLINE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BACKOFF_CAP = 60.0


class SyncError(Exception):
    """A sync step failed for a reason worth a person's attention."""


@dataclass
class InstalledTask:
    name: str
    version: str
    digest: str
    release_id: str
    manifest: device_pb2.TaskManifest
    path: pathlib.Path
    _files: dict[str, str] | None = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def files(self) -> dict[str, str]:
        """The version's Python scripts (relative path -> source), read once: what the sandbox runs."""
        if self._files is None:
            self._files = {p.relative_to(self.path).as_posix(): p.read_text("utf-8")
                           for p in sorted(self.path.rglob("*.py")) if p.is_file()}
        return self._files

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "digest": self.digest, "release_id": self.release_id,
                "manifest": json_format.MessageToDict(self.manifest, preserving_proto_field_name=True)}


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TaskStore:
    """The tasks installed on one device."""

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.RLock()
        self._cache: dict[str, InstalledTask] | None = None

    def _pointer(self, name: str) -> dict:
        try:
            return json.loads((self.root / name / CURRENT_FILE).read_text())
        except FileNotFoundError:
            return {}

    def _load(self, name: str, entry: dict | None) -> InstalledTask | None:
        if not entry:
            return None
        path = self.root / name / entry["version"]
        if not path.is_dir():
            return None
        manifest = json_format.ParseDict(entry["manifest"], device_pb2.TaskManifest())
        return InstalledTask(name, entry["version"], entry["digest"], entry.get("release_id", ""), manifest, path)

    def installed(self) -> dict[str, InstalledTask]:
        with self._lock:
            if self._cache is None:
                cache = {}
                for d in sorted(self.root.iterdir()):
                    if d.is_dir() and (d / CURRENT_FILE).exists():
                        t = self._load(d.name, self._pointer(d.name).get("current"))
                        if t is not None:
                            cache[d.name] = t
                self._cache = cache
            return dict(self._cache)

    def get(self, name: str) -> InstalledTask | None:
        return self.installed().get(name)

    def _write_pointer(self, name: str, pointer: dict) -> None:
        task_dir = self.root / name
        tmp = task_dir / (CURRENT_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(pointer, f, sort_keys=True)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, task_dir / CURRENT_FILE)
        if self.fsync:
            _fsync_dir(task_dir)

    def install(self, task: device_pb2.ActiveTask, files: dict[str, bytes]) -> InstalledTask:
        """Install verified bundle files as the task's current version (atomic switch)."""
        with self._lock:
            task_dir = self.root / task.name
            task_dir.mkdir(parents=True, exist_ok=True)
            final = task_dir / task.version
            if not final.is_dir() and not files:
                raise SyncError(f"cannot install {task.name}@{task.version}: no files and no local copy")
            if not final.is_dir():
                tmp = task_dir / f"{task.version}.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp)  # left over from a crash mid-extract
                bundle.extract_to(files, tmp)
                if self.fsync:
                    for p in tmp.rglob("*"):
                        if p.is_file():
                            fd = os.open(p, os.O_RDONLY)
                            os.fsync(fd)
                            os.close(fd)
                    _fsync_dir(tmp)
                os.rename(tmp, final)
            old = self._pointer(task.name)
            new = InstalledTask(task.name, task.version, task.bundle_digest, task.release_id, task.manifest, final)
            previous = old.get("current")
            if previous and previous.get("version") == task.version:
                previous = old.get("previous")  # a re-install of the same version keeps the older fallback
            self._write_pointer(task.name, {"current": new.to_json(), "previous": previous})
            self._prune(task.name, {task.version, (previous or {}).get("version")})
            if self._cache is not None:
                self._cache[task.name] = new
            return new

    def has_local(self, name: str, version: str, digest: str) -> bool:
        """True if this exact version is still on disk as the previous one (a rollback needs no download)."""
        with self._lock:
            prev = self._pointer(name).get("previous") or {}
            return (prev.get("version") == version and prev.get("digest") == digest
                    and (self.root / name / version).is_dir())

    def _prune(self, name: str, keep: set) -> None:
        for d in (self.root / name).iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Uninstall a task (its pointer first, so a crash never leaves a half-removed current version)."""
        with self._lock:
            task_dir = self.root / name
            if not (task_dir / CURRENT_FILE).exists():
                return False
            os.replace(task_dir / CURRENT_FILE, task_dir / (CURRENT_FILE + ".removed"))
            shutil.rmtree(task_dir, ignore_errors=True)
            if self._cache is not None:
                self._cache.pop(name, None)
            return True

    def rollback_local(self, name: str) -> InstalledTask:
        """Switch back to the version installed before the current one, without the network."""
        with self._lock:
            pointer = self._pointer(name)
            prev = self._load(name, pointer.get("previous"))
            if prev is None:
                raise SyncError(f"task {name!r} has no previous version installed to roll back to")
            self._write_pointer(name, {"current": pointer["previous"], "previous": pointer.get("current")})
            if self._cache is not None:
                self._cache[name] = prev
            return prev


class BundleCache:
    """Verified bundle bytes by digest, shared by the devices of one process (a fleet): one download
    per digest however many devices need it. Safe because every entry was verified by digest."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._data: dict[str, dict[str, bytes]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get_or_fetch(self, digest: str, fetch: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
        with self._lock:
            if digest in self._data:
                return self._data[digest]
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:  # single flight: concurrent devices wait for the first download
            with self._lock:
                if digest in self._data:
                    return self._data[digest]
            files = fetch()
            with self._lock:
                if len(self._data) >= self.max_entries:
                    self._data.pop(next(iter(self._data)))
                self._data[digest] = files
                self._locks.pop(digest, None)
            return files


@dataclass
class SyncResult:
    installed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    revision: str = ""
    poll_after_seconds: int = 60

    @property
    def changed(self) -> bool:
        return bool(self.installed or self.dropped)


class TaskSync:
    def __init__(self, store: TaskStore, channel: grpc.Channel, metadata: tuple,
                 device_info: Callable[[], device_pb2.DeviceInfo], *,
                 report: Callable[[str, bytes], object] | None = None,
                 on_change: Callable[[SyncResult], None] | None = None,
                 accept: Callable[[device_pb2.ActiveTask], str | None] | None = None,
                 bundle_cache: BundleCache | None = None, timeout: float = 30.0,
                 blob_http: HttpBlobs | None = None):
        self.store = store
        self.stub = device_pb2_grpc.DeviceServiceStub(channel)
        self.metadata = tuple(metadata)
        self.device_info = device_info
        self.report = report            # (topic, payload) -> ..., usually UpTunnel.send
        self.on_change = on_change
        self.accept = accept            # a reason to refuse a task on this device, or None
        self.bundle_cache = bundle_cache
        self.timeout = timeout
        self.blob_http = blob_http      # HTTPS downloads when the platform announces a URL base
        self.blob_url_base = ""
        self.revision = ""
        self.poll_after = 60.0
        self.unauthenticated = ""       # the platform's message once the credential is refused
        self.last_error = ""
        self.last_sync = 0.0
        # digest -> reason: a refusal is reported once; a bad download is retried on later pulls
        # (a corrupting network may heal), a capability refusal is not.
        self._refused: dict[str, str] = {}
        self._sync_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch_thread: threading.Thread | None = None
        self._watch_call = None

    # -- one pull -------------------------------------------------------------------------------
    def info(self) -> device_pb2.DeviceInfo:
        info = self.device_info()
        del info.installed[:]
        info.installed.extend(sorted(t.ref for t in self.store.installed().values()))
        return info

    def _report(self, task: device_pb2.ActiveTask, status: str, error: str = "") -> None:
        if self.report is not None:
            rep = tunnel_pb2.DeliveryReport(task=task.name, version=task.version, release_id=task.release_id,
                                            status=status, error=error[:2000])
            self.report("delivery", rep.SerializeToString())

    def _fetch(self, digest: str, size: int = 0) -> dict[str, bytes]:
        if self.blob_http is not None and self.blob_url_base:
            try:
                return bundle.unpack(self.blob_http.fetch(self.blob_url_base, digest, size), digest)
            except (HttpDownloadError, bundle.BundleError) as e:
                log.warning("HTTPS download of %s failed (%s); falling back to gRPC", digest[:20], e)
        chunks = self.stub.FetchBundle(device_pb2.FetchBundleRequest(digest=digest), metadata=self.metadata,
                                       timeout=self.timeout)
        data = b"".join(c.data for c in chunks)
        if self.blob_http is not None:
            self.blob_http.discard(digest)  # a partial HTTPS download is no longer needed
        return bundle.unpack(data, digest)  # verifies the sha256 before parsing anything

    def sync_once(self) -> SyncResult:
        """Pull the active list and converge; raises grpc.RpcError when the platform is unreachable."""
        with self._sync_lock:
            reply = self.stub.GetActiveTasks(self.info(), metadata=self.metadata, timeout=self.timeout)
            result = SyncResult(revision=reply.revision, poll_after_seconds=reply.poll_after_seconds or 60)
            self.blob_url_base = reply.blob_url_base
            installed = self.store.installed()
            wanted = {t.name for t in reply.tasks}
            for name in sorted(set(installed) - wanted):
                self.store.remove(name)
                result.dropped.append(installed[name].ref)
                log.info("dropped %s: no longer released to this device", installed[name].ref)
            for task in reply.tasks:
                have = installed.get(task.name)
                if have is not None and have.version == task.version and have.digest == task.bundle_digest:
                    if have.release_id != task.release_id:
                        # Same version under a new release (e.g. a rollback): count the delivery there too.
                        self.store.install(task, {})
                        self._report(task, "installed")
                    continue
                if task.bundle_digest in self._refused and not self._refused[task.bundle_digest].startswith("bundle"):
                    continue  # refused by this device's capabilities: that will not change
                reason = self.accept(task) if self.accept else None
                files: dict[str, bytes] = {}
                if reason is None and self.store.has_local(task.name, task.version, task.bundle_digest):
                    pass  # back to the version kept on disk: verified when it was installed
                elif reason is None:
                    try:
                        fetch = lambda t=task: self._fetch(t.bundle_digest, t.bundle_size)  # noqa: E731
                        files = (self.bundle_cache.get_or_fetch(task.bundle_digest, fetch)
                                 if self.bundle_cache else fetch())
                        if task.manifest.entry not in files:
                            raise bundle.BundleError(f"entry script {task.manifest.entry!r} is not in the bundle")
                    except bundle.BundleError as e:
                        reason = f"bundle refused: {e}"
                if reason is not None:
                    result.rejected.append(f"{task.name}@{task.version}")
                    if task.bundle_digest not in self._refused:  # report once, not on every pull
                        log.error("refused %s@%s: %s%s", task.name, task.version[:12], reason,
                                  f" (keeps running {have.version[:12]})" if have else "")
                        self._report(task, "rejected", reason)
                    self._refused[task.bundle_digest] = reason
                    continue
                self._refused.pop(task.bundle_digest, None)
                self.store.install(task, files)
                result.installed.append(f"{task.name}@{task.version}")
                log.info("installed %s@%s (release %s)", task.name, task.version[:12], task.release_id)
                self._report(task, "installed")
            self.revision = reply.revision
            self.poll_after = float(result.poll_after_seconds)
            self.last_sync = time.time()
            self.last_error = ""
        if self.on_change is not None and result.changed:
            self.on_change(result)
        return result

    def rollback_local(self, name: str):
        """Switch a task back to its previous installed version and report it as rolled back."""
        t = self.store.rollback_local(name)
        if self.report is not None:
            rep = tunnel_pb2.DeliveryReport(task=t.name, version=t.version, release_id=t.release_id, status="rolled_back")
            self.report("delivery", rep.SerializeToString())
        if self.on_change is not None:
            self.on_change(SyncResult(installed=[t.ref]))
        return t

    # -- staying in sync ------------------------------------------------------------------------
    def poke(self) -> None:
        """Pull now (the platform said the list may have changed)."""
        self._wake.set()

    def start(self, watch: bool = True) -> None:
        self._stop.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="walle-sync", daemon=True)
            self._thread.start()
        if watch and self._watch_thread is None:
            self._watch_thread = threading.Thread(target=self._watch, name="walle-watch", daemon=True)
            self._watch_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        for t in (self._thread, self._watch_thread):
            if t is not None:
                t.join(timeout=5)
        self._thread = self._watch_thread = None

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.sync_once()
                if attempt:
                    log.info("platform reachable again; in sync (revision %s)", self.revision)
                attempt = 0
                delay = self.poll_after * random.uniform(0.8, 1.2)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.unauthenticated = e.details() or "unauthenticated"
                    log.error("task sync STOPPED: the platform refused this device's credential (%s). "
                              "Installed tasks keep running; enroll the device again to resume syncing.",
                              self.unauthenticated)
                    self._stop.set()
                    return
                attempt += 1
                self.last_error = f"{code.name}: {e.details()}"
                delay = backoff_delay(attempt, base=0.5, cap=BACKOFF_CAP)
                if code in OFFLINE:
                    log.warning("platform unreachable (%s); running installed tasks, retry in %.1fs",
                                self.last_error, delay)
                else:
                    log.error("task sync failed (%s); retry in %.1fs", self.last_error, delay)
            except Exception:
                attempt += 1
                delay = backoff_delay(attempt, base=0.5, cap=BACKOFF_CAP)
                log.exception("task sync failed; retry in %.1fs", delay)
            self._wake.wait(delay)
            self._wake.clear()

    def _watch(self) -> None:
        """Hold a WatchTasks stream open; each ListChanged (the first arrives on connect) pokes a pull."""
        attempt = 0
        while not self._stop.is_set():
            try:
                req = device_pb2.WatchRequest(device=self.device_info(), known_revision=self.revision)
                self._watch_call = self.stub.WatchTasks(req, metadata=self.metadata)
                for _msg in self._watch_call:
                    attempt = 0
                    self.poke()
            except grpc.RpcError as e:
                if self._stop.is_set() or e.code() == grpc.StatusCode.CANCELLED:
                    return
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.unauthenticated = e.details() or "unauthenticated"
                    self._wake.set()
                    return
            finally:
                self._watch_call = None
            attempt += 1
            self._stop.wait(backoff_delay(attempt, base=0.5, cap=BACKOFF_CAP))
