"""The device side of batch services (down tunnel): list a day's batches and pull them over one
server stream; each batch arrives zlib-compressed and is decoded here.

`pull_op` is the host API op `tunnel.pull(service, table, ...)`: a task pulls batches from a named
batch service through the device's own authenticated connection into one of its tables, and the host
fires an event. The host knows a service only by its wire contract (BATCH_SERVICES: the gRPC stub of
the batch protocol and the message a batch payload holds) and writes what the service sent,
generically: one row per item with the item's fields (scalars as they are; lists, maps and nested
messages as compact JSON text; bytes as base64), the `batch_id`, and the constant columns the task
asked for (its own bookkeeping, e.g. a state). What the rows mean is the task's business: its
library decodes them."""
from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from walle.protos import coda_pb2, coda_pb2_grpc
from walle.protos.errors import FailedPrecondition, InvalidArgument, Unavailable

MAX_BATCH_BYTES = 4 << 20  # decompressed
MAX_ROWS_LIMIT = 100_000
MAX_EXTRA_COLUMNS = 16
BATCH_COLUMN = "batch_id"
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class BatchService:
    """A batch service's wire contract: a stub with ListBatches / PullBatches (the batch protocol of
    protos/coda.proto) and `items`, the message a batch payload decodes to, whose one repeated
    message field holds the items."""
    stub: Callable[[grpc.Channel], Any]
    items: type[Message]

    @property
    def item_field(self) -> FieldDescriptor:
        fields = [f for f in self.items.DESCRIPTOR.fields if f.is_repeated and f.message_type is not None]
        if len(fields) != 1:
            raise TypeError(f"{self.items.DESCRIPTOR.full_name} must have exactly one repeated message field")
        return fields[0]


# service name -> wire contract (the only per-service knowledge of the host)
BATCH_SERVICES: dict[str, BatchService] = {
    "samples": BatchService(coda_pb2_grpc.SampleServiceStub, coda_pb2.SampleList),
}


@dataclass
class PulledBatch:
    batch_id: str
    day: int
    items: list[Message]
    wire_bytes: int  # compressed payload size: what the download cost


def decode_batch(batch: coda_pb2.SampleBatch, service: BatchService) -> list[Message]:
    d = zlib.decompressobj()
    raw = d.decompress(batch.zlib_samples, MAX_BATCH_BYTES + 1)
    if len(raw) > MAX_BATCH_BYTES or d.unconsumed_tail:
        raise ValueError(f"batch {batch.batch_id} decompresses to more than {MAX_BATCH_BYTES} bytes")
    try:
        items = list(getattr(service.items.FromString(raw), service.item_field.name))
    except DecodeError as e:
        raise ValueError(f"batch {batch.batch_id} is not a {service.items.DESCRIPTOR.name}: {e}") from None
    if len(items) != batch.count:
        raise ValueError(f"batch {batch.batch_id} says {batch.count} items but holds {len(items)}")
    return items


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _one(value: Any, field: FieldDescriptor) -> Any:
    """One element as a JSON value: messages as objects of their set fields, bytes as base64, numbers
    (int64 too) as numbers."""
    if field.message_type is not None:
        return {f.name: _json_value(value, f) for f, _v in value.ListFields()}
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def _json_value(msg: Message, field: FieldDescriptor) -> Any:
    value = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        vfield = field.message_type.fields_by_name["value"]
        return {str(k): _one(v, vfield) for k, v in value.items()}
    if field.is_repeated:
        return [_one(v, field) for v in value]
    return _one(value, field)


def _column(msg: Message, field: FieldDescriptor) -> Any:
    """A stored column: scalars as they are; lists, maps and messages as compact JSON text (an unset
    message is null)."""
    if field.is_repeated or field.message_type is not None:
        if not field.is_repeated and not msg.HasField(field.name):
            return None
        return _json_text(_json_value(msg, field))
    return _one(getattr(msg, field.name), field)


def item_row(item: Message, fields: list[str] | tuple[str, ...] | None = None,
             columns: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The table row of one item: its `fields` (all when None) and the constant `columns`.
    Raises ValueError for a value storage cannot hold (NaN, infinity)."""
    desc = item.DESCRIPTOR
    row: dict[str, Any] = {}
    for name in fields if fields is not None else [f.name for f in desc.fields]:
        try:
            row[name] = _column(item, desc.fields_by_name[name])
        except ValueError:
            raise ValueError(f"{desc.name} field {name!r} holds NaN or infinity") from None
        if isinstance(row[name], float) and not math.isfinite(row[name]):
            raise ValueError(f"{desc.name} field {name!r} holds NaN or infinity")
    row.update(columns or {})
    return row


def check_layout(service: BatchService, fields: Any, columns: Any) -> tuple[list[str] | None, dict[str, Any]]:
    """The task's `fields` (a subset of the item's fields) and constant `columns`, checked: a clear
    error names the bad name or value."""
    desc = service.item_field.message_type
    known = [f.name for f in desc.fields]
    if fields is not None:
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
            raise InvalidArgument(f"fields must be a non-empty list of {desc.name} field names, got {fields!r}")
        unknown = [f for f in fields if f not in known]
        if unknown or len(set(fields)) != len(fields):
            raise InvalidArgument(f"fields {unknown or fields} are not distinct {desc.name} fields "
                                  f"(known: {', '.join(known)})")
    stored = fields if fields is not None else known
    columns = {} if columns is None else columns
    if not isinstance(columns, dict) or len(columns) > MAX_EXTRA_COLUMNS:
        raise InvalidArgument(f"columns must be an object of at most {MAX_EXTRA_COLUMNS} column -> value, "
                              f"got {columns!r}")
    for key, value in columns.items():
        if not isinstance(value, _SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidArgument(f"columns[{key!r}] must be a finite scalar (str, int, float, bool, null), got {value!r}")
    for key in [BATCH_COLUMN, *columns]:
        if key in stored:
            raise InvalidArgument(f"column {key!r} is also a {desc.name} field: leave the field out with fields=[...]")
    if BATCH_COLUMN in columns:
        raise InvalidArgument(f"column {BATCH_COLUMN!r} is written by the host")
    return (list(fields) if fields is not None else None), dict(columns)


class BatchClient:
    def __init__(self, service: BatchService, channel: grpc.Channel, metadata: tuple, timeout: float = 30.0):
        self.service = service
        self.stub = service.stub(channel)
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
                out.append(PulledBatch(b.batch_id, b.day, decode_batch(b, self.service), len(b.zlib_samples)))
                if on_batch is not None:
                    on_batch(out[-1])
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        return out


def pull_op(storage, namespace: str, channel: grpc.Channel, metadata: tuple, emit: Callable[[str, Any], object],
            services: Mapping[str, BatchService] = BATCH_SERVICES) -> Callable[..., dict]:
    """`tunnel.pull(service, table, max_rows=200, event="batch_received", day=0, fields=None, columns=None)`.

    Pulls the next batches of `day` (0: the newest day the cloud prepared) not pulled yet, as many as
    fit `table` below `max_rows` rows and today's allowance, stores each batch's items as rows in one
    write (`fields`: which of the item's fields to keep, all when None; `columns`: constant columns
    added to every row), then emits `event` with {"day", "batches"} (when any arrived). Returns what
    happened: service, day, today (the cloud's work-cycle day), pulled (batches), rows, batch_ids,
    bytes, pulled_today, daily_limit, exhausted (nothing more to pull today) and reason."""

    def pull(service: str, table: str, max_rows: int = 200, event: str = "batch_received", day: int = 0,
             fields: list | None = None, columns: dict | None = None) -> dict:
        spec = services.get(service) if isinstance(service, str) else None
        if spec is None:
            raise InvalidArgument(f"unknown batch service {service!r} (known: {', '.join(sorted(services))})")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS_LIMIT:
            raise InvalidArgument(f"max_rows must be an int in [1, {MAX_ROWS_LIMIT}], got {max_rows!r}")
        if isinstance(day, bool) or not isinstance(day, int) or day < 0:
            raise InvalidArgument(f"day must be an int >= 0 (0: the newest prepared day), got {day!r}")
        if not isinstance(event, str):
            raise InvalidArgument(f"event must be an event name ('' for none), got {event!r}")
        keep, extra = check_layout(spec, fields, columns)
        if channel is None:
            raise FailedPrecondition("tunnel.pull needs a connection to a platform; a local run (walle task run) has none")
        client = BatchClient(spec, channel, metadata)
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
            try:
                rows = [item_row(item, keep, {BATCH_COLUMN: b.batch_id, **extra}) for item in b.items]
            except ValueError as e:
                raise InvalidArgument(f"tunnel.pull({service!r}): batch {b.batch_id}: {e}") from None
            if rows:
                out["rows"] += storage.insert(namespace, table, rows)
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
