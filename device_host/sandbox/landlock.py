"""Landlock via ctypes syscall(): a ruleset that handles every access right the running ABI knows and
grants none, so the child can open no file, bind/connect no TCP port (ABI >= 4), and reach no abstract
unix socket nor signal any process outside its domain (ABI >= 6).

Only ever called in a throwaway probe child or a task child: on Android the syscalls may be trapped
(SIGSYS kills the caller).
"""
from __future__ import annotations

import ctypes
import os

from . import seccomp

# landlock_create_ruleset / add_rule / restrict_self use the unified numbers on x86_64 and aarch64.
_NR = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_TCP = 0b11  # BIND_TCP | CONNECT_TCP (ABI 4)
_SCOPES = 0b11  # ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Attr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def _numbers() -> tuple[int, int, int]:
    arch = seccomp.machine()
    if arch not in _NR:
        raise seccomp.UnsupportedArch(f"no Landlock syscall numbers for arch {arch!r}")
    return _NR[arch]


def abi_version() -> int:
    """The kernel's Landlock ABI, or 0 when Landlock is missing or disabled."""
    try:
        create, _, _ = _numbers()
    except seccomp.UnsupportedArch:
        return 0
    rc = _libc.syscall(ctypes.c_long(create), None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(rc), 0)


def restrict_self(abi: int) -> None:
    """Deny all filesystem access (and TCP, abstract-unix and signal scope where the ABI has them)."""
    if abi < 1:
        raise OSError("Landlock is not available")
    create, _, restrict = _numbers()
    fs = _FS_BY_ABI[max(k for k in _FS_BY_ABI if k <= abi)]
    attr = _Attr(fs, _NET_TCP if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(ctypes.c_long(create), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"landlock_create_ruleset failed: {os.strerror(e)}")
    try:
        seccomp.set_no_new_privs()
        if _libc.syscall(ctypes.c_long(restrict), ctypes.c_int(fd), ctypes.c_uint32(0)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_restrict_self failed: {os.strerror(e)}")
    finally:
        os.close(fd)
