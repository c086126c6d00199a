"""Bundles and resources over HTTPS by digest (platform side): immutable cache headers, ETag, single
byte ranges (206/416), If-None-Match, the per-device check, the explicit public mode and the folder
export for a static server or CDN. Real uvicorn over TLS on 127.0.0.1."""
import hashlib
import json
import pathlib
import ssl
import urllib.error
import urllib.request

import pytest

from walle.platform import pki
from walle.platform.blobs_http import export_blobs, parse_range, start_blob_server, Unsatisfiable
from walle.platform.manifest import validate_task_dir
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle, device_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Live:
    def __init__(self, tmp, public=False):
        self.tmp = tmp
        self.keys = pki.init(tmp / "data")
        self.platform = Platform(tmp / "data", keys=self.keys)
        pkid = tmp / "data" / "pki"
        self.port, self.stop = start_blob_server(self.platform, public=public, certfile=pkid / "server.pem",
                                                 keyfile=pkid / "server-key.pem")
        self.ssl = ssl.create_default_context(cadata=self.keys.ca_pem.decode())

    def release(self, extra=b"", channel=""):
        src = ROOT / "tasks" / "hello"
        _m, files = validate_task_dir(src)
        files = dict(files)
        files["main.py"] += extra
        tv = self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=tv.version, channel=channel))
        return tv

    def token(self, device_id):
        return self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id)).token

    def get(self, digest, token="", **headers):
        req = urllib.request.Request(self.platform.blob_url_base + "sha256/" + digest.split(":")[-1], headers=headers)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.stop()


def test_parse_range():
    assert parse_range("", 10) is None
    assert parse_range("bytes=0-3", 10) == (0, 3)
    assert parse_range("bytes=4-", 10) == (4, 9)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole blob is sent
    for bad in ("bytes=10-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(Unsatisfiable):
            parse_range(bad, 10)


def test_released_bundle_served_with_ranges_to_its_device_only(live):
    tv = live.release()
    assert live.platform.blob_url_base == f"https://127.0.0.1:{live.port}/blobs/"
    token = live.token("phone-1")
    reply = live.platform.active_tasks("phone-1", device_pb2.DeviceInfo(host_version="0.1.0"))
    assert reply.blob_url_base == live.platform.blob_url_base and reply.tasks[0].bundle_digest == tv.bundle_digest
    assert reply.blob_url_wants_credential  # our own server checks device tokens
    whole = live.platform.blob(tv.bundle_digest)

    status, headers, body = live.get(tv.bundle_digest, token)
    assert status == 200 and body == whole
    assert headers["cache-control"] == "private, max-age=31536000, immutable"  # behind a credential
    assert headers["etag"] == '"%s"' % tv.bundle_digest[7:] and headers["accept-ranges"] == "bytes"
    assert "sha256:" + hashlib.sha256(body).hexdigest() == tv.bundle_digest

    status, headers, body = live.get(tv.bundle_digest, token, Range="bytes=10-99")
    assert status == 206 and body == whole[10:100] and headers["content-range"] == f"bytes 10-99/{len(whole)}"
    status, headers, body = live.get(tv.bundle_digest, token, Range="bytes=-5")
    assert status == 206 and body == whole[-5:]
    status, headers, _ = live.get(tv.bundle_digest, token, Range=f"bytes={len(whole)}-")
    assert status == 416 and headers["content-range"] == f"bytes */{len(whole)}"
    # If-Range with another validator: the client's bytes are stale, so the whole blob comes back
    status, _, body = live.get(tv.bundle_digest, token, Range="bytes=10-", **{"If-Range": '"other"'})
    assert status == 200 and body == whole
    status, _, body = live.get(tv.bundle_digest, token, **{"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""

    # no credential, a bad one, a device the bundle was not released to, a bad path
    status, headers, body = live.get(tv.bundle_digest)
    assert status == 401 and "credential" in json.loads(body)["error"] and "www-authenticate" in headers
    assert live.get(tv.bundle_digest, "nope")[0] == 401
    other = live.release(extra=b"\n# v2 for the beta channel\n", channel="beta")
    status, _, body = live.get(other.bundle_digest, token)
    assert status == 403 and "not released to device" in json.loads(body)["error"]
    assert live.get("sha256:" + "0" * 64, token)[0] == 403
    req = urllib.request.Request(live.platform.blob_url_base + "sha256/XYZ", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, context=live.ssl, timeout=10)
    assert e.value.code == 400


def test_resources_need_a_tunnel_task_and_public_mode_is_explicit(tmp_path):
    live = Live(tmp_path / "a")
    try:
        ref = live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="conf/x", data=b"\x01" * 5000))
        token = live.token("phone-2")
        live.platform.active_tasks("phone-2", device_pb2.DeviceInfo(host_version="0.1.0"))
        status, _, body = live.get(ref.digest, token)
        assert status == 403 and "tunnel" in json.loads(body)["error"]
        assert live.platform.resource("conf/x").blob_url_base == live.platform.blob_url_base
        assert live.platform.resource("conf/x").blob_url_wants_credential
    finally:
        live.stop()
    assert live.platform.blob_url_base == ""  # stopped: devices are no longer sent there
    assert not live.platform.resource("conf/x").blob_url_wants_credential

    pub = Live(tmp_path / "b", public=True)
    try:
        tv = pub.release()
        status, headers, body = pub.get(tv.bundle_digest)  # no credential needed: the operator chose this
        assert status == 200 and headers["cache-control"] == "public, max-age=31536000, immutable"
        # public content: devices are told not to send their token there
        assert not pub.platform.active_tasks("phone-9", device_pb2.DeviceInfo(host_version="0.1.0")).blob_url_wants_credential
        assert pub.get(tv.bundle_digest, "bad-token")[0] == 401  # a credential, when given, is still checked
    finally:
        pub.stop()


def test_export_blobs_writes_released_bundles_and_resources(live, tmp_path):
    tv = live.release()
    unreleased = live.platform.SubmitTask(admin_pb2.SubmitTaskRequest(
        archive=bundle.pack({**validate_task_dir(ROOT / "tasks" / "hello")[1], "extra.txt": b"x"}), author="t"))
    ref = live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="conf/y", data=b"hello resource"))
    out = tmp_path / "cdn"
    assert export_blobs(live.platform, out) == 2
    files = {p.name: p.read_bytes() for p in (out / "sha256").iterdir()}
    assert files == {tv.bundle_digest[7:]: live.platform.blob(tv.bundle_digest), ref.digest[7:]: b"hello resource"}
    assert unreleased.bundle_digest[7:] not in files  # only what devices may be handed
    assert export_blobs(live.platform, out) == 0  # immutable: never rewritten
