"""On-device model store with CoDA's model version control (paper 4.4.1, Figure 6).

Per model name, in `<root>/<name>/`:
* `M.npz`    the current model, read by inference;
* `M0.npz`   the backup, written once at creation and never modified (always-available fallback);
* `Mbuf.npz` the training buffer: a copy of M while an update runs, renamed over M on commit;
* `M.lock`   the write lock (flock): while a writer holds it, inference is served from M0;
* `update.lock` serialises updaters (commit / rollback / begin_update / discard) of one name.

Each file carries its parameters AND a JSON metadata header (version, base_version, metrics,
created_at, source), so one atomic rename changes both. Every write goes to a temp file in the same
directory, is fsynced, `os.replace`d over the target, and the directory is fsynced: a kill -9 at any
moment leaves the old or the new file, never a torn one. flock locks die with their process, so a
crash never leaves a stale lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from typing import Any, Iterator

from walle.protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

from . import core
from .core import Model

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SLOTS = ("M", "M0", "Mbuf")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(f"model name {name!r} must match {NAME_RE.pattern} "
                              "(letters, digits, '_' or '-', at most 64 characters)")
    return name


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(d)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class ModelStore:
    """Versioned model files for one device. Safe across threads and processes of that device."""

    def __init__(self, root_dir: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root_dir))
        os.makedirs(self.root, exist_ok=True)

    # ---- paths and locks -------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _path(self, name: str, slot: str) -> str:
        return os.path.join(self._dir(name), f"{slot}.npz")

    def _require(self, name: str) -> str:
        d = self._dir(name)
        if not os.path.exists(os.path.join(d, "M0.npz")):
            raise NotFound(f"model {name!r} does not exist in this store")
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
        """The lock that makes inference fall back to M0 (held only around the rename into M)."""
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

    def _load_slot(self, name: str, slot: str) -> Model:
        model = core.from_npz_bytes(self._read(name, slot))
        model.meta["slot"] = slot
        return model

    def _meta(self, name: str, slot: str) -> dict[str, Any]:
        return core.read_header(self._read(name, slot))

    def load(self, name: str, which: str = "M", *, fallback: bool = True) -> Model:
        """Load a slot. For "M": serve M0 while M is write-locked or if M is missing/unreadable
        (unless fallback=False). `model.meta["slot"]` tells which file was served."""
        if which not in SLOTS:
            raise InvalidArgument(f"which must be one of {SLOTS}, got {which!r}")
        self._require(name)
        if which == "M" and fallback:
            if not self.is_locked(name):
                try:
                    return self._load_slot(name, "M")
                except (OSError, InvalidArgument):
                    pass
            return self._load_slot(name, "M0")
        try:
            return self._load_slot(name, which)
        except FileNotFoundError:
            raise NotFound(f"model {name!r} has no {which} file") from None

    def _current(self, name: str) -> dict[str, Any]:
        """Header of M, or of M0 if M is unreadable (a crash right after creation)."""
        try:
            return self._meta(name, "M")
        except (OSError, InvalidArgument):
            return self._meta(name, "M0")

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name, "M0"))

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root)
                      if NAME_RE.match(n) and os.path.exists(os.path.join(self.root, n, "M0.npz")))

    def info(self, name: str) -> dict[str, Any]:
        d = self._require(name)
        cur, m0 = self._current(name), self._meta(name, "M0")
        sizes = {s: os.path.getsize(p) for s in SLOTS if os.path.exists(p := self._path(name, s))}
        return {"name": name, "arch": cur["arch"], "config": cur["config"], "M": cur["meta"],
                "M0": m0["meta"], "has_buffer": "Mbuf" in sizes, "locked": self.is_locked(name),
                "sizes": sizes, "dir": d}

    # ---- writing ---------------------------------------------------------------------------
    def create(self, name: str, arch: str, config: dict | None = None,
               params_npz_bytes: bytes | None = None, *, seed: int = 0,
               metrics: dict | None = None) -> dict[str, Any]:
        """Create M0 and M (version 1), randomly initialised from `seed` or from a parameter file
        (e.g. the cloud's global model, whose arch and config must agree)."""
        d = self._dir(name)
        if params_npz_bytes is not None:
            model = core.from_npz_bytes(params_npz_bytes)
            if model.arch != arch:
                raise InvalidArgument(f"parameter file is a {model.arch!r} model, not {arch!r}")
            if config is not None and core.build(arch, config).config != model.config:
                raise InvalidArgument(f"config {config} does not match the parameter file's {model.config}")
            source = "file"
        else:
            model = core.build(arch, config, seed)
            source = "init"
        os.makedirs(d, exist_ok=True)
        _fsync_dir(self.root)
        with self._flock(name, "update.lock"):
            if self.exists(name):
                raise AlreadyExists(f"model {name!r} already exists")
            meta = {"version": 1, "base_version": None, "created_at": time.time(),
                    "metrics": dict(metrics or model.meta.get("metrics") or {}), "source": source}
            data = model.to_npz_bytes(meta)
            # M before M0: M0's existence is what marks the model as created.
            atomic_write(self._path(name, "M"), data)
            atomic_write(self._path(name, "M0"), data)
        return self.info(name)

    def begin_update(self, name: str) -> Model:
        """Copy M to Mbuf and return it for training; commit() needs its base version to be current."""
        self._require(name)
        with self._flock(name, "update.lock"):
            model = self.load(name, "M")
            base = model.meta["version"]
            meta = {**model.meta, "buffer_of": base}
            meta.pop("slot", None)
            atomic_write(self._path(name, "Mbuf"), model.to_npz_bytes(meta))
        model.meta = {"base_version": base, "slot": "Mbuf", "version": base}
        return model

    def commit(self, name: str, model: Model, metrics: dict | None = None) -> dict[str, Any]:
        """Write the trained model into Mbuf, then rename Mbuf over M under the write lock."""
        d = self._require(name)
        base = model.meta.get("base_version")
        with self._flock(name, "update.lock"):
            cur = self._current(name)
            if model.arch != cur["arch"] or model.config != cur["config"]:
                raise InvalidArgument(f"model is {model.arch} {model.config}, store holds "
                                      f"{cur['arch']} {cur['config']}")
            if base != cur["meta"]["version"]:
                raise FailedPrecondition(f"model {name!r} changed to version {cur['meta']['version']} "
                                         f"since this update began from version {base}")
            meta = {"version": cur["meta"]["version"] + 1, "base_version": base,
                    "created_at": time.time(), "metrics": dict(metrics or {}), "source": "commit"}
            self._publish(name, model.to_npz_bytes(meta))
            self._cleanup_temps(d)
        return meta

    def _publish(self, name: str, data: bytes) -> None:
        buf = self._path(name, "Mbuf")
        atomic_write(buf, data)
        with self.write_lock(name):
            os.replace(buf, self._path(name, "M"))
            _fsync_dir(self._dir(name))

    def discard(self, name: str) -> None:
        """Drop the training buffer (the update is not kept)."""
        self._require(name)
        with self._flock(name, "update.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name, "Mbuf"))

    def rollback(self, name: str) -> dict[str, Any]:
        """Restore M0's parameters into M, as a new version (versions only grow)."""
        d = self._require(name)
        with self._flock(name, "update.lock"):
            cur = self._current(name)
            m0 = self._load_slot(name, "M0")
            meta = {"version": cur["meta"]["version"] + 1, "base_version": cur["meta"]["version"],
                    "created_at": time.time(), "metrics": m0.meta.get("metrics", {}),
                    "source": "rollback", "restored_from": m0.meta["version"]}
            self._publish(name, m0.to_npz_bytes(meta))
            self._cleanup_temps(d)
        return meta
