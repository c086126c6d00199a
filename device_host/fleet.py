"""A fleet of emulated devices in ONE process, for load tests and demos.

Each device is a full DeviceHost with its own data folder, credential and attributes; what they share
is what a process can share without changing behaviour: one gRPC channel, one sandbox worker pool, one
verified-bundle cache (one download per digest), and one thread pool that runs their syncs, uploads and
task runs. Instead of one WatchTasks stream (and thread) per device, ONE watcher stream fans out: each
ListChanged makes every device pull (the platform's revision is global, so one stream sees every change).

Attributes come from a profile (weighted choices, deterministic by seed):
  {"app_version": {"2.3.0": 6, "2.2.0": 3, "1.9.0": 1}, "os": {"android": 7, "ios": 3},
   "region": {"cn-east": 1, "cn-north": 1}, "tags": {"beta": 1, "": 9}}
or from a JSONL file with one attribute object per line (line i is device i; "device_id" optional).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import grpc

from walle.protos import device_pb2, device_pb2_grpc

from .host import DeviceHost
from .identity import Credentials, IdentityError, check_attrs, credentials_path
from .sync import BundleCache
from .tunnel import backoff_delay

log = logging.getLogger("walle.device.fleet")

DEFAULT_PROFILE: dict[str, dict[str, float]] = {
    "app_version": {"2.3.0": 5, "2.2.1": 3, "1.9.0": 2},
    "os": {"android": 7, "ios": 3},
    "os_version": {"13": 4, "14": 4, "12": 2},
    "region": {"cn-east": 4, "cn-north": 3, "cn-south": 2, "overseas": 1},
    "network": {"wifi": 6, "4g": 3, "5g": 1},
}

# (device_id, user_id) -> token (or full Credentials): how a fleet enrolls devices it has no
# credential for. The user is the one the device's attributes name ("" if none): the platform binds
# it at enrollment and uses only that, never the user_id a device reports.
Enroller = Callable[[str, str], "str | Credentials"]


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))]


def _raise_fd_limit(wanted: int) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("raised the open-file limit from %d to %d for the fleet", soft, target)


def draw_attrs(profile: dict[str, dict[str, float]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n attribute dicts drawn from a weighted profile; the same seed gives the same fleet."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        attrs: dict[str, Any] = {"user_id": f"u{i:06d}"}
        for key, weights in sorted(profile.items()):
            if not isinstance(weights, dict) or not weights:
                raise IdentityError(f"profile key {key!r} must map values to weights")
            values, w = zip(*sorted(weights.items()))
            if any((not isinstance(x, (int, float))) or x < 0 for x in w) or sum(w) <= 0:
                raise IdentityError(f"profile key {key!r}: weights must be non-negative numbers, not all zero")
            choice = rng.choices(values, weights=w)[0]
            if key == "tags":
                attrs["tags"] = [t for t in choice.split("|") if t]
            elif choice != "":
                attrs[key] = choice
        out.append(check_attrs(attrs))
    return out


def load_profile_file(path: str | os.PathLike, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A .jsonl file gives per-device attributes (cycled if shorter than n); a .json file is a profile."""
    path = pathlib.Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise IdentityError(f"{path}:{i}: not JSON: {e}") from None
        if not rows:
            raise IdentityError(f"{path} holds no device attributes")
        return [dict(rows[i % len(rows)]) for i in range(n)]
    try:
        profile = json.loads(text)
    except ValueError as e:
        raise IdentityError(f"{path}: profile is not JSON: {e}") from None
    return draw_attrs(profile, n, seed)


@dataclass
class RoundStats:
    devices: int = 0
    synced: int = 0
    failed: int = 0
    installed: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)   # per device: round start -> device in sync
    elapsed_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class Fleet:
    def __init__(self, n_devices: int, platform_address: str, base_dir: str | os.PathLike, *,
                 profile: dict | None = None, profile_file: str | os.PathLike | None = None, seed: int = 0,
                 sandbox: Any = None, enroll: Enroller | None = None, credentials_file: str | os.PathLike | None = None,
                 workers: int = 32, durable: bool = False, channel: grpc.Channel | None = None,
                 id_prefix: str = "fleet", progress: bool = False):
        if n_devices < 1:
            raise IdentityError(f"a fleet needs at least 1 device (got {n_devices})")
        self.base_dir = pathlib.Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.platform_address = platform_address
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            platform_address, options=[("grpc.max_receive_message_length", 32 << 20)])
        self.sandbox = sandbox
        self.progress = progress
        _raise_fd_limit(8 * n_devices + 256)  # each device keeps its tunnel queue open (db, -wal, -shm)
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="walle-fleet")
        self.bundle_cache = BundleCache()
        if profile_file:
            attrs = load_profile_file(profile_file, n_devices, seed)
        else:
            attrs = draw_attrs(profile or DEFAULT_PROFILE, n_devices, seed)
        ids = [a.pop("device_id", None) or f"{id_prefix}-{i:06d}" for i, a in enumerate(attrs)]
        attrs = [check_attrs(a) for a in attrs]
        creds = self._credentials(ids, [str(a.get("user_id", "")) for a in attrs], enroll, credentials_file)
        ids = [c.device_id for c in creds]  # a pre-made credential names its device
        self.devices: list[DeviceHost] = list(self.pool.map(
            lambda i: DeviceHost(self.base_dir / ids[i], platform_address, attrs=attrs[i], sandbox=sandbox,
                                 credentials=creds[i], channel=self.channel, bundle_cache=self.bundle_cache,
                                 durable=durable),
            range(n_devices)))
        self.rounds: list[RoundStats] = []
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._watch_call = None

    def _credentials(self, ids: list[str], users: list[str], enroll: Enroller | None,
                     credentials_file) -> list[Credentials]:
        given: list[Credentials] = []
        if credentials_file:
            for i, line in enumerate(pathlib.Path(credentials_file).read_text().splitlines(), 1):
                if line.strip():
                    try:
                        given.append(Credentials.from_dict(json.loads(line), f"{credentials_file}:{i}"))
                    except ValueError as e:
                        raise IdentityError(f"{credentials_file}:{i}: {e}") from None
            if len(given) < len(ids):
                raise IdentityError(f"{credentials_file} has {len(given)} credentials for {len(ids)} devices")

        def one(i: int) -> Credentials:
            if given:
                return given[i]
            path = credentials_path(self.base_dir / ids[i])
            if path.exists():
                return Credentials.load(path)  # enrolled by an earlier run
            if enroll is None:
                raise IdentityError(f"device {ids[i]} has no credential: pass enroll=... or credentials_file=...")
            got = enroll(ids[i], users[i])
            cred = got if isinstance(got, Credentials) else Credentials(ids[i], got, self.platform_address,
                                                                        user_id=users[i])
            cred.save(path)
            return cred
        return list(self.pool.map(one, range(len(ids))))

    # -- fleet operations --------------------------------------------------------------------------
    def _map(self, fn: Callable[[DeviceHost], Any], label: str) -> list[tuple[DeviceHost, Any, BaseException | None]]:
        """Run fn on every device in the pool; returns (device, result, error) in completion order."""
        out = []
        jobs = {self.pool.submit(fn, d): d for d in self.devices}
        progress = None
        if self.progress:
            from rich.progress import Progress
            progress = Progress(transient=True)
            progress.start()
            task = progress.add_task(label, total=len(jobs))
        try:
            for f in futures.as_completed(jobs):
                err = f.exception()
                out.append((jobs[f], None if err else f.result(), err))
                if progress is not None:
                    progress.advance(task)
        finally:
            if progress is not None:
                progress.stop()
        return out

    def sync_all(self) -> RoundStats:
        """Every device pulls and converges, then uploads its delivery reports."""
        t0 = time.perf_counter()

        def one(d: DeviceHost):
            res = d.sync.sync_once()
            done = time.perf_counter() - t0
            d.up.flush_once()  # delivery reports; what is left retries on the next round
            return res, done
        st = RoundStats(devices=len(self.devices))
        for d, value, err in self._map(one, "syncing"):
            if err is not None:
                st.failed += 1
                key = err.code().name if isinstance(err, grpc.RpcError) else type(err).__name__
                st.errors[key] = st.errors.get(key, 0) + 1
                continue
            res, done = value
            st.synced += 1
            st.installed += len(res.installed)
            st.rejected += len(res.rejected)
            st.latencies.append(done)
        st.elapsed_s = time.perf_counter() - t0
        self.rounds.append(st)
        return st

    def flush_all(self, timeout: float = 10.0) -> int:
        """Upload every device's queue; returns how many devices still have records queued."""
        return sum(1 for _d, ok, err in self._map(lambda d: d.up.flush(timeout), "uploading") if err or not ok)

    def emit_all(self, event_name: str, payload: Any = None) -> int:
        """The app event on every device; queued runs execute in the pool. Returns runs done."""
        def one(d: DeviceHost) -> int:
            d.emit(event_name, payload)
            return d.triggers.drain()
        return sum(v or 0 for _d, v, _e in self._map(one, f"event {event_name}"))

    def run_due(self) -> int:
        """Run schedule/table_rows triggers that are due on every device."""
        def one(d: DeviceHost) -> int:
            d.triggers.check_schedules()
            d.triggers.check_tables()
            return d.triggers.drain()
        return sum(v or 0 for _d, v, _e in self._map(one, "runs"))

    def installed_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.devices:
            for ref in d.store.installed():
                counts[ref] = counts.get(ref, 0) + 1
        return counts

    # -- the one shared watcher --------------------------------------------------------------------
    def start_watch(self) -> None:
        if self._watch_thread is None:
            self._stop.clear()
            self._watch_thread = threading.Thread(target=self._watch, name="walle-fleet-watch", daemon=True)
            self._watch_thread.start()

    def _watch(self) -> None:
        d0 = self.devices[0]
        stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        attempt = 0
        while not self._stop.is_set():
            try:
                self._watch_call = stub.WatchTasks(device_pb2.WatchRequest(device=d0.device_info()),
                                                   metadata=d0.credentials.metadata)
                for _msg in self._watch_call:
                    attempt = 0
                    self._changed.set()
            except grpc.RpcError as e:
                if self._stop.is_set() or e.code() == grpc.StatusCode.CANCELLED:
                    return
                log.warning("fleet watch stream: %s %s", e.code().name, e.details())
            attempt += 1
            self._stop.wait(backoff_delay(attempt, base=0.5, cap=60))

    def wait_change(self, timeout: float) -> bool:
        """True if the platform announced a change (clears the flag)."""
        hit = self._changed.wait(timeout)
        self._changed.clear()
        return hit

    def run(self, duration: float, *, poll_seconds: float = 60.0,
            on_round: Callable[[RoundStats], None] | None = None) -> None:
        """Stay in sync for `duration` seconds: a round on every announced change and every poll_seconds."""
        self.start_watch()
        deadline = time.monotonic() + duration
        next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            if self.wait_change(min(max(0.0, next_poll - now), deadline - now)) or time.monotonic() >= next_poll:
                st = self.sync_all()
                self.run_due()
                if on_round:
                    on_round(st)
                next_poll = time.monotonic() + poll_seconds * random.uniform(0.8, 1.2)

    def summary(self) -> dict:
        last = self.rounds[-1] if self.rounds else RoundStats(devices=len(self.devices))
        lat = [x for r in self.rounds for x in r.latencies]
        runs = sum(d.stats["runs"] for d in self.devices)
        ok = sum(d.stats["ok"] for d in self.devices)
        return {"devices": len(self.devices), "synced": last.synced, "sync_failed": last.failed,
                "tasks_installed": sum(r.installed for r in self.rounds),
                "installed_now": self.installed_counts(), "rejected": sum(r.rejected for r in self.rounds),
                "runs_ok": ok, "runs_failed": runs - ok, "rounds": len(self.rounds),
                "sync_p50_s": _percentile(lat, 50), "sync_p99_s": _percentile(lat, 99),
                "last_round_s": last.elapsed_s, "errors": last.errors}

    def print_summary(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table
        s = self.summary()
        t = Table("fleet", "value", title="fleet summary")
        t.add_row("devices synced", f"{s['synced']}/{s['devices']}" + (f" ({s['sync_failed']} failed)" if s["sync_failed"] else ""))
        t.add_row("tasks installed", str(s["tasks_installed"]))
        for ref, n in sorted(s["installed_now"].items()):
            t.add_row(f"  now on devices: {ref}", str(n))
        t.add_row("bundles rejected", str(s["rejected"]))
        t.add_row("runs ok / failed", f"{s['runs_ok']} / {s['runs_failed']}")
        t.add_row("sync latency p50 / p99", f"{s['sync_p50_s'] * 1000:.0f} ms / {s['sync_p99_s'] * 1000:.0f} ms")
        t.add_row("sync rounds", str(s["rounds"]))
        if s["errors"]:
            t.add_row("last round errors", ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())))
        (console or Console()).print(t)

    def close(self) -> None:
        self._stop.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
        list(self.pool.map(lambda d: d.close(), self.devices))
        self.pool.shutdown(wait=True)
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def devices_matching(fleet: Fleet, pred: Callable[[dict], bool]) -> Iterable[DeviceHost]:
    return [d for d in fleet.devices if pred(d.attrs)]
