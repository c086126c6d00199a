"""The platform as one object over a data folder. Its methods are the AdminService RPCs (request
proto in, reply proto out), so the CLI drives a local data folder and a remote server alike.

Data folder layout:
  state.sqlite3     releases, devices, audit trail, reports, resources (PlatformState; or a shared
                    PostgreSQL named by --state / WALLE_STATE, for serving replicas)
  repo-id           the name of this folder's task repository (submit intents are kept per repository)
  tasks/            the task git repository and the bundle cache (TaskRepository)
  blobs/sha256/     published resources, content-addressed
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import math
import re
import os
import pathlib
import tempfile
import uuid
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from walle.protos import admin_pb2, bundle, device_pb2, tunnel_pb2
from walle.protos.datadir import keep_out_of_git

from .auth import DeviceCredentials, OperatorCredentials
from .errors import InvalidArgument, NotFound, PermissionDenied, WalleError
from .groupcommit import GroupCommit
from .guards import GuardRPCs
from .manifest import strip_ignored, validate_task_files
from .observe import Observe
from .releases import MAX_DEVICE_INFO_BYTES, ReleaseManager, check_device_info, device_attrs, info_from_attrs, release_to_proto
from .runnable import check_runnable
from .state import PlatformState, UploadWrite, open_state, state_url
from .taskrepo import TaskRepository, TaskVersion

log = logging.getLogger("walle.platform")

MAX_UPLOAD_RECORDS = 10_000
MAX_UPLOAD_BYTES = 16 << 20
RESOURCE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-./")
EPOCH_SPAN = 1 << 40          # seqs per up-tunnel epoch; stored seq = slot * EPOCH_SPAN + seq
MAX_EPOCHS_PER_DEVICE = 1000
REPORT_STATUS_RE = re.compile(r"^[a-z_]{1,32}$")
DELIVERY_STATUSES = ("installed", "rejected", "rolled_back")

MEMO_MAX_BYTES = 64 << 20    # decision memo: keys and replies
GRANT_TTL_S = 3600           # a replaced active set still authorises downloads this long


@dataclass(frozen=True)
class Grant:
    """What one active set lets a device download and report on."""
    digests: frozenset
    releases: frozenset
    tunnel: bool


class Decision(NamedTuple):
    """One memoised GetActiveTasks answer."""
    reply: bytes       # the serialized ActiveTasks
    grant: Grant
    app_version: str
    info: bytes        # the DeviceInfo as decided on (device and user ids from the credential)


# (device_id, [(seq, ts_ms, payload bytes)]) -> (accepted, duplicates)
UploadHandler = Callable[[str, list[tuple[int, int, bytes]]], tuple[int, int]]


def task_version_to_proto(tv: TaskVersion) -> admin_pb2.TaskVersion:
    return admin_pb2.TaskVersion(name=tv.name, version=tv.version, message=tv.message, author=tv.author,
                                 created_at=tv.created_at, bundle_digest=tv.bundle_digest,
                                 bundle_size=tv.bundle_size, manifest=tv.manifest.to_proto(), created=tv.created)


BLOB_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class Platform(Observe, GuardRPCs):
    def __init__(self, data_dir: str | os.PathLike, *, keys=None, state: str = ""):
        """`keys`: the platform's PlatformKeys (walle.platform.pki); they sign every released bundle
        and are handed to devices at enrollment. Without them bundles go out unsigned (--insecure).
        `state`: the state URL (walle.platform.state); default $WALLE_STATE or SQLite in `data_dir`."""
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        keep_out_of_git(self.data_dir)  # keys, tokens and databases live here
        self.keys = keys
        signer = keys.sign if keys is not None else None
        self.state = open_state(state_url(self.data_dir, state))
        self.repo = TaskRepository(self.data_dir / "tasks", journal=StateSubmitJournal(self.state, _repo_id(self.data_dir)))
        self.credentials = DeviceCredentials(self.state)
        self.operators = OperatorCredentials(self.state)
        self.releases = ReleaseManager(self.state, self.repo, signer=signer)
        self.blob_dir = self.data_dir / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        # Where devices may also download blobs over HTTPS ("" = gRPC only); see blobs_http.py.
        self.blob_url_base = ""
        # Devices send their credential there only when it is our own access-checked blob server.
        self.blob_url_credential = False
        self.upload_handlers: dict[str, UploadHandler] = {}
        self._seen: dict[str, tuple[int, str, bytes]] = {}  # device -> (time, app version, DeviceInfo bytes)
        self._memo: tuple[int, dict, int] = (-1, {}, 0)  # (revision, (request, device, user) -> Decision, bytes)
        self._seen_lock = threading.Lock()
        self._handed: dict[str, dict[Grant, float]] = {}  # device -> sets it was handed -> last time
        self._grants: dict[Grant, Grant] = {}
        self._unrecorded: set[tuple[str, str]] = set()   # (device, release) not yet in device_releases
        self._trim_due = False
        self._uploads: GroupCommit[UploadWrite] = GroupCommit(self._store_uploads)

    # -- tasks ----------------------------------------------------------------------------------
    def SubmitTask(self, req: admin_pb2.SubmitTaskRequest) -> admin_pb2.TaskVersion:
        try:
            files = bundle.unpack(req.archive, bundle.digest(req.archive))
        except bundle.BundleError as e:
            raise InvalidArgument(f"task archive refused: {e}") from None
        check_runnable(files, validate_task_files(strip_ignored(files)).entry)
        # The audit entry is written by the repository's journal before the submit is acknowledged.
        tv = self.repo.submit_files(files, message=req.message or None, author=req.author or "walle")
        self.releases.publish(tv.name, tv.version)  # replicas serve it from the shared state
        return task_version_to_proto(tv)

    def ListTasks(self, req: admin_pb2.Empty | None = None) -> admin_pb2.TaskList:
        return admin_pb2.TaskList(tasks=[task_version_to_proto(t) for t in self.repo.list_tasks()])

    def GetTaskHistory(self, req: admin_pb2.TaskRef) -> admin_pb2.TaskHistory:
        return admin_pb2.TaskHistory(versions=[task_version_to_proto(t) for t in self.repo.history(req.name)])

    def DiffTask(self, req: admin_pb2.DiffRequest) -> admin_pb2.DiffReply:
        return admin_pb2.DiffReply(unified_diff=self.repo.diff(req.name, req.v1, req.v2))

    def ShowTask(self, req: admin_pb2.TaskRef) -> admin_pb2.TaskFiles:
        tv = self.repo.get(req.name, req.version)
        files, digests = {}, {}
        for path, data in self.repo.files(req.name, tv.version).items():
            digests[path] = bundle.digest(data)
            try:
                files[path] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[path] = f"<binary {len(data)} bytes>"
        return admin_pb2.TaskFiles(version=task_version_to_proto(tv), files=files, digests=digests)

    # -- releases -------------------------------------------------------------------------------
    def _release(self, row: dict) -> admin_pb2.Release:
        return release_to_proto(row, self.state.release_stats(row["id"]))

    def CreateRelease(self, req: admin_pb2.CreateReleaseRequest) -> admin_pb2.Release:
        rollout = req.rollout if (req.has_rollout or req.rollout) else None
        row = self.releases.create(req.task, req.version, rule=req.rule, rollout=rollout, stage=req.stage,
                                   channel=req.channel, allow=list(req.allow), deny=list(req.deny),
                                   actor=req.actor or "operator", config=dict(req.config))
        return self._release(row)

    def ListReleases(self, req: admin_pb2.ReleaseFilter) -> admin_pb2.ReleaseList:
        rows = self.state.releases(task=req.task, channel=req.channel, active_only=req.active_only)
        stats = self.state.release_stats_many([r["id"] for r in rows])
        return admin_pb2.ReleaseList(releases=[release_to_proto(r, stats[r["id"]]) for r in rows])

    def GetRelease(self, req: admin_pb2.ReleaseRef) -> admin_pb2.Release:
        return self._release(self.releases.get(req.id))

    def SetRollout(self, req: admin_pb2.SetRolloutRequest) -> admin_pb2.Release:
        return self._release(self.releases.set_rollout(req.id, req.rollout, req.stage, actor=req.actor or "operator"))

    def PauseRelease(self, req: admin_pb2.ReleaseRef) -> admin_pb2.Release:
        return self._release(self.releases.pause(req.id, actor=req.actor or "operator"))

    def ResumeRelease(self, req: admin_pb2.ReleaseRef) -> admin_pb2.Release:
        return self._release(self.releases.resume(req.id, actor=req.actor or "operator"))

    def RevokeRelease(self, req: admin_pb2.ReleaseRef) -> admin_pb2.Release:
        return self._release(self.releases.revoke(req.id, actor=req.actor or "operator"))

    def Rollback(self, req: admin_pb2.RollbackRequest) -> admin_pb2.Release:
        return self._release(self.releases.rollback(req.task, req.to_version, req.channel,
                                                    actor=req.actor or "operator"))

    # -- devices --------------------------------------------------------------------------------
    def EnrollDevice(self, req: admin_pb2.EnrollRequest) -> admin_pb2.EnrollReply:
        device_id, token = self.credentials.enroll(req.device_id, ttl_seconds=req.ttl_seconds,
                                                   actor=req.actor or "operator", user_id=req.user_id)
        reply = admin_pb2.EnrollReply(device_id=device_id, token=token, user_id=req.user_id)
        if self.keys is not None:  # what the device pins: the CA for TLS, the key for bundle signatures
            reply.platform_ca_pem = self.keys.ca_pem.decode()
            reply.bundle_public_key = self.keys.bundle_public_key
        return reply

    def RevokeDevice(self, req: admin_pb2.DeviceRef) -> admin_pb2.Device:
        return _device_proto(self.credentials.revoke(req.device_id, actor=req.actor or "operator"))

    def ListDevices(self, req: admin_pb2.Empty | None = None) -> admin_pb2.DeviceList:
        self.flush_seen()
        return admin_pb2.DeviceList(devices=[_device_proto(d) for d in self.credentials.devices()])

    def Preview(self, info: device_pb2.DeviceInfo) -> admin_pb2.PreviewReply:
        tasks, why = self.releases.resolve(info, explain=True)
        return admin_pb2.PreviewReply(tasks=tasks, explanation=why)

    # -- resources (down tunnel) ----------------------------------------------------------------
    def PublishResource(self, req: admin_pb2.PublishResourceRequest) -> admin_pb2.ResourceInfoRef:
        name = req.name
        if not name or len(name) > 128 or not set(name) <= RESOURCE_NAME_CHARS or ".." in name or name.startswith("/"):
            raise InvalidArgument(f"resource name {name!r} is invalid: lower-case letters, digits, '_-./', no '..'")
        try:
            json.loads(req.metadata_json or "{}")
        except ValueError as e:
            raise InvalidArgument(f"resource metadata is not JSON: {e}") from None
        digest = self.put_blob(req.data)
        self.state.put_blob(digest, req.data)  # for replicas: they do not share this disk
        with self.state.transaction() as tx:
            version = tx.add_resource(name, digest, len(req.data), req.metadata_json or "{}", int(time.time()))
            tx.audit(req.actor or "operator", "resource.publish", f"{name}@{version}", {"digest": digest})
        return admin_pb2.ResourceInfoRef(name=name, version=version, digest=digest, size=len(req.data))

    def resource(self, name: str, version: str = "") -> tunnel_pb2.ResourceInfo:
        r = self.state.resource(name, version)
        if r is None:
            raise NotFound(f"unknown resource {name!r}" + (f" version {version!r}" if version else ""))
        return tunnel_pb2.ResourceInfo(name=r["name"], version=r["version"], digest=r["digest"], size=r["size"],
                                       metadata_json=r["metadata"], blob_url_base=self.blob_url_base,
                                       blob_url_wants_credential=self.blob_url_credential)

    def put_blob(self, data: bytes) -> str:
        digest = bundle.digest(data)
        path = self.blob_dir / digest.split(":", 1)[1]
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.blob_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return digest

    def blob(self, digest: str) -> bytes:
        """A bundle or resource by digest, re-verified on read: from this disk, else from the shared
        state (what another process published), else rebuilt from the task repository."""
        if digest.startswith("sha256:") and (self.blob_dir / digest[7:]).is_file() and len(digest) == 71:
            data = (self.blob_dir / digest[7:]).read_bytes()
            bundle.verify(data, digest)
            return data
        if BLOB_DIGEST_RE.match(digest or ""):
            data = self.state.blob(digest)
            if data is not None:
                bundle.verify(data, digest)
                return data
        return self.repo.bundle_by_digest(digest)

    # -- device-facing --------------------------------------------------------------------------
    def active_tasks(self, device_id: str, info: device_pb2.DeviceInfo) -> device_pb2.ActiveTasks:
        return device_pb2.ActiveTasks.FromString(self.active_tasks_bytes(device_id, info.SerializeToString()))

    def active_tasks_bytes(self, device_id: str, raw: bytes) -> bytes:
        """The serialized ActiveTasks for a device's serialized DeviceInfo (the gRPC hot path: bytes in,
        bytes out). Devices poll with unchanged attributes and the decision is a pure function of
        them, the device, its bound user and the release state, so each reply is decided and
        serialized once per revision and found again by the request's bytes (the whole memo goes on
        a change); a request that is refused is never memoised."""
        # The credential, not the request, says who the device is and whose it is.
        user = self.credentials.bound_user(device_id)
        key = (raw, device_id, user)
        rev = self.state.cached_revision()
        memo = self._memo
        if memo[0] != rev or memo[2] > MEMO_MAX_BYTES:
            memo = self._memo = (rev, {}, 0)
        hit = memo[1].get(key)
        if hit is None:
            hit = memo[1][key] = self._decide(device_id, user, raw)
            self._memo = (rev, memo[1], memo[2] + 2 * len(raw) + len(device_id) + len(user) + len(hit.reply))
        now = time.monotonic()
        with self._seen_lock:
            self._seen[device_id] = (int(time.time()), hit.app_version, hit.info)
            held = self._handed.setdefault(device_id, {})
            if hit.grant not in held:
                self._unrecorded.update((device_id, r) for r in hit.grant.releases)
                if len(held) > 8:  # keep the most recent few sets per device
                    for old in sorted(held, key=held.get)[:len(held) - 8]:
                        del held[old]
            held[hit.grant] = now
        return hit.reply

    def _decide(self, device_id: str, user: str, raw: bytes) -> "Decision":
        if len(raw) > MAX_DEVICE_INFO_BYTES:  # refused below, before anything is copied out of it
            self._trim_due = True
        try:
            info = device_pb2.DeviceInfo.FromString(raw)
        except DecodeError:
            raise InvalidArgument(f"the request is not a DeviceInfo message ({len(raw)} bytes that do not parse)") from None
        if info.user_id and info.user_id != user:
            if user:
                raise PermissionDenied(
                    f"device {device_id!r} is enrolled for user {user!r} but reports user_id {info.user_id[:130]!r}: "
                    "the platform uses only the user bound at enrollment (re-enroll with --user-id to change it)")
            info.user_id = ""  # an unbound device has no user: what it claims is ignored, never trusted
        info.device_id, info.user_id = device_id, user
        attrs = info.SerializeToString(deterministic=True)
        check_device_info(info, max(len(raw), len(attrs)))
        tasks, _ = self.releases.resolve(info)
        h = hashlib.sha256()
        for t in tasks:
            h.update(f"{t.name}@{t.version}@{t.bundle_digest}@{t.release_id};".encode())  # config is per release
        reply = device_pb2.ActiveTasks(tasks=tasks, revision=h.hexdigest()[:16], poll_after_seconds=60,
                                       blob_url_base=self.blob_url_base,
                                       blob_url_wants_credential=self.blob_url_credential)
        return Decision(reply.SerializeToString(), self._grant(tasks), info.app_version, attrs)

    def _grant(self, tasks) -> "Grant":
        tunnel = any("tunnel" in t.manifest.apis for t in tasks)
        g = Grant(frozenset(t.bundle_digest for t in tasks), frozenset(t.release_id for t in tasks), tunnel)
        with self._seen_lock:
            if len(self._grants) > 100_000:  # interning only saves memory; start afresh if it grows
                self._grants = {}
            return self._grants.setdefault(g, g)  # one shared copy per distinct set

    def _recent_grants(self, device_id: str) -> list["Grant"]:
        """What the device was handed recently (in-flight downloads of a replaced set still finish)."""
        horizon = time.monotonic() - GRANT_TTL_S
        with self._seen_lock:
            return [g for g, at in self._handed.get(device_id, {}).items() if at >= horizon]

    def _current_grant(self, device_id: str) -> "Grant":
        """What the device gets now, from its last reported attributes (for a device whose poll
        another server process answered, or that polled before a restart)."""
        with self._seen_lock:
            hit = self._seen.get(device_id)
        if hit is not None:
            info = device_pb2.DeviceInfo.FromString(hit[2])
        else:
            row = self.state.device(device_id)
            info = info_from_attrs(json.loads(row["attrs"]) if row else {})
            info.device_id, info.user_id = device_id, self.credentials.bound_user(device_id)
        tasks, _ = self.releases.resolve(info)
        return self._grant(tasks)

    def authorize_blob(self, device_id: str, digest: str) -> None:
        """A device may download a bundle only if it is in its active set (or a recent one)."""
        if any(digest in g.digests for g in self._recent_grants(device_id)):
            return
        if digest in self._current_grant(device_id).digests:
            return
        raise PermissionDenied(f"bundle {digest[:80]} is not released to device {device_id!r}")

    def authorize_resource(self, device_id: str) -> str:
        """Resources go only to devices whose active set (or a recent one) holds a task granted the
        "tunnel" API, the only way a task reads them. Returns the device id."""
        if any(g.tunnel for g in self._recent_grants(device_id)) or self._current_grant(device_id).tunnel:
            return device_id
        raise PermissionDenied(f"device {device_id!r} has no released task granted the 'tunnel' API, "
                               "so it may not download resources")

    def delivered_to(self, device_id: str, release_ids: set[str]) -> set[str]:
        """Those of `release_ids` the platform ever handed to the device."""
        got = set()
        for g in self._recent_grants(device_id):
            got |= g.releases & release_ids
        if release_ids - got:
            self._record_deliveries()
            got |= self.state.delivered_releases(device_id, release_ids - got)
        return got

    def _record_deliveries(self) -> None:
        with self._seen_lock:
            pairs, self._unrecorded = self._unrecorded, set()
        try:
            self.state.record_deliveries(pairs)
        except BaseException:
            with self._seen_lock:
                self._unrecorded |= pairs
            raise

    def device_user(self, device_id: str) -> str:
        """The user bound to the device at enrollment ("" if none): never what the device reports."""
        return self.credentials.bound_user(device_id)

    def flush_seen(self) -> None:
        if self._trim_due:
            # A refused huge request lives on in exception/frame cycles until the cyclic GC runs, and
            # glibc then keeps its freed buffers: collect, and hand the memory back to the system.
            self._trim_due = False
            gc.collect()
            _malloc_trim()
        self._record_deliveries()
        with self._seen_lock:
            seen, self._seen = self._seen, {}
        self.credentials.touch({d: (ts, app, device_attrs(device_pb2.DeviceInfo.FromString(raw)))
                                for d, (ts, app, raw) in seen.items()})

    def upload(self, device_id: str, batch: tunnel_pb2.UpBatch) -> tuple[int, int, int]:
        """Store one up-tunnel batch; returns (accepted, duplicates, the cloud's high-water seq for
        the batch's epoch). A batch is stored whole or refused whole: nothing refused is acknowledged."""
        try:
            raw = zlib.decompressobj().decompress(batch.zlib_records, MAX_UPLOAD_BYTES + 1)
        except zlib.error as e:
            raise InvalidArgument(f"upload batch is not valid zlib data: {e}") from None
        if len(raw) > MAX_UPLOAD_BYTES:
            raise InvalidArgument(f"upload batch decompresses to more than {MAX_UPLOAD_BYTES} bytes")
        records = tunnel_pb2.UpRecords()
        try:
            records.ParseFromString(raw)
        except Exception:
            raise InvalidArgument("upload batch does not contain an UpRecords message") from None
        if len(records.records) != batch.count:
            raise InvalidArgument(f"upload batch says {batch.count} records but holds {len(records.records)}")
        if len(records.records) > MAX_UPLOAD_RECORDS:
            raise InvalidArgument(f"upload batch has {len(records.records)} records; at most {MAX_UPLOAD_RECORDS}")
        by_topic: dict[str, list[tuple[int, int, bytes]]] = {}
        for r in records.records:
            if not 0 < r.seq < EPOCH_SPAN:
                raise InvalidArgument(f"upload record has seq {r.seq}; sequence numbers run from 1 to {EPOCH_SPAN - 1}")
            by_topic.setdefault(r.topic, []).append((r.seq, r.ts_ms, r.payload))
        for topic in by_topic:
            if topic not in self.upload_handlers and topic not in ("run_report", "delivery") \
                    and not topic.startswith(("event", "task.", "log")):
                raise InvalidArgument(f"unknown upload topic {topic!r}")
        parsed = {t: self._parse_platform_records(device_id, t, recs) for t, recs in by_topic.items()
                  if t not in self.upload_handlers}
        top = max((r.seq for r in records.records), default=0)
        write = UploadWrite(device_id, batch.epoch, top,
                            {t: self._report_rows(device_id, t, recs) for t, recs in parsed.items()})
        accepted = dups = 0
        if any(t in self.upload_handlers for t in by_topic):
            k, _hw = self.state.stream_slot(device_id, batch.epoch, MAX_EPOCHS_PER_DEVICE)
            for topic, recs in by_topic.items():  # handlers count what they store their own way
                if topic in self.upload_handlers:
                    a, d = self.upload_handlers[topic](device_id, [(k * EPOCH_SPAN + seq, ts, p) for seq, ts, p in recs])
                    accepted, dups = accepted + a, dups + d
            stored, hw = self._store_upload(write, k)
        else:  # the common case: committed together with other devices' uploads
            stored, hw = self._uploads.submit(write)
        for topic, n in stored.items():
            accepted, dups = accepted + n, dups + len(write.rows[topic]) - n
        if stored.get("run_report"):
            self.after_run_reports({m.release_id for _seq, _ts, _payload, m in parsed["run_report"]})
        return accepted, dups, hw

    def _store_uploads(self, writes: list[UploadWrite]) -> list:
        """One transaction for many devices' uploads; if it fails as a whole (e.g. two replicas made
        the same device's epoch slot at once), each upload is stored on its own."""
        try:
            return self.state.store_uploads(writes, EPOCH_SPAN, MAX_EPOCHS_PER_DEVICE)
        except WalleError:
            raise
        except Exception as e:
            if len(writes) == 1:
                raise
            log.info("a batch of %d uploads failed as a whole (%s: %s); storing them one by one",
                     len(writes), type(e).__name__, e)
        out: list = []
        for w in writes:
            try:
                out.append(self._store_upload(w))
            except Exception as e:
                out.append(e)
        return out

    def _store_upload(self, write: UploadWrite, k: int | None = None) -> tuple[dict[str, int], int]:
        """One device's upload, a transaction per step (the previous way, kept for batches that
        upload handlers share and for retries): ({topic: rows newly stored}, high-water mark).
        `k`: the epoch's slot, if the caller already has it."""
        if k is None:
            k, _hw = self.state.stream_slot(write.device_id, write.epoch, MAX_EPOCHS_PER_DEVICE)
        base = k * EPOCH_SPAN  # the stored seq: slot k of this device's epochs, then the device's seq
        stored = {}
        for topic, rows in write.rows.items():
            stored[topic] = self.state.add_reports(topic, [(r[0], r[1] + base, *r[2:]) for r in rows])
        return stored, self.state.raise_stream_hw(write.device_id, write.epoch, write.top)

    def _parse_platform_records(self, device_id: str, topic: str, recs) -> list:
        """Parse and check run and delivery reports; a bad one refuses the batch with its reason."""
        parsed = []
        for seq, ts_ms, payload in recs:
            m = None
            if topic in ("run_report", "delivery"):
                m = tunnel_pb2.RunReport() if topic == "run_report" else tunnel_pb2.DeliveryReport()
                try:
                    m.ParseFromString(payload)
                except Exception:
                    raise InvalidArgument(f"{topic} record seq {seq} is not a valid {type(m).__name__}") from None
                _check_report(topic, seq, m)
            parsed.append((seq, ts_ms, payload, m))
        releases = {m.release_id for *_, m in parsed if m is not None and m.release_id}
        missing = releases - self.delivered_to(device_id, releases)
        if missing:
            raise PermissionDenied(f"{topic} for release {sorted(missing)[0]}, which was never delivered to device "
                                   f"{device_id!r}: a device reports only on releases it received")
        return parsed

    @staticmethod
    def _report_rows(device_id: str, topic: str, parsed: list) -> list[tuple]:
        """The rows add_reports stores, numbered in the device's epoch."""
        rows = []
        for seq, ts_ms, payload, m in parsed:
            ts = int(ts_ms / 1000) or int(time.time())
            if topic == "run_report":
                rows.append((device_id, seq, ts, m.task, m.version, m.release_id, m.status, m.duration_s,
                             m.peak_memory_kb, m.error[:2000], m.trigger))
            elif topic == "delivery":
                rows.append((device_id, seq, ts, m.task, m.version, m.release_id, m.status, m.error[:2000]))
            else:
                rows.append((device_id, seq, ts, payload.decode("utf-8", "replace")[:65536]))
        return rows


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class StateSubmitJournal:
    """The task repository's submit journal (taskrepo.SubmitJournal) in the state database: every
    acknowledged submit has its audit entry; a commit never confirmed is taken back, on the record."""

    def __init__(self, state: PlatformState, repo_id: str = ""):
        self.state = state
        self.repo_id = repo_id  # replicas share the state, each with its own repository

    def begin(self, task: str, parent: str, actor: str) -> int:
        return self.state.begin_submit(task, parent, actor, self.repo_id)

    def confirm(self, intent: int, tv: TaskVersion) -> None:
        self.state.end_submit(intent, "task.submit", f"{tv.name}@{tv.version}",
                              {"message": tv.message, "digest": tv.bundle_digest})

    def rolled_back(self, intent: int, task: str, sha: str) -> None:
        if sha:
            self.state.end_submit(intent, "task.submit.rolled_back", f"{task}@{sha}",
                                  {"why": "the submit was not acknowledged; its commit was taken back"})
        else:
            self.state.end_submit(intent)

    def recovered(self, intent: int, task: str, parent: str) -> None:
        self.state.end_submit(intent, "task.submit.recovered", task,
                              {"why": "an unconfirmed submit whose commit is no longer the newest was kept",
                               "parent": parent})

    def pending(self) -> list[dict]:
        return self.state.pending_submits(self.repo_id)


def _repo_id(data_dir: pathlib.Path) -> str:
    """The data folder's task repository's name, made once (a random one: paths repeat across hosts)."""
    path = data_dir / "repo-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=data_dir)
    with os.fdopen(fd, "w") as f:
        f.write(uuid.uuid4().hex + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # the first writer wins; a racing one reads its name
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def _check_report(topic: str, seq: int, m) -> None:
    where = f"{topic} record seq {seq}"
    for field in ("task", "version", "release_id", "status"):
        if len(getattr(m, field)) > 128:
            raise InvalidArgument(f"{where}: {field} is longer than 128 characters")
    if not m.task or not REPORT_STATUS_RE.match(m.status):
        raise InvalidArgument(f"{where}: needs a task and a status of lower-case letters or '_' (got {m.status!r})")
    if topic == "delivery":
        if m.status not in DELIVERY_STATUSES:
            raise InvalidArgument(f"{where}: status must be one of {', '.join(DELIVERY_STATUSES)} (got {m.status!r})")
        return
    if not math.isfinite(m.duration_s) or m.duration_s < 0:
        raise InvalidArgument(f"{where}: duration_s must be a finite number >= 0 (got {m.duration_s!r})")
    if m.peak_memory_kb < 0:
        raise InvalidArgument(f"{where}: peak_memory_kb must be >= 0 (got {m.peak_memory_kb})")


def _device_proto(d: dict) -> admin_pb2.Device:
    return admin_pb2.Device(device_id=d["device_id"], enrolled_at=d["enrolled_at"], revoked=bool(d["revoked"]),
                            last_seen=d["last_seen"], app_version=d["app_version"], attrs_json=d["attrs"],
                            user_id=d.get("user_id", ""))


def to_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)
