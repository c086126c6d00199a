"""Resumable HTTPS downloads of content-addressed blobs (bundles, resources) from the URL base the
platform announces, typically a CDN or the platform's blob server.

Bytes arrive in a partial file `<dir>/<hex>.part`; a cut download resumes from what is already
there with a Range request. The finished bytes are verified against the digest before anyone sees
them, so a wrong or stale cache only fails the download, and the caller falls back to gRPC.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pathlib
import re
import ssl
import threading
import urllib.error
import urllib.request

log = logging.getLogger("walle.device.blobfetch")
CHUNK = 64 * 1024
HEX = re.compile(r"^sha256:([0-9a-f]{64})$")


class HttpDownloadError(Exception):
    """The blob could not be downloaded over HTTP (the caller falls back to gRPC)."""


class _Restart(Exception):
    """The partial file is unusable: start again from byte 0."""


class HttpBlobs:
    def __init__(self, partial_dir: str | os.PathLike, metadata: tuple = (), ca_pem: str = "",
                 timeout: float = 30.0, attempts: int = 4, max_bytes: int = 1 << 30):
        self.partial_dir = pathlib.Path(partial_dir)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # The device credential goes only over HTTPS, and only where the platform says its own
        # access-checked blob server answers: a CDN or static cache never sees device tokens.
        self.authorization = dict((k.lower(), v) for k, v in metadata).get("authorization", "")
        self.ssl = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
        self.timeout = timeout
        self.attempts = attempts
        self.max_bytes = max_bytes
        self.stats = {"requests": 0, "resumed": 0, "bytes": 0}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def fetch(self, base: str, digest: str, size: int = 0, credential: bool = False) -> bytes:
        """The verified bytes of `digest` from <base>sha256/<hex>; raises HttpDownloadError.
        `credential`: send the device token (the platform announced its own blob server)."""
        m = HEX.match(digest or "")
        if not m:
            raise HttpDownloadError(f"not a sha256 digest: {digest[:80]!r}")
        if not base.startswith(("https://", "http://")):
            raise HttpDownloadError(f"blob URL base must be http(s): {base[:200]!r}")
        url = base.rstrip("/") + "/sha256/" + m.group(1)
        part = self.partial_dir / (m.group(1) + ".part")
        limit = size or self.max_bytes
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            last: Exception | None = None
            for _ in range(self.attempts):
                try:
                    self._download(url, part, limit, credential)
                    break
                except HttpDownloadError:
                    raise
                except _Restart:
                    part.unlink(missing_ok=True)
                    last = HttpDownloadError("the server's range did not continue the partial file")
                except (OSError, http.client.HTTPException, ssl.SSLError) as e:
                    last = e  # cut connection, timeout, reset: keep the partial file and resume
                    log.info("download of %s interrupted (%s): resuming from %d bytes", url, e,
                             part.stat().st_size if part.exists() else 0)
            else:
                raise HttpDownloadError(f"{url}: {last}")
            data = part.read_bytes()
            part.unlink(missing_ok=True)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise HttpDownloadError(f"{url} served other bytes: expected {digest}, got {actual}")
        return data

    def discard(self, digest: str) -> None:
        """Drop a partial download (the blob arrived another way)."""
        m = HEX.match(digest or "")
        if m:
            (self.partial_dir / (m.group(1) + ".part")).unlink(missing_ok=True)

    def _download(self, url: str, part: pathlib.Path, limit: int, credential: bool) -> None:
        """Bring `part` to the complete blob, resuming from its current length."""
        have = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        if credential and self.authorization and url.startswith("https://"):
            headers["Authorization"] = self.authorization
        req = urllib.request.Request(url, headers=headers)
        self.stats["requests"] += 1
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout,
                                          context=self.ssl if url.startswith("https://") else None)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                raise _Restart() from None  # the partial file is longer than the blob
            raise HttpDownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        with resp:
            if resp.status == 206:
                m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != have:
                    raise _Restart()
                total = int(m.group(3)) if m.group(3) != "*" else 0
                mode = "ab"
                self.stats["resumed"] += 1
            elif resp.status == 200:
                total, mode = int(resp.headers.get("content-length") or 0), "wb"  # the whole blob again
                have = 0
            else:
                raise HttpDownloadError(f"{url}: unexpected HTTP {resp.status}")
            if total > limit:
                part.unlink(missing_ok=True)
                raise HttpDownloadError(f"{url}: {total} bytes is more than the expected {limit}")
            with open(part, mode) as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    have += len(chunk)
                    if have > limit:
                        f.close()
                        part.unlink(missing_ok=True)
                        raise HttpDownloadError(f"{url}: more than the expected {limit} bytes")
                    f.write(chunk)
                    f.flush()  # what arrived survives a cut connection
                    self.stats["bytes"] += len(chunk)
            if total and have < total:
                raise http.client.IncompleteRead(b"", total - have)
