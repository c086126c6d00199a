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

import hashlib
import json
import logging
import os
import pathlib
import random
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from google.protobuf import json_format

from walle.protos import bundle, device_pb2, device_pb2_grpc, tunnel_pb2
from walle.protos.namespaces import owns_by_name, sharing_problem, storage_scope

from .blobfetch import HttpBlobs, HttpDownloadError
from .recovery import set_aside
from .tunnel import backoff_delay

log = logging.getLogger("walle.device.sync")

CURRENT_FILE = "current.json"
MARKER_FILE = ".walle-install.json"   # written last into a version folder: the install is complete
TRASH_PREFIX = ".trash-"
OFFLINE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
BACKOFF_CAP = 60.0


class SyncError(Exception):
    """A sync step failed for a reason worth a person's attention."""


class InstallError(SyncError):
    """A version could not be written to disk (e.g. the disk is full); nothing of it was left behind."""


class CorruptInstall(SyncError):
    """An installed version's files no longer match what was installed (truncated, deleted, changed)."""


@dataclass
class InstalledTask:
    name: str
    version: str
    digest: str
    release_id: str
    manifest: device_pb2.TaskManifest
    path: pathlib.Path
    install_id: str = ""
    delivered_as: str = "installed"   # the delivery report this install owes: "installed" | "rolled_back"
    reported: bool = False            # that report is queued (the up-tunnel key makes it exactly once)
    config_json: str = ""     # the release's task config (canonical JSON, covered by the signature)
    _files: dict[str, str] | None = field(default=None, repr=False)
    _manifest_dict: dict | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def files(self) -> dict[str, str]:
        """The version's Python scripts (relative path -> source), read once and checked against the
        install marker: what the sandbox runs. Raises CorruptInstall if a file changed since install."""
        if self._files is None:
            hashes = _read_marker(self.path, self.digest)
            if isinstance(hashes, str):
                raise CorruptInstall(f"{self.ref}: {hashes}")
            out = {}
            for rel in sorted(hashes):
                if not rel.endswith(".py"):
                    continue
                try:
                    data = (self.path / rel).read_bytes()
                except OSError as e:
                    raise CorruptInstall(f"{self.ref}: {rel} cannot be read: {e.strerror}") from None
                if hashlib.sha256(data).hexdigest() != hashes[rel]:
                    raise CorruptInstall(f"{self.ref}: {rel} does not match the installed bundle "
                                         f"({len(data)} bytes on disk)")
                out[rel] = data.decode("utf-8")
            self._files = out
        return self._files

    def config(self) -> dict:
        """The release's task config: parameter -> value ({} for a task without config)."""
        return json.loads(self.config_json) if self.config_json else {}

    def _manifest_json(self) -> dict:
        if self._manifest_dict is None:  # the manifest never changes; its pointer is written twice per install
            self._manifest_dict = json_format.MessageToDict(self.manifest, preserving_proto_field_name=True)
        return self._manifest_dict

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "digest": self.digest, "release_id": self.release_id,
                "install_id": self.install_id, "delivered_as": self.delivered_as, "reported": self.reported,
                "manifest": self._manifest_json(),
                "config_json": self.config_json}


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(path: pathlib.Path, digest: str) -> dict[str, str] | str:
    """The file hashes recorded when `path` was installed, or why the folder is not a complete install."""
    try:
        marker = json.loads((path / MARKER_FILE).read_bytes())
        hashes = marker["files"]
        if marker["digest"] != digest or not isinstance(hashes, dict):
            return f"install marker is for bundle {str(marker['digest'])[:19]}, not {digest[:19]}"
        return hashes
    except FileNotFoundError:
        return "no install marker (the install never completed or the folder was partly deleted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"install marker unreadable: {e}"


def verify_install(path: pathlib.Path, digest: str) -> str | None:
    """None if every file recorded at install is present with its recorded sha256, else the problem."""
    if not path.is_dir():
        return "version folder missing"
    hashes = _read_marker(path, digest)
    if isinstance(hashes, str):
        return hashes
    for rel, want in hashes.items():
        try:
            got = hashlib.sha256((path / rel).read_bytes()).hexdigest()
        except OSError as e:
            return f"{rel}: {e.strerror or e}"
        if got != want:
            return f"{rel} does not match the installed bundle"
    return None


class TaskStore:
    """The tasks installed on one device.

    A version folder counts as installed only if its install marker (written last, listing every file's
    sha256) matches its files: a folder a crash left half-written or half-deleted is never run. Folders are
    deleted by renaming them to `.trash-*` first (atomic), then removing; leftovers (`*.tmp`, `.trash-*`)
    are swept on start. What had to be quarantined is kept in `problems` until the sync reports it.
    """

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.RLock()
        self._cache: dict[str, InstalledTask] | None = None
        self.problems: list[dict] = []   # quarantined files, drained by TaskSync into "event.host" reports

    # -- on-disk helpers ----------------------------------------------------------------------------
    def _trash(self, path: pathlib.Path) -> None:
        """Delete a folder or file atomically: rename it out of the way, then remove it."""
        if not path.exists() and not path.is_symlink():
            return
        dead = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
        os.rename(path, dead)
        if self.fsync:
            _fsync_dir(path.parent)
        _remove(dead)

    def _sweep(self, folder: pathlib.Path) -> None:
        """Remove what a crash left behind: half-extracted `.tmp` folders and half-removed `.trash-*`."""
        for d in folder.iterdir():
            if d.name.startswith(TRASH_PREFIX) or d.name.endswith(".tmp"):
                _remove(d)

    def _problem(self, name: str, entry: dict | None, problem: str) -> None:
        entry = entry or {}
        log.error("quarantined %s@%s: %s; it will be fetched again", name, str(entry.get("version", "?"))[:12],
                  problem)
        self.problems.append({"kind": "quarantined", "task": name, "version": entry.get("version", ""),
                              "release_id": entry.get("release_id", ""), "problem": problem[:1000]})

    def take_problems(self) -> list[dict]:
        with self._lock:
            out, self.problems = self.problems, []
            return out

    def _pointer(self, name: str) -> dict:
        path = self.root / name / CURRENT_FILE
        try:
            pointer = json.loads(path.read_bytes())
            if not isinstance(pointer, dict):
                raise ValueError("not a JSON object")
            return pointer
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            try:
                self._problem(name, None, set_aside(path, str(e)))
            except OSError as moved:
                self._problem(name, None, f"{CURRENT_FILE} is corrupt ({e}) and cannot be moved: {moved}")
            return {}

    def _load(self, name: str, entry: dict | None, *, check: bool = False) -> InstalledTask | None:
        if not entry:
            return None
        try:
            path = self.root / name / entry["version"]
            manifest = json_format.ParseDict(entry["manifest"], device_pb2.TaskManifest())
            task = InstalledTask(name, entry["version"], entry["digest"], entry.get("release_id", ""), manifest, path,
                                 entry.get("install_id", ""), entry.get("delivered_as", "installed"),
                                 bool(entry.get("reported")), entry.get("config_json", ""))
        except (KeyError, TypeError, ValueError, json_format.ParseError) as e:
            self._problem(name, entry if isinstance(entry, dict) else None, f"{CURRENT_FILE} entry is invalid ({e})")
            return None
        if check:
            problem = verify_install(path, task.digest)
            if problem:
                self._problem(name, entry, problem)
                self._trash(path)
                return None
        return task

    def installed(self) -> dict[str, InstalledTask]:
        """The runnable tasks; on first use every current version is verified against its marker."""
        with self._lock:
            if self._cache is None:
                self._sweep(self.root)
                cache = {}
                for d in sorted(self.root.iterdir()):
                    if not d.is_dir() or d.name.startswith("."):
                        continue
                    self._sweep(d)
                    pointer = self._pointer(d.name)
                    t = self._load(d.name, pointer.get("current"), check=True)
                    if t is not None:
                        cache[d.name] = t
                self._cache = cache
            return dict(self._cache)

    def get(self, name: str) -> InstalledTask | None:
        return self.installed().get(name)

    def quarantine(self, task: InstalledTask, problem: str) -> None:
        """A version found corrupt while in use: stop running it and delete it; the next sync fetches it again."""
        with self._lock:
            if self._cache is not None and self._cache.get(task.name) is task:
                self._cache.pop(task.name)
            self._problem(task.name, task.to_json(), problem)
            self._trash(task.path)

    def _write_pointer(self, name: str, pointer: dict) -> None:
        task_dir = self.root / name
        tmp = task_dir / (CURRENT_FILE + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(pointer, sort_keys=True))  # dumps: the C encoder, not dump's pure-Python one
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, task_dir / CURRENT_FILE)
        except OSError:
            _remove(tmp)
            raise
        if self.fsync:
            _fsync_dir(task_dir)

    def _extract(self, task: device_pb2.ActiveTask, files: dict[str, bytes], final: pathlib.Path) -> None:
        """Write the files to `<version>.tmp`, then the marker (last), fsync, and rename into place."""
        tmp = final.with_name(f"{final.name}.tmp")
        _remove(tmp)  # left over from a crash mid-extract
        try:
            bundle.extract_to(files, tmp)
            marker = {"digest": task.bundle_digest,
                      "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())}}
            with open(tmp / MARKER_FILE, "w") as f:
                f.write(json.dumps(marker, sort_keys=True))
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if self.fsync:
                for p in tmp.rglob("*"):
                    if p.is_file():
                        fd = os.open(p, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                _fsync_dir(tmp)
            os.rename(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as e:
            _remove(tmp)
            raise InstallError(f"cannot write {task.name}@{task.version[:12]} to disk: "
                               f"{e.strerror or e} (partial files removed)") from None

    def install(self, task: device_pb2.ActiveTask, files: dict[str, bytes]) -> InstalledTask:
        """Install verified bundle files as the task's current version (atomic switch). Raises InstallError
        (with nothing left behind) when the disk refuses the write."""
        with self._lock:
            task_dir = self.root / task.name
            task_dir.mkdir(parents=True, exist_ok=True)
            final = task_dir / task.version
            if final.exists() and verify_install(final, task.bundle_digest):
                self._trash(final)  # a folder a crash left half-written or half-deleted is never trusted
            created = not final.is_dir()
            if created:
                if not files:
                    raise SyncError(f"cannot install {task.name}@{task.version}: no files and no local copy")
                self._extract(task, files, final)
            old = self._pointer(task.name)
            new = InstalledTask(task.name, task.version, task.bundle_digest, task.release_id, task.manifest, final,
                                secrets.token_hex(8), config_json=task.config_json)
            previous = old.get("current")
            if previous and previous.get("version") == task.version:
                previous = old.get("previous")  # a re-install of the same version keeps the older fallback
            try:
                self._write_pointer(task.name, {"current": new.to_json(), "previous": previous})
            except OSError as e:
                if created:
                    _remove(final)
                raise InstallError(f"cannot switch {task.name} to {task.version[:12]}: {e.strerror or e}") from None
            self._prune(task.name, {task.version, (previous or {}).get("version")})
            if self._cache is not None:
                self._cache[task.name] = new
            return new

    def mark_reported(self, task: InstalledTask) -> None:
        """Record in current.json that this install's delivery report is queued."""
        with self._lock:
            pointer = self._pointer(task.name)
            current = pointer.get("current") or {}
            if current.get("install_id") == task.install_id and not current.get("reported"):
                current["reported"] = task.reported = True
                self._write_pointer(task.name, pointer)

    def has_local(self, name: str, version: str, digest: str) -> bool:
        """True if this exact version is still on disk, intact, as the previous one (a rollback needs no download)."""
        with self._lock:
            prev = self._pointer(name).get("previous") or {}
            return (prev.get("version") == version and prev.get("digest") == digest
                    and verify_install(self.root / name / version, digest) is None)

    def _prune(self, name: str, keep: set) -> None:
        for d in (self.root / name).iterdir():
            if d.is_dir() and d.name not in keep:
                try:
                    self._trash(d)
                except OSError as e:   # a left-over folder costs space, not correctness: swept on next start
                    log.warning("could not remove %s: %s", d, e)

    def remove(self, name: str) -> bool:
        """Uninstall a task: its folder is renamed away in one step, then deleted."""
        with self._lock:
            task_dir = self.root / name
            if not (task_dir / CURRENT_FILE).exists():
                return False
            self._trash(task_dir)
            if self._cache is not None:
                self._cache.pop(name, None)
            return True

    def rollback_local(self, name: str) -> InstalledTask:
        """Switch back to the version installed before the current one, without the network."""
        with self._lock:
            pointer = self._pointer(name)
            prev = self._load(name, pointer.get("previous"), check=True)
            if prev is None:
                raise SyncError(f"task {name!r} has no previous version installed to roll back to")
            prev.install_id, prev.delivered_as, prev.reported = secrets.token_hex(8), "rolled_back", False
            entry = prev.to_json()
            self._write_pointer(name, {"current": entry, "previous": pointer.get("current")})
            if self._cache is not None:
                self._cache[name] = prev
            return prev


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


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
                 report: Callable[..., object] | None = None,
                 on_change: Callable[[SyncResult], None] | None = None,
                 accept: Callable[[device_pb2.ActiveTask], str | None] | None = None,
                 bundle_cache: BundleCache | None = None, timeout: float = 30.0,
                 blob_http: HttpBlobs | None = None):
        self.store = store
        self.stub = device_pb2_grpc.DeviceServiceStub(channel)
        self.metadata = tuple(metadata)
        self.device_info = device_info
        self.report = report            # (topic, payload, once_key=...) -> ..., usually UpTunnel.send
        self.on_change = on_change
        self.accept = accept            # a reason to refuse a task on this device, or None
        self.bundle_cache = bundle_cache
        self.timeout = timeout
        self.blob_http = blob_http      # HTTPS downloads when the platform announces a URL base
        self.blob_url_base = ""
        self.blob_credential = False    # send the device token there (only to the platform's own server)
        self.revision = ""
        self.poll_after = 60.0
        self.unauthenticated = ""       # the platform's message once the credential is refused
        self.last_error = ""
        self.last_sync = 0.0
        # digest -> (reason, retry): a refusal is reported once; a bad download or a failed write is
        # retried on later pulls (a corrupting network may heal, a disk may be freed), a capability
        # refusal is not.
        self._refused: dict[str, tuple[str, bool]] = {}
        self._reported: set[str] = set()   # install ids whose report is queued
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

    def _send(self, topic: str, payload, once_key: str = "") -> bool:
        """Queue a report; False (logged) if the device cannot store it now (e.g. its disk is full)."""
        if self.report is None:
            return True
        try:
            if once_key:
                self.report(topic, payload, once_key=once_key)
            else:
                self.report(topic, payload)
            return True
        except Exception as e:  # noqa: BLE001 - a report that cannot be queued must not stop the sync
            log.error("cannot queue a %s report: %s", topic, e)
            return False

    def _report(self, task: device_pb2.ActiveTask, status: str, error: str = "") -> None:
        rep = tunnel_pb2.DeliveryReport(task=task.name, version=task.version, release_id=task.release_id,
                                        status=status, error=error[:2000])
        self._send("delivery", rep.SerializeToString())

    def _report_install(self, t: InstalledTask) -> None:
        """Report a completed install (or local rollback) exactly once: keyed by its install id, so the
        report queued before a crash and the one re-sent after it are the same record."""
        if not t.install_id or t.install_id in self._reported or t.reported:
            return
        rep = tunnel_pb2.DeliveryReport(task=t.name, version=t.version, release_id=t.release_id,
                                        status=t.delivered_as)
        if self._send("delivery", rep.SerializeToString(), once_key=f"install:{t.name}:{t.install_id}"):
            self._reported.add(t.install_id)
            try:   # remembered next to the install too, in case the queue file is lost before upload
                self.store.mark_reported(t)
            except OSError as e:
                log.warning("could not record that %s was reported: %s", t.ref, e)

    def report_problems(self) -> None:
        """Tell the platform what the store had to quarantine (corrupt files), then forget it."""
        for p in self.store.take_problems():
            if not self._send("event.host.quarantined", p):
                self.store.problems.append(p)   # retried on the next sync
                break

    def _fetch(self, digest: str, size: int = 0) -> dict[str, bytes]:
        if self.blob_http is not None and self.blob_url_base:
            try:
                return bundle.unpack(self.blob_http.fetch(self.blob_url_base, digest, size,
                                                           credential=self.blob_credential), digest)
            except (HttpDownloadError, bundle.BundleError) as e:
                log.warning("HTTPS download of %s failed (%s); falling back to gRPC", digest[:20], e)
        chunks = self.stub.FetchBundle(device_pb2.FetchBundleRequest(digest=digest), metadata=self.metadata,
                                       timeout=self.timeout)
        data = b"".join(c.data for c in chunks)
        if self.blob_http is not None:
            self.blob_http.discard(digest)  # a partial HTTPS download is no longer needed
        return bundle.unpack(data, digest)  # verifies the sha256 before parsing anything

    def _refuse(self, result: SyncResult, task: device_pb2.ActiveTask, have: InstalledTask | None, reason: str,
                retry: bool) -> None:
        """Report a refusal once per digest; `retry` ones (bad download, full disk) are tried again later."""
        result.rejected.append(f"{task.name}@{task.version}")
        if task.bundle_digest not in self._refused:  # report once, not on every pull
            log.error("refused %s@%s: %s%s", task.name, task.version[:12], reason,
                      f" (keeps running {have.version[:12]})" if have else "")
            self._report(task, "rejected", reason)
        self._refused[task.bundle_digest] = (reason, retry)

    def _converge(self, task: device_pb2.ActiveTask, have: InstalledTask | None, result: SyncResult,
                  peers: dict[str, device_pb2.TaskManifest]) -> None:
        if have is not None and have.version == task.version and have.digest == task.bundle_digest:
            if have.release_id != task.release_id or have.config_json != task.config_json:
                # Same version under a new release (its config, a rollback): count the delivery there too.
                self._report_install(self.store.install(task, {}))
            return
        refused = self._refused.get(task.bundle_digest)
        if refused and not refused[1]:
            return  # refused by this device's capabilities: that will not change
        # Sharing storage is granted, not claimed: checked against the other tasks as they will be after
        # this sync (the platform's list, else what stays installed). Of two tasks in one scope without a
        # mutual grant, the claimant is refused: the one not owning the scope by name, else the one not
        # installed there; with neither told apart, both. A refused task keeps its old version.
        installed = self.store.installed()

        def rank(m: device_pb2.TaskManifest) -> tuple[bool, bool]:
            t = installed.get(m.name)
            return owns_by_name(m), t is not None and storage_scope(t.manifest) == storage_scope(m)
        mine = rank(task.manifest)
        problem = sharing_problem(task.manifest, peers.values(), gives_way=lambda other: rank(other) < mine)
        if problem is not None:
            return self._refuse(result, task, have, f"namespace refused: {problem}", retry=True)
        reason = self.accept(task) if self.accept else None
        if reason is not None:
            return self._refuse(result, task, have, reason, retry=reason.startswith("bundle"))
        files: dict[str, bytes] = {}
        if not self.store.has_local(task.name, task.version, task.bundle_digest):
            try:
                fetch = lambda: self._fetch(task.bundle_digest, task.bundle_size)  # noqa: E731
                files = self.bundle_cache.get_or_fetch(task.bundle_digest, fetch) if self.bundle_cache else fetch()
                if task.manifest.entry not in files:
                    raise bundle.BundleError(f"entry script {task.manifest.entry!r} is not in the bundle")
            except bundle.BundleError as e:
                return self._refuse(result, task, have, f"bundle refused: {e}", retry=True)
        try:
            t = self.store.install(task, files)
        except (SyncError, OSError) as e:   # e.g. the disk is full: this task only, the others go on
            return self._refuse(result, task, have, f"install failed: {e}", retry=True)
        self._refused.pop(task.bundle_digest, None)
        result.installed.append(f"{task.name}@{task.version}")
        log.info("installed %s@%s (release %s)", task.name, task.version[:12], task.release_id)
        self._report_install(t)

    def sync_once(self) -> SyncResult:
        """Pull the active list and converge; raises grpc.RpcError when the platform is unreachable.
        A task that cannot be installed is refused (and reported) alone: the others still converge."""
        with self._sync_lock:
            installed = self.store.installed()
            for t in installed.values():   # installs a crash kept from being reported
                self._report_install(t)
            self.report_problems()
            reply = self.stub.GetActiveTasks(self.info(), metadata=self.metadata, timeout=self.timeout)
            result = SyncResult(revision=reply.revision, poll_after_seconds=reply.poll_after_seconds or 60)
            self.blob_url_base, self.blob_credential = reply.blob_url_base, reply.blob_url_wants_credential
            installed = self.store.installed()
            wanted = {t.name for t in reply.tasks}
            for name in sorted(set(installed) - wanted):
                try:
                    self.store.remove(name)
                except OSError as e:
                    log.error("could not drop %s: %s", installed[name].ref, e)
                    continue
                result.dropped.append(installed[name].ref)
                log.info("dropped %s: no longer released to this device", installed[name].ref)
            peers = {n: t.manifest for n, t in self.store.installed().items()}
            peers.update((t.name, t.manifest) for t in reply.tasks)
            for task in reply.tasks:
                self._converge(task, installed.get(task.name), result, peers)
            self.report_problems()
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
        self._report_install(t)
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
