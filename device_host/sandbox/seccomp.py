"""Dependency-free seccomp-BPF filters (ctypes + prctl), for x86_64 and aarch64; other arches fail closed.

The task filter is a deny-list that answers an errno (so numpy/MNN fail cleanly instead of dying):
sockets, exec, fork (clone without CLONE_THREAD, or with namespace flags), ptrace and cross-process
memory/pidfd calls, signals to any pid but our own, namespace/mount/bpf/io_uring/keyring calls,
rlimit changes, every filesystem change, and opens (fs_mode "none": every open; "readonly": write
flags). clone3 and openat2 answer ENOSYS (glibc falls back to clone/openat, which we can inspect).
A wrong arch kills the process; x32 syscall numbers get ENOSYS.

The android_sim filter SIGSYS-traps what an Android app's seccomp policy traps (landlock_*, seccomp(2),
close_range, unshare) so those code paths are exercised on a server. Installing filters goes through
prctl(PR_SET_SECCOMP), which Android allows, never through seccomp(2).

Syscall numbers were generated from the kernel uapi headers and cross-checked against libseccomp 2.5.4
(tests/device_host/test_sandbox.py repeats that check when libseccomp is present).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

X86_64 = {
    "read": 0, "write": 1, "open": 2, "openat": 257, "openat2": 437, "close": 3, "socket": 41, "socketpair": 53,
    "connect": 42, "bind": 49, "listen": 50, "accept": 43, "accept4": 288, "execve": 59, "execveat": 322, "fork": 57,
    "vfork": 58, "clone": 56, "clone3": 435, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "process_madvise": 440, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424, "kcmp": 312,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "bpf": 321,
    "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 250,
    "add_key": 248, "request_key": 249, "userfaultfd": 323, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
    "syslog": 103, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "rename": 82, "renameat": 264, "renameat2": 316, "unlink": 87, "unlinkat": 263,
    "mkdir": 83, "mkdirat": 258, "rmdir": 84, "mknod": 133, "mknodat": 259, "link": 86, "linkat": 265,
    "symlink": 88, "symlinkat": 266, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92,
    "fchown": 93, "lchown": 94, "fchownat": 260, "truncate": 76, "ftruncate": 77, "utime": 132, "utimes": 235,
    "utimensat": 280, "futimesat": 261, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "creat": 85, "fanotify_init": 300, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsmount": 432, "fsconfig": 431, "fspick": 433, "mount_setattr": 442,
    "memfd_create": 319, "memfd_secret": 447, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
    "clock_adjtime": 305, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "vhangup": 153,
    "uselib": 134, "tkill": 200, "kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "setpgid": 109, "setsid": 112, "prlimit64": 302, "setrlimit": 160, "setpriority": 141, "ioprio_set": 251,
    "migrate_pages": 256, "move_pages": 279, "ioctl": 16, "seccomp": 317, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "close_range": 436, "capset": 126, "personality": 135,
}
AARCH64 = {
    "read": 63, "write": 64, "openat": 56, "openat2": 437, "close": 57, "socket": 198, "socketpair": 199,
    "connect": 203, "bind": 200, "listen": 201, "accept": 202, "accept4": 242, "execve": 221, "execveat": 281,
    "clone": 220, "clone3": 435, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
    "process_madvise": 440, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424, "kcmp": 272,
    "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "bpf": 280,
    "perf_event_open": 241, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "keyctl": 219,
    "add_key": 217, "request_key": 218, "userfaultfd": 282, "init_module": 105, "finit_module": 273,
    "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "reboot": 142, "swapon": 224, "swapoff": 225,
    "syslog": 116, "acct": 89, "quotactl": 60, "quotactl_fd": 443, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "renameat": 38, "renameat2": 276, "unlinkat": 35, "mkdirat": 34, "mknodat": 33,
    "linkat": 37, "symlinkat": 36, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchown": 55, "fchownat": 54,
    "truncate": 45, "ftruncate": 46, "utimensat": 88, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7,
    "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16, "fanotify_init": 262, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsmount": 432, "fsconfig": 431, "fspick": 433, "mount_setattr": 442,
    "memfd_create": 279, "memfd_secret": 447, "settimeofday": 170, "clock_settime": 112, "adjtimex": 171,
    "clock_adjtime": 266, "sethostname": 161, "setdomainname": 162, "vhangup": 58, "tkill": 130, "kill": 129,
    "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "setpgid": 154, "setsid": 157,
    "prlimit64": 261, "setrlimit": 164, "setpriority": 140, "ioprio_set": 30, "migrate_pages": 238,
    "move_pages": 239, "ioctl": 29, "seccomp": 277, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
    "landlock_restrict_self": 446, "close_range": 436, "capset": 91, "personality": 92,
}
# (syscall table, AUDIT_ARCH_* value, whether x32 numbers must be refused)
ARCHES = {
    "x86_64": (X86_64, 0xC000003E, True),
    "aarch64": (AARCH64, 0xC00000B7, False),
}

# Syscalls answered with EPERM (names missing on an arch, e.g. fork on aarch64, are skipped).
DENY_EPERM = (
    "socket socketpair connect bind listen accept accept4 execve execveat fork vfork ptrace process_vm_readv "
    "process_vm_writev process_madvise pidfd_open pidfd_getfd pidfd_send_signal kcmp unshare setns mount umount2 "
    "pivot_root chroot bpf perf_event_open io_uring_setup io_uring_enter io_uring_register keyctl add_key "
    "request_key userfaultfd init_module finit_module delete_module kexec_load kexec_file_load reboot swapon "
    "swapoff syslog acct quotactl quotactl_fd name_to_handle_at open_by_handle_at rename renameat renameat2 unlink "
    "unlinkat mkdir mkdirat rmdir mknod mknodat link linkat symlink symlinkat chmod fchmod fchmodat fchmodat2 "
    "chown fchown lchown fchownat truncate ftruncate utime utimes utimensat futimesat setxattr lsetxattr fsetxattr "
    "removexattr lremovexattr fremovexattr creat fanotify_init move_mount open_tree fsopen fsmount fsconfig fspick "
    "mount_setattr memfd_create memfd_secret settimeofday clock_settime adjtimex clock_adjtime sethostname "
    "setdomainname iopl ioperm vhangup uselib tkill rt_sigqueueinfo rt_tgsigqueueinfo setpgid setsid setrlimit "
    "setpriority ioprio_set migrate_pages move_pages capset personality"
).split()
DENY_ENOSYS = ("clone3", "openat2")
ANDROID_TRAPPED = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp",
                   "close_range", "unshare")
FS_MODES = ("none", "readonly")

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_TRAP, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00030000, 0x00050000, 0x7FFF0000
_OFF_NR, _OFF_ARCH = 0, 4
CLONE_THREAD = 0x00010000
CLONE_NS_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
OPEN_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000 | 0o20000000  # WRONLY RDWR CREAT TRUNC APPEND TMPFILE
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_GET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 21, 2


class UnsupportedArch(RuntimeError):
    """No syscall table for this CPU: seccomp is reported unavailable (fail closed)."""


def machine() -> str:
    return os.uname().machine


def _arch(arch: str | None) -> tuple[dict, int, bool]:
    arch = arch or machine()
    if arch not in ARCHES:
        raise UnsupportedArch(f"no seccomp syscall table for arch {arch!r} (supported: {', '.join(ARCHES)})")
    return ARCHES[arch]


def _stmt(code: int, k: int) -> tuple:
    return (code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> tuple:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # seccomp_data.args[i], low 32 bits (little-endian arches only)


def _errno(e: int) -> int:
    return RET_ERRNO | e


def _prologue(audit_arch: int, deny_x32: bool) -> list[tuple]:
    prog = [_stmt(_LD_W_ABS, _OFF_ARCH), _jump(_JEQ, audit_arch, 1, 0), _stmt(_RET, RET_KILL_PROCESS),
            _stmt(_LD_W_ABS, _OFF_NR)]
    if deny_x32:
        prog += [_jump(_JGE, 0x40000000, 0, 1), _stmt(_RET, _errno(errno.ENOSYS))]
    return prog


def _rule(nr: int, block: list[tuple]) -> list[tuple]:
    """`if nr == NR: <block>`; every path through a block ends in a return."""
    return [_jump(_JEQ, nr, 0, len(block))] + block


def _ret(action: int) -> list[tuple]:
    return [_stmt(_RET, action)]


def build_task_filter(fs_mode: str = "none", pid: int | None = None, arch: str | None = None) -> list[tuple]:
    """The per-task deny-list filter. `pid` is the only target kill()/tgkill() may signal."""
    if fs_mode not in FS_MODES:
        raise ValueError(f"fs_mode must be one of {FS_MODES}, got {fs_mode!r}")
    table, audit_arch, deny_x32 = _arch(arch)
    pid = os.getpid() if pid is None else pid
    eperm, allow = _errno(errno.EPERM), RET_ALLOW
    prog = _prologue(audit_arch, deny_x32)
    for name in DENY_EPERM:
        if name in table:
            prog += _rule(table[name], _ret(eperm))
    for name in DENY_ENOSYS:
        prog += _rule(table[name], _ret(_errno(errno.ENOSYS)))
    # clone: threads only, and never with namespace flags.
    prog += _rule(table["clone"], [_stmt(_LD_W_ABS, _arg_lo(0)), _jump(_JSET, CLONE_NS_FLAGS, 2, 0),
                                   _jump(_JSET, CLONE_THREAD, 0, 1), _stmt(_RET, allow), _stmt(_RET, eperm)])
    # kill/tgkill: only at ourselves (raise(), pthread_kill()).
    for name in ("kill", "tgkill"):
        prog += _rule(table[name], [_stmt(_LD_W_ABS, _arg_lo(0)), _jump(_JEQ, pid, 0, 1), _stmt(_RET, allow),
                                    _stmt(_RET, eperm)])
    # prlimit64: reading our own limits only (pid 0, new_limit NULL).
    prog += _rule(table["prlimit64"], [
        _stmt(_LD_W_ABS, _arg_lo(0)), _jump(_JEQ, 0, 0, 5),
        _stmt(_LD_W_ABS, _arg_lo(2)), _jump(_JEQ, 0, 0, 3),
        _stmt(_LD_W_ABS, _arg_lo(2) + 4), _jump(_JEQ, 0, 0, 1),
        _stmt(_RET, allow), _stmt(_RET, eperm)])
    # ioctl: no terminal input injection.
    prog += _rule(table["ioctl"], [_stmt(_LD_W_ABS, _arg_lo(1)), _jump(_JEQ, TIOCSTI, 2, 0),
                                   _jump(_JEQ, TIOCLINUX, 1, 0), _stmt(_RET, allow), _stmt(_RET, eperm)])
    for name, flags_arg in (("open", 1), ("openat", 2)):
        if name not in table:
            continue
        if fs_mode == "none":
            prog += _rule(table[name], _ret(eperm))
        else:
            prog += _rule(table[name], [_stmt(_LD_W_ABS, _arg_lo(flags_arg)), _jump(_JSET, OPEN_WRITE_FLAGS, 0, 1),
                                        _stmt(_RET, eperm), _stmt(_RET, allow)])
    prog += _ret(allow)
    return prog


_TEMPLATES: dict[tuple[str, str], tuple[bytes, list[int]]] = {}
_PID_PLACEHOLDER = 0x7FFFFFFF  # above pid_max, so it never equals a real pid or another constant here


def task_filter_bytes(fs_mode: str = "none", pid: int | None = None) -> bytes:
    """build_task_filter() as raw BPF, cached per (fs_mode, arch) and patched with the pid (fast path)."""
    key = (fs_mode, machine())
    if key not in _TEMPLATES:
        prog = build_task_filter(fs_mode, _PID_PLACEHOLDER)
        raw = _assemble(prog)
        offsets = [i * 8 + 4 for i, ins in enumerate(prog) if ins[0] == _JEQ and ins[3] == _PID_PLACEHOLDER]
        _TEMPLATES[key] = (raw, offsets)
    raw, offsets = _TEMPLATES[key]
    buf = bytearray(raw)
    for off in offsets:
        struct.pack_into("=I", buf, off, os.getpid() if pid is None else pid)
    return bytes(buf)


def _assemble(prog: list[tuple]) -> bytes:
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def build_android_sim_filter(arch: str | None = None) -> list[tuple]:
    """Trap (SIGSYS) the calls an Android app's seccomp policy traps; allow everything else."""
    table, audit_arch, _ = _arch(arch)
    prog = [_stmt(_LD_W_ABS, _OFF_ARCH), _jump(_JEQ, audit_arch, 1, 0), _stmt(_RET, RET_KILL_PROCESS),
            _stmt(_LD_W_ABS, _OFF_NR)]
    for name in ANDROID_TRAPPED:
        prog += _rule(table[name], _ret(RET_TRAP))
    return prog + _ret(RET_ALLOW)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = _libc.prctl(option, arg2, arg3, 0, 0)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}) failed: {os.strerror(e)}")
    return rc


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def install(prog: list[tuple] | bytes) -> None:
    """Install a filter on the calling thread (call it while single-threaded, so all threads inherit it)."""
    raw = prog if isinstance(prog, bytes) else _assemble(prog)
    if not raw or len(raw) % 8 or len(raw) // 8 > 4096:
        raise ValueError(f"bad BPF program length ({len(raw)} bytes)")
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p))
    set_no_new_privs()
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def mode() -> int:
    """0 = no seccomp, 2 = filter mode (PR_GET_SECCOMP)."""
    return prctl(PR_GET_SECCOMP)
