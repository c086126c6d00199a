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

Trigger loops are stopped (a task emitting its own trigger event would otherwise run forever):
  * chain depth: an event emitted by a run triggered at depth d triggers runs at depth d + 1; runs past
    MAX_CHAIN_DEPTH are not queued;
  * rate limit: each task's runs that tasks can keep going by themselves (events emitted by runs, and
    table_rows) draw from a token bucket (RATE_BURST runs, refilled at RATE_PER_S); a run due with no
    token left is dropped. Runs of app events and schedules are not limited: the app sets their pace.
Each stop is reported through `on_refused(task, trigger, reason)` (the host sends a "refused" run report),
once per chain and once per rate-limited stretch, not once per dropped run.

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

MAX_CHAIN_DEPTH = 16  # runs one app event may set off through events the runs emit
RATE_BURST = 30  # triggered runs a task may make in a burst...
RATE_PER_S = 1.0  # ...and per second after it


@dataclass
class Pending:
    task: str
    event: dict
    trigger: str
    depth: int = 0


class _Bucket:
    def __init__(self, now: float):
        self.tokens, self.at, self.dropped = float(RATE_BURST), now, 0

    def take(self, now: float) -> bool:
        self.tokens = min(float(RATE_BURST), self.tokens + (now - self.at) * RATE_PER_S)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


# (task, event, trigger) -> list of (event_name, payload) the run emitted
Runner = Callable[[str, dict, str], list]
RowCounter = Callable[[str, str], int]  # (task, table) -> row count
Refused = Callable[[str, str, str], None]  # (task, trigger, reason): a triggered run was stopped


class TriggerEngine:
    def __init__(self, runner: Runner, count_rows: RowCounter | None = None, *, workers: int = 1,
                 tick: float = 0.5, clock: Callable[[], float] = time.monotonic, on_refused: Refused | None = None):
        self.runner = runner
        self.on_refused = on_refused
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
        self._buckets: dict[str, _Bucket] = {}
        self.runs = 0
        self.refused = 0

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
    def enqueue(self, task: str, event: dict, trigger: str, depth: int = 0) -> None:
        with self._cond:
            # A queued task keeps its place (OrderedDict keeps a key's position) and takes the latest event.
            self._queue[task] = Pending(task, event, trigger, depth)
            self._cond.notify()

    def emit(self, event_name: str, payload: object = None, depth: int = 0) -> list[str]:
        """Queue every task whose event trigger matches; returns their names. `depth`: how many runs
        led to this event (0 for an app event); past MAX_CHAIN_DEPTH nothing is queued."""
        tasks = self.tasks_for_event(event_name)
        if depth > MAX_CHAIN_DEPTH:
            for task in tasks:
                self._refuse(task, f"event:{event_name}", (
                    f"trigger loop stopped: event {event_name!r} is {depth} runs deep in one chain of events "
                    f"(limit {MAX_CHAIN_DEPTH}); a task that emits the event that triggers it loops"))
            return []
        for task in tasks:
            self.enqueue(task, {"name": event_name, "payload": payload if payload is not None else {},
                                "ts_ms": int(time.time() * 1000)}, f"event:{event_name}", depth)
        return tasks

    def _refuse(self, task: str, trigger: str, reason: str) -> None:
        with self._cond:
            self.refused += 1
        log.warning("%s (%s): %s", task, trigger, reason)
        if self.on_refused is not None:
            try:
                self.on_refused(task, trigger, reason)
            except Exception:
                log.exception("reporting the stopped run of %s failed", task)

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
        while True:
            p, limited = self._next(block)
            if p is None or limited is None:
                return p
            self._refuse(p.task, p.trigger, limited)

    def _next(self, block: bool) -> tuple[Pending | None, str | None]:
        """The next runnable pending run, or one dropped by the rate limit with the reason to report."""
        with self._cond:
            while True:
                for name, p in self._queue.items():
                    if name not in self._running:
                        del self._queue[name]
                        bucket = self._buckets.setdefault(name, _Bucket(self.clock()))
                        if (p.depth > 0 or p.trigger.startswith("table_rows:")) and not bucket.take(self.clock()):
                            bucket.dropped += 1
                            if bucket.dropped == 1:  # once per rate-limited stretch
                                return p, (f"trigger rate limit: {name} was triggered more than {RATE_BURST} times "
                                           f"in a burst (refill {RATE_PER_S:g} per second); triggered runs are "
                                           f"dropped until the rate falls")
                            self.refused += 1
                            break
                        bucket.dropped = 0
                        self._running.add(name)
                        return p, None
                else:
                    if not block or self._stop.is_set():
                        return None, None
                    self._cond.wait(self.tick)
                    if self._stop.is_set():
                        return None, None

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
            self.emit(name, payload, p.depth + 1)
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
