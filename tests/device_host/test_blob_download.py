"""Devices download bundles and resources over HTTPS from the URL base the platform announces:
a cut connection is resumed with a Range request and ends in a verified, signature-checked install;
a cache serving wrong bytes is refused and the gRPC stream takes over. Real TLS on 127.0.0.1."""
import os
import pathlib
import socket
import threading

import pytest
from starlette.staticfiles import StaticFiles

from walle.device_host.blobfetch import HttpDownloadError
from walle.device_host.host import DeviceHost
from walle.device_host.identity import Credentials
from walle.platform import pki
from walle.platform.blobs_http import build_app, export_blobs
from walle.platform.httpserve import serve_in_thread
from walle.platform.manifest import validate_task_dir
from walle.platform.server import build_server, tls_credentials
from walle.platform.service import Platform
from walle.protos import admin_pb2, bundle

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAYLOAD = os.urandom(400_000)  # incompressible: the bundle is ~400 KB on the wire


class Recorder:
    """ASGI middleware noting each request's path and Range header (and Authorization header)."""

    def __init__(self, app):
        self.app, self.seen, self.authorization = app, [], []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            self.seen.append((scope["path"], headers.get(b"range", b"").decode()))
            self.authorization.append(headers.get(b"authorization", b"").decode())
        await self.app(scope, receive, send)


class CuttingProxy:
    """A TCP proxy in front of the blob server that cuts its first connection after `cut_after`
    bytes from the server (TLS passes through untouched, so the client sees a broken stream)."""

    def __init__(self, upstream_port, cut_after):
        self.upstream, self.cut_after, self.connections = upstream_port, cut_after, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.open += [client, up]
            limit = self.cut_after if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src, dst, limit):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()
        for s in self.open:
            s.close()


class Live:
    def __init__(self, tmp):
        self.tmp = tmp
        self.keys = pki.init(tmp / "data")
        self.platform = Platform(tmp / "data", keys=self.keys)
        _s, self.port, self.stop_grpc = build_server(self.platform, credentials=tls_credentials(self.platform))
        self.pkid = tmp / "data" / "pki"
        self.stops = [lambda: self.stop_grpc(0)]

    def https(self, app):
        port, stop = serve_in_thread(app, certfile=self.pkid / "server.pem", keyfile=self.pkid / "server-key.pem")
        self.stops.append(stop)
        return port

    def release(self, name="hello"):
        _m, files = validate_task_dir(ROOT / "tasks" / "hello")
        files = {**files, "payload.bin": PAYLOAD}
        if name != "hello":  # the same task under another name, reading resources through the tunnel
            files["task.toml"] = files["task.toml"].decode().replace('name = "hello"', f'name = "{name}"').replace(
                'apis = ["log", "storage"]', 'apis = ["log", "storage", "tunnel"]').encode()
        tv = self.platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="t"))
        self.platform.CreateRelease(admin_pb2.CreateReleaseRequest(task=tv.name, version=tv.version))
        return tv

    def device(self, name):
        r = self.platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=name))
        cred = Credentials(name, r.token, f"localhost:{self.port}", r.platform_ca_pem, r.bundle_public_key.hex())
        host = DeviceHost(self.tmp / name, attrs={"user_id": name}, credentials=cred)
        self.stops.append(host.close)
        return host

    def close(self):
        for stop in reversed(self.stops):
            stop()


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.close()


def test_cut_download_resumes_with_a_range_and_installs_verified(live):
    rec = Recorder(build_app(live.platform))
    proxy = CuttingProxy(live.https(rec), cut_after=150_000)
    live.stops.append(proxy.close)
    live.platform.blob_url_base = f"https://127.0.0.1:{proxy.port}/blobs/"
    live.platform.blob_url_credential = True  # the platform's own access-checked blob app
    tv = live.release()
    host = live.device("phone-1")

    res = host.sync.sync_once()
    assert res.installed == [f"hello@{tv.version}"] and not res.rejected
    installed = host.store.get("hello")
    assert (installed.path / "payload.bin").read_bytes() == PAYLOAD
    # first request cut mid-body, second resumed where the partial file ended, over the same HTTPS
    path = "/blobs/sha256/" + tv.bundle_digest[7:]
    assert [p for p, _ in rec.seen] == [path, path] and proxy.connections == 2
    assert rec.seen[0][1] == ""
    resumed_from = int(rec.seen[1][1].removeprefix("bytes=").rstrip("-"))
    assert 100_000 < resumed_from < 150_000
    assert host.sync.blob_http.stats["resumed"] == 1
    assert all(a.startswith("Bearer ") for a in rec.authorization)  # our own server checks the token
    assert not list((host.data_dir / "downloads").iterdir())  # no partial file left behind


def test_tampered_cache_is_refused_and_grpc_takes_over(live, tmp_path):
    tv = live.release()
    tunnel_task = live.release("reader")
    ref = live.platform.PublishResource(admin_pb2.PublishResourceRequest(name="conf/big", data=PAYLOAD[:50_000]))
    folder = tmp_path / "cdn"
    assert export_blobs(live.platform, folder) == 3
    # the cache now serves wrong bytes for the bundle and the resource
    (folder / "sha256" / tv.bundle_digest[7:]).write_bytes(b"evil" + PAYLOAD)
    (folder / "sha256" / ref.digest[7:]).write_bytes(b"x" * 50_000)
    rec = Recorder(StaticFiles(directory=folder))  # any static file server in front of the folder
    live.platform.blob_url_base = f"https://127.0.0.1:{live.https(rec)}/"
    host = live.device("phone-2")

    with pytest.raises(HttpDownloadError, match="served other bytes"):
        host.sync.blob_http.fetch(live.platform.blob_url_base, tv.bundle_digest)
    res = host.sync.sync_once()
    assert sorted(res.installed) == sorted([f"hello@{tv.version}", f"reader@{tunnel_task.version}"])
    assert (host.store.get("hello").path / "payload.bin").read_bytes() == PAYLOAD  # from gRPC, verified
    info, data = host.down.fetch_resource("conf/big")
    assert info.blob_url_base == live.platform.blob_url_base and data == PAYLOAD[:50_000]
    assert ("/sha256/" + ref.digest[7:], "") in rec.seen  # HTTPS was tried first, then refused
    assert not any(rec.authorization)  # a cache of signed blobs never receives the device token
    assert not list((host.data_dir / "downloads").iterdir())  # nothing half-downloaded kept

    # once the cache is repaired, HTTPS serves the next device
    export_dir = folder / "sha256"
    for p in export_dir.iterdir():
        p.unlink()
    export_blobs(live.platform, folder)
    host2 = live.device("phone-3")
    before = len(rec.seen)
    assert host2.sync.sync_once().installed
    assert host2.sync.blob_http.stats["bytes"] > 400_000 and len(rec.seen) > before
    assert host2.down.fetch_resource("conf/big")[1] == PAYLOAD[:50_000]
