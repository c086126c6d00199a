"""The device's tunnel to the cloud.

Up (`UpTunnel`): an on-disk queue in SQLite (WAL). `send()` gives each record the next per-device
sequence number and commits it before returning, so a record survives a crash or a restart. A flusher
uploads the queue in order, in batches of at most 500 records or 1 MiB (zlib-compressed), and deletes
records only after the cloud's ack: delivery is at-least-once, and the cloud drops records it already
holds by (device_id, epoch, seq); the epoch is random per queue, so a wiped queue starts a new stream. While offline it retries with exponential backoff and jitter.

Queue cap: at most `max_records` records are kept. When a send would go over, the oldest records of
the lowest priority class are dropped first: "log" (0), then "event" and task topics "task.*" (1),
then "behavior" (2); "run_report" and "delivery" (3) are dropped only if nothing else is left. Dropped
records are counted in `stats()["dropped"]`. The queue is also capped in bytes (`max_bytes`, same order),
and each task's own records in it (`task_max_bytes`): a task over its share gets ResourceExhausted, and
one run may queue at most RUN_MAX_BYTES. Space is reclaimed as records are acked (incremental vacuum and
a WAL checkpoint), so the file shrinks back when the queue drains.

Down (`DownTunnel`): versioned resources by name (e.g. "coda/global_model"), verified against their
sha256 digest and cached on disk by digest, so an unchanged resource is never downloaded twice.

Tasks reach both through host-API ops (`tunnel_ops`): `tunnel.up(topic, data)` may only use the task's
own topics "task.<taskname>" / "task.<taskname>.<sub>" or the shared topics in TASK_SHARED_TOPICS;
`tunnel.down(name, version="", format="auto")` returns a resource as parsed JSON or base64 text.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import sqlite3
import tempfile
import threading
import time
import zlib
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from walle.protos import coda_pb2, tunnel_pb2, tunnel_pb2_grpc
from walle.protos.errors import ResourceExhausted

from .blobfetch import HttpBlobs, HttpDownloadError
from .recovery import CorruptDatabase, is_corruption, set_aside

log = logging.getLogger("walle.device.tunnel")

MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 1 << 20
MAX_BATCHES_PER_UPLOAD = 8
MAX_RECORD_BYTES = 256 * 1024
DEFAULT_MAX_RECORDS = 100_000
DEFAULT_MAX_BYTES = 128 << 20  # the whole queue
DEFAULT_TASK_MAX_BYTES = 16 << 20  # one task's records waiting in the queue
RUN_MAX_BYTES = 4 << 20  # what one run may queue
_RECLAIM_PAGES = 256  # free pages that trigger an incremental vacuum
TOPIC_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[A-Za-z0-9_-]+)*$")
TASK_SHARED_TOPICS = frozenset({"behavior", "behavior.batch"})
DOWN_MAX_BYTES = 4 << 20
# The cloud will never take such a record (malformed, or a report on a release it never sent).
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class TunnelError(ValueError):
    """A record or resource request is refused; the message names why."""


def priority(topic: str) -> int:
    if topic in ("run_report", "delivery"):
        return 3
    if topic == "behavior":
        return 2
    if topic == "log":
        return 0
    return 1


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter in [d/2, d]: many devices do not retry in lockstep."""
    d = min(cap, base * (2 ** min(attempt, 20)))
    return random.uniform(d / 2, d)


class UpTunnel:
    def __init__(self, db_path: str | os.PathLike, channel: grpc.Channel | None, metadata: tuple = (), *,
                 max_records: int = DEFAULT_MAX_RECORDS, durable: bool = True, timeout: float = 30.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, task_max_bytes: int = DEFAULT_TASK_MAX_BYTES):
        self.path = pathlib.Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stub = tunnel_pb2_grpc.TunnelServiceStub(channel) if channel is not None else None
        self.metadata = tuple(metadata)
        self.max_records = max_records
        self.max_bytes, self.task_max_bytes = max_bytes, task_max_bytes
        self.timeout = timeout
        self.durable = durable
        self.recovered = ""   # why the queue file was found corrupt and set aside at open, if it was
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            if not is_corruption(e):
                raise   # e.g. a full disk: the file is sound, never set it aside
            self._db = self._recover(e)
        self.epoch = self._db.execute("SELECT value FROM up_meta WHERE key='epoch'").fetchone()[0]
        if "owner" not in {r[1] for r in self._db.execute("PRAGMA table_info(up_queue)")}:
            self._db.execute("ALTER TABLE up_queue ADD COLUMN owner TEXT")  # the task that queued it
        self._bytes = self._db.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM up_queue").fetchone()[0]
        self._owner_bytes: dict[str, int] = dict(self._db.execute(
            "SELECT owner, SUM(length(payload)) FROM up_queue WHERE owner IS NOT NULL GROUP BY owner"))
        self._lock = threading.Lock()        # guards the connection
        self._upload_lock = threading.Lock()  # one upload at a time keeps order
        self._unary = True  # the platform has UploadBatch (until it answers UNIMPLEMENTED)
        self._stats = {"sent": 0, "acked": 0, "duplicates": 0, "dropped": 0, "rejected": 0, "errors": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.unauthenticated = False
        self.last_error = ""

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                # INCREMENTAL: freed pages can be given back to the file system (VACUUM applies it to an old file)
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                db.execute("VACUUM")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA journal_size_limit={4 << 20}")
            # FULL: a committed send() survives power loss, not only a process crash.
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            # AUTOINCREMENT never reuses a seq, even after the highest records were deleted.
            db.execute("""CREATE TABLE IF NOT EXISTS up_queue (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, ts_ms INTEGER NOT NULL,
                prio INTEGER NOT NULL, payload BLOB NOT NULL)""")
            db.execute("CREATE INDEX IF NOT EXISTS up_queue_prio ON up_queue(prio, seq)")
            # The stream epoch: picked once per queue, so a wiped or new queue (whose seqs restart)
            # is a new stream to the cloud, never mistaken for records it already holds.
            db.execute("CREATE TABLE IF NOT EXISTS up_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO up_meta VALUES ('epoch', ?)", [random.getrandbits(63) or 1])
            # Keys of records that must be queued at most once (e.g. one report per completed install).
            db.execute("CREATE TABLE IF NOT EXISTS up_once (key TEXT PRIMARY KEY)")
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise CorruptDatabase(f"quick_check: {problem}")
            return db
        except BaseException:
            db.close()
            raise

    def _recover(self, error: Exception) -> sqlite3.Connection:
        """The queue file is corrupt: set it aside (it may be salvaged by hand) and start an empty queue,
        a new stream (epoch) to the cloud, so its restarted seqs are not taken for duplicates."""
        self.recovered = set_aside(self.path, str(error)) + "; the up-tunnel queue restarted empty"
        return self._open()

    # -- queue ----------------------------------------------------------------------------------
    def send(self, topic: str, payload: bytes | dict | list | str, owner: str | None = None, *,
             once_key: str = "") -> int:
        """Queue one record durably; returns its seq. `owner`: the task it is charged to (None: the host).
        With `once_key`, a record with the same key that was queued before (even by a previous process) is
        not queued again: 0 is returned."""
        if not isinstance(topic, str) or not TOPIC_RE.match(topic) or len(topic) > 128:
            raise TunnelError(f"up-tunnel topic {topic!r} is invalid: lower-case words separated by '.'")
        if isinstance(payload, (dict, list, str)):
            payload = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        if not isinstance(payload, (bytes, bytearray)):
            raise TunnelError(f"up-tunnel payload must be bytes or JSON-able (got {type(payload).__name__})")
        if len(payload) > MAX_RECORD_BYTES:
            raise TunnelError(f"up-tunnel record of {len(payload)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
        with self._lock:
            if owner is not None and self._owner_bytes.get(owner, 0) + len(payload) > self.task_max_bytes:
                raise ResourceExhausted(
                    f"task {owner!r} has {self._owner_bytes.get(owner, 0)} bytes waiting in the up-tunnel queue; "
                    f"{len(payload)} more would be over its {self.task_max_bytes}-byte share (retry once uploaded)")
            saved = self._bytes, dict(self._owner_bytes), self._stats["dropped"]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if once_key and not self._db.execute("INSERT OR IGNORE INTO up_once (key) VALUES (?)",
                                                     [once_key]).rowcount:
                    self._db.execute("ROLLBACK")
                    return 0
                cur = self._db.execute("INSERT INTO up_queue (topic, ts_ms, prio, payload, owner) VALUES (?, ?, ?, ?, ?)",
                                       [topic, int(time.time() * 1000), priority(topic), bytes(payload), owner])
                seq = cur.lastrowid
                self._charge(owner, len(payload))
                self._enforce_cap()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._bytes, self._owner_bytes, self._stats["dropped"] = saved
                raise
        self._wake.set()
        return seq

    def _charge(self, owner: str | None, delta: int) -> None:
        self._bytes += delta
        if owner is not None:
            left = self._owner_bytes.get(owner, 0) + delta
            if left > 0:
                self._owner_bytes[owner] = left
            else:
                self._owner_bytes.pop(owner, None)

    def _enforce_cap(self) -> None:
        over = self._db.execute("SELECT COUNT(*) FROM up_queue").fetchone()[0] - self.max_records
        while over > 0 or self._bytes > self.max_bytes:
            victims = self._db.execute("SELECT seq, owner, length(payload) FROM up_queue ORDER BY prio, seq LIMIT ?",
                                       [max(over, 64)]).fetchall()
            if not victims:
                break
            for seq, owner, size in victims:
                if over <= 0 and self._bytes <= self.max_bytes:
                    break
                self._db.execute("DELETE FROM up_queue WHERE seq = ?", [seq])
                self._charge(owner, -size)
                self._stats["dropped"] += 1
                over -= 1

    def pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM up_queue").fetchone()[0]

    def pending_records(self) -> list[tuple[int, str]]:
        with self._lock:
            return self._db.execute("SELECT seq, topic FROM up_queue ORDER BY seq").fetchall()

    def stats(self) -> dict:
        with self._lock:
            queued = self._bytes
        return dict(self._stats, pending=self.pending(), pending_bytes=queued)

    def owner_bytes(self, owner: str) -> int:
        """Bytes of `owner`'s records waiting in the queue."""
        with self._lock:
            return self._owner_bytes.get(owner, 0)

    # -- upload ---------------------------------------------------------------------------------
    def _batches(self) -> list[tuple[tunnel_pb2.UpBatch, int]]:
        """Up to MAX_BATCHES_PER_UPLOAD batches from the head of the queue, with their last seq."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, ts_ms, payload FROM up_queue ORDER BY seq LIMIT ?",
                                    [MAX_BATCH_RECORDS * MAX_BATCHES_PER_UPLOAD]).fetchall()
        out, cur, size = [], [], 0
        for seq, topic, ts_ms, payload in rows:
            if cur and (len(cur) >= MAX_BATCH_RECORDS or size + len(payload) > MAX_BATCH_BYTES):
                out.append(cur)
                cur, size = [], 0
            cur.append(tunnel_pb2.UpRecord(seq=seq, topic=topic, ts_ms=ts_ms, payload=payload))
            size += len(payload) + len(topic) + 16
        if cur:
            out.append(cur)
        return [(tunnel_pb2.UpBatch(zlib_records=zlib.compress(tunnel_pb2.UpRecords(records=recs).SerializeToString(), 6),
                                    count=len(recs), epoch=self.epoch), recs[-1].seq) for recs in out]

    def flush_once(self) -> int:
        """One Upload call for the head of the queue; returns how many records were acked.

        Raises grpc.RpcError when the cloud cannot be reached; records stay queued."""
        if self.stub is None:
            raise TunnelError("up tunnel has no channel")
        with self._upload_lock:
            batches = self._batches()
            if not batches:
                return 0
            last_seq = batches[-1][1]
            n = sum(b.count for b, _ in batches)
            try:
                ack = self._upload([b for b, _ in batches])
            except grpc.RpcError as e:
                if e.code() in REFUSED:
                    return self._isolate(batches, e.details())
                self._stats["errors"] += 1
                raise
            if ack.max_seq > self._last_assigned():
                # The cloud holds seqs this queue never assigned (a restored copy of an old queue):
                # what it called duplicates may be new. Start a new epoch and send them again.
                log.warning("cloud holds seq %d of epoch %d but this queue assigned only up to %d; "
                            "starting a new epoch", ack.max_seq, self.epoch, self._last_assigned())
                self._new_epoch()
                return 0
            # Deleting only after the ack is what makes delivery at-least-once.
            self._delete_through(last_seq)
            self._stats["sent"] += n
            self._stats["acked"] += ack.accepted
            self._stats["duplicates"] += ack.duplicates
            return n

    def _upload(self, batches: list[tunnel_pb2.UpBatch]) -> tunnel_pb2.UploadAck:
        """One Upload call; a single batch goes as a unary UploadBatch (cheaper at both ends) unless
        the platform predates it."""
        if len(batches) == 1 and self._unary:
            try:
                return self.stub.UploadBatch(batches[0], metadata=self.metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("the platform has no UploadBatch (an older version): uploading as a stream")
                self._unary = False
        return self.stub.Upload(iter(batches), metadata=self.metadata, timeout=self.timeout)

    def _isolate(self, batches: list[tuple[tunnel_pb2.UpBatch, int]], why: str) -> int:
        """The cloud refused a batch: send its records one by one and drop only those it refuses,
        so one bad record (e.g. a topic the cloud has no handler for) cannot block or sink the rest."""
        log.warning("cloud refused an upload (%s); retrying its records one by one", why)
        sent = 0
        for b, _ in batches:
            for rec in tunnel_pb2.UpRecords.FromString(zlib.decompress(b.zlib_records)).records:
                one = tunnel_pb2.UpBatch(zlib_records=zlib.compress(
                    tunnel_pb2.UpRecords(records=[rec]).SerializeToString()), count=1, epoch=self.epoch)
                try:
                    ack = self._upload([one])
                    self._stats["acked"] += ack.accepted
                    self._stats["duplicates"] += ack.duplicates
                    self._stats["sent"] += 1
                except grpc.RpcError as e:
                    if e.code() not in REFUSED:
                        self._stats["errors"] += 1
                        raise  # offline again: what is left stays queued
                    # The cloud will never take this record; keeping it would block the queue forever.
                    log.error("cloud refused up-tunnel record seq %d (topic %r), dropped: %s", rec.seq, rec.topic,
                              e.details())
                    self._stats["rejected"] += 1
                self._delete_through(rec.seq)
                sent += 1
        return sent

    def _last_assigned(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='up_queue'").fetchone()
        return row[0] if row else 0

    def _new_epoch(self) -> None:
        with self._lock:
            self.epoch = random.getrandbits(63) or 1
            self._db.execute("UPDATE up_meta SET value=? WHERE key='epoch'", [self.epoch])

    def _delete_through(self, seq: int) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._db.execute("SELECT owner, SUM(length(payload)) FROM up_queue WHERE seq <= ? GROUP BY owner",
                                        [seq]).fetchall()
                self._db.execute("DELETE FROM up_queue WHERE seq <= ?", [seq])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for owner, size in gone:
                self._charge(owner, -size)
            self._reclaim()

    def _reclaim(self) -> None:
        """Give freed pages back to the file system, so the file shrinks as the queue drains."""
        if self._db.execute("PRAGMA freelist_count").fetchone()[0] >= _RECLAIM_PAGES:
            self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page per call
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def flush(self, timeout: float = 10.0) -> bool:
        """Upload until the queue is empty; False if it is not empty by the deadline."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            try:
                if self.flush_once() == 0 and self.pending() == 0:
                    return True
                attempt = 0
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.unauthenticated = True
                    self.last_error = e.details() or "unauthenticated"
                    return False
                attempt += 1
                delay = min(backoff_delay(attempt, base=0.1, cap=2.0), deadline - time.monotonic())
                if delay <= 0:
                    return False
                time.sleep(delay)
            if time.monotonic() >= deadline:
                return self.pending() == 0

    # -- background flusher -------------------------------------------------------------------
    def start(self, interval: float = 1.0) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(interval,), name="walle-up-tunnel", daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        attempt = 0
        while not self._stop.is_set():
            delay = interval if attempt == 0 else backoff_delay(attempt)
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                while self.flush_once():
                    pass
                if attempt:
                    log.info("up tunnel reconnected; queue drained")
                attempt = 0
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.unauthenticated = True
                    self.last_error = e.details() or "unauthenticated"
                    log.error("up tunnel stopped: the platform refused this device's credential (%s); "
                              "%d records stay queued until the device is enrolled again", e.details(), self.pending())
                    return
                attempt += 1
                self.last_error = f"{e.code().name}: {e.details()}"
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("up tunnel offline (%s); %d records queued, retrying with backoff",
                                self.last_error, self.pending())

    def stop(self, flush_timeout: float = 0.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if flush_timeout > 0 and self.stub is not None and self.pending():
            self.flush(flush_timeout)

    def close(self) -> None:
        self.stop()
        with self._lock:
            self._db.close()


class DownTunnel:
    def __init__(self, cache_dir: str | os.PathLike, channel: grpc.Channel, metadata: tuple = (), timeout: float = 60.0,
                 blob_http: HttpBlobs | None = None):
        self.cache_dir = pathlib.Path(cache_dir)
        self.blob_http = blob_http  # HTTPS downloads when the platform announces a URL base
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stub = tunnel_pb2_grpc.TunnelServiceStub(channel)
        self.metadata = tuple(metadata)
        self.timeout = timeout

    def _cached(self, digest: str) -> bytes | None:
        path = self.cache_dir / digest.replace(":", "-")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            path.unlink(missing_ok=True)  # corrupted on disk: fetch again
            return None
        return data

    def resource_info(self, name: str, version: str = "") -> tunnel_pb2.ResourceInfo:
        """The resource's info (latest version when `version` is ""), without its bytes."""
        req = tunnel_pb2.ResourceRequest(name=name, version=version)
        return self.stub.GetResource(req, metadata=self.metadata, timeout=self.timeout)

    def fetch_resource(self, name: str, version: str = "") -> tuple[tunnel_pb2.ResourceInfo, bytes]:
        """The resource's info and verified bytes (latest version when `version` is "")."""
        info = self.resource_info(name, version)
        data = self._cached(info.digest)
        if data is not None:
            return info, data
        # the version just resolved, even if a newer one lands meanwhile
        req = tunnel_pb2.ResourceRequest(name=name, version=info.version)
        data = None
        if self.blob_http is not None and info.blob_url_base:
            try:
                data = self.blob_http.fetch(info.blob_url_base, info.digest, info.size,
                                            credential=info.blob_url_wants_credential)
            except HttpDownloadError as e:
                log.warning("HTTPS download of resource %s@%s failed (%s); falling back to gRPC", name, info.version, e)
        if data is None:
            parts = [c.data for c in self.stub.FetchResource(req, metadata=self.metadata, timeout=self.timeout)]
            data = b"".join(parts)
            if self.blob_http is not None:
                self.blob_http.discard(info.digest)  # a partial HTTPS download is no longer needed
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != info.digest:
            raise TunnelError(f"resource {name}@{info.version} digest mismatch: expected {info.digest}, got {actual}")
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.cache_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cache_dir / info.digest.replace(":", "-"))
        return info, data


def _up_payload(topic: str, data: Any) -> bytes | dict | list | str:
    if topic == "behavior":
        # The cloud's behavior handler expects a coda BehaviorLog protobuf; tasks pass its fields.
        if not isinstance(data, dict):
            raise TunnelError("tunnel.up('behavior', data): data must be a dict of BehaviorLog fields "
                              "(ts, item_id, event, value)")
        try:
            return json_format.ParseDict(data, coda_pb2.BehaviorLog()).SerializeToString()
        except json_format.ParseError as e:
            raise TunnelError(f"tunnel.up('behavior'): {e}") from None
    if topic == "behavior.batch":
        # Aggregated behaviour, compressed on the device: zlib(BehaviorBatch{first_seq, logs}).
        if not isinstance(data, dict):
            raise TunnelError("tunnel.up('behavior.batch', data): data must be {'first_seq': n, 'logs': [BehaviorLog fields]}")
        try:
            return zlib.compress(json_format.ParseDict(data, coda_pb2.BehaviorBatch()).SerializeToString())
        except json_format.ParseError as e:
            raise TunnelError(f"tunnel.up('behavior.batch'): {e}") from None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    try:
        return json.dumps(data, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TunnelError(f"tunnel.up({topic!r}): data is not JSON-able: {e}") from None


def tunnel_ops(task_name: str, up: UpTunnel, down: DownTunnel | None) -> dict[str, Callable]:
    """Host-API ops a task granted the "tunnel" API may call; make them once per run (RUN_MAX_BYTES)."""
    own = f"task.{task_name}"
    queued = [0]  # bytes this run has queued

    def up_op(topic: str, data: Any = None) -> dict:
        if not isinstance(topic, str) or not (topic == own or topic.startswith(own + ".") or topic in TASK_SHARED_TOPICS):
            raise TunnelError(f"task {task_name!r} may only send to topics {own!r}, {own + '.<name>'!r} or "
                              f"{sorted(TASK_SHARED_TOPICS)} (got {topic!r})")
        payload = _up_payload(topic, data)
        if isinstance(payload, str):
            payload = payload.encode()
        if queued[0] + len(payload) > RUN_MAX_BYTES:
            raise ResourceExhausted(f"this run has queued {queued[0]} bytes on the up tunnel; {len(payload)} more "
                                    f"would be over the {RUN_MAX_BYTES}-byte limit per run")
        seq = up.send(topic, payload, owner=task_name)
        queued[0] += len(payload)
        return {"seq": seq}

    def down_op(name: str, version: str = "", format: str = "auto") -> dict:
        """format "info": the resource's name, version, digest and metadata only (no download)."""
        if down is None:
            raise TunnelError("this device has no down tunnel")
        if format not in ("auto", "json", "base64", "info"):
            raise TunnelError(f"tunnel.down format must be 'auto', 'json', 'base64' or 'info' (got {format!r})")
        try:
            if format == "info":
                info, data = down.resource_info(name, version), b""
            else:
                info, data = down.fetch_resource(name, version)
        except grpc.RpcError as e:
            raise TunnelError(f"tunnel.down({name!r}): {e.code().name}: {e.details()}") from None
        if len(data) > DOWN_MAX_BYTES:
            raise TunnelError(f"resource {name}@{info.version} is {len(data)} bytes; tasks may read at most "
                              f"{DOWN_MAX_BYTES} through tunnel.down")
        out = {"name": info.name, "version": info.version, "digest": info.digest,
               "metadata": json.loads(info.metadata_json or "{}")}
        if format == "info":
            return out
        if format in ("auto", "json"):
            try:
                out.update(encoding="json", data=json.loads(data.decode("utf-8")))
                return out
            except (UnicodeDecodeError, ValueError):
                if format == "json":
                    raise TunnelError(f"resource {name}@{info.version} is not UTF-8 JSON; use format='base64'") from None
        out.update(encoding="base64", data=base64.b64encode(data).decode())
        return out

    return {"tunnel.up": up_op, "tunnel.down": down_op}


__all__ = ["UpTunnel", "DownTunnel", "TunnelError", "tunnel_ops", "backoff_delay", "priority"]
