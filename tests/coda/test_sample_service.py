"""The sample-query service over a real gRPC server on 127.0.0.1, on both store backends:
batching, the 12-a-day limit, 7-day expiry, resumable pulls, payload round trip, authentication."""
from __future__ import annotations

import random
import time
import zlib

import grpc
import pytest

from walle.platform.coda.mappings import Mappings
from walle.platform.errors import Unauthenticated
from walle.platform.server import LoopServer
from walle.platform.coda.sample_service import SampleServicer, add_to_server, sample_list_bytes, samples_from_batch
from walle.protos import coda_pb2, coda_pb2_grpc
from walle.protos.coda_pb2 import Sample


class TokenAuth:
    """A real (small) bearer-token check: `authorization: Bearer <token>` against a dict."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens

    def __call__(self, context) -> str:
        value = dict(context.invocation_metadata()).get("authorization", "")
        token = value[len("Bearer "):] if value.startswith("Bearer ") else ""
        if token not in self.tokens:
            raise Unauthenticated("missing or unknown device token")
        return self.tokens[token]


def make_samples(prefix: str, n: int, day: int) -> list[Sample]:
    return [Sample(sample_id=f"{prefix}{i}", user=f"owner{i % 7}", ts=1_700_000_000 + i, day=day,
                   label=float(i % 2), item_id=10_000 + i, item_cats=[i % 4], hist_items=list(range(i, i + 20)),
                   hist_cats=[1] * 20, profile=[0.1 * i, -0.5]) for i in range(n)]


class Env:
    def __init__(self, kv):
        self.mappings = Mappings(kv)
        self.clock = {"today": None}
        self.devices = {"dev-a": "alice", "dev-b": "bob", "dev-x": None}
        tokens = {"tok-a": "dev-a", "tok-b": "dev-b", "tok-x": "dev-x"}
        today = lambda: self.clock["today"]  # noqa: E731
        self.servicer = SampleServicer(self.mappings, TokenAuth(tokens), self.devices.get, today=None)
        self._today_fn = today
        self.server = LoopServer(lambda s: add_to_server(s, self.servicer), port=0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = coda_pb2_grpc.SampleServiceStub(self.channel)

    def set_today(self, day: int | None) -> None:
        self.clock["today"] = day
        self.servicer.today = None if day is None else self._today_fn

    def list(self, day: int, token: str = "tok-a") -> coda_pb2.BatchList:
        return self.stub.ListBatches(coda_pb2.ListBatchesRequest(day=day), metadata=[("authorization", f"Bearer {token}")])

    def pull(self, day: int, batch_ids=(), max_batches=0, token: str = "tok-a") -> list[coda_pb2.SampleBatch]:
        req = coda_pb2.PullBatchesRequest(day=day, batch_ids=list(batch_ids), max_batches=max_batches)
        return list(self.stub.PullBatches(req, metadata=[("authorization", f"Bearer {token}")]))

    def close(self):
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def env(kv):
    e = Env(kv)
    yield e
    e.close()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_sample_list_bytes_matches_protobuf():
    samples = make_samples("w", 30, 1) + [Sample(sample_id="big", hist_items=list(range(2000)))]
    blobs = [s.SerializeToString() for s in samples]
    assert sample_list_bytes(blobs) == coda_pb2.SampleList(samples=samples).SerializeToString()


def test_unauthenticated_is_refused(env):
    env.mappings.put_day(1, {"alice": make_samples("a", 30, 1)})
    for token in ("", "wrong"):
        md = [("authorization", f"Bearer {token}")] if token else []
        code, _ = code_of(lambda: env.stub.ListBatches(coda_pb2.ListBatchesRequest(day=1), metadata=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: list(env.stub.PullBatches(coda_pb2.PullBatchesRequest(day=1), metadata=md)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert env.mappings.pulls("dev-a", 1) == 0


def test_batches_of_25_merged_up_to_40_and_round_trip(env):
    alice = make_samples("a", 310, 4)   # 11 x 25 + 35
    bob = make_samples("a", 65, 4)      # shares samples with alice: 25 + 40
    env.mappings.put_day(4, {"alice": alice, "bob": bob})
    listing = env.list(4)
    assert [(b.batch_id, b.count) for b in listing.batches] == [(f"4.{i}", 25) for i in range(11)] + [("4.11", 35)]
    assert (listing.day, listing.pulled_today, listing.daily_limit) == (4, 0, 12)
    assert [b.count for b in env.list(4, token="tok-b").batches] == [25, 40]

    got = env.pull(4)
    assert [b.batch_id for b in got] == [f"4.{i}" for i in range(12)]
    assert [s for b in got for s in samples_from_batch(b)] == alice
    assert all(b.day == 4 for b in got)
    # The payload is plain zlib over a SampleList (no base64) and smaller than the raw list.
    raw = coda_pb2.SampleList(samples=alice[:25]).SerializeToString()
    assert zlib.decompress(got[0].zlib_samples) == raw
    assert len(got[0].zlib_samples) < len(raw)
    bob_got = env.pull(4, token="tok-b")
    assert [len(samples_from_batch(b)) for b in bob_got] == [25, 40]
    assert samples_from_batch(bob_got[1]) == bob[25:]


def test_daily_limit_of_12(env):
    env.mappings.put_day(2, {"alice": make_samples("a", 14 * 25, 2)})
    assert len(env.list(2).batches) == 14
    first = env.pull(2, max_batches=5)
    assert [b.batch_id for b in first] == [f"2.{i}" for i in range(5)]
    rest = env.pull(2)                  # the next ones, clamped to the 7 left
    assert [b.batch_id for b in rest] == [f"2.{i}" for i in range(5, 12)]
    assert env.list(2).pulled_today == 12
    code, details = code_of(lambda: env.pull(2))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "daily limit of 12 batches reached for day 2"
    code, _ = code_of(lambda: env.pull(2, batch_ids=["2.0"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert env.mappings.pulls("dev-a", 2) == 12
    # Another device has its own allowance.
    env.devices["dev-b"] = "alice"
    assert len(env.pull(2, token="tok-b")) == 12


def test_explicit_repull_counts_and_bad_requests(env):
    env.mappings.put_day(3, {"alice": make_samples("a", 100, 3)})
    env.pull(3, max_batches=2)
    again = env.pull(3, batch_ids=["3.1", "3.0"])
    assert [b.batch_id for b in again] == ["3.1", "3.0"]
    assert env.list(3).pulled_today == 4
    nxt = env.pull(3)
    assert [b.batch_id for b in nxt] == ["3.2", "3.3"]   # resuming skips what was pulled
    assert env.pull(3) == []                              # nothing left: empty stream, not an error
    assert env.list(3).pulled_today == 6
    cases = [
        (lambda: env.pull(3, batch_ids=["3.9"]), grpc.StatusCode.NOT_FOUND, "3.9"),
        (lambda: env.pull(99), grpc.StatusCode.NOT_FOUND, "day 99"),
        (lambda: env.list(99), grpc.StatusCode.NOT_FOUND, "day 99"),
        (lambda: env.pull(-1), grpc.StatusCode.INVALID_ARGUMENT, "day must be >= 0"),
        (lambda: env.pull(3, max_batches=-2), grpc.StatusCode.INVALID_ARGUMENT, "max_batches"),
        (lambda: env.pull(3, batch_ids=["3.0", "3.0"]), grpc.StatusCode.INVALID_ARGUMENT, "repeats"),
        (lambda: env.pull(3, batch_ids=["3.0", "3.1"], max_batches=1), grpc.StatusCode.INVALID_ARGUMENT, "max_batches"),
        (lambda: env.pull(3, token="tok-x"), grpc.StatusCode.NOT_FOUND, "not linked to a user"),
    ]
    for call, want, text in cases:
        code, details = code_of(call)
        assert code == want and text in details, (code, details)
    assert env.list(3).pulled_today == 6  # refused requests are not counted
    # One unknown id refuses the whole request: nothing is sent or counted.
    code, details = code_of(lambda: env.pull(3, batch_ids=["3.0", "3.1", "3.0x"]))
    assert code == grpc.StatusCode.NOT_FOUND and "3.0x" in details
    assert env.list(3).pulled_today == 6
    got = env.pull(3, batch_ids=["3.0", "3.1", "3.2", "3.3"])
    assert len(got) == 4 and env.list(3).pulled_today == 10
    code, details = code_of(lambda: env.pull(3, batch_ids=["3.0", "3.1", "3.2"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "requested 3 batches but only 2 of the daily limit of 12 remain for day 3"
    assert env.list(3).pulled_today == 10


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def settled_marks(env, day: int, ids: list[str]) -> set[str]:
    """The batches marked as pulled once the cancelled stream has ended on the server (then the
    counted pulls equal the marked batches)."""
    def settled():
        before = env.mappings.pulls("dev-a", day)
        time.sleep(0.1)
        return before == env.mappings.pulls("dev-a", day) == len(env.mappings.pulled("dev-a", day, ids))
    assert _wait_for(settled)
    return env.mappings.pulled("dev-a", day, ids)


def test_resume_after_client_cancels_mid_stream(env):
    # Batches of ~100 KB that do not compress, read over a channel without BDP window growth: HTTP/2
    # flow control (64 KB) keeps the server from handing all 8 to the transport before the client
    # cancels, however slow the machine (small batches could all be "sent" into socket buffers).
    rng = random.Random(5)
    samples = make_samples("r", 8 * 25, 5)
    for s in samples:
        s.hist_items[:] = [rng.randrange(1 << 30) for _ in range(1000)]
        s.hist_cats[:] = [1] * 1000
    env.mappings.put_day(5, {"alice": samples})
    all_ids = [f"5.{i}" for i in range(8)]
    channel = grpc.insecure_channel(f"127.0.0.1:{env.server.port}", options=[("grpc.http2.bdp_probe", 0)])
    stub = coda_pb2_grpc.SampleServiceStub(channel)
    call = stub.PullBatches(coda_pb2.PullBatchesRequest(day=5), metadata=[("authorization", "Bearer tok-a")])
    first = [next(call) for _ in range(3)]
    call.cancel()
    channel.close()
    assert [b.batch_id for b in first] == all_ids[:3]
    marked = settled_marks(env, 5, all_ids)
    assert set(all_ids[:2]) <= marked and len(marked) < 8

    resumed = env.pull(5)
    assert [b.batch_id for b in resumed] == [b for b in all_ids if b not in marked]
    # At most the batch in flight at the cancel (the last one read) is sent again; nothing is skipped
    # unless it was sent in full before the cancel.
    overlap = {b.batch_id for b in first} & {b.batch_id for b in resumed}
    assert overlap <= {first[-1].batch_id}
    got_ids = {b.batch_id for b in first + resumed}
    lost = [b for b in all_ids if b not in got_ids]
    assert set(lost) <= marked
    if lost:
        resumed += env.pull(5, batch_ids=lost)
    assert {b.batch_id for b in first + resumed} == set(all_ids)
    assert env.list(5).pulled_today == len(marked) + len(resumed)
    by_id = {b.batch_id: b for b in first + resumed}
    assert [s for bid in all_ids for s in samples_from_batch(by_id[bid])] == samples
    assert env.list(5).pulled_today == 8 + len(lost)


def test_seven_day_window_and_expiry(env):
    for day in range(3, 11):
        env.mappings.put_day(day, {"alice": make_samples(f"d{day % 2}-", 30, day)})
    env.set_today(9)
    assert [b.batch_id for b in env.list(3).batches] == ["3.0"]
    code, details = code_of(lambda: env.list(2))
    assert code == grpc.StatusCode.NOT_FOUND and "only days 3..9 are kept" in details
    code, _ = code_of(lambda: env.list(10))      # tomorrow's data is not served yet
    assert code == grpc.StatusCode.NOT_FOUND

    env.set_today(10)
    assert env.mappings.expire(10) > 0
    env.set_today(None)                            # no window: the store itself must have dropped day 3
    code, details = code_of(lambda: env.list(3))
    assert code == grpc.StatusCode.NOT_FOUND and "no samples were prepared for day 3" in details
    assert len(env.pull(4)) == 1 and len(env.pull(10)) == 1


def test_limit_counts_per_calendar_day(env):
    for day in (9, 10):
        env.mappings.put_day(day, {"alice": make_samples(f"c{day}-", 8 * 25, day)})
    env.set_today(10)
    assert len(env.pull(9)) == 8
    assert len(env.pull(10)) == 4                  # 12 per calendar day, whatever day's data
    listing = env.list(10)
    assert listing.pulled_today == 12
    code, details = code_of(lambda: env.pull(10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.endswith("for day 10")
    env.set_today(11)
    assert [b.batch_id for b in env.pull(10)] == [f"10.{i}" for i in range(4, 8)]
    assert env.list(10).pulled_today == 4


def big_samples(prefix: str, n: int, day: int) -> list[Sample]:
    """Samples of ~15 KB each that zlib cannot shrink much: a batch of 25 is ~350 KB on the wire."""
    import random
    rng = random.Random(7)
    return [Sample(sample_id=f"{prefix}{i}", user="owner", ts=1_700_000_000 + i, day=day, label=1.0, item_id=i,
                   hist_items=[rng.randrange(1 << 20) for _ in range(5000)]) for i in range(n)]


def test_killed_client_mid_pull_keeps_its_unsent_batches(env):
    samples = big_samples("k", 12 * 25, 6)
    env.mappings.put_day(6, {"alice": samples})
    all_ids = [f"6.{i}" for i in range(12)]
    # No BDP window growth: flow control, not the time a batch takes to prepare (stored batches take
    # none), keeps the server from handing all 12 to the transport before the cancel.
    channel = grpc.insecure_channel(f"127.0.0.1:{env.server.port}", options=[("grpc.http2.bdp_probe", 0)])
    call = coda_pb2_grpc.SampleServiceStub(channel).PullBatches(coda_pb2.PullBatchesRequest(day=6),
                                                                metadata=[("authorization", "Bearer tok-a")])
    first = next(call)
    call.cancel()  # the device is killed after receiving one batch
    channel.close()
    assert first.batch_id == "6.0"
    marked = settled_marks(env, 6, all_ids)
    # Only what the transport took before the cancel counts; flow control holds back the rest.
    assert len(marked) < 12  # before the fix all 12 counted
    assert env.list(6).pulled_today == len(marked)
    resumed = env.pull(6)
    assert [b.batch_id for b in resumed] == [b for b in all_ids if b not in marked]
    assert env.list(6).pulled_today == 12
    by_id = {b.batch_id: b for b in resumed}
    by_id.setdefault(first.batch_id, first)
    lost = [b for b in all_ids if b not in by_id]  # accepted by the transport but never read
    assert set(lost) <= marked
    assert all(samples_from_batch(by_id[b]) == samples[i * 25:(i + 1) * 25]
               for i, b in enumerate(all_ids) if b in by_id)


def test_batch_id_list_is_capped_at_the_daily_limit(env):
    env.mappings.put_day(7, {"alice": make_samples("c", 100, 7)})
    # A request listing 40,001 ids (one repeated) is refused by its length before any other work.
    ids = [f"7.{i}" for i in range(40_000)] + ["7.0"]
    code, details = code_of(lambda: env.pull(7, batch_ids=ids))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "batch_ids lists 40001 batches; at most the daily limit of 12 per request"
    code, details = code_of(lambda: env.pull(7, batch_ids=["7.1", "7.0", "7.1"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "repeats batch ids ['7.1']" in details
    assert env.list(7).pulled_today == 0
    assert len(env.pull(7, batch_ids=["7.0", "7.1", "7.2", "7.3"])) == 4
