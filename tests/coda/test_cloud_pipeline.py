"""The CoDA cloud side over real gRPC: behaviour logs up the tunnel, the day pipeline, and devices
pulling their matched samples from the sample-query service."""
import zlib

import grpc
import pytest

from walle.platform.auth import bearer_metadata
from walle.platform.coda import movielens
from walle.platform.coda.cloud import CodaCloud
from walle.platform.coda.sample_service import samples_from_batch
from walle.platform.server import build_server
from walle.platform.service import Platform
from walle.protos import admin_pb2, coda_pb2, coda_pb2_grpc, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

N_USERS = 40


@pytest.fixture(scope="module")
def data():
    ml = movielens.load()
    users = sorted(ml.inter["user_id"].unique())[:N_USERS]
    inter = ml.inter[ml.inter["user_id"].isin(users)]
    train, test = movielens.assign_days(inter, 3)
    return ml, users, train, test


@pytest.fixture
def cloud(tmp_path, data):
    ml, *_ = data
    platform = Platform(tmp_path / "platform")
    coda = CodaCloud(platform, items=ml.items, users=ml.users, k=10)
    _server, port, stop = build_server(platform, port=0, extra=coda.add_services)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield platform, coda, channel
    channel.close()
    stop(0)


def upload(channel, md, records) -> tunnel_pb2.UploadAck:
    recs = tunnel_pb2.UpRecords(records=[tunnel_pb2.UpRecord(seq=seq + 1, topic="behavior", payload=log.SerializeToString())
                                         for seq, log in records])
    batch = tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=len(recs.records))
    return tunnel_pb2_grpc.TunnelServiceStub(channel).Upload(iter([batch]), metadata=md, timeout=30)


def enroll_all(platform, channel, users):
    mds = {}
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    for u in users:
        token = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=movielens.device_id(u), user_id=str(u))).token
        mds[u] = bearer_metadata(token)  # the user is bound at enrollment, not taken from the device
        stub.GetActiveTasks(device_pb2.DeviceInfo(), metadata=mds[u], timeout=10)
    return mds


def test_upload_pipeline_and_pull(cloud, data):
    platform, coda, channel = cloud
    ml, users, train, test = data
    mds = enroll_all(platform, channel, users)
    coda.today = 1
    total = 0
    for u in users:
        recs = movielens.replay_logs(train, u, 1)
        ack = upload(channel, mds[u], recs)
        assert ack.accepted == len(recs) and ack.duplicates == 0
        total += len(recs)
        again = upload(channel, mds[u], recs)  # a re-send after a lost ack
        assert again.accepted == 0 and again.duplicates == len(recs)
    assert coda.raw.count() == total
    result = coda.run_day(1)
    assert result.users == len(users) and result.matched_users > 0 and result.batches > 0

    stub = coda_pb2_grpc.SampleServiceStub(channel)
    u = users[0]
    listing = stub.ListBatches(coda_pb2.ListBatchesRequest(day=1), metadata=mds[u])
    assert listing.batches and listing.daily_limit == 12
    assert all(25 <= b.count <= 40 for b in listing.batches[:-1])
    got = list(stub.PullBatches(coda_pb2.PullBatchesRequest(day=1, max_batches=12), metadata=mds[u]))
    assert 0 < len(got) <= 12
    samples = [s for b in got for s in samples_from_batch(b)]
    pseudonyms = {coda.pseudonym_of_device(movielens.device_id(x)) for x in users}
    served_bytes = b"".join(s.SerializeToString() for s in samples)
    assert not any(p.encode() in served_bytes for p in pseudonyms)  # neighbours stay anonymous
    assert all(s.user == "" and len(s.sample_id) == 16 for s in samples)
    # matched samples come from the K neighbours, never from the user itself
    own_ids = {x.sample_id.rsplit("-", 1)[-1] for x in coda.day_samples[1][coda.pseudonym_of_device(
        movielens.device_id(u))]}
    assert own_ids and not own_ids & {s.sample_id for s in samples}
    # no test-period interaction was uploaded, so none can be served
    test_keys = {(int(r.item_id), int(r.ts)) for r in test.itertuples()}
    assert not any((s.item_id, s.ts) in test_keys for s in samples)


def test_unauthenticated_and_malformed_uploads_refused(cloud, data):
    platform, coda, channel = cloud
    ml, users, train, _ = data
    with pytest.raises(grpc.RpcError) as e:
        upload(channel, (), movielens.replay_logs(train, users[0], 1))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    mds = enroll_all(platform, channel, users[:1])
    bad = coda_pb2.BehaviorLog(ts=1, item_id=-5, event="rate", value=4.0)
    with pytest.raises(grpc.RpcError) as e:
        upload(channel, mds[users[0]], [(0, bad)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in e.value.details()
    assert coda.raw.count() == 0
