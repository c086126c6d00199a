"""The cloud keeps its own time and catalog: a served platform across three work-cycle days (the day
is state in the KV store, closed by a separate `walle cloud pipeline` process or in-process), uploads
stamped with the day they arrived, pulls served and the 12-a-day limit counted per day; a catalog that
is not MovieLens, loaded as data and published to devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib

import grpc
import numpy as np
import pandas as pd
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.coda import catalog
from walle.platform.coda.cloud import BEHAVIOR_BATCH_TOPIC, CodaCloud
from walle.platform.coda.sample_service import samples_from_batch
from walle.platform.errors import FailedPrecondition, InvalidArgument
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, coda_pb2, coda_pb2_grpc, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

N_USERS = 24
SHELVES = ["fiction", "poetry", "history", "science", "travel", "cooking"]


def books_catalog(n_items: int = 300) -> pd.DataFrame:
    """A small book shop: two shelves per book, a price and a year (no MovieLens anywhere)."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(1, n_items + 1):
        a, b = rng.choice(len(SHELVES), size=2, replace=False)
        rows.append({"item_id": 1000 + i, "categories": f"{SHELVES[a]}|{SHELVES[b]}",
                     "title": f"Book {i}", "price": float(rng.integers(5, 60)), "year": int(rng.integers(1900, 2024))})
    return pd.DataFrame(rows)


def behaviour(user: int, day: int, n: int = 60) -> list[coda_pb2.BehaviorLog]:
    """User `user` mostly reads two shelves (a taste the matching can find), clicks some of what it views."""
    rng = np.random.default_rng(user * 100 + day)
    base = 1_700_000_000 + day * 86_400
    out = []
    for j in range(n):
        item = 1001 + int(rng.integers(0, 300)) if j % 3 else 1001 + (user % 6) * 50 + int(rng.integers(0, 50))
        out.append(coda_pb2.BehaviorLog(ts=base + j * 60, item_id=item, event="click" if j % 4 == 0 else "view",
                                        value=1.0))
    return out


def upload_batch(channel, md, first_seq: int, logs, tunnel_seq: int) -> tunnel_pb2.UploadAck:
    """The device's aggregated, compressed behaviour: one tunnel record holding zlib(BehaviorBatch)."""
    payload = zlib.compress(coda_pb2.BehaviorBatch(first_seq=first_seq, logs=logs).SerializeToString())
    recs = tunnel_pb2.UpRecords(records=[tunnel_pb2.UpRecord(seq=tunnel_seq, topic=BEHAVIOR_BATCH_TOPIC,
                                                             payload=payload)])
    batch = tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=1)
    return tunnel_pb2_grpc.TunnelServiceStub(channel).Upload(iter([batch]), metadata=md, timeout=30)


@pytest.fixture
def served(tmp_path):
    platform = Platform(tmp_path / "platform")
    coda = CodaCloud(platform, k=8)
    doc, ref = coda.load_catalog(books_catalog())
    _server, port, stop = build_server(platform, port=0, extra=coda.add_services)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    mds = {}
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    for u in range(N_USERS):
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=f"phone-{u}", user_id=f"reader{u}")).token
        mds[u] = bearer_metadata(token)  # the user is bound at enrollment
        stub.GetActiveTasks(device_pb2.DeviceInfo(user_id=f"reader{u}"), metadata=mds[u], timeout=10)
    yield platform, coda, channel, mds, tmp_path / "platform"
    channel.close()
    stop(0)


def _pipeline_process(data_dir, *args) -> dict:
    """`walle cloud pipeline` as a separate process on the same data folder and KV store."""
    env = dict(os.environ, WALLE_DATA_DIR=str(data_dir))
    out = subprocess.run([sys.executable, "-m", "walle.platform.cli", "--data-dir", str(data_dir), "cloud", "pipeline",
                          "--k", "8", "--json", *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_three_days_served(served):
    platform, coda, channel, mds, data_dir = served
    samples = coda_pb2_grpc.SampleServiceStub(channel)
    assert coda.today == 1 and coda.prepared_day == 0
    with pytest.raises(grpc.RpcError) as e:  # nothing prepared yet: day 0 ("the newest") is not found
        samples.ListBatches(coda_pb2.ListBatchesRequest(day=0), metadata=mds[0], timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    pulled_ids = {}
    for day in (1, 2, 3):
        for u in range(N_USERS):
            ack = upload_batch(channel, mds[u], first_seq=day * 1000, logs=behaviour(u, day), tunnel_seq=day)
            assert ack.accepted == 60
        again = upload_batch(channel, mds[0], first_seq=day * 1000, logs=behaviour(0, day), tunnel_seq=day)
        assert again.accepted == 0 and again.duplicates == 60  # a re-sent batch stores nothing twice
        raw = coda.raw.frame()
        assert sorted(raw["day"].unique()) == list(range(1, day + 1))  # stamped with the day they arrived in
        assert (raw[raw["day"] == day]["seq"] >= day * 1000).all()

        if day < 3:
            if day == 1:
                summary = _pipeline_process(data_dir)  # a separate process closes day 1
                assert summary["day"] == 1 and summary["today"] == 2 and summary["batches"] > 0
                # few users: exact search, checked on a sample (an exact tie may order two users either way)
                assert summary["matching_recall"] > 0.99
            else:
                result = coda.close_day()
                assert result.day == 2 and result.batches > 0
            assert coda.today == day + 1 and coda.prepared_day == day

            # today is day+1: devices pull the newest prepared day, counted against today
            listing = samples.ListBatches(coda_pb2.ListBatchesRequest(day=0), metadata=mds[0], timeout=10)
            assert listing.day == day and listing.today == day + 1 and listing.pulled_today == 0
            assert len(listing.batches) >= 12
            got = list(samples.PullBatches(coda_pb2.PullBatchesRequest(day=day, max_batches=8), metadata=mds[0]))
            got += list(samples.PullBatches(coda_pb2.PullBatchesRequest(day=day), metadata=mds[0]))  # resumes
            assert len(got) == 12 and len({b.batch_id for b in got}) == 12
            assert all(s.day == day for b in got for s in samples_from_batch(b))
            pulled_ids[day] = {b.batch_id for b in got}
            with pytest.raises(grpc.RpcError) as e:  # the 13th batch of today
                list(samples.PullBatches(coda_pb2.PullBatchesRequest(day=day, batch_ids=[listing.batches[-1].batch_id]),
                                         metadata=mds[0]))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"day {day + 1}" in e.value.details()
            # another device has its own allowance
            other = list(samples.PullBatches(coda_pb2.PullBatchesRequest(day=day, max_batches=3), metadata=mds[1]))
            assert len(other) == 3
    # day 3: yesterday's (day 2) limit does not carry over; day 1 is still kept and servable
    listing = samples.ListBatches(coda_pb2.ListBatchesRequest(day=0), metadata=mds[0], timeout=10)
    assert listing.day == 2 and listing.today == 3
    assert coda.raw.frame()["day"].max() == 3


def test_a_day_is_closed_by_one_process_at_a_time(served):
    _platform, coda, *_ = served
    coda.store.incr(b"meta:closing:1")  # another process is closing day 1
    with pytest.raises(FailedPrecondition, match="being closed by another process"):
        coda.close_day()
    assert coda.today == 1
    coda.close_day(force=True)
    assert coda.today == 2 and coda.store.get(b"meta:closing:1") is None


def test_served_clock_advances_days(served):
    """`platform serve --coda-day-seconds N`: the pipeline runs on a schedule."""
    _platform, coda, channel, mds, _ = served
    upload_batch(channel, mds[0], first_seq=1, logs=behaviour(0, 1), tunnel_seq=1)
    stop_clock = coda.start_clock(0.2)
    try:
        deadline = time.monotonic() + 120
        while coda.today < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_clock()
    assert coda.today >= 4 and coda.prepared_day == coda.today - 1
    frozen = coda.today
    time.sleep(0.5)
    assert coda.today == frozen  # stopped


def test_catalog_not_movielens(served, tmp_path):
    platform, coda, channel, mds, _ = served
    info = platform.resource(catalog.RESOURCE)
    doc = json.loads(platform.blob(info.digest))
    assert info.version == "v1" and doc["categories"] == sorted(doc["categories"], key=doc["categories"].index)
    assert len(doc["items"]) == 300 and set(doc["features"]) == {"title", "price", "year"}
    items = coda.items
    fiction = doc["categories"].index("fiction") + 1
    book = books_catalog().iloc[0]
    assert set(items.set_index("item_id").loc[int(book["item_id"]), "genre_ids"]) == {
        doc["categories"].index(c) + 1 for c in book["categories"].split("|")}
    # a reload (Parquet this time) keeps the ids of known categories and appends new ones
    new = pd.DataFrame({"item_id": [5000, 5001], "categories": ["fiction|graphic novels", ""], "title": ["a", "b"]})
    path = tmp_path / "more.parquet"
    new.to_parquet(path)
    doc2, ref2 = coda.load_catalog(catalog.read_file(path))
    assert ref2.version == "v2"
    assert doc2["categories"][:len(doc["categories"])] == doc["categories"]
    assert doc2["items"] == [[5000, [fiction, len(doc["categories"]) + 1]], [5001, []]]
    # the pipeline uses the stored catalog: item categories reach the samples
    for u in range(4):
        upload_batch(channel, mds[u], first_seq=1, logs=behaviour(u, 1), tunnel_seq=1)
    coda.load_catalog(books_catalog())
    coda.close_day()
    some = next(iter(coda.day_samples[1].values()))
    assert all(s.item_cats for s in some)


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"item_id": [1]}), "lacks columns"),
    (pd.DataFrame({"item_id": [1, 1], "categories": ["a", "b"]}), "appears twice"),
    (pd.DataFrame({"item_id": ["x"], "categories": ["a"]}), "must be an integer"),
    (pd.DataFrame({"item_id": [0], "categories": ["a"]}), r"must be in 1\.\.2\^31-1"),
])
def test_bad_catalog_refused(frame, message):
    with pytest.raises(InvalidArgument, match=message):
        catalog.build(frame)


def test_closing_a_day_publishes_the_global_model(served):
    platform, coda, channel, mds, _ = served
    coda.global_epochs = 1
    for u in range(4):
        upload_batch(channel, mds[u], first_seq=1, logs=behaviour(u, 1), tunnel_seq=1)
    coda.close_day()
    info = platform.resource("coda/global_model")
    meta = json.loads(info.metadata_json)
    assert info.version == "v1" and meta["day"] == 1 and meta["catalog"] == "v1"
    assert meta["metrics"]["n_train"] == sum(len(v) for v in coda.day_samples[1].values())
    # A model blob of the task library's DIN, sized by the catalog (no separate .mnn graph any more).
    from walle.device_host.models import blob
    _params, model_meta = blob.unpack(platform.blob(info.digest))
    assert model_meta["arch"] == "din" and model_meta["config"]["n_items"] == int(coda.items["item_id"].max()) + 1


def test_the_global_model_is_retrained_every_day_on_all_days_so_far(served):
    """Cloud-based learning retrains on the global data: closing day d publishes a new version trained
    on the samples of days 1..d; another process on the same folder (no in-memory samples) rebuilds the
    same training set from the raw table and trains the same model."""
    platform, coda, channel, mds, data_dir = served
    coda.global_epochs = 1
    per_day = {}
    for day in (1, 2):
        for u in range(6):
            upload_batch(channel, mds[u], first_seq=1 + 100 * day, logs=behaviour(u, day), tunnel_seq=day)
        coda.close_day()
        per_day[day] = sum(len(v) for v in coda.day_samples[day].values())
        info = platform.resource("coda/global_model")
        meta = json.loads(info.metadata_json)
        assert info.version == f"v{day}" and meta["days"] == [1, day]
        assert meta["metrics"]["n_train"] == sum(per_day.values())  # every day so far, not just today's
    in_memory = coda.samples_through(2)
    assert [s.day for s in in_memory] == sorted(s.day for s in in_memory) and {s.day for s in in_memory} == {1, 2}
    other = CodaCloud(Platform(data_dir), k=8, global_epochs=1)  # a `walle cloud pipeline` process
    rebuilt = other.samples_through(2)
    assert [s.SerializeToString() for s in rebuilt] == [s.SerializeToString() for s in in_memory]
    v2 = platform.resource("coda/global_model")
    other.publish_global_model(2)
    assert platform.resource("coda/global_model").digest == v2.digest  # deterministic: the same blob


def test_a_new_data_folder_takes_an_injected_pseudonym_key_and_keeps_it(tmp_path):
    key = bytes(range(32))
    coda = CodaCloud(Platform(tmp_path / "p"), pseudonym_key=key)
    assert coda.key == key and (coda.dir / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    assert CodaCloud(Platform(tmp_path / "p")).key == key  # the folder keeps it
    with pytest.raises(FailedPrecondition, match="another pseudonym key"):
        CodaCloud(Platform(tmp_path / "p"), pseudonym_key=bytes(32))
    with pytest.raises(InvalidArgument, match="must be 32 bytes"):
        CodaCloud(Platform(tmp_path / "q"), pseudonym_key=b"short")
    assert CodaCloud(Platform(tmp_path / "r")).key != CodaCloud(Platform(tmp_path / "s")).key  # default: random


@pytest.mark.slow
def test_platform_serve_runs_the_pipeline_on_a_schedule(tmp_path):
    """`walle platform serve --coda-day-seconds N` as a real process; this process reads the shared day."""
    from walle.platform.coda.kvstore import open_store
    data = tmp_path / "p"
    proc = subprocess.Popen([sys.executable, "-m", "walle.platform.cli", "--data-dir", str(data), "platform", "serve",
                             "--insecure", "--port", "0", "--coda-day-seconds", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        today = 1
        while time.monotonic() < deadline and today < 3 and proc.poll() is None:
            time.sleep(0.2)
            kv = data / "coda" / "kv.sqlite3"
            if kv.exists():
                store = open_store(f"sqlite:///{kv}")
                raw = store.get(b"meta:today")
                store.close()
                today = int(raw) if raw else 1
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert today >= 3
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode in (0, -15)


def test_cli_catalog_load(tmp_path):
    from click.testing import CliRunner

    from walle.platform.cli import main as walle_main
    path = tmp_path / "books.csv"
    books_catalog(20).to_csv(path, index=False)
    data = tmp_path / "p"
    out = CliRunner().invoke(walle_main, ["--data-dir", str(data), "cloud", "catalog", "load", str(path), "--json"])
    assert out.exit_code == 0, out.output
    reply = json.loads(out.output)
    assert reply["resource"] == "coda/catalog" and reply["items"] == 20 and reply["categories"] == len(SHELVES)
    assert Platform(data).resource("coda/catalog").version == "v1"
    out = CliRunner().invoke(walle_main, ["--data-dir", str(data), "cloud", "catalog", "load", str(tmp_path / "no.csv")])
    assert out.exit_code == 3 and "does not exist" in out.output
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,categories\n1,a\n1,b\n")
    out = CliRunner().invoke(walle_main, ["--data-dir", str(data), "cloud", "catalog", "load", str(bad)])
    assert out.exit_code == 2 and "appears twice" in out.output
    assert Platform(data).resource("coda/catalog").version == "v1"  # nothing stored


def test_cli_pipeline_refuses_a_match_nprobe_below_one(tmp_path):
    from click.testing import CliRunner

    from walle.platform.cli import main as walle_main
    out = CliRunner().invoke(walle_main, ["--data-dir", str(tmp_path / "p"), "cloud", "pipeline", "--match-nprobe", "0"])
    assert out.exit_code == 2 and "--match-nprobe" in out.output and not (tmp_path / "p" / "coda").exists()
