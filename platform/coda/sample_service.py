"""The CoDA sample-query gRPC service (paper section 4.2.1 "Sample Query", section 5.2): a device lists
its user's matched-sample batches for a day and pulls them over one server stream, at most
`daily_limit` (12) batches per device per day, each batch sent as zlib(SampleList) in a gRPC `bytes`
field (no base64: the transport is binary). The batches go out as the SampleBatch bytes the daily job
stored (Mappings.batch_messages): one store read per stream, no per-request compression or encoding.

Pulls are resumable: with no batch ids the stream carries the batches this device has not pulled yet.
A batch counts as pulled once the transport has accepted it (`context.write` returned) with the stream
still up. A stream that breaks or is cancelled stops at once: the batch being written and those not
written yet are given back (not counted, not marked), so a later pull gets them; the batch in flight
may be sent again (the client drops it by batch id) rather than lost. The protocol has no client
acknowledgements, so a batch accepted by the transport but still unread in the client's buffers when
it disconnected counts as pulled; a careful client compares ListBatches with the ids it holds and
re-pulls missing ones by id (counted again).

Store writes are per stream, not per batch: the stream reserves its batches from the daily allowance
in one atomic step up front, and records which batches went out (and gives back the rest) when it ends.
Both steps run on the event loop with no await between them and the stream's `finally`, so a
cancellation cannot separate a reservation from its settlement. If the server process dies
mid-stream, that stream's batches stay counted but unmarked: the limit is never exceeded, and a resume
sends them again within what is left of the allowance.

The handlers are coroutines for a grpc.aio server whose interceptor turns the WalleErrors raised here
into statuses (walle.platform.server.ErrorTranslation); store reads and compression run in the
server's thread pool.
"""
from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from typing import Callable

import grpc

from walle.protos import coda_pb2, coda_pb2_grpc

from walle.platform.errors import InvalidArgument, NotFound, ResourceExhausted

from .mappings import Mappings, sample_list_bytes  # noqa: F401 (re-exported)

# The calling device's id from the call's credential; raises Unauthenticated.
Authenticate = Callable[[grpc.aio.ServicerContext], str]


def samples_from_batch(batch: coda_pb2.SampleBatch) -> list[coda_pb2.Sample]:
    """Decode a pulled batch (the device side of the wire format); checks the announced count."""
    samples = list(coda_pb2.SampleList.FromString(zlib.decompress(batch.zlib_samples)).samples)
    if len(samples) != batch.count:
        raise InvalidArgument(f"batch {batch.batch_id!r} announces {batch.count} samples but holds {len(samples)}")
    return samples


class SampleServicer(coda_pb2_grpc.SampleServiceServicer):
    def __init__(self, mappings: Mappings, authenticate: Authenticate,
                 user_for_device: Callable[[str], str | None], today: Callable[[], int] | None = None,
                 daily_limit: int = 12, latest_day: Callable[[], int] | None = None):
        """`today` (a day number) enables the kept-days window and counts the daily limit per calendar
        day; without it the limit is counted per requested day."""
        if daily_limit < 1:
            raise InvalidArgument(f"daily_limit must be >= 1 (got {daily_limit})")
        self.mappings = mappings
        self.authenticate = authenticate
        self.user_for_device = user_for_device
        self.today = today
        self.daily_limit = daily_limit
        self.latest_day = latest_day  # resolves day 0 in ListBatches: the newest prepared day

    # ---- shared checks ------------------------------------------------------------------------

    def _user_and_limit_day(self, device: str, day: int) -> tuple[str, int]:
        """The device's user and the day its pulls count against; raises for an unserved day."""
        if day < 0:
            raise InvalidArgument(f"day must be >= 0 (got {day})")
        user = self.user_for_device(device)
        if not user:
            raise NotFound(f"device {device!r} is not linked to a user")
        limit_day = day
        if self.today is not None:
            limit_day = self.today()
            first = limit_day - self.mappings.keep_days + 1
            if not first <= day <= limit_day:
                raise NotFound(f"day {day} is not served: only days {max(first, 0)}..{limit_day} are kept")
        if not self.mappings.has_day(day):
            raise NotFound(f"no samples were prepared for day {day}")
        return user, limit_day

    # ---- RPCs -----------------------------------------------------------------------------------

    async def ListBatches(self, request: coda_pb2.ListBatchesRequest, context) -> coda_pb2.BatchList:
        return await asyncio.to_thread(self._list, self.authenticate(context), request.day)

    def _list(self, device: str, day: int) -> coda_pb2.BatchList:
        if day == 0 and self.latest_day is not None:  # day 0: the newest prepared day
            day = self.latest_day()
            if day == 0:
                raise NotFound("no day has been prepared yet")
        user, limit_day = self._user_and_limit_day(device, day)
        batches = self.mappings.list_batches(user, day)
        pulled = self.mappings.pulls(device, limit_day)
        return coda_pb2.BatchList(day=day, batches=[coda_pb2.BatchInfo(batch_id=b, count=n) for b, n in batches],
                                  pulled_today=min(pulled, self.daily_limit), daily_limit=self.daily_limit,
                                  today=limit_day)

    def _select(self, device: str, request: coda_pb2.PullBatchesRequest) -> tuple[str, int, list[tuple[str, list[str]]]]:
        """(user, limit day, the batches to send in order); raises before anything is sent or counted."""
        day = request.day
        if request.max_batches < 0:
            raise InvalidArgument(f"max_batches must be >= 0, 0 meaning up to the daily limit (got {request.max_batches})")
        # Checked before anything else looks at the list: no request can cost more than a daily limit.
        if len(request.batch_ids) > self.daily_limit:
            raise InvalidArgument(f"batch_ids lists {len(request.batch_ids)} batches; at most the daily limit "
                                  f"of {self.daily_limit} per request")
        wanted = list(request.batch_ids)
        if any(not b for b in wanted):
            raise InvalidArgument("batch_ids contains an empty batch id")
        repeated = sorted(b for b, n in Counter(wanted).items() if n > 1)
        if repeated:
            raise InvalidArgument(f"batch_ids repeats batch ids {repeated[:10]}")
        if request.max_batches and len(wanted) > request.max_batches:
            raise InvalidArgument(f"batch_ids lists {len(wanted)} batches but max_batches is {request.max_batches}")
        user, limit_day = self._user_and_limit_day(device, day)
        batches = self.mappings.user_batches(user, day)
        allowance = self.daily_limit - self.mappings.pulls(device, limit_day)
        if wanted:
            by_id = dict(batches)
            unknown = [b for b in wanted if b not in by_id]
            if unknown:
                raise NotFound(f"unknown batch ids {unknown[:10]} for day {day}")
            chosen = [(b, by_id[b]) for b in wanted]
        else:
            done = self.mappings.pulled(device, day, [b for b, _ in batches])
            chosen = [(b, ids) for b, ids in batches if b not in done]
            if request.max_batches:
                chosen = chosen[:request.max_batches]
            if allowance > 0:
                chosen = chosen[:allowance]  # "the next batches": as many as the limit still allows
        if chosen and allowance < len(chosen):
            raise ResourceExhausted(self._limit_message(limit_day, len(chosen), allowance))
        return user, limit_day, chosen

    def _limit_message(self, limit_day: int, requested: int, allowance: int) -> str:
        if allowance <= 0:
            return f"daily limit of {self.daily_limit} batches reached for day {limit_day}"
        return (f"requested {requested} batches but only {allowance} of the daily limit of "
                f"{self.daily_limit} remain for day {limit_day}")

    async def PullBatches(self, request: coda_pb2.PullBatchesRequest, context) -> None:
        """Writes serialized SampleBatch messages (registered without a response serializer)."""
        device = self.authenticate(context)
        user, limit_day, chosen = await asyncio.to_thread(self._select, device, request)
        if not chosen:
            return
        # Read before reserving: this await may be cancelled with nothing counted yet.
        payloads = await asyncio.to_thread(self.mappings.batch_messages, user, request.day, chosen)
        day = request.day
        # From the reservation to the `try` below there is no await: a cancellation cannot fall between
        # reserving the allowance and the `finally` that settles it.
        granted = self.mappings.reserve_pulls(device, limit_day, len(chosen), self.daily_limit)
        if granted < len(chosen) and (request.batch_ids or granted == 0):
            # Another stream of this device took the allowance since _select: explicit requests are
            # all or nothing; "the next batches" sends what is left.
            self.mappings.release_pulls(device, limit_day, granted)
            allowance = self.daily_limit - self.mappings.pulls(device, limit_day)
            raise ResourceExhausted(self._limit_message(limit_day, len(chosen), allowance))
        sent: list[str] = []
        try:
            for (batch_id, _ids), payload in zip(chosen[:granted], payloads):
                await context.write(payload)
                # The transport accepted the batch with the stream still up. A cancellation (the client
                # went away) raises at the await instead, leaving that batch and the rest unmarked.
                sent.append(batch_id)
        finally:
            if sent:
                self.mappings.mark_pulled(device, day, sent)
            self.mappings.release_pulls(device, limit_day, granted - len(sent))


def add_to_server(server: grpc.aio.Server, servicer: SampleServicer) -> None:
    """SampleService as generated, except PullBatches writes the stored SampleBatch bytes as they are."""
    from walle.platform.server import generated_handlers, register_handlers
    service, handlers = generated_handlers(coda_pb2_grpc.add_SampleServiceServicer_to_server, servicer)
    pull = handlers["PullBatches"]
    handlers["PullBatches"] = grpc.unary_stream_rpc_method_handler(
        pull.unary_stream, request_deserializer=pull.request_deserializer)
    register_handlers(server, service, handlers)
