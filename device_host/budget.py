"""Host work is charged to the task: what is left of one run's wall and CPU budget for host API ops.

The sandbox runner makes one Budget per run and runs every host API op of that run on a worker thread
with the budget bound (`current()`). The runner's watchdog ends the run when the deadline passes or when
the child's CPU plus the host CPU spent on its ops exceeds the run's CPU limit, even while an op is still
executing; it then cancels the budget so the op stops at its next check:

  * ops may call `check()` in loops (it raises ResourceExhausted once the run is over);
  * SQLite work is interrupted through `sqlite_progress` (install it with set_progress_handler);
  * an op may declare what it will cost before it starts (`declare_cost`): HostAPI refuses a call whose
    estimate is over what the run has left, instead of starting work it cannot finish.

Python cannot kill a thread: an op that ignores all of this runs on after its run has ended. Such a
lingering op is reniced to 19, and while one of a task's ops lingers, that task's new ops are refused
(`admit_new_op`), so one task never has more than MAX_LINGERING ops of ended runs working in the host.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from walle.protos.errors import ResourceExhausted

_local = threading.local()
MAX_LINGERING = 1  # ops of a task's ended runs still executing in the host
_lingering: dict[str, set[threading.Thread]] = {}
_lingering_lock = threading.Lock()
_CLK_TCK = os.sysconf("SC_CLK_TCK")
WATCH_FROM_S = 0.1  # host CPU for a run after which its child's CPU is watched
WATCH_EVERY_S = 0.05


@dataclass(frozen=True)
class Cost:
    """An op's estimate before it starts: host CPU seconds and bytes of memory it will allocate."""
    cpu_s: float = 0.0
    memory_bytes: int = 0


class Budget:
    def __init__(self, deadline: float, cpu_seconds: float, memory_bytes: int, child_pid: int | None = None):
        self.deadline = deadline  # time.monotonic() value
        self.cpu_seconds = float(cpu_seconds)
        self.memory_bytes = int(memory_bytes)
        self.child_pid = child_pid
        self.host_cpu_s = 0.0  # CPU the host spent on this run's finished ops
        self.reason = ""
        self.cpu_exceeded = False  # the watcher killed the child: task CPU + host CPU reached the limit
        self._cancelled = threading.Event()
        self._kill_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def child_cpu_s(self) -> float:
        """CPU the task process has used so far (0 when it cannot be read)."""
        if self.child_pid is None:
            return 0.0
        try:
            with open(f"/proc/{self.child_pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def charge(self, host_cpu_s: float) -> None:
        """Add CPU the host spent on an op. The child's RLIMIT_CPU cannot be lowered from here (it runs as
        another uid under seccomp), so once the host has spent CPU for the run a watcher kills the child
        when its CPU plus the host's reaches the limit (`cpu_exceeded`)."""
        self.host_cpu_s += host_cpu_s
        if self.child_pid is not None and self.host_cpu_s >= WATCH_FROM_S and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="walle-cpu-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._cancelled.wait(WATCH_EVERY_S):
            with self._kill_lock:  # cancel() takes it too: never signal a child that was already reaped
                if self._cancelled.is_set():
                    return
                if self.cpu_left() <= 0:
                    self.cpu_exceeded = True
                    self._cancel_locked("CPU limit reached")
                    try:
                        os.killpg(self.child_pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    return

    def wall_left(self) -> float:
        return self.deadline - time.monotonic()

    def cpu_left(self, running_op_s: float = 0.0) -> float:
        return self.cpu_seconds - self.host_cpu_s - running_op_s - self.child_cpu_s()

    def cancel(self, reason: str) -> None:
        with self._kill_lock:
            self._cancel_locked(reason)

    def _cancel_locked(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise ResourceExhausted(f"the run is over ({self.reason}); host work for it was stopped")
        if self.wall_left() <= 0:
            self.cancel("wall-clock limit reached")
            raise ResourceExhausted("the run's wall-clock limit was reached during a host API call")

    def admit(self, op: str, cost: Cost) -> None:
        """Refuse an op whose declared cost is over what this run has left."""
        left = self.cpu_left()
        if cost.cpu_s > left:
            raise ResourceExhausted(f"{op} would need about {cost.cpu_s:.1f} s of CPU; this run has {max(left, 0):.1f} s "
                                    f"left of its {self.cpu_seconds:g} s limit (ask for less work per call)")
        wall = self.wall_left()
        if cost.cpu_s > wall:
            raise ResourceExhausted(f"{op} would need about {cost.cpu_s:.1f} s; this run has {max(wall, 0):.1f} s "
                                    f"of wall-clock time left")
        if cost.memory_bytes > self.memory_bytes:
            raise ResourceExhausted(f"{op} would allocate about {cost.memory_bytes >> 20} MiB in the host, over this "
                                    f"run's {self.memory_bytes >> 20} MiB memory limit")


def current() -> Budget | None:
    """The budget of the run whose host op this thread is executing (None outside a run)."""
    return getattr(_local, "budget", None)


def bind(budget: Budget | None) -> None:
    _local.budget = budget


def check() -> None:
    """Call in long host-side loops: raises ResourceExhausted once the calling run is over."""
    b = current()
    if b is not None:
        b.check()


def sqlite_progress() -> int:
    """sqlite3 progress handler: a non-zero return interrupts the statement of a cancelled run."""
    b = current()
    return 1 if b is not None and (b.cancelled or b.wall_left() <= 0) else 0


def declare_cost(fn: Callable, estimate: Callable[..., Cost]) -> Callable:
    """Attach a cost estimate to a host op; `estimate` takes the op's arguments and returns a Cost."""
    fn.walle_cost = estimate  # type: ignore[attr-defined]
    return fn


def cost_of(fn: Callable) -> Callable[..., Cost] | None:
    return getattr(fn, "walle_cost", None)


def linger(owner: str, thread: threading.Thread) -> None:
    """`thread` runs an op of `owner` whose run has ended: deprioritise it and count it against `owner`."""
    try:
        os.setpriority(os.PRIO_PROCESS, thread.native_id, 19)  # Linux: a thread id renices that thread only
    except (OSError, TypeError):
        pass
    with _lingering_lock:
        _lingering.setdefault(owner, set()).add(thread)


def admit_new_op(owner: str) -> None:
    """Refuse a new op of `owner` while MAX_LINGERING of its ops from ended runs are still executing."""
    with _lingering_lock:
        alive = {t for t in _lingering.get(owner, ()) if t.is_alive()}
        if alive:
            _lingering[owner] = alive
        else:
            _lingering.pop(owner, None)
    if len(alive) >= MAX_LINGERING:
        raise ResourceExhausted(f"the host is still finishing {len(alive)} host API call(s) of an earlier run of "
                                f"{owner!r} that overran its budget; try again later")
