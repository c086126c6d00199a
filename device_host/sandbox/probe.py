"""Start-up probes: which OS mechanisms actually work here, each tried in a throwaway forked child.

A mechanism the platform traps (Android answers landlock_*/seccomp()/close_range/unshare with SIGSYS)
kills only its probe child; the zygote records "killed:SIGSYS" and never uses it for tasks.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
from typing import Callable

from . import child, landlock, seccomp

PROBE_TIMEOUT_S = 20.0


def in_child(fn: Callable[[], object]) -> tuple[bool, object]:
    """Run fn() in a forked child; (True, its JSON result) or (False, "killed:SIGSYS"/"error:...")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            out = {"ok": fn()}
        except BaseException as exc:
            out, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], PROBE_TIMEOUT_S)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return False, f"killed:{signal.Signals(os.WTERMSIG(status)).name}"
    out = json.loads(data or b"{}")
    return ("ok" in out), out.get("ok", out.get("error", "no answer"))


def _denied(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except PermissionError:
        return True
    except OSError as exc:
        return exc.errno in (errno.EPERM, errno.EACCES)
    return False


def _probe_seccomp() -> bool:
    seccomp.install(seccomp.build_task_filter("none", os.getpid()))

    def fork() -> None:
        if os.fork() == 0:
            os._exit(0)

    checks = [_denied(lambda: socket.socket()), _denied(lambda: os.open("/etc/hostname", os.O_RDONLY)),
              _denied(fork), _denied(lambda: os.kill(os.getppid(), 0)), seccomp.mode() == 2]
    import numpy as np

    a = np.ones((64, 64), dtype=np.float32)
    checks.append(float((a @ a).sum()) == 64.0 ** 3)  # compute still works under the filter
    return all(checks)


def _probe_landlock() -> int:
    abi = landlock.abi_version()
    if abi < 1:
        return 0
    landlock.restrict_self(abi)
    return abi if _denied(lambda: os.open("/etc/hostname", os.O_RDONLY)) else 0


def _probe_rlimits() -> bool:
    child.apply_rlimits(memory_mb=32, cpu_seconds=5)
    try:
        bytearray(256 * 1024 * 1024)
    except MemoryError:
        return True
    return False


def _probe_drop_uid() -> bool:
    return child.drop_root() and os.getuid() == child.NOBODY and os.geteuid() == child.NOBODY


def _probe_close_range() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(436), ctypes.c_uint(4000), ctypes.c_uint(4000), ctypes.c_uint(0)) == 0


def run_all(profile: str) -> dict:
    """The capability dict reported as Sandbox.capabilities (plus `*_detail` strings for failures)."""
    caps: dict = {"profile": profile, "arch": seccomp.machine(), "restricted_python": True, "fs_mode": "none"}
    for name, fn in (("seccomp", _probe_seccomp), ("landlock", _probe_landlock), ("rlimits", _probe_rlimits),
                     ("drop_uid", _probe_drop_uid), ("close_range", _probe_close_range)):
        ok, value = in_child(fn)
        caps[name] = value if ok else (0 if name == "landlock" else False)
        if not ok:
            caps[f"{name}_detail"] = value
    return caps
