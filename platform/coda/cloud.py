"""The CoDA cloud side wired into the platform (paper 4.2): behaviour logs arrive through the up
tunnel into the raw table; once a day the pipeline turns them into samples and user vectors, finds
each user's K most similar users (Algorithm 1), stores their samples in the batch and sample
mappings, and the sample-query service serves each device its batches.

Data folder: <platform data>/coda/ holds raw.sqlite3 (raw behaviour table), kv.sqlite3 (the embedded
mapping store; or a Redis URL), and pseudonym.key (the key of the user pseudonyms, mode 0600)."""
from __future__ import annotations

import functools
import logging
import os
import pathlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from walle.protos import coda_pb2

from ..errors import InvalidArgument
from . import matching, samples as samplegen
from .kvstore import open_store
from .mappings import Mappings
from .rawlog import RawLogStore
from .sample_service import SampleServicer, add_to_server

log = logging.getLogger("walle.coda")


@dataclass
class DayResult:
    day: int
    raw_rows: int
    users: int
    samples: int
    matched_users: int
    batches: int
    stored_samples: int
    expired: int
    seconds: dict = field(default_factory=dict)
    vector_top10_cosine: float = float("nan")


def served_copy(sample: coda_pb2.Sample) -> coda_pb2.Sample:
    """The sample as another user's device receives it: without its owner's pseudonym, in the
    `user` field or in the id (`<pseudonym>-<hmac>` becomes the 64-bit HMAC part), so a device
    cannot tell which users it was matched with. Smaller on the wire too (~7% per batch)."""
    out = coda_pb2.Sample()
    out.CopyFrom(sample)
    out.user = ""
    out.sample_id = sample.sample_id.rsplit("-", 1)[-1]
    return out


class CodaCloud:
    def __init__(self, platform, *, items: pd.DataFrame, users: pd.DataFrame | None = None,
                 kv_url: str = "", k: int = 100, daily_limit: int = 12, batch_size: int = 25,
                 max_batch: int = 40, keep_days: int = 7, scheduler: object = None, hist_len: int = 50):
        """`platform`: the Platform whose tunnel receives the logs and whose credentials
        authenticate devices. `items`/`users`: the app's catalogue (item categories) and user
        profiles, keyed by the user ids devices report."""
        self.platform = platform
        self.dir = pathlib.Path(platform.data_dir) / "coda"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items, self.users = items, users
        self.key = self._load_key()
        self.raw = RawLogStore(self.dir / "raw.sqlite3")
        self.store = open_store(kv_url or f"sqlite:///{self.dir / 'kv.sqlite3'}")
        self.mappings = Mappings(self.store, batch_size=batch_size, max_batch=max_batch, keep_days=keep_days,
                                 daily_limit=daily_limit)
        self.k, self.daily_limit, self.scheduler, self.hist_len = k, daily_limit, scheduler, hist_len
        self.today = 1
        self.day_samples: dict[int, dict[str, list[coda_pb2.Sample]]] = {}
        platform.upload_handlers["behavior"] = self._on_behavior

    def _load_key(self) -> bytes:
        path = self.dir / "pseudonym.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return path.read_bytes()

    # -- wiring ---------------------------------------------------------------------------------
    def user_of(self, device_id: str) -> str:
        """The user a device reports (its user_id attribute), else the device id itself."""
        return self.platform.device_user(device_id) or device_id

    def pseudonym_of_device(self, device_id: str) -> str:
        return samplegen.pseudonym(self.user_of(device_id), self.key)

    def add_services(self, server) -> None:
        from ..server import device_of
        servicer = SampleServicer(self.mappings, functools.partial(device_of, self.platform), self.pseudonym_of_device,
                                  today=lambda: self.today, daily_limit=self.daily_limit)
        add_to_server(server, servicer)

    def _on_behavior(self, device_id: str, recs: list[tuple[int, int, bytes]]) -> tuple[int, int]:
        records = []
        for seq, _ts_ms, payload in recs:
            m = coda_pb2.BehaviorLog()
            try:
                m.ParseFromString(payload)
            except Exception:
                raise InvalidArgument(f"behavior record seq {seq} is not a BehaviorLog") from None
            records.append((seq, m))
        return self.raw.add(device_id, self.user_of(device_id), records, day=self.today)

    # -- the daily pipeline (Algorithm 1 + section 4.2.1) ----------------------------------------
    def run_day(self, day: int, progress: Callable[[str], None] | None = None) -> DayResult:
        step = progress or (lambda _msg: None)
        t = {}
        t0 = time.perf_counter()
        raw = self.raw.frame(day_range=(max(0, day - 365), day))  # history context for sequences
        t["load"] = time.perf_counter() - t0
        step(f"day {day}: {len(raw)} raw rows")
        t0 = time.perf_counter()
        gen = samplegen.generate(raw, self.items, self.users, key=self.key, day=day, hist_len=self.hist_len,
                                 scheduler=self.scheduler)
        t["samples"] = time.perf_counter() - t0
        self.day_samples[day] = gen.samples
        users, vectors = gen.user_vectors
        step(f"day {day}: {gen.n_samples} samples, {len(users)} user vectors")
        t0 = time.perf_counter()
        matched: dict[str, list[coda_pb2.Sample]] = {}
        top10 = float("nan")
        if len(users) >= 2:
            sims, idx = matching.knn(vectors, k=self.k)
            top10 = float(np.nanmean(sims[:, :10]))
            cap = self.daily_limit * self.mappings.batch_size
            served = {u: [served_copy(x) for x in ss] for u, ss in gen.samples.items()}
            for row, user in enumerate(users):
                out: list[coda_pb2.Sample] = []
                for j in idx[row]:  # most similar users first
                    if j < 0:
                        continue
                    out.extend(served.get(users[j], ()))
                    if len(out) >= cap:
                        break
                if out:
                    matched[user] = out[:cap]
        t["matching"] = time.perf_counter() - t0
        step(f"day {day}: matched {len(matched)} users (K={self.k})")
        t0 = time.perf_counter()
        summary = self.mappings.put_day(day, matched)
        expired = self.mappings.expire(day)
        t["mappings"] = time.perf_counter() - t0
        self.day_samples = {d: s for d, s in self.day_samples.items() if d > day - self.mappings.keep_days}
        return DayResult(day=day, raw_rows=len(raw), users=len(users), samples=gen.n_samples,
                         matched_users=len(matched), batches=getattr(summary, "batches", 0),
                         stored_samples=getattr(summary, "samples", 0), expired=expired, seconds=t,
                         vector_top10_cosine=top10)
