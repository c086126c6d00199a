"""On-device model store with CoDA's model version control (paper 4.4.1, Figure 6), for any model:
a model is a blob of named parameter arrays plus the task's metadata (see blob.py).

Per scope (a task's storage namespace) and model name, in `<root>/<scope>/<name>/`:
* `M.blob`    the current model, read by inference;
* `M0.blob`   the backup, written at creation and never modified (always-available fallback);
* `Mbuf.blob` the training buffer: a copy of M while an update runs, renamed over M on commit;
* `M.lock`    the write lock (flock): while a writer holds it, inference is served from M0;
* `update.lock` serialises updaters (create / begin_update / commit / discard / rollback).

Each blob carries the store's version record and the task's metadata, so one atomic rename changes
both. Every write goes to a temp file in the same directory, is fsynced, `os.replace`d over the
target, and the directory is fsynced: a kill -9 at any moment leaves the old or the new file, never
a torn one. flock locks die with their process, so a crash never leaves a stale lock. A scope has a
byte quota over all its files; a write that would pass it is refused before anything changes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from typing import Any, Iterator

import numpy as np

from walle.protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

from . import blob

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SLOTS = ("M", "M0", "Mbuf")
DEFAULT_QUOTA = 32 * 1024 * 1024  # bytes per scope: M, M0 and a buffer of a few models


def check_name(name: Any, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(f"{what} {name!r} must match {NAME_RE.pattern} "
                              "(letters, digits, '_' or '-', at most 64 characters)")
    return name


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: str, data: bytes, durable: bool) -> None:
    """Create `path` (it must not exist) holding `data`; removed again if the write fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def atomic_write(path: str, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one; `durable` also
    survives a power cut (fsync of the file and its directory)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    _write_new(tmp, data, durable)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(d)


def atomic_write_linked(paths: list[str], data: bytes) -> None:
    """`data` under every path of one directory, renamed in in order, each a crash-safe replace as
    in atomic_write: written and fsynced once, the other names hard links to it (no file is ever
    changed in place, every write renames a new one in, so names sharing a file stay independent).
    Where the file system has no hard links, each path is written on its own."""
    d = os.path.dirname(paths[0])
    stamp = f"{os.getpid()}.{time.monotonic_ns()}.tmp"
    temps = [os.path.join(d, f".{os.path.basename(p)}.{stamp}") for p in paths]
    _write_new(temps[0], data, durable=True)
    try:
        for t in temps[1:]:
            os.link(temps[0], t)
    except OSError:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        for p in paths:
            atomic_write(p, data)
        return
    for t, p in zip(temps, paths):
        os.replace(t, p)
    _fsync_dir(d)


def apply_delta(base: dict[str, np.ndarray], params: Any, rows: Any) -> dict[str, np.ndarray]:
    """M's parameters `base` with a delta commit applied: each array of `params` replaces the one of
    that name, or, for a name in `rows`, only those rows. Every name must be M's, every shape and
    dtype must fit; a bad delta changes nothing."""
    if not isinstance(params, dict) or not isinstance(rows, dict):
        raise InvalidArgument("a delta commit needs params and rows as objects of name -> array")
    if len(params) > blob.MAX_PARAMS:
        raise InvalidArgument(f"params has {len(params)} arrays; at most {blob.MAX_PARAMS}")
    out = dict(base)
    for name in set(params) | set(rows):
        if name not in base:
            raise InvalidArgument(f"delta commit: {name!r} is not a parameter of the stored model "
                                  "(a changed architecture commits in full)")
        if name not in params:
            raise InvalidArgument(f"delta commit: rows of {name!r} given without their values")
        a, b = params[name], base[name]
        if not isinstance(a, np.ndarray) or a.dtype != b.dtype:
            raise InvalidArgument(f"delta commit: {name!r} must be a {b.dtype} array, got {type(a).__name__} "
                                  f"{getattr(a, 'dtype', '')}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InvalidArgument(f"parameter {name!r} holds NaN or infinity")
        if name not in rows:
            if a.shape != b.shape:
                raise InvalidArgument(f"delta commit: {name!r} has shape {list(a.shape)}, the model's is {list(b.shape)}")
            out[name] = a
            continue
        ids = np.asarray(rows[name]) if isinstance(rows[name], (list, np.ndarray)) else None
        if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu") or b.ndim < 1:
            raise InvalidArgument(f"delta commit: rows[{name!r}] must be a list of row numbers")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= b.shape[0] or np.unique(ids).size != ids.size):
            raise InvalidArgument(f"delta commit: rows[{name!r}] must be distinct row numbers in [0, {b.shape[0]})")
        if a.shape != (ids.size,) + b.shape[1:]:
            raise InvalidArgument(f"delta commit: {name!r} has shape {list(a.shape)} for {ids.size} rows of "
                                  f"{list(b.shape)}")
        merged = b.copy()
        merged[ids.astype(np.int64)] = a
        out[name] = merged
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class ModelStore:
    """The models of one scope on one device. Safe across threads and processes of that device."""

    def __init__(self, root_dir: str | os.PathLike, quota_bytes: int = DEFAULT_QUOTA):
        self.root = os.path.abspath(os.fspath(root_dir))
        self.quota = int(quota_bytes)
        os.makedirs(self.root, exist_ok=True)

    # ---- paths, locks, quota ---------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _path(self, name: str, slot: str) -> str:
        return os.path.join(self._dir(name), f"{slot}.blob")

    def _require(self, name: str) -> str:
        d = self._dir(name)
        if not os.path.exists(os.path.join(d, "M0.blob")):
            raise NotFound(f"model {name!r} does not exist")
        return d

    @contextlib.contextmanager
    def _flock(self, name: str, lock: str) -> Iterator[None]:
        fd = os.open(os.path.join(self._dir(name), lock), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def write_lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The lock that makes inference fall back to M0 (held around the rename into M)."""
        return self._flock(name, "M.lock")

    def is_locked(self, name: str) -> bool:
        fd = os.open(os.path.join(self._dir(name), "M.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def used_bytes(self) -> int:
        total = 0
        for d, _dirs, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files if f.endswith(".blob"))
        return total

    def _check_quota(self, name: str, adding: int, replacing: tuple[str, ...]) -> None:
        freed = sum(os.path.getsize(p) for s in replacing if os.path.exists(p := self._path(name, s)))
        after = self.used_bytes() - freed + adding
        if after > self.quota:
            raise ResourceExhausted(f"model {name!r}: {adding} more bytes would bring this task's models to "
                                    f"{after} bytes, over the {self.quota}-byte quota")

    def _cleanup_temps(self, d: str) -> None:
        # Temp files of writers killed mid-write; a live writer's pid is skipped.
        for f in os.listdir(d):
            parts = f.split(".")
            if f.startswith(".") and f.endswith(".tmp") and len(parts) >= 5 and parts[-3].isdigit():
                if not _pid_alive(int(parts[-3])):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, f))

    # ---- reading ---------------------------------------------------------------------------
    def _read(self, name: str, slot: str) -> bytes:
        with open(self._path(name, slot), "rb") as f:
            return f.read()

    def _record(self, name: str, slot: str) -> dict[str, Any]:
        return blob.read_header(self._read(name, slot))["meta"]

    def _current(self, name: str) -> tuple[str, dict[str, Any]]:
        """(slot, record) of M, or of M0 if M is unreadable (a crash right after creation)."""
        try:
            return "M", self._record(name, "M")
        except (OSError, InvalidArgument):
            return "M0", self._record(name, "M0")

    def load(self, name: str, which: str = "M") -> dict[str, Any]:
        """{"params", "meta", "version", "served_from"}. For "M": M0 is served while M is
        write-locked, or if M is missing or unreadable."""
        if which not in SLOTS:
            raise InvalidArgument(f"which must be one of {SLOTS}, got {which!r}")
        self._require(name)
        slots = [which]
        if which == "M":
            slots = ["M0"] if self.is_locked(name) else ["M", "M0"]
        for slot in slots:
            try:
                params, rec = blob.unpack(self._read(name, slot))
            except FileNotFoundError:
                if slot == slots[-1]:
                    raise NotFound(f"model {name!r} has no {which} file") from None
                continue
            except InvalidArgument:
                if slot == slots[-1]:
                    raise
                continue
            return {"params": params, "meta": rec.get("meta", {}), "version": rec["version"], "served_from": slot}
        raise NotFound(f"model {name!r} has no readable {which}")  # unreachable: the loop returns or raises

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name, "M0"))

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root)
                      if NAME_RE.match(n) and os.path.exists(os.path.join(self.root, n, "M0.blob")))

    def info(self, name: str) -> dict[str, Any]:
        self._require(name)
        _slot, cur = self._current(name)
        m0 = self._record(name, "M0")
        sizes = {s: os.path.getsize(p) for s in SLOTS if os.path.exists(p := self._path(name, s))}
        shapes = {k: list(v) for k, v in cur.get("shapes", {}).items()}
        return {"name": name, "version": cur["version"], "meta": cur.get("meta", {}), "record": _public(cur),
                "M0": _public(m0), "m0_meta": m0.get("meta", {}), "shapes": shapes, "has_buffer": "Mbuf" in sizes,
                "locked": self.is_locked(name), "sizes": sizes}

    # ---- writing ---------------------------------------------------------------------------
    def _blob(self, params: dict, meta: dict, record: dict) -> bytes:
        params = blob.check_params(params)
        rec = dict(record, meta=blob.check_meta(meta), created_at=time.time(),
                   shapes={k: list(np.shape(v)) for k, v in params.items()})
        return blob.pack(params, rec)

    def create(self, name: str, params: dict, meta: dict | None = None, *, source: str = "init",
               replace: bool = False) -> dict[str, Any]:
        """M0 and M (version 1, or the next version with replace=True, which also renews M0: a new
        architecture is a new model)."""
        d = self._dir(name)
        if not os.path.isdir(d):
            os.makedirs(d, exist_ok=True)
            _fsync_dir(self.root)  # the model's folder itself survives a power cut
        with self._flock(name, "update.lock"):
            version = 1
            if self.exists(name):
                if not replace:
                    raise AlreadyExists(f"model {name!r} already exists")
                version = self._current(name)[1]["version"] + 1
            data = self._blob(params, meta or {}, {"version": version, "base_version": None, "source": source})
            self._check_quota(name, 2 * len(data), ("M", "M0"))
            # M before M0: M0's existence is what marks the model as created.
            atomic_write_linked([self._path(name, "M"), self._path(name, "M0")], data)
        return self.info(name)

    def begin_update(self, name: str) -> dict[str, Any]:
        """Copy M to Mbuf (the training buffer) and return M's params, meta and version."""
        self._require(name)
        with self._flock(name, "update.lock"):
            got = self.load(name, "M")
            data = self._read(name, got["served_from"])
            self._check_quota(name, len(data), ("Mbuf",))
            # Scratch: commit rewrites Mbuf in full before publishing it, so this copy needs no fsync.
            atomic_write(self._path(name, "Mbuf"), data, durable=False)
        return got

    def commit(self, name: str, params: dict, meta: dict | None, base_version: int,
               rows: dict | None = None) -> dict[str, Any]:
        """Write the trained parameters into Mbuf, then rename Mbuf over M under the write lock.
        Refused if M changed since the update began (another writer committed or rolled back).

        With `rows` it is a delta commit: `params` holds only what changed, and for each name in
        `rows` (an embedding table, say) only the listed rows, in that order; the rest is M's. The
        new M is assembled whole and published the same way, so a crash leaves the old or the new M."""
        d = self._require(name)
        if isinstance(base_version, bool) or not isinstance(base_version, int):
            raise InvalidArgument(f"base_version must be the integer version begin_update returned, got {base_version!r}")
        with self._flock(name, "update.lock"):
            slot, cur = self._current(name)
            if base_version != cur["version"]:
                raise FailedPrecondition(f"model {name!r} changed to version {cur['version']} since this update "
                                         f"began from version {base_version}")
            if not os.path.exists(self._path(name, "Mbuf")):
                raise FailedPrecondition(f"model {name!r} has no update in progress (call begin_update first)")
            if rows is not None:
                params = apply_delta(blob.unpack(self._read(name, slot))[0], params, rows)
            data = self._blob(params, meta or {}, {"version": cur["version"] + 1, "base_version": base_version,
                                                    "source": "commit"})
            self._check_quota(name, len(data), ("Mbuf", "M"))
            self._publish(name, data)
            self._cleanup_temps(d)
        return _public(blob.read_header(data)["meta"])

    def _publish(self, name: str, data: bytes) -> None:
        buf = self._path(name, "Mbuf")
        d, base = os.path.split(buf)
        tmp = os.path.join(d, f".{base}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        _write_new(tmp, data, durable=True)  # the data is on disk; the name that lasts is M's, below
        os.replace(tmp, buf)
        with self.write_lock(name):
            os.replace(buf, self._path(name, "M"))
            _fsync_dir(self._dir(name))

    def discard(self, name: str) -> int:
        """Drop the training buffer (the update is not kept); returns M's version."""
        self._require(name)
        with self._flock(name, "update.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name, "Mbuf"))
            return self._current(name)[1]["version"]

    def rollback(self, name: str) -> dict[str, Any]:
        """Restore M0's parameters into M, as a new version (versions only grow)."""
        d = self._require(name)
        with self._flock(name, "update.lock"):
            cur = self._current(name)[1]
            params, m0 = blob.unpack(self._read(name, "M0"))
            data = self._blob(params, m0.get("meta", {}), {"version": cur["version"] + 1,
                                                           "base_version": cur["version"], "source": "rollback",
                                                           "restored_from": m0["version"]})
            self._check_quota(name, len(data), ("Mbuf", "M"))
            self._publish(name, data)
            self._cleanup_temps(d)
        return _public(blob.read_header(data)["meta"])


def _public(record: dict) -> dict:
    """The store's version record without the task's metadata and shapes (reported separately)."""
    return {k: v for k, v in record.items() if k not in ("meta", "shapes")}


class ModelStores:
    """One ModelStore per scope under `root`: a task sees only its scope's models."""

    def __init__(self, root_dir: str | os.PathLike, quota_bytes: int = DEFAULT_QUOTA):
        self.root = os.path.abspath(os.fspath(root_dir))
        self.quota = quota_bytes

    def scope(self, scope: str) -> ModelStore:
        return ModelStore(os.path.join(self.root, check_name(scope, "model scope")), self.quota)
