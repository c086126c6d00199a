"""Bundles and resources as static content: served over HTTPS by digest, immutable and cacheable,
with range requests so a device resumes a cut download, or written into a folder that any static
file server or CDN can serve.

Layout (both modes): <base>sha256/<64 hex>. Devices learn <base> from `ActiveTasks.blob_url_base`
(and `ResourceInfo.blob_url_base`) and keep gRPC FetchBundle as the fallback. They verify the
digest and the bundle signature exactly as for gRPC, so an untrusted cache can only fail a download,
never change what is installed.

Who may download: by default a request must carry a device credential (`Authorization: Bearer`),
and the same per-device check as gRPC applies (a bundle only if it was released to that device; a
resource only if the device runs a task granted the "tunnel" API). Those responses are marked
`private` so a shared cache never hands them to another client. Serving without a credential
(`public=True`, or a folder behind a CDN) is an explicit operator choice: the content is signed and
content-addressed, so it cannot be forged, but anyone who learns a digest can read it.
"""
from __future__ import annotations

import collections
import os
import pathlib
import re
import threading
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import InvalidArgument, NotFound, Unauthenticated, WalleError
from .files import write_atomic
from .httpserve import serve_in_thread
from .service import Platform

IMMUTABLE = "max-age=31536000, immutable"
HEX = re.compile(r"^[0-9a-f]{64}$")
CACHE_BYTES = 256 * 1024 * 1024  # verified blobs kept in memory (ranges are served from these)
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}


class Unsatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one `bytes=` range, None to send everything (absent, several
    ranges, or a unit we do not serve: RFC 9110 allows ignoring Range); raises Unsatisfiable."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        first = int(m.group(1))
        last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if first >= size or last < first:
            raise Unsatisfiable()
        return first, last
    n = int(m.group(2))  # "bytes=-N": the last N bytes
    if n == 0 or size == 0:
        raise Unsatisfiable()
    return max(0, size - n), size - 1


class _VerifiedBlobs:
    """Blob bytes by digest, each verified once when read from disk or the task repository."""

    def __init__(self, platform: Platform, max_bytes: int = CACHE_BYTES):
        self.platform = platform
        self.max_bytes = max_bytes
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> bytes:
        with self._lock:
            data = self._data.get(digest)
            if data is not None:
                self._data.move_to_end(digest)
                return data
        data = self.platform.blob(digest)  # verifies the sha256
        with self._lock:
            if digest not in self._data and len(data) <= self.max_bytes:
                self._data[digest] = data
                self._size += len(data)
                while self._size > self.max_bytes:
                    _, old = self._data.popitem(last=False)
                    self._size -= len(old)
        return data


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def authorize(platform: Platform, token: str, digest: str) -> str:
    """The device id allowed to download `digest`; the same rules as the gRPC downloads."""
    device_id = platform.credentials.verify(token)
    if (platform.blob_dir / digest[7:]).is_file():  # a published resource (bundles live in the task repo)
        platform.authorize_resource(device_id)
    else:
        platform.authorize_blob(device_id, digest)
    return device_id


def build_app(platform: Platform, *, public: bool = False) -> Starlette:
    """GET/HEAD /blobs/sha256/<hex>: the blob with immutable cache headers, ETag = the digest,
    single byte ranges (206 + Content-Range, 416 when unsatisfiable) and If-None-Match (304)."""
    blobs = _VerifiedBlobs(platform)

    def get_blob(request: Request) -> Response:
        hexd = request.path_params["hex"]
        try:
            if not HEX.match(hexd):
                raise InvalidArgument("blob path must be /blobs/sha256/<64 lowercase hex>")
            digest = "sha256:" + hexd
            token = _bearer(request)
            if token or not public:  # a credential, when given, is always checked
                if not token:
                    raise Unauthenticated("blob download needs a device credential (Authorization: Bearer <token>)")
                authorize(platform, token, digest)
            data = blobs.get(digest)
        except WalleError as e:
            headers = {"www-authenticate": 'Bearer realm="walle"'} if e.grpc_code == "UNAUTHENTICATED" else {}
            return JSONResponse({"error": e.message}, status_code=HTTP_STATUS.get(e.grpc_code, 500), headers=headers)
        etag = f'"{hexd}"'
        headers = {"etag": etag, "accept-ranges": "bytes",
                   "cache-control": ("public, " if public else "private, ") + IMMUTABLE}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        size = len(data)
        rng_header = request.headers.get("range", "")
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != etag:
            rng_header = ""  # the client holds other bytes: send the whole blob
        try:
            rng = parse_range(rng_header, size)
        except Unsatisfiable:
            headers["content-range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        if rng is None:
            return Response(data, media_type="application/octet-stream", headers=headers)
        first, last = rng
        headers["content-range"] = f"bytes {first}-{last}/{size}"
        return Response(data[first:last + 1], status_code=206, media_type="application/octet-stream", headers=headers)

    return Starlette(routes=[Route("/blobs/sha256/{hex}", get_blob, methods=["GET", "HEAD"])])


def start_blob_server(platform: Platform, host: str = "127.0.0.1", port: int = 0, *, public: bool = False,
                      certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                      url_base: str = "") -> tuple[int, Callable[[], None]]:
    """Serve blobs from a background thread and tell devices where (`url_base`, default this server's
    https://host:port/blobs/). Returns (bound port, stop function)."""
    bound, stop = serve_in_thread(build_app(platform, public=public), host, port, certfile=certfile,
                                  keyfile=keyfile, name="blobs")
    scheme = "https" if certfile else "http"
    platform.blob_url_base = url_base or f"{scheme}://{host}:{bound}/blobs/"
    platform.blob_url_credential = not public  # the URL fronts this server: it checks device tokens

    def stop_and_forget() -> None:
        platform.blob_url_base, platform.blob_url_credential = "", False
        stop()

    return bound, stop_and_forget


def released_digests(platform: Platform) -> set[str]:
    """Bundles of active releases (what devices may be handed now)."""
    return {r["bundle_digest"] for r in platform.state.releases(active_only=True)}


def export_blobs(platform: Platform, folder: str | os.PathLike) -> int:
    """Write the bundles of active releases and every published resource into `folder`/sha256/<hex>
    for a static file server or CDN (the operator's choice: that content is then public). Files are
    written atomically and never rewritten; returns how many were written."""
    out = pathlib.Path(folder) / "sha256"
    out.mkdir(parents=True, exist_ok=True)
    digests = released_digests(platform) | {"sha256:" + p.name for p in platform.blob_dir.iterdir()
                                              if HEX.match(p.name)}
    written = 0
    for digest in sorted(digests):
        path = out / digest[7:]
        if path.is_file():
            continue
        try:
            data = platform.blob(digest)
        except NotFound:
            continue
        write_atomic(path, data)
        written += 1
    return written
