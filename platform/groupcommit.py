"""Group commit: writes that arrive while another is being committed share the next transaction.

Callers block in `submit` until THEIR write has committed (or failed), so nothing is acknowledged
before it is durable. The first caller to find no commit under way leads: it takes everything queued
(its own write included), commits it as one batch through `write_many`, hands the lead to the oldest
write still waiting, and returns. A database round trip and a COMMIT per batch instead of per write
is what lets thousands of devices report at once.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class _Pending:
    __slots__ = ("item", "done", "lead", "result", "error")

    def __init__(self, item) -> None:
        self.item = item
        self.done = threading.Event()  # set when the result is in, or when this waiter must lead
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    def __init__(self, write_many: Callable[[list[T]], list], max_batch: int = 256):
        """`write_many(items)` commits the items in one transaction and returns one entry per item:
        its result, or an exception instance that refused that item alone. If it raises, every
        item of the batch gets that exception (nothing of the batch was committed)."""
        self._write_many = write_many
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leading = False
        self.batches = 0  # committed batches (for tests and benchmarks)
        self.items = 0

    def submit(self, item: T):
        """Commit `item` (with whatever else is queued); returns its result or raises its error."""
        me = _Pending(item)
        with self._lock:
            self._queue.append(me)
            me.lead = not self._leading
            self._leading = True
        if not me.lead:
            me.done.wait()  # woken with a result, or to lead
        if me.lead:
            self._lead()
        if me.error is not None:
            raise me.error
        return me.result

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        try:
            results = self._write_many([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"write_many returned {len(results)} results for {len(batch)} items")
        except BaseException as e:
            results = [e] * len(batch)
        self.batches += 1
        self.items += len(batch)
        with self._lock:  # pass the lead on before waking anyone: a waiter that wakes is done
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True
                nxt.done.set()
            else:
                self._leading = False
        for p, r in zip(batch, results):
            if isinstance(r, BaseException):
                p.error = r
            else:
                p.result = r
            p.lead = False
            p.done.set()
