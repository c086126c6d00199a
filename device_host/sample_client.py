"""The device side of CoDA's sample query (down tunnel): list today's matched batches and pull
them over one server stream; each batch arrives zlib-compressed and is decoded here."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import grpc

from walle.protos import coda_pb2, coda_pb2_grpc

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

    def pull(self, day: int, max_batches: int) -> list[PulledBatch]:
        """The next batches not pulled yet today (resumable), at most `max_batches`. Stops quietly
        at the daily limit (RESOURCE_EXHAUSTED)."""
        out: list[PulledBatch] = []
        if max_batches <= 0:
            return out
        try:
            for b in self.stub.PullBatches(coda_pb2.PullBatchesRequest(day=day, max_batches=max_batches),
                                           metadata=self.metadata, timeout=self.timeout):
                out.append(PulledBatch(b.batch_id, b.day, decode_batch(b), len(b.zlib_samples)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        return out
