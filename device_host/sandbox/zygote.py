"""The zygote: a clean process that pre-imports numpy, MNN and RestrictedPython and forks one fresh child
per task. Started by runner.py with ``python -I -m walle.device_host.sandbox.zygote <ctrl-fd> <profile>``,
a 4-variable environment and only the control socket (AF_UNIX SOCK_SEQPACKET) open.

Control protocol (one JSON object per datagram, host -> zygote -> host):
  {"op": "probe"}                                  -> {"capabilities": {...}}
  {"op": "run", "limits": {...}, "layers": {...}}  + the task socket via SCM_RIGHTS -> {"pid": n}
  {"op": "reap", "pid": n}                          -> {"status": raw wait status, "maxrss_kb": k, "cpu_s": s}
EOF on the control socket: kill every unreaped child and exit.
MNN stays at one thread here: a zygote that ever raised it would hang every forked child (mnn-notes 5).
"""
from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys

MAX_CONTROL = 65536


def _quiet_imports() -> None:
    # MNN prints its CPU banner on C-level fd 1 at import; keep it off whatever fd 1 is.
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        try:
            import MNN  # noqa: F401
        except ImportError:
            pass  # no MNN wheel on this device (e.g. Termux): tasks that import it get a clear ImportError
        import numpy  # noqa: F401

        from . import child, policy, probe  # noqa: F401  (builds the curated namespaces)

        policy.warm_up()
        seccomp_mod = sys.modules[__package__ + ".seccomp"]
        for fs_mode in seccomp_mod.FS_MODES:
            try:
                seccomp_mod.task_filter_bytes(fs_mode)  # assemble once here, patch the pid per child
            except seccomp_mod.UnsupportedArch:
                break
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _send(ctrl: socket.socket, obj: object) -> None:
    ctrl.send(json.dumps(obj).encode())


def _restricted_python_ok() -> bool:
    from .policy import compile_task

    try:
        compile_task("x = ().__class__.__base__.__subclasses__()\n", "<probe>")
    except SyntaxError:
        return True
    return False


def serve(ctrl: socket.socket, profile: str) -> None:
    from . import child, probe

    children: set[int] = set()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(ctrl, MAX_CONTROL, 4)
        except (ConnectionResetError, OSError):
            data, fds = b"", []
        if not data:
            break
        msg = json.loads(data)
        op = msg.get("op")
        if op == "probe":
            caps = probe.run_all(profile)
            caps["restricted_python"] = _restricted_python_ok()
            _send(ctrl, {"capabilities": caps})
        elif op == "run":
            task_fd = fds[0]
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(task_fd)
                _send(ctrl, {"error": f"fork failed: {exc}"})
                continue
            if pid == 0:
                child.main(task_fd, msg)  # never returns
            os.close(task_fd)
            try:
                os.setpgid(pid, pid)  # also done by the child; whoever runs first wins, same result
            except OSError:
                pass
            children.add(pid)
            _send(ctrl, {"pid": pid})
        elif op == "reap":
            pid = int(msg["pid"])
            if pid not in children:
                _send(ctrl, {"error": f"unknown child {pid}"})
                continue
            try:
                os.killpg(pid, signal.SIGKILL)  # always: grandchildren must not outlive the task
            except ProcessLookupError:
                pass
            _, status, ru = os.wait4(pid, 0)
            children.discard(pid)
            _send(ctrl, {"status": status, "maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime})
        elif op == "ping":
            _send(ctrl, {"pong": os.getpid()})
        else:
            _send(ctrl, {"error": f"unknown op {op!r}"})
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def main(argv: list[str]) -> None:
    fd, profile = int(argv[1]), argv[2]
    if "no-mnn" in argv[3:]:
        sys.modules["MNN"] = None  # behave exactly as a device without an MNN wheel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = socket.socket(fileno=fd)
    _quiet_imports()
    if profile == "android_sim":
        from . import seccomp

        seccomp.install(seccomp.build_android_sim_filter())
    # Move every warm object out of the collector's reach: a GC pass in a child would touch (and so
    # copy-on-write) the whole inherited heap.
    gc.collect()
    gc.freeze()
    _send(ctrl, {"ready": os.getpid()})
    serve(ctrl, profile)


if __name__ == "__main__":
    main(sys.argv)
