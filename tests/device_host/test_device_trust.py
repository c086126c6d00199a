"""Devices trust only their platform: TLS against the CA pinned at enrollment, and bundles signed by
the key pinned at enrollment. An unsigned, re-signed or tampered bundle is refused and reported,
and the previous version keeps running."""
import dataclasses
import pathlib
import time

import pytest

from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.device_host.sandbox import Sandbox
from walle.platform import pki
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server, tls_credentials
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

ROOT = pathlib.Path(__file__).resolve().parents[2]


def variant(tmp: pathlib.Path, tag: str) -> dict:
    src = ROOT / "tasks" / "hello"
    _m, files = validate_task_dir(src)
    files = dict(files)
    files["main.py"] = files["main.py"] + f"\n# {tag}\n".encode()
    return files


def release(platform: Platform, files: dict):
    tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
    platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version))
    return tv


def enroll(platform: Platform, device_id: str, address: str) -> Credentials:
    r = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id))
    return Credentials(device_id, r.token, address, r.platform_ca_pem, r.bundle_public_key.hex())


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(workers=1)
    yield sb
    sb.close()


def host_for(tmp, name, cred, sandbox):
    return DeviceHost(tmp / name, attrs={"user_id": name}, sandbox=sandbox, credentials=cred)


def test_device_of_platform_a_refuses_bundles_signed_by_platform_b(tmp_path, sandbox):
    keys_a, keys_b = pki.init(tmp_path / "a"), pki.init(tmp_path / "b")
    platform = Platform(tmp_path / "a", keys=keys_a)
    _s, port, stop = build_server(platform, port=0, credentials=tls_credentials(platform))
    address = f"localhost:{port}"
    try:
        v1 = release(platform, variant(tmp_path, "v1"))
        cred = enroll(platform, "phone", address)
        assert cred.ca_pem and len(bytes.fromhex(cred.bundle_public_key)) == 32
        host = host_for(tmp_path, "phone", cred, sandbox)
        assert host.sync_now().installed == [f"hello@{v1.version}"]
        assert host.run_task("hello", {"payload": {"who": "a"}}).status == "ok"
        host.close()

        # The platform's signing key is replaced by B's (a compromised or foreign signer) and v2 goes out.
        stop(0)
        forged = dataclasses.replace(keys_a, signing_key=keys_b.signing_key)
        platform = Platform(tmp_path / "a", keys=forged)
        _s, port2, stop = build_server(platform, port=0, credentials=tls_credentials(platform))
        cred = dataclasses.replace(cred, platform=f"localhost:{port2}")
        host = host_for(tmp_path, "phone", cred, sandbox)
        v2 = release(platform, variant(tmp_path, "v2"))
        result = host.sync_now()
        assert result.rejected == [f"hello@{v2.version}"] and not result.installed
        assert host.installed()["hello"].version == v1.version      # the previous version keeps running
        assert host.run_task("hello", {}).status == "ok"
        assert host.up.flush(timeout=10)
        rel = platform.ListReleases(admin_pb2.ReleaseFilter(task="hello")).releases[0]
        assert rel.version == v2.version and rel.stats.rejected == 1  # reported to the platform
        err = platform.state.reports("delivery", status="rejected")[0]["error"]
        assert "signature" in err
        host.close()
    finally:
        stop(0)


def test_unsigned_bundles_are_refused_by_a_pinned_device(tmp_path, sandbox):
    keys = pki.init(tmp_path / "keys")
    platform = Platform(tmp_path / "plain")  # no keys: bundles go out unsigned
    _s, port, stop = build_server(platform, port=0)
    try:
        release(platform, variant(tmp_path, "v1"))
        r = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id="pinned"))
        cred = Credentials("pinned", r.token, f"127.0.0.1:{port}", "", keys.bundle_public_key.hex())
        host = host_for(tmp_path, "pinned", cred, sandbox)
        result = host.sync_now()
        assert result.rejected and not host.installed()
        host.close()
    finally:
        stop(0)


def test_a_device_pinning_the_ca_cannot_be_served_by_another_platform(tmp_path, sandbox):
    import grpc
    keys_a = pki.init(tmp_path / "a")
    other = Platform(tmp_path / "b", keys=pki.init(tmp_path / "b"))
    _s, port, stop = build_server(other, port=0, credentials=tls_credentials(other))
    try:
        token = other.EnrollDevice(admin_pb2.EnrollRequest(device_id="d")).token
        cred = Credentials("d", token, f"localhost:{port}", keys_a.ca_pem.decode(), keys_a.bundle_public_key.hex())
        host = host_for(tmp_path, "d", cred, sandbox)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            host.sync_now()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 30
        host.close()
    finally:
        stop(0)
