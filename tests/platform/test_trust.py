"""TLS on every channel, operator-authenticated admin calls, signed bundles, credential expiry."""
import pathlib
import time

import grpc
import pytest

from walle.platform import errors, pki
from walle.platform.auth import bearer_metadata
from walle.platform.client import RemoteAdmin
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server, operator_authorizer, tls_credentials
from walle.platform.service import Platform
from walle.protos import admin_pb2, admin_pb2_grpc, bundle, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


class TlsPlatform:
    def __init__(self, root: pathlib.Path):
        self.keys = pki.init(root)
        self.platform = Platform(root, keys=self.keys)
        self.operator_token = self.platform.operators.create("alice")
        self.server, self.port, self.stop = build_server(
            self.platform, port=0, credentials=tls_credentials(self.platform),
            authorize_admin=operator_authorizer(self.platform))
        self.address = f"localhost:{self.port}"

    def channel(self, ca_pem: bytes | None = None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem or self.keys.ca_pem)
        return grpc.secure_channel(self.address, creds)


@pytest.fixture
def two(tmp_path):
    a, b = TlsPlatform(tmp_path / "a"), TlsPlatform(tmp_path / "b")
    yield a, b
    a.stop(0)
    b.stop(0)


def submit_and_release(p: TlsPlatform):
    _m, files = validate_task_dir(ROOT / "tasks" / "hello")
    tv = p.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files)))
    p.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version))
    return tv


def test_plaintext_client_cannot_talk_to_tls_server(two):
    a, _ = two
    with grpc.insecure_channel(a.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.AdminServiceStub(ch).ListTasks(admin_pb2.Empty(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_pinning_another_platforms_ca_refuses_the_server(two):
    a, b = two
    with a.channel(ca_pem=b.keys.ca_pem) as ch:
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.AdminServiceStub(ch).ListTasks(admin_pb2.Empty(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_calls_need_an_operator_credential_and_are_audited(two):
    a, _ = two
    with a.channel() as ch:
        anonymous = RemoteAdmin(ch)
        with pytest.raises(errors.Unauthenticated):
            anonymous.ListTasks(admin_pb2.Empty())
        forged = RemoteAdmin(ch, metadata=(("authorization", "Bearer wot1.nope"),))
        with pytest.raises(errors.Unauthenticated):
            forged.ListTasks(admin_pb2.Empty())
        device_token = a.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="d1")).token
        with pytest.raises(errors.Unauthenticated):  # a device credential is not an operator credential
            RemoteAdmin(ch, metadata=bearer_metadata(device_token)).ListTasks(admin_pb2.Empty())
        alice = RemoteAdmin(ch, metadata=bearer_metadata(a.operator_token))
        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        tv = alice.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="mallory"))
        rel = alice.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, actor="mallory"))
        alice.PauseRelease(admin_pb2.ReleaseRef(id=rel.id))
        a.platform.operators.revoke("alice", actor="root")
        with pytest.raises(errors.Unauthenticated):
            alice.ResumeRelease(admin_pb2.ReleaseRef(id=rel.id))
    entries = [(e.actor, e.action, e.target) for e in a.platform.GetAudit(admin_pb2.AuditRequest()).entries]
    assert ("alice", "task.submit", f"hello@{tv.version}") in entries  # the operator, not what the client claimed
    assert ("alice", "release.create", rel.id) in entries and ("alice", "release.pause", rel.id) in entries
    assert ("root", "operator.revoke", "alice") in entries
    assert not any(actor == "mallory" for actor, _, _ in entries)
    assert a.platform.GetRelease(admin_pb2.ReleaseRef(id=rel.id)).state == "paused"


def test_released_bundles_are_signed_by_their_platform(two):
    a, b = two
    tv = submit_and_release(a)
    enrolled = a.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="phone"))
    assert enrolled.platform_ca_pem.encode() == a.keys.ca_pem and enrolled.bundle_public_key == a.keys.bundle_public_key
    with a.channel(enrolled.platform_ca_pem.encode()) as ch:
        task = device_pb2_grpc.DeviceServiceStub(ch).GetActiveTasks(
            device_pb2.DeviceInfo(user_id="u", host_version="0.1.0"), metadata=bearer_metadata(enrolled.token)).tasks[0]
    assert task.bundle_digest == tv.bundle_digest
    assert bundle.verify_signature(a.keys.bundle_public_key, task.bundle_digest, task.signature)
    assert not bundle.verify_signature(b.keys.bundle_public_key, task.bundle_digest, task.signature)
    assert not bundle.verify_signature(a.keys.bundle_public_key, task.bundle_digest, b.keys.sign(task.bundle_digest))
    tampered = bytearray(task.signature)
    tampered[0] ^= 1
    assert not bundle.verify_signature(a.keys.bundle_public_key, task.bundle_digest, bytes(tampered))
    data = bytearray(a.platform.blob(task.bundle_digest))
    data[-5] ^= 1
    with pytest.raises(bundle.BundleError):
        bundle.unpack(bytes(data), task.bundle_digest)


def _device_calls(ch, md):
    dev = device_pb2_grpc.DeviceServiceStub(ch)
    tun = tunnel_pb2_grpc.TunnelServiceStub(ch)
    from walle.protos import coda_pb2, coda_pb2_grpc
    smp = coda_pb2_grpc.SampleServiceStub(ch)
    return {
        "GetActiveTasks": lambda: dev.GetActiveTasks(device_pb2.DeviceInfo(), metadata=md, timeout=5),
        "FetchBundle": lambda: list(dev.FetchBundle(device_pb2.FetchBundleRequest(digest="sha256:" + "0" * 64),
                                                    metadata=md, timeout=5)),
        "WatchTasks": lambda: next(dev.WatchTasks(device_pb2.WatchRequest(), metadata=md, timeout=5)),
        "Upload": lambda: tun.Upload(iter([]), metadata=md, timeout=5),
        "GetResource": lambda: tun.GetResource(tunnel_pb2.ResourceRequest(name="x"), metadata=md, timeout=5),
        "FetchResource": lambda: list(tun.FetchResource(tunnel_pb2.ResourceRequest(name="x"), metadata=md, timeout=5)),
        "ListBatches": lambda: smp.ListBatches(coda_pb2.ListBatchesRequest(day=1), metadata=md, timeout=5),
        "PullBatches": lambda: list(smp.PullBatches(coda_pb2.PullBatchesRequest(day=1), metadata=md, timeout=5)),
    }


def test_expired_or_revoked_device_credentials_are_refused_everywhere(tmp_path):
    from walle.platform.coda import movielens
    from walle.platform.coda.cloud import CodaCloud
    keys = pki.init(tmp_path)
    platform = Platform(tmp_path, keys=keys)
    ml = movielens.load()
    coda = CodaCloud(platform, items=ml.items.head(50), users=None, k=5)
    _s, port, stop = build_server(platform, port=0, credentials=tls_credentials(platform), extra=coda.add_services)
    try:
        short = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="short", ttl_seconds=1))
        revoked = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="gone"))
        platform.RevokeDevice(admin_pb2.DeviceRef(device_id="gone"))
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(keys.ca_pem)) as ch:
            assert _device_calls(ch, bearer_metadata(short.token))["GetActiveTasks"]().revision  # valid at first
            time.sleep(2.1)  # expiry is rounded up to a whole second: at most 2 s after enrollment
            for who in (short.token, revoked.token):
                for name, call in _device_calls(ch, bearer_metadata(who)).items():
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    finally:
        stop(0)
