"""`tunnel.pull` is generic: the host writes what a named batch service sent (one row per item with
the item's fields, the batch id and the task's constant columns) into the table the task names. Here a
service that has nothing to do with CoDA (its batches hold tunnel `UpRecord`s) is served by a real
gRPC server on 127.0.0.1, and a task in the real sandbox pulls it into its own table."""
from __future__ import annotations

import base64
import json
import zlib

import grpc
import pytest

from walle.device_host.hostapi import HostAPI
from walle.device_host.sample_client import BatchService, item_row, pull_op
from walle.device_host.sandbox import Limits, Sandbox
from walle.device_host.storage import TaskStorage
from walle.platform.server import LoopServer
from walle.protos import coda_pb2, coda_pb2_grpc, tunnel_pb2

RECORDS = BatchService(coda_pb2_grpc.SampleServiceStub, tunnel_pb2.UpRecords)
BATCHES = {f"7.{b}": [tunnel_pb2.UpRecord(seq=10 * b + i, topic=f"topic{b}", ts_ms=1_700_000_000_000 + i,
                                          payload=bytes([b, i, 255])) for i in range(3)] for b in range(4)}

TASK = """from walle import HostAPIError, storage, tunnel

def main(event):
    kw = event.get("kw", {})
    try:
        res = tunnel.pull(service=event.get("service", "records"), table="inbox", max_rows=7, event="got", **kw)
    except HostAPIError as e:
        return {"error": e.kind, "message": str(e)}
    rows = storage.query("inbox", order_by="seq", limit=100) if "inbox" in storage.tables() else []
    return {"res": res, "rows": rows}
"""


class RecordService(coda_pb2_grpc.SampleServiceServicer):
    """The batch protocol of protos/coda.proto serving batches of tunnel records."""

    async def ListBatches(self, request, context):
        return coda_pb2.BatchList(day=7, today=8, pulled_today=0, daily_limit=12,
                                  batches=[coda_pb2.BatchInfo(batch_id=b, count=len(r)) for b, r in BATCHES.items()])

    async def PullBatches(self, request, context):
        for b, recs in list(BATCHES.items())[:request.max_batches]:
            payload = zlib.compress(tunnel_pb2.UpRecords(records=recs).SerializeToString())
            await context.write(coda_pb2.SampleBatch(batch_id=b, day=7, count=len(recs), zlib_samples=payload))


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=1) as sb:
        yield sb


@pytest.fixture
def world(tmp_path, sandbox):
    server = LoopServer(lambda s: coda_pb2_grpc.add_SampleServiceServicer_to_server(RecordService(), s), port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    storage = TaskStorage(tmp_path / "storage.sqlite3")
    emitted = []

    def run(event):
        op = pull_op(storage, "reader", channel, (), lambda name, payload: emitted.append((name, payload)),
                     services={"records": RECORDS})
        api = HostAPI(storage, "reader", extra_ops={"tunnel.pull": op})
        res = sandbox.run({"main.py": TASK}, "main.py", event, limits=Limits(), api_handler=api,
                          allowed_apis=api.allowed_apis())
        assert res.status == "ok", res.error
        return res.value
    try:
        yield run, storage, emitted
    finally:
        channel.close()
        storage.close()
        server.stop(0)


def test_a_non_coda_service_lands_in_the_tasks_table_with_its_own_fields(world):
    run, storage, emitted = world
    got = run({"kw": {"columns": {"state": "unread", "note": None}}})
    res, rows = got["res"], got["rows"]
    # what fits below max_rows=7 with batches of 3: two batches
    assert (res["pulled"], res["rows"], res["batch_ids"], res["day"], res["today"]) == (2, 6, ["7.0", "7.1"], 7, 8)
    assert emitted == [("got", {"day": 7, "batches": ["7.0", "7.1"]})]
    want = [r for b in ("7.0", "7.1") for r in BATCHES[b]]
    assert [r["seq"] for r in rows] == [r.seq for r in want]
    for row, rec, batch in zip(rows, want, ["7.0"] * 3 + ["7.1"] * 3):
        assert row == {"seq": rec.seq, "topic": rec.topic, "ts_ms": rec.ts_ms,
                       "payload": base64.b64encode(rec.payload).decode(), "batch_id": batch, "state": "unread",
                       "note": None}
    assert rows == [item_row(rec, None, {"batch_id": b, "state": "unread", "note": None})
                    for rec, b in zip(want, ["7.0"] * 3 + ["7.1"] * 3)]
    assert storage.count("reader", "inbox") == 6


def test_fields_choose_what_is_kept(world):
    run, _storage, _emitted = world
    rows = run({"kw": {"fields": ["seq", "topic"]}})["rows"]
    assert rows[0] == {"seq": 0, "topic": "topic0", "batch_id": "7.0"}


@pytest.mark.parametrize("kw, kind, words", [
    ({"fields": ["seq", "sample_id"]}, "InvalidArgument", "sample_id"),
    ({"fields": []}, "InvalidArgument", "non-empty list"),
    ({"columns": {"topic": "x"}}, "InvalidArgument", "also a UpRecord field"),
    ({"columns": {"batch_id": "x"}, "fields": ["seq"]}, "InvalidArgument", "written by the host"),
    ({"columns": {"state": [1]}}, "InvalidArgument", "finite scalar"),
    ({"service": "nope"}, "InvalidArgument", "unknown batch service 'nope'"),
])
def test_bad_layouts_are_refused_before_anything_is_stored(world, kw, kind, words):
    run, storage, emitted = world
    event = {"kw": {k: v for k, v in kw.items() if k != "service"}}
    if "service" in kw:
        event["service"] = kw["service"]
    got = run(event)
    assert got["error"] == kind and words in got["message"]
    assert "inbox" not in storage.table_names("reader") and emitted == []


def test_item_rows_keep_lists_and_nested_messages_as_json_text():
    s = coda_pb2.Sample(sample_id="s1", user="u", ts=5, day=2, label=1.0, item_id=2**40, item_cats=[3],
                        hist_items=[2**40, 7], hist_cats=[1, 2], profile=[0.5, -1.25])
    row = item_row(s, None, {"state": "new"})
    assert row["item_id"] == 2**40 and json.loads(row["hist_items"]) == [2**40, 7]  # int64 stays a number
    assert json.loads(row["profile"]) == [0.5, -1.25] and row["user"] == "u" and row["state"] == "new"
    batch = coda_pb2.SampleList(samples=[s])
    nested = item_row(coda_pb2.BehaviorBatch(first_seq=3, logs=[coda_pb2.BehaviorLog(ts=1, item_id=2)]))
    assert json.loads(nested["logs"]) == [{"ts": 1, "item_id": 2}] and nested["first_seq"] == 3
    assert item_row(batch)["samples"].startswith("[{")
    with pytest.raises(ValueError, match="profile"):
        item_row(coda_pb2.Sample(profile=[float("nan")]))
