"""The device side of the sample query (down tunnel): list today's matched batches and pull them over
one server stream; each batch arrives zlib-compressed and is decoded here.

`pull_op` is the host API op `tunnel.pull(service, table, ...)`: a task pulls batches from a named
batch service through the device's own authenticated connection into one of its tables and the host
fires an event. The host knows services only by name (BATCH_SERVICES) and how to turn a batch into
rows; what the rows mean is the task's business."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from walle.protos import coda_pb2, coda_pb2_grpc
from walle.protos.errors import FailedPrecondition, InvalidArgument, Unavailable

from .coda_rows import sample_to_row

MAX_BATCH_BYTES = 4 << 20  # decompressed; a batch holds at most 40 samples


@dataclass
class PulledBatch:
    batch_id: str
    day: int
    samples: list[coda_pb2.Sample]
    wire_bytes: int  # compressed payload size: what the download cost


def decode_batch(batch: coda_pb2.SampleBatch) -> list[coda_pb2.Sample]:
    d = zlib.decompressobj()
    raw = d.decompress(batch.zlib_samples, MAX_BATCH_BYTES + 1)
    if len(raw) > MAX_BATCH_BYTES or d.unconsumed_tail:
        raise ValueError(f"batch {batch.batch_id} decompresses to more than {MAX_BATCH_BYTES} bytes")
    samples = list(coda_pb2.SampleList.FromString(raw).samples)
    if len(samples) != batch.count:
        raise ValueError(f"batch {batch.batch_id} says {batch.count} samples but holds {len(samples)}")
    return samples


class SampleClient:
    def __init__(self, channel: grpc.Channel, metadata: tuple, timeout: float = 30.0):
        self.stub = coda_pb2_grpc.SampleServiceStub(channel)
        self.metadata = metadata
        self.timeout = timeout

    def list_batches(self, day: int) -> coda_pb2.BatchList:
        return self.stub.ListBatches(coda_pb2.ListBatchesRequest(day=day), metadata=self.metadata, timeout=self.timeout)

    def pull(self, day: int, max_batches: int,
             on_batch: Callable[[PulledBatch], object] | None = None) -> list[PulledBatch]:
        """The next batches not pulled yet today (resumable), at most `max_batches`. Stops quietly
        at the daily limit (RESOURCE_EXHAUSTED). `on_batch` stores each batch as it arrives, so a
        stream that breaks later loses none of the batches already counted."""
        out: list[PulledBatch] = []
        if max_batches <= 0:
            return out
        try:
            for b in self.stub.PullBatches(coda_pb2.PullBatchesRequest(day=day, max_batches=max_batches),
                                           metadata=self.metadata, timeout=self.timeout):
                out.append(PulledBatch(b.batch_id, b.day, decode_batch(b), len(b.zlib_samples)))
                if on_batch is not None:
                    on_batch(out[-1])
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        return out


# service name -> how a batch becomes table rows (the only per-service knowledge of the host)
BATCH_SERVICES: dict[str, Callable[[PulledBatch], list[dict]]] = {
    "samples": lambda b: [sample_to_row(s, batch_id=b.batch_id, state="new", score=None) for s in b.samples],
}
MAX_ROWS_LIMIT = 100_000


def pull_op(storage, namespace: str, channel: grpc.Channel, metadata: tuple,
            emit: Callable[[str, Any], object]) -> Callable[..., dict]:
    """`tunnel.pull(service, table, max_rows=200, event="batch_received", day=0)`.

    Pulls the next batches of `day` (0: the newest day the cloud prepared) not pulled yet, as many as
    fit `table` below `max_rows` rows and today's allowance, stores each batch's rows in one write,
    then emits `event` with {"day", "batches"} (when any arrived). Returns what happened: service,
    day, today (the cloud's work-cycle day), pulled (batches), rows, batch_ids, bytes, pulled_today,
    daily_limit, exhausted (nothing more to pull today) and reason."""

    def pull(service: str, table: str, max_rows: int = 200, event: str = "batch_received", day: int = 0) -> dict:
        to_rows = BATCH_SERVICES.get(service)
        if to_rows is None:
            raise InvalidArgument(f"unknown batch service {service!r} (known: {', '.join(sorted(BATCH_SERVICES))})")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise InvalidArgument(f"max_rows must be an int in [1, {MAX_ROWS_LIMIT}], got {max_rows!r}")
        if isinstance(day, bool) or not isinstance(day, int) or day < 0:
            raise InvalidArgument(f"day must be an int >= 0 (0: the newest prepared day), got {day!r}")
        if not isinstance(event, str):
            raise InvalidArgument(f"event must be an event name ('' for none), got {event!r}")
        if channel is None:
            raise FailedPrecondition("tunnel.pull needs a connection to a platform; a local run (walle task run) has none")
        client = SampleClient(channel, metadata)
        out = {"service": service, "day": day, "today": 0, "pulled": 0, "rows": 0, "batch_ids": [], "bytes": 0,
               "pulled_today": 0, "daily_limit": 0, "exhausted": False, "reason": ""}
        try:
            listing = client.list_batches(day)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                out.update(exhausted=True, reason=e.details() or "nothing prepared")
                return out
            raise Unavailable(f"tunnel.pull({service!r}): {e.code().name}: {e.details()}") from None
        out.update(day=listing.day, today=listing.today, pulled_today=listing.pulled_today,
                   daily_limit=listing.daily_limit)
        allowance = listing.daily_limit - listing.pulled_today
        have = storage.count(namespace, table) if table in storage.table_names(namespace) else 0
        biggest = max((b.count for b in listing.batches), default=1)
        fits = max(0, max_rows - have) // max(biggest, 1)
        wanted = min(allowance, fits, len(listing.batches))
        if allowance <= 0 or not listing.batches:
            out.update(exhausted=True, reason="daily limit reached" if listing.batches else "no batches for this day")
            return out
        if wanted <= 0:
            out["reason"] = f"table {table!r} is full ({have} of {max_rows} rows)"
            return out
        def store(b: PulledBatch) -> None:
            out["rows"] += storage.insert(namespace, table, to_rows(b))
            out["batch_ids"].append(b.batch_id)
            out["bytes"] += b.wire_bytes

        try:
            batches = client.pull(listing.day, wanted, on_batch=store)
        except grpc.RpcError as e:
            if out["batch_ids"] and event:  # what arrived is stored: let the filter see it
                emit(event, {"day": listing.day, "batches": out["batch_ids"]})
            raise Unavailable(f"tunnel.pull({service!r}): {e.code().name}: {e.details()} "
                              f"(after {len(out['batch_ids'])} batches)") from None
        out["pulled"] = len(batches)
        out["pulled_today"] = listing.pulled_today + len(batches)
        if len(batches) < wanted or out["pulled_today"] >= listing.daily_limit:
            out.update(exhausted=True, reason="daily limit reached" if out["pulled_today"] >= listing.daily_limit
                       else "no more batches for this day")
        if batches and event:
            emit(event, {"day": listing.day, "batches": out["batch_ids"]})
        return out

    return pull
