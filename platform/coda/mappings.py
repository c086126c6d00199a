"""The two mappings behind the CoDA sample query (paper section 4.2.1, Figure 4; section 5.2) on a KVStore:

- sample mapping: sample id -> serialized `Sample` protobuf, stored ONCE however many users it was
  matched to (raw protobuf: per-sample compression does not pay; batches are compressed when served);
- batch mapping: (user, day, batch id) -> sample ids, 25 per batch, a trailing fragment merged into the
  batch before it when the result stays <= 40 (see `split_batches`);
- served batches: (user, day, batch id) -> the serialized `SampleBatch` a device pulls, its samples
  zlib-compressed ONCE when the day is written, so serving a batch is one read and a write of stored
  bytes (no per-request assembly or compression). This costs storage per user (a sample shared by K
  users is compressed into K batches); `compressed_batches=False` trades it back for CPU per pull.

Only the last `keep_days` days are kept. Every day records which samples it references, so `expire`
deletes a sample exactly when no kept day references it any more. The same store also holds each
device's daily pull counter and which batches it already pulled (for resumable pulls).

Key layout (`day` is 10 zero-padded digits, so one day's keys share a prefix):
  s:<sample id>                         sample bytes
  D:<day> / P:<day>                     registry: days holding batch data / pull records
  d:<day>:B:<user>                      that user's batches for the day (JSON [[batch id, [sample ids]]])
  d:<day>:z:<user>\\0<batch id>         the serialized SampleBatch served for that batch
  d:<day>:x:<sample id>                 the day references this sample
  d:<day>:c:<device id>                 pulls on this day (atomic counter)
  d:<day>:p:<device id>\\0<batch id>     this device pulled this batch of this day

put_day and expire form the daily job: run them from one writer, not concurrently with each other.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Iterable

from walle.protos.coda_pb2 import Sample, SampleBatch

from walle.platform.errors import FailedPrecondition, InvalidArgument, NotFound

from .kvstore import KVStore

MAX_DAY = 10**10 - 1


@dataclasses.dataclass(frozen=True)
class DaySummary:
    day: int
    users: int            # users given at least one batch
    batches: int
    sample_refs: int      # (user, sample) pairs after de-duplicating each user's list
    samples: int          # distinct samples stored for the day
    removed_samples: int  # samples deleted because a re-run of the day no longer references them


def split_batches(n: int, batch_size: int = 25, max_batch: int = 40) -> list[int]:
    """Batch sizes for n samples. Full batches of `batch_size`; a remainder r = n % batch_size is
    merged into the previous batch when there is one and batch_size + r <= max_batch, otherwise it
    stays a smaller last batch. Fewer than batch_size samples (n < 25) make one batch of n; n = 0 none.
    With 25/40: 40 -> [40], 41 -> [25, 16], 65 -> [25, 40], 24 -> [24]."""
    if n < 0:
        raise InvalidArgument(f"sample count must be >= 0 (got {n})")
    full, r = divmod(n, batch_size)
    sizes = [batch_size] * full
    if r:
        if sizes and batch_size + r <= max_batch:
            sizes[-1] += r
        else:
            sizes.append(r)
    return sizes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FIELD1 = [b"\x0a" + _varint(n) for n in range(1 << 14)]  # tag + length prefix for samples < 16 KB


def sample_list_bytes(samples: list[bytes]) -> bytes:
    """A serialized SampleList built from serialized Samples without re-parsing them
    (field 1, length-delimited: tag 0x0A, varint length, bytes)."""
    parts = []
    for s in samples:
        n = len(s)
        parts.append(_FIELD1[n] if n < 16384 else b"\x0a" + _varint(n))
        parts.append(s)
    return b"".join(parts)


def _batch_key(dk: bytes, user: str, batch_id: str) -> bytes:
    return b"d:" + dk + b":z:" + user.encode() + b"\x00" + batch_id.encode()


def _day_key(day: int) -> bytes:
    return b"%010d" % day


def _check_day(day: object, what: str = "day") -> int:
    if not isinstance(day, int) or isinstance(day, bool) or not 0 <= day <= MAX_DAY:
        raise InvalidArgument(f"{what} must be an integer in 0..{MAX_DAY} (got {day!r})")
    return day


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 256:
        raise InvalidArgument(f"{what} must be a non-empty string of at most 256 characters "
                              f"without NUL (got {value!r:.80})")
    return value


class Mappings:
    def __init__(self, store: KVStore, *, batch_size: int = 25, max_batch: int = 40, keep_days: int = 7,
                 daily_limit: int = 12, zlib_level: int = 6, compressed_batches: bool = True):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1 (got {batch_size})")
        if max_batch < batch_size:
            raise InvalidArgument(f"max_batch must be >= batch_size {batch_size} (got {max_batch})")
        if keep_days < 1:
            raise InvalidArgument(f"keep_days must be >= 1 (got {keep_days})")
        if daily_limit < 1:
            raise InvalidArgument(f"daily_limit must be >= 1 (got {daily_limit})")
        if not 0 <= zlib_level <= 9:
            raise InvalidArgument(f"zlib_level must be in 0..9 (got {zlib_level})")
        self.store = store
        self.zlib_level = zlib_level
        self.compressed_batches = compressed_batches
        self.batch_size = batch_size
        self.max_batch = max_batch
        self.keep_days = keep_days
        self.daily_limit = daily_limit

    # ---- writing a day's matching result -------------------------------------------------------

    def put_day(self, day: int, matched: dict[str, list[Sample]]) -> DaySummary:
        """Store one day's matching result (user pseudonym -> matched samples), replacing any earlier
        run of the same day. All new keys land in one atomic put_many; leftovers of an earlier run are
        deleted afterwards, so a crash in between leaves the new day fully readable."""
        _check_day(day)
        if not isinstance(matched, dict):
            raise InvalidArgument(f"matched must be a dict user -> list of Sample (got {type(matched).__name__})")
        blobs: dict[str, bytes] = {}
        given: dict[str, Sample] = {}  # the object each id was serialized from: the same object shared
        #                                by many users (the usual case after KNN matching) serializes once
        plans: dict[str, list[tuple[str, list[str]]]] = {}
        refs = 0
        for user, samples in matched.items():
            _check_name(user, "user pseudonym")
            ids: list[str] = []
            seen: set[str] = set()
            for s in samples:
                if not isinstance(s, Sample):
                    raise InvalidArgument(f"matched[{user!r}] holds a {type(s).__name__}, not a Sample")
                sid = s.sample_id
                if given.get(sid) is not s:
                    _check_name(sid, f"sample_id of a sample matched to {user!r}")
                    data = s.SerializeToString(deterministic=True)
                    if blobs.setdefault(sid, data) != data:
                        raise InvalidArgument(f"sample id {sid!r} is given with two different contents on day {day}")
                    given[sid] = s
                if sid not in seen:  # a sample matched twice to one user is trained on once
                    seen.add(sid)
                    ids.append(sid)
            if not ids:
                continue
            refs += len(ids)
            batches, start = [], 0
            for i, size in enumerate(split_batches(len(ids), self.batch_size, self.max_batch)):
                batches.append((f"{day}.{i}", ids[start:start + size]))
                start += size
            plans[user] = batches

        dk = _day_key(day)
        old_lists = dict(self.store.scan_prefix(b"d:" + dk + b":B:"))
        old_users = set(old_lists)
        old_batches = {_batch_key(dk, k[len(dk) + 5:].decode(), bid)
                       for k, raw in old_lists.items() for bid, _ids in json.loads(raw)}
        old_sids = {k[len(dk) + 5:].decode() for k, _ in self.store.scan_prefix(b"d:" + dk + b":x:")}

        items: list[tuple[bytes, bytes]] = [(b"D:" + dk, b"1")]
        items += ((b"s:" + sid.encode(), data) for sid, data in blobs.items())
        items += ((b"d:" + dk + b":x:" + sid.encode(), b"") for sid in blobs)
        new_users = set()
        for user, batches in plans.items():
            key = b"d:" + dk + b":B:" + user.encode()
            new_users.add(key)
            items.append((key, json.dumps(batches, separators=(",", ":")).encode()))
        new_batches = set()
        if self.compressed_batches:
            for user, batches in plans.items():
                for bid, ids in batches:
                    key = _batch_key(dk, user, bid)
                    new_batches.add(key)
                    items.append((key, self._batch_message(day, bid, [blobs[sid] for sid in ids])))
        self.store.put_many(items)

        self.store.delete_many(old_users - new_users)
        self.store.delete_many(old_batches - new_batches)
        gone = old_sids - blobs.keys()
        self.store.delete_many(b"d:" + dk + b":x:" + sid.encode() for sid in gone)
        removed = self._delete_unreferenced(gone)
        return DaySummary(day=day, users=len(plans), batches=sum(len(b) for b in plans.values()),
                          sample_refs=refs, samples=len(blobs), removed_samples=removed)

    def _registered_days(self, registry: bytes) -> set[int]:
        return {int(k[2:]) for k, _ in self.store.scan_prefix(registry)}

    def _delete_unreferenced(self, sids: Iterable[str], *, ignore_days: frozenset[int] = frozenset()) -> int:
        """Delete the samples among `sids` that no registered day (outside ignore_days) references."""
        sids = sorted(set(sids))
        if not sids:
            return 0
        days = sorted(self._registered_days(b"D:") - ignore_days)
        unreferenced = set(sids)
        for day in days:
            if not unreferenced:
                break
            cand = sorted(unreferenced)
            dk = _day_key(day)
            marks = self.store.mget([b"d:" + dk + b":x:" + sid.encode() for sid in cand])
            unreferenced -= {sid for sid, m in zip(cand, marks) if m is not None}
        return self.store.delete_many(b"s:" + sid.encode() for sid in sorted(unreferenced))

    # ---- reading ------------------------------------------------------------------------------

    def user_batches(self, user: str, day: int) -> list[tuple[str, list[str]]]:
        """(batch id, sample ids) of a user's day, in order; [] when the user has none that day."""
        _check_name(user, "user pseudonym")
        raw = self.store.get(b"d:" + _day_key(_check_day(day)) + b":B:" + user.encode())
        return [] if raw is None else [(bid, ids) for bid, ids in json.loads(raw)]

    def list_batches(self, user: str, day: int) -> list[tuple[str, int]]:
        return [(bid, len(ids)) for bid, ids in self.user_batches(user, day)]

    def has_day(self, day: int) -> bool:
        """Whether a matching result is stored for this day (for any user)."""
        return self.store.get(b"D:" + _day_key(_check_day(day))) is not None

    def get_samples(self, sample_ids: list[str]) -> list[bytes]:
        """Serialized samples in order, one MGET; a missing one means the mappings are inconsistent."""
        blobs = self.store.mget([b"s:" + sid.encode() for sid in sample_ids])
        for sid, blob in zip(sample_ids, blobs):
            if blob is None:
                raise FailedPrecondition(f"sample {sid!r} is referenced by a batch but missing from the sample mapping")
        return blobs  # type: ignore[return-value]

    def _batch_message(self, day: int, batch_id: str, samples: list[bytes]) -> bytes:
        return SampleBatch(batch_id=batch_id, day=day, count=len(samples),
                           zlib_samples=zlib.compress(sample_list_bytes(samples), self.zlib_level)).SerializeToString()

    def batch_messages(self, user: str, day: int, batches: list[tuple[str, list[str]]]) -> list[bytes]:
        """The serialized SampleBatch of each (batch id, sample ids) of the user's day, in order: the
        bytes stored when the day was written (one MGET), or, for a batch stored without them
        (compressed_batches=False, or written by an older version), assembled and compressed now."""
        dk = _day_key(_check_day(day))
        _check_name(user, "user pseudonym")
        stored = self.store.mget([_batch_key(dk, user, bid) for bid, _ids in batches])
        return [raw if raw is not None else self._batch_message(day, bid, self.get_samples(ids))
                for (bid, ids), raw in zip(batches, stored)]

    def get_batch(self, user: str, day: int, batch_id: str) -> list[bytes]:
        for bid, ids in self.user_batches(user, day):
            if bid == batch_id:
                return self.get_samples(ids)
        raise NotFound(f"no batch {batch_id!r} for user {user!r} on day {day}")

    # ---- retention ----------------------------------------------------------------------------

    def expire(self, today: int) -> int:
        """Delete everything of days <= today - keep_days (batch lists, pull records) and every sample
        no kept day references. Returns the number of keys deleted. Safe to re-run after a crash: a
        day leaves the registry only once all its keys are gone."""
        _check_day(today, "today")
        cutoff = today - self.keep_days
        old = sorted(d for d in self._registered_days(b"D:") | self._registered_days(b"P:") if d <= cutoff)
        deleted = 0
        for day in old:
            dk = _day_key(day)
            # Batch lists first (nothing serves the day any more), then samples, then the day's markers:
            # the markers are what a re-run uses to find the samples, so they go after them.
            deleted += self.store.delete_many([k for k, _ in self.store.scan_prefix(b"d:" + dk + b":B:")])
            sids = [k[len(dk) + 5:].decode() for k, _ in self.store.scan_prefix(b"d:" + dk + b":x:")]
            deleted += self._delete_unreferenced(sids, ignore_days=frozenset(old))
            deleted += self.store.delete_many([k for k, _ in self.store.scan_prefix(b"d:" + dk + b":")])
            self.store.delete_many([b"D:" + dk, b"P:" + dk])
        return deleted

    # ---- per-device pull records --------------------------------------------------------------

    def _count(self, device_id: str, day: int, amount: int) -> int:
        dk = _day_key(_check_day(day))
        n = self.store.incr(b"d:" + dk + b":c:" + _check_name(device_id, "device id").encode(), amount)
        if n == amount > 0:  # first pulls of this device that day: make sure expire will find the day
            self.store.put_many([(b"P:" + dk, b"1")])
        return n

    def record_pull(self, device_id: str, day: int) -> int:
        """Count one pull for the device on this day (atomic); returns the pulls so far that day."""
        return self._count(device_id, day, 1)

    def pulls(self, device_id: str, day: int) -> int:
        _check_name(device_id, "device id")
        raw = self.store.get(b"d:" + _day_key(_check_day(day)) + b":c:" + device_id.encode())
        return 0 if raw is None else int(raw)

    def reserve_pulls(self, device_id: str, day: int, n: int = 1, limit: int | None = None) -> int:
        """Take up to n pulls from the device's daily allowance in one atomic step; returns how many were
        granted (0 when it is used up). Counting first and giving back the overflow keeps the limit
        exact however many streams one device runs at once."""
        if n < 1:
            raise InvalidArgument(f"pulls to reserve must be >= 1 (got {n})")
        limit = self.daily_limit if limit is None else limit
        total = self._count(device_id, day, n)
        over = min(n, total - limit)
        if over > 0:
            self.release_pulls(device_id, day, over)
            return n - over
        return n

    def release_pulls(self, device_id: str, day: int, n: int = 1) -> None:
        """Give back reserved pulls (batches that never left the server)."""
        if n > 0:
            self._count(device_id, day, -n)

    def mark_pulled(self, device_id: str, day: int, batch_ids: Iterable[str]) -> None:
        prefix = b"d:" + _day_key(_check_day(day)) + b":p:" + _check_name(device_id, "device id").encode() + b"\x00"
        self.store.put_many([(prefix + bid.encode(), b"") for bid in batch_ids])

    def pulled(self, device_id: str, day: int, batch_ids: list[str]) -> set[str]:
        """The subset of batch_ids this device already pulled for that day."""
        prefix = b"d:" + _day_key(_check_day(day)) + b":p:" + _check_name(device_id, "device id").encode() + b"\x00"
        marks = self.store.mget([prefix + bid.encode() for bid in batch_ids])
        return {bid for bid, m in zip(batch_ids, marks) if m is not None}
