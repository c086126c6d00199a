"""When installed tasks run: the triggers in their manifests, and the device's run queue.

Trigger kinds:
  event       the app or a task emits an event whose name equals the trigger's (exact match,
              e.g. "batch_received", "page_view:home").
  table_rows  a storage table reaches `min_rows` rows. Checked after every run and on a timer. It fires
              when the count is >= min_rows and differs from the count it last fired at, so a task that
              does not consume its rows is not re-run in a loop; a task that deletes them re-arms it.
  schedule    every `every_seconds` seconds (the first run one interval after the task is installed).

The queue: ONE FIFO queue per device. A task never runs twice at once. A task that is already queued is
coalesced: it keeps its place and one pending run, which carries the LATEST event. A task that is running
may be queued once more (it runs again after the current run ends). Events a task emits (`events.emit`)
are dispatched after the emitting run has ended, so a task emitting its own trigger event runs again
after itself, never inside itself.

The engine runs the queue on its own worker threads (`start`) or in the caller's thread (`drain`), which
is how a fleet of emulated devices shares one thread pool.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from walle.protos import device_pb2

log = logging.getLogger("walle.device.triggers")


@dataclass
class Pending:
    task: str
    event: dict
    trigger: str


# (task, event, trigger) -> list of (event_name, payload) the run emitted
Runner = Callable[[str, dict, str], list]
RowCounter = Callable[[str, str], int]  # (task, table) -> row count


class TriggerEngine:
    def __init__(self, runner: Runner, count_rows: RowCounter | None = None, *, workers: int = 1,
                 tick: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.count_rows = count_rows
        self.workers = workers
        self.tick = tick
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: OrderedDict[str, Pending] = OrderedDict()  # FIFO of tasks, one pending run each
        self._running: set[str] = set()
        self._by_event: dict[str, list[str]] = {}
        self._tables: dict[str, list[tuple[str, int]]] = {}     # task -> [(table, min_rows)]
        self._schedules: dict[str, float] = {}                  # task -> every_seconds
        self._next_due: dict[str, float] = {}
        self._fired_at: dict[tuple[str, str], int] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.runs = 0

    # -- which task fires on what ---------------------------------------------------------------
    def set_tasks(self, manifests: dict[str, device_pb2.TaskManifest]) -> None:
        """Re-index triggers after an install, drop or rollback; queued runs of removed tasks are dropped."""
        by_event: dict[str, list[str]] = {}
        tables: dict[str, list[tuple[str, int]]] = {}
        schedules: dict[str, float] = {}
        for name, m in sorted(manifests.items()):
            for t in m.triggers:
                if t.kind == "event" and t.event:
                    by_event.setdefault(t.event, []).append(name)
                elif t.kind == "table_rows" and t.table:
                    tables.setdefault(name, []).append((t.table, max(1, int(t.min_rows))))
                elif t.kind == "schedule" and t.every_seconds > 0:
                    schedules[name] = float(t.every_seconds)
        now = self.clock()
        with self._cond:
            self._by_event, self._tables = by_event, tables
            for name, every in schedules.items():
                if self._schedules.get(name) != every:
                    self._next_due[name] = now + every
            self._schedules = schedules
            for name in list(self._next_due):
                if name not in schedules:
                    del self._next_due[name]
            for name in list(self._queue):
                if name not in manifests:
                    del self._queue[name]
            self._cond.notify_all()

    def tasks_for_event(self, event_name: str) -> list[str]:
        with self._cond:
            return list(self._by_event.get(event_name, ()))

    # -- queueing -------------------------------------------------------------------------------
    def enqueue(self, task: str, event: dict, trigger: str) -> None:
        with self._cond:
            # A queued task keeps its place (OrderedDict keeps a key's position) and takes the latest event.
            self._queue[task] = Pending(task, event, trigger)
            self._cond.notify()

    def emit(self, event_name: str, payload: object = None) -> list[str]:
        """Queue every task whose event trigger matches; returns their names."""
        tasks = self.tasks_for_event(event_name)
        for task in tasks:
            self.enqueue(task, {"name": event_name, "payload": payload if payload is not None else {},
                                "ts_ms": int(time.time() * 1000)}, f"event:{event_name}")
        return tasks

    def check_tables(self) -> list[str]:
        """Queue tasks whose table_rows trigger is due; returns their names."""
        if self.count_rows is None:
            return []
        with self._cond:
            tables = dict(self._tables)
        fired = []
        for task, specs in tables.items():
            for table, min_rows in specs:
                try:
                    n = self.count_rows(task, table)
                except Exception as e:  # a missing table simply has no rows yet
                    log.debug("row count %s/%s: %s", task, table, e)
                    continue
                key = (task, table)
                if n < min_rows:
                    self._fired_at.pop(key, None)
                    continue
                if self._fired_at.get(key) == n:
                    continue
                self._fired_at[key] = n
                self.enqueue(task, {"name": "table_rows", "table": table, "rows": n, "min_rows": min_rows},
                             f"table_rows:{table}")
                fired.append(task)
                break
        return fired

    def check_schedules(self) -> list[str]:
        now = self.clock()
        due = []
        with self._cond:
            for task, at in list(self._next_due.items()):
                if now >= at:
                    every = self._schedules[task]
                    # Skip missed intervals instead of bursting after a pause.
                    self._next_due[task] = now + every
                    due.append((task, every))
        for task, every in due:
            self.enqueue(task, {"name": "schedule", "every_seconds": every}, f"schedule:{every:g}s")
        return [t for t, _ in due]

    def pending(self) -> list[str]:
        with self._cond:
            return list(self._queue)

    def running(self) -> set[str]:
        with self._cond:
            return set(self._running)

    # -- running --------------------------------------------------------------------------------
    def _take(self, block: bool) -> Pending | None:
        with self._cond:
            while True:
                for name, p in self._queue.items():
                    if name not in self._running:
                        del self._queue[name]
                        self._running.add(name)
                        return p
                if not block or self._stop.is_set():
                    return None
                self._cond.wait(self.tick)
                if self._stop.is_set():
                    return None

    def _execute(self, p: Pending) -> None:
        emitted: list = []
        try:
            emitted = self.runner(p.task, p.event, p.trigger) or []
        except Exception:
            log.exception("run of %s (%s) failed in the host", p.task, p.trigger)
        finally:
            with self._cond:
                self._running.discard(p.task)
                self.runs += 1
                self._cond.notify_all()
        for name, payload in emitted:  # after the run ended: see the module docstring
            self.emit(name, payload)
        self.check_tables()

    def drain(self, max_runs: int = 10_000) -> int:
        """Run queued tasks in this thread until the queue is empty; returns how many ran."""
        n = 0
        while n < max_runs:
            p = self._take(block=False)
            if p is None:
                break
            self._execute(p)
            n += 1
        return n

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"walle-run-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._timer, name="walle-triggers", daemon=True)
        t.start()
        self._threads.append(t)

    def _worker(self) -> None:
        while not self._stop.is_set():
            p = self._take(block=True)
            if p is not None:
                self._execute(p)

    def _timer(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.check_schedules()
                self.check_tables()
            except Exception:
                log.exception("trigger timer failed")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = []


def event_names(manifests: Iterable[device_pb2.TaskManifest]) -> set[str]:
    return {t.event for m in manifests for t in m.triggers if t.kind == "event"}
