"""The CoDA cloud side wired into the platform (paper 4.2): behaviour logs arrive through the up
tunnel into the raw table; once a day the pipeline turns them into samples and user vectors, finds
each user's K most similar users (Algorithm 1), stores their samples in the batch and sample
mappings, and the sample-query service serves each device its batches.

The work-cycle day is persistent state in the key-value store (`meta:today`), shared by the server and
any `walle cloud pipeline` process on the same data folder and store: uploads are stamped with it, the
sample service serves and counts the 12-a-day limit against it, and `close_day` (the daily pipeline)
prepares today's matched samples and then advances it. A day is closed by one process at a time
(`meta:closing:<day>`, taken with an atomic increment).

Data folder: <platform data>/coda/ holds raw.sqlite3 (raw behaviour table), kv.sqlite3 (the embedded
mapping store), catalog.json (the item catalog, see catalog.py) and pseudonym.key (the key of the user
pseudonyms, mode 0600). Past one machine (stateless replicas and a pipeline process sharing no
disk) the raw table and the key live in PostgreSQL (`raw_url`, default: the platform state's
PostgreSQL if it has one) and the mappings and the day in Redis (`kv_url`); the catalog is read from
the published resource `coda/catalog` in the platform state, so nothing is read from the folder."""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from walle.protos import coda_pb2

from ..errors import FailedPrecondition, InvalidArgument, NotFound
from . import catalog as catalog_mod
from . import matching, samples as samplegen
from .kvstore import open_store
from .mappings import Mappings
from .rawlog import open_raw_log
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
    matching_recall: float = float("nan")  # recall@K on 200 sampled users against exact search


def served_copy(sample: coda_pb2.Sample) -> coda_pb2.Sample:
    """The sample as another user's device receives it: without its owner's pseudonym, in the
    `user` field or in the id (`<pseudonym>-<hmac>` becomes the 64-bit HMAC part), so a device
    cannot tell which users it was matched with. Smaller on the wire too (~7% per batch)."""
    out = coda_pb2.Sample()
    out.CopyFrom(sample)
    out.user = ""
    out.sample_id = sample.sample_id.rsplit("-", 1)[-1]
    return out


KV_ENV = "WALLE_CODA_KV"            # default mapping store URL (serving replicas, their workers, the pipeline)
RAW_LOG_ENV = "WALLE_CODA_RAW_LOG"  # default raw log URL
TODAY_KEY = b"meta:today"
PREPARED_KEY = b"meta:prepared"
BEHAVIOR_BATCH_TOPIC = "behavior.batch"  # zlib(BehaviorBatch): a device's aggregated behaviour
MAX_BATCH_BYTES = 16 << 20               # decompressed size of one behaviour batch


class CodaCloud:
    def __init__(self, platform, *, items: pd.DataFrame | None = None, users: pd.DataFrame | None = None,
                 kv_url: str = "", raw_url: str = "", k: int = 100, daily_limit: int = 12, batch_size: int = 25,
                 max_batch: int = 40, keep_days: int = 7, scheduler: object = None, hist_len: int = 50,
                 global_epochs: int = 0, global_seed: int = 0, pseudonym_key: bytes | None = None,
                 match_nprobe: int = 16):
        """`platform`: the Platform whose tunnel receives the logs and whose credentials
        authenticate devices. `items`: a fixed catalogue (item_id, genre_ids); None reads the
        catalog loaded with `walle cloud catalog load` (an empty one until then). `users`: optional
        user profiles keyed by the user ids devices report. `kv_url` / `raw_url`: the mapping store
        and the raw log (default $WALLE_CODA_KV / $WALLE_CODA_RAW_LOG, else the raw log goes where a
        PostgreSQL platform state is, else both are files in the data folder). `global_epochs` > 0:
        closing day d also retrains the global model on all samples of days 1..d and publishes it
        (`coda/global_model`). `pseudonym_key`: the key of a NEW raw log's user pseudonyms (default:
        32 random bytes; a reproducible experiment derives it from its seed); a log keeps its key.
        `match_nprobe`: lists searched per list of users when matching runs on a Dask `scheduler`
        (past 300,000 users); more lists, higher recall, more CPU."""
        self.platform = platform
        self.dir = pathlib.Path(platform.data_dir).resolve() / "coda"  # absolute: it goes into a sqlite:/// URL
        self.dir.mkdir(parents=True, exist_ok=True)
        self._items, self.users = items, users
        self.catalogs = catalog_mod.CatalogStore(self.dir)
        state = getattr(platform.state, "url", "")
        self.raw = open_raw_log(raw_url or os.environ.get(RAW_LOG_ENV, "")
                                or (state if state.startswith(("postgresql://", "postgres://")) else "")
                                or f"sqlite:///{self.dir / 'raw.sqlite3'}")
        # kept with the raw log: every replica pseudonymizes alike
        self.key = self.raw.pseudonym_key(pseudonym_key)
        self.store = open_store(kv_url or os.environ.get(KV_ENV, "") or f"sqlite:///{self.dir / 'kv.sqlite3'}")
        self.mappings = Mappings(self.store, batch_size=batch_size, max_batch=max_batch, keep_days=keep_days,
                                 daily_limit=daily_limit)
        self.k, self.daily_limit, self.scheduler, self.hist_len = k, daily_limit, scheduler, hist_len
        self.global_epochs, self.global_seed, self.match_nprobe = global_epochs, global_seed, match_nprobe
        self.day_samples: dict[int, dict[str, list[coda_pb2.Sample]]] = {}
        self.global_seconds: dict[int, float] = {}  # wall seconds of each day's global model training
        platform.upload_handlers["behavior"] = self._on_behavior
        platform.upload_handlers[BEHAVIOR_BATCH_TOPIC] = self._on_behavior_batch

    # -- the work-cycle day (persistent, shared by every process on this store) -------------------
    @property
    def today(self) -> int:
        raw = self.store.get(TODAY_KEY)
        return 1 if raw is None else int(raw)

    @today.setter
    def today(self, day: int) -> None:
        if isinstance(day, bool) or not isinstance(day, int) or day < 1:
            raise InvalidArgument(f"day must be an integer >= 1, got {day!r}")
        self.store.put_many([(TODAY_KEY, str(day).encode())])

    @property
    def prepared_day(self) -> int:
        """The newest day whose matched samples were prepared (0: none yet)."""
        raw = self.store.get(PREPARED_KEY)
        return 0 if raw is None else int(raw)

    def close_day(self, *, force: bool = False, progress: Callable[[str], None] | None = None) -> DayResult:
        """The daily pipeline: prepare the matched samples of today's uploads, then advance today by
        one. Refused (FailedPrecondition) when another process is closing the same day, unless
        `force` (for a process that died mid-way). A crash before the advance leaves today as it was:
        running again re-does the day (run_day replaces a day's mappings)."""
        day = self.today
        claim = b"meta:closing:%d" % day
        if self.store.incr(claim) > 1 and not force:
            raise FailedPrecondition(f"day {day} is being closed by another process (or one that died: "
                                     f"run `walle cloud pipeline --force`)")
        try:
            result = self.run_day(day, progress=progress)
        except BaseException:
            self.store.delete_many([claim])
            raise
        if self.global_epochs and result.samples:
            self.publish_global_model(day)
        self.store.put_many([(PREPARED_KEY, str(day).encode()), (TODAY_KEY, str(day + 1).encode())])
        self.store.delete_many([claim])
        log.info("closed day %d: %d samples, %d users matched, %d batches; today is day %d",
                 day, result.samples, result.matched_users, result.batches, day + 1)
        return result

    def start_clock(self, day_seconds: float) -> Callable[[], None]:
        """Close a day every `day_seconds` (compressed days for demos and tests) on a daemon thread;
        returns a function that stops it (waiting for a pipeline run in progress)."""
        if not day_seconds > 0:
            raise InvalidArgument(f"day length must be > 0 seconds, got {day_seconds!r}")
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(day_seconds):
                try:
                    self.close_day()
                except Exception:  # one failed day must not stop the clock; it is logged
                    log.exception("closing day %d failed", self.today)

        thread = threading.Thread(target=loop, name="walle-coda-clock", daemon=True)
        thread.start()

        def stop_clock(timeout: float = 60.0) -> None:
            stop.set()
            thread.join(timeout)
        return stop_clock

    def samples_through(self, day: int) -> list[coda_pb2.Sample]:
        """The cloud's own samples of days 1..`day` (all uploaded behaviour so far), ordered by
        (day, sample id) so training on them is reproducible. Days this process did not prepare
        (another process closed them, or older than keep_days) are generated again from the raw table."""
        pool = {d: [s for ss in self.day_samples[d].values() for s in ss] for d in range(1, day + 1)
                if d in self.day_samples}
        missing = set(range(1, day + 1)) - set(pool)
        if missing:
            raw = self.raw.frame(day_range=(0, day))
            gen = samplegen.generate(raw, self.items, self.users, key=self.key, hist_len=self.hist_len,
                                     scheduler=self.scheduler)
            for ss in gen.samples.values():
                for s in ss:
                    if s.day in missing:
                        pool.setdefault(s.day, []).append(s)
        return sorted((s for ss in pool.values() for s in ss), key=lambda s: (s.day, s.sample_id))

    def publish_global_model(self, day: int, seed: int | None = None) -> object:
        """Paper 4.2.2: retrain the global DIN on every sample of days 1..`day` (cloud-based learning
        over the global data) and publish it as a new version of `coda/global_model` (a model blob: the
        task library's DIN, sized by the item catalog), recording the days and the catalog version it
        was trained with. A full retrain from the seed each day, so a day's model does not depend on
        how earlier days were run (~41 s CPU for MovieLens-100k's 84k samples, 2 epochs)."""
        from walle.protos import admin_pb2

        from .global_model import catalog_config, train_global
        pool = self.samples_through(day)
        if not pool:
            raise FailedPrecondition(f"no samples for days 1..{day}: nothing to train the global model on")
        t0 = time.perf_counter()
        data, metrics = train_global(pool, epochs=self.global_epochs, seed=self.global_seed if seed is None else seed,
                                     catalog=catalog_config(self.items))
        try:
            catalog_version = self.platform.resource(catalog_mod.RESOURCE).version
        except Exception:
            catalog_version = ""
        meta = json.dumps({"metrics": metrics, "day": day, "days": [1, day], "catalog": catalog_version})
        ref = self.platform.PublishResource(admin_pb2.PublishResourceRequest(
            name="coda/global_model", data=data, metadata_json=meta, actor="coda-pipeline"))
        self.global_seconds[day] = time.perf_counter() - t0
        log.info("day %d: global model %s@%s on %d samples of days 1..%d", day, ref.name, ref.version, len(pool), day)
        return ref

    # -- the item catalog -------------------------------------------------------------------------
    @property
    def items(self) -> pd.DataFrame:
        if self._items is not None:
            return self._items
        return catalog_mod.items_frame(self._catalog_doc() or catalog_mod.empty())

    def _catalog_doc(self) -> dict | None:
        """The current catalog: the published resource (shared by every process on the platform
        state), else this folder's copy (a folder from before catalogs were published)."""
        try:
            ref = self.platform.resource(catalog_mod.RESOURCE)
        except NotFound:
            return self.catalogs.load()
        return json.loads(self.platform.blob(ref.digest))

    def load_catalog(self, frame: pd.DataFrame, actor: str = "operator") -> tuple[dict, object]:
        """Store a catalog in the documented layout (category ids kept from the previous one) and
        publish it to devices as the resource `coda/catalog`. Returns (document, resource ref)."""
        from walle.protos import admin_pb2
        doc = catalog_mod.build(frame, self._catalog_doc())
        data = catalog_mod.encode(doc)
        ref = self.platform.PublishResource(admin_pb2.PublishResourceRequest(
            name=catalog_mod.RESOURCE, data=data, actor=actor,
            metadata_json=json.dumps({"items": len(doc["items"]), "categories": len(doc["categories"])})))
        self.catalogs.save(doc)
        return doc, ref

    # -- wiring ---------------------------------------------------------------------------------
    def user_of(self, device_id: str) -> str:
        """The user a device reports (its user_id attribute), else the device id itself."""
        return self.platform.device_user(device_id) or device_id

    def pseudonym_of_device(self, device_id: str) -> str:
        return samplegen.pseudonym(self.user_of(device_id), self.key)

    def add_services(self, server) -> None:
        from ..server import device_of
        servicer = SampleServicer(self.mappings, functools.partial(device_of, self.platform), self.pseudonym_of_device,
                                  today=lambda: self.today, daily_limit=self.daily_limit,
                                  latest_day=lambda: self.prepared_day)
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

    def _on_behavior_batch(self, device_id: str, recs: list[tuple[int, int, bytes]]) -> tuple[int, int]:
        """Aggregated behaviour: each record is zlib(BehaviorBatch); log i is keyed by first_seq + i
        (the device's own behaviour sequence), so a re-sent batch stores nothing twice."""
        records = []
        for seq, _ts_ms, payload in recs:
            try:
                d = zlib.decompressobj()
                raw = d.decompress(payload, MAX_BATCH_BYTES + 1)
                if len(raw) > MAX_BATCH_BYTES or d.unconsumed_tail:
                    raise InvalidArgument(f"{BEHAVIOR_BATCH_TOPIC} record seq {seq} decompresses to more than "
                                          f"{MAX_BATCH_BYTES} bytes")
                batch = coda_pb2.BehaviorBatch.FromString(raw)
            except InvalidArgument:
                raise
            except Exception:
                raise InvalidArgument(f"{BEHAVIOR_BATCH_TOPIC} record seq {seq} is not a zlib-compressed "
                                      f"BehaviorBatch") from None
            records.extend((batch.first_seq + i, m) for i, m in enumerate(batch.logs))
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
        top10 = recall = float("nan")
        if len(users) >= 2:
            sims, idx = matching.knn(vectors, k=self.k, scheduler=self.scheduler, distributed_nprobe=self.match_nprobe)
            top10 = float(np.nanmean(sims[:, :10]))
            recall = matching.sampled_recall(vectors, idx)
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
                         vector_top10_cosine=top10, matching_recall=recall)
