"""The CoDA work cycle end to end (paper Figure 1, section 4.1) on MovieLens-100k, as a deployment,
and its evaluation.

Three parties, talking over the interfaces a real deployment uses:
  - the cloud: a served platform (real gRPC, TLS, signed bundles) with the CoDA services; the
    operator submits the five CoDA tasks and releases them with the run's config (as
    `walle release create --set`), loads the catalog (`walle cloud catalog load`) and closes each day
    with the daily pipeline (`walle cloud pipeline`: samples, matching, the global model on day 1);
  - a fleet of real device hosts (as `walle fleet run`: shared sandbox, each host runs its own
    queued tasks and uploads its own queue);
  - the users (simulator.py): each MovieLens user plays the app on their device and talks to it only
    through the app interface (emit / ask). Devices build their own samples from that behaviour
    (coda_samples), upload it, pull their matched batches (coda_fetch), filter (coda_filter) and
    train (coda_train); the home page is ranked by coda_infer.
This module never writes device storage, models or cloud tables (tests/coda/test_demo_e2e.py checks).

Evaluation: each user's last 10% of interactions is held out (never emitted, never uploaded) and, at
the end, shown on the user's home page: the device ranks it with its CoDA model `ctr` and its Local
baseline `ctr_local` (same Algorithm 3 gate, local samples only), and the published global model
scores it for the Cloud arm; the user's clicks (rating >= 4) are the labels."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from walle.protos import admin_pb2, bundle

from .. import manifest as manifest_mod
from .. import pki
from ..demo import tasks_dir
from ..errors import InvalidArgument
from ..server import build_server, tls_credentials
from ..service import Platform
from . import datasets, evaluation
from . import samples as samplegen
from .plot import plot
from .simulator import Users

TASKS = ("coda_samples", "coda_fetch", "coda_filter", "coda_train", "coda_infer")
PAPER_COST = {"wall_s": 0.7, "memory_mb": 120, "kb_per_trigger": 19.4}
EVAL_KEY = b"walle-demo-evaluation"  # pseudonyms of the evaluator's own test samples


@dataclass
class Config:
    dataset: str = datasets.DEFAULT  # a name of datasets.REGISTRY
    users: int = 0            # 0 = every user of the data set
    days: int = 3             # simulated work cycles; day 1 only feeds the global model
    seeds: tuple[int, ...] = (0,)
    k: int = 100
    # The device's "today" is the cloud's day, which the pipeline advances when it closes a day: the
    # matched samples of day d are pulled on day d + 1. So t = 1 validates on yesterday's (day d's)
    # local samples and t' = 3 trains on days d-2..d-1 (time compressed; the paper's t = 3, t' = 7).
    t: int = 1
    t_prime: int = 3
    # One morning pull stands for a day of 10-minute fetches: the outside table holds the day's 12
    # batches (12 x 25 samples), so coda_fetch gets them in one pull and the day's training follows.
    max_rows: int = 300
    global_epochs: int = 2
    workers: int = 4          # device threads in the emulated fleet
    task_config: dict = field(default_factory=dict)  # per-release config overrides (sigma, epochs, lr, ...)
    out_dir: str = "demo-output"
    work_dir: str = ""        # where the platform and the fleet's device folders live; "" = work_root()


@dataclass
class DeviceLog:
    rounds: list = field(default_factory=list)   # per device-day: wall, runs, fetch results
    bytes_down: int = 0
    batches: int = 0
    filter_runs: int = 0


def demo_key(purpose: str, seed: int) -> bytes:
    """A key the demo derives from its seed (never used outside the demo), so runs repeat exactly."""
    return hashlib.sha256(f"walle-demo:{purpose}:{seed}".encode()).digest()


class FleetApp:
    """One device of the fleet as its app sees it: `emit` and `ask` of the app interface. The fleet
    runs no background threads per device, so the device runs what its triggers queued whenever the
    app waits on it (an ask) and when the fleet settles it."""

    def __init__(self, host):
        self.host = host

    def emit(self, name: str, payload=None):
        from walle.device_host import app
        return app.emit(self.host, name, payload)[0]

    def ask(self, event: str, payload=None, task: str = ""):
        from walle.device_host import app
        self.settle()
        try:
            return app.answer(self.host, event, payload, task)
        finally:
            self.settle()

    def settle(self) -> None:
        while self.host.triggers.drain():
            pass


class Experiment:
    def __init__(self, cfg: Config, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console()
        self.ml = datasets.load(cfg.dataset)  # inter, items, users (or None), device_id, catalog
        inter = self.ml.inter
        if cfg.users:
            inter = inter[inter["user_id"].isin(sorted(inter["user_id"].unique())[:cfg.users])]
        self.user_ids = sorted(int(u) for u in inter["user_id"].unique())
        self.train, self.test = datasets.assign_days(inter, cfg.days)
        self.titles = dict(zip(self.ml.items["item_id"].astype(int), self.ml.items["title"]))
        self.phases: dict[str, float] = {}  # wall seconds of each fleet-wide step of the current seed
        self.global_models: list[dict] = []  # the global model versions the cloud published this seed
        self._eval_samples: dict | None = None

    # -- one seed -------------------------------------------------------------------------------
    def run_seed(self, seed: int, work: pathlib.Path) -> dict:
        from walle.device_host.fleet import Fleet
        from walle.device_host.identity import Credentials
        from walle.device_host.sandbox import Sandbox

        from .catalog import items_frame
        from .cloud import CodaCloud
        cfg, con = self.cfg, self.console
        t_setup = time.perf_counter()
        keys = pki.init(work / "platform")  # TLS and signed bundles, as in production
        platform = Platform(work / "platform", keys=keys)
        coda = CodaCloud(platform, users=self.ml.users, k=cfg.k, global_epochs=cfg.global_epochs, global_seed=seed,
                         pseudonym_key=demo_key("pseudonym", seed))  # reproducible per seed
        _server, port, stop = build_server(platform, port=0, extra=coda.add_services,
                                           credentials=tls_credentials(platform))
        address = f"localhost:{port}"
        sandbox = Sandbox(workers=2)  # models train in the sandboxed children, in parallel
        fleet = channel = None
        try:
            doc, _ref = coda.load_catalog(self.ml.catalog(), actor="demo")  # `cloud catalog load`
            items = items_frame(doc)
            self._release_tasks(platform, seed)
            profile = work / "devices.jsonl"
            with profile.open("w") as f:
                for u in self.user_ids:
                    f.write(json.dumps({"device_id": self.ml.device_id(u), "user_id": str(u), "os": "android",
                                        "app_version": "2.3.0", "region": "cn"}) + "\n")

            def enroll(did: str, user: str) -> Credentials:  # each device pins the CA and the bundle key
                r = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=did, actor="demo", user_id=user))
                return Credentials(did, r.token, address, r.platform_ca_pem, r.bundle_public_key.hex(), user_id=user)

            channel = Credentials("demo", "-", address, keys.ca_pem.decode()).channel()
            fleet = Fleet(len(self.user_ids), address, work / "devices", profile_file=profile, sandbox=sandbox,
                          enroll=enroll, workers=cfg.workers, seed=seed, channel=channel)
            apps = {int(h.device_id.rsplit("-", 1)[1]): FleetApp(h) for h in fleet.devices}
            stats = fleet.sync_all()
            self.phases["setup: platform, release, fleet enrol + sync"] = time.perf_counter() - t_setup
            installed = fleet.installed_counts()
            counts = ", ".join(f"{ref.split('@')[0]} x{n}" for ref, n in sorted(installed.items()))
            con.print(f"seed {seed}: {len(apps)} devices synced; installed {counts}", highlight=False)
            cats = {int(i): [int(c) for c in cs] for i, cs in zip(items["item_id"], items["genre_ids"])}
            users = Users(self.train, cats, samplegen.profile_table(self.ml.users), items["item_id"].to_numpy())
            logs = {uid: DeviceLog() for uid in apps}
            for day in range(1, cfg.days + 1):
                self._each(apps, f"day {day}: users", lambda uid, a: (users.behave(a, uid, day), a.settle()))
                t0 = time.perf_counter()
                left = fleet.flush_all(timeout=60)  # each device's up tunnel (the uploads coda_samples queued)
                self.phases[f"day {day}: uploads"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                res = coda.close_day()  # the daily pipeline (`walle cloud pipeline`): today becomes day + 1
                self.phases[f"day {day}: global model"] = coda.global_seconds.get(day, 0.0)
                self.phases[f"day {day}: cloud pipeline"] = time.perf_counter() - t0 - coda.global_seconds.get(day, 0.0)
                con.print(f"  day {day}: cloud {res.raw_rows} behaviour rows, {res.samples} samples, "
                          f"{res.matched_users} users matched, {res.batches} batches "
                          f"({sum(res.seconds.values()):.1f}s){f'; {left} devices still uploading' if left else ''}",
                          highlight=False)
                self._report_global(platform, coda.global_seconds.get(day))  # the devices restart from it
                if day == 1:
                    continue  # nothing matched yet: devices start the next day, from the global model
                self._each(apps, f"day {day + 1} morning: fetch, filter, train, home page",
                           lambda uid, a: self._device_day(users, a, logs[uid], uid, day))
            t0 = time.perf_counter()
            metrics, per_user = self._evaluate(platform, apps, users, items)
            fleet.flush_all(timeout=30)  # the run reports of the evaluation pages too
            self.phases["evaluation (pages built, asked, scored)"] = time.perf_counter() - t0
            metrics["per_user"] = per_user
            metrics["global_models"] = self.global_models
            metrics["cost"] = self._cost(logs)
            metrics["diagnostics"] = self._diagnostics(logs)
            metrics["release_stats"] = {r.task: {"delivered": r.stats.delivered, "ran": r.stats.ran,
                                                 "runs": r.stats.runs, "failed": r.stats.failed}
                                        for r in platform.ListReleases(admin_pb2.ReleaseFilter()).releases}
            metrics["sync"] = {"p50_s": getattr(stats, "p50", None)}
            metrics["cloud_day"] = coda.today
            metrics["phase_seconds"], self.phases, self.global_models = self.phases, {}, []
            return metrics
        finally:
            if fleet is not None:
                fleet.close()
            sandbox.close()
            if channel is not None:
                channel.close()
            stop(0)

    def _release_tasks(self, platform: Platform, seed: int) -> None:
        """The operator: submit the CoDA tasks and release them with the run's config (the demo's
        compressed t / t', the seed, the Local arm, and any overrides), like `walle release create ... --set`."""
        overrides = {"t": self.cfg.t, "t_prime": self.cfg.t_prime, "max_rows": self.cfg.max_rows, "seed": seed,
                     "local_arm": True,
                     **self.cfg.task_config}
        tasks = {name: manifest_mod.validate_task_dir(tasks_dir() / name) for name in TASKS}
        unknown = sorted(set(overrides) - {p.name for m, _f in tasks.values() for p in m.config})
        if unknown:
            raise InvalidArgument(f"task config overrides {unknown} are declared by none of {', '.join(TASKS)}")
        for name, (m, files) in tasks.items():
            keys = {p.name for p in m.config}
            tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="demo",
                                                                 message=f"{name} for the demo"))
            platform.CreateRelease(admin_pb2.CreateReleaseRequest(
                task=name, version=tv.version, rule='app_version >= "1.0"', actor="demo",
                config={k: str(v).lower() if isinstance(v, bool) else str(v)
                        for k, v in overrides.items() if k in keys}))

    def _each(self, apps: dict, label: str, fn) -> None:
        from concurrent import futures
        errors = []
        t0 = time.perf_counter()
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as prog, \
                futures.ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="walle-demo-user") as pool:
            bar = prog.add_task(label, total=len(apps))
            for f in [pool.submit(fn, uid, a) for uid, a in apps.items()]:
                try:
                    f.result()
                except Exception as e:  # one device failing must not stop the fleet; it is reported
                    errors.append(e)
                prog.advance(bar)
        self.phases[label] = time.perf_counter() - t0
        if errors:
            self.console.print(f"  [yellow]{label}: {len(errors)} device(s) failed; first: {errors[0]!r}[/yellow]")

    # -- a device's day, as its user lives it --------------------------------------------------------
    def _device_day(self, users: Users, app: FleetApp, log: DeviceLog, uid: int, day: int) -> None:
        runs = []
        app.host.on_run = lambda name, result: runs.append((name, result))  # observe, as the run reports do
        rss0 = _reset_peak_rss()
        t0 = time.perf_counter()
        fetches = users.fetch(app)  # the round: pull, filter, train
        wall, extra_mb = time.perf_counter() - t0, _peak_rss_mb() - rss0
        page = users.home_page(app, uid, day)
        app.host.on_run = None
        for f in fetches:
            log.bytes_down += f.get("bytes", 0)
            log.batches += f.get("pulled", 0)
        log.filter_runs += sum(1 for n, _r in runs if n == "coda_filter")
        log.rounds.append({"day": day, "wall_s": wall, "extra_rss_mb": extra_mb, "home_page": page,
                           "runs": [(n, r.status, r.duration_s, r.peak_memory_kb, r.error[-2000:] if r.error else "")
                                    for n, r in runs],
                           "values": [(n, r.value) for n, r in runs if r.status == "ok"]})

    def _report_global(self, platform: Platform, seconds: float | None) -> None:
        info = platform.resource("coda/global_model")
        meta = json.loads(info.metadata_json)
        m = meta["metrics"]
        self.global_models.append({"version": info.version, "digest": info.digest, "days": meta["days"],
                                   "n_train": m["n_train"], "train_auc": m["train_auc"], "train_seconds": seconds})
        self.console.print(f"  global model {info.name}@{info.version}: {m['n_train']} samples of days "
                           f"{meta['days'][0]}..{meta['days'][1]}, train AUC {m['train_auc']:.3f} "
                           f"({info.size / 1024:.0f} KB)", highlight=False)

    # -- evaluation (the metrics and arms are defined in evaluation.py) -----------------------------
    def eval_samples(self, items: pd.DataFrame) -> dict[int, tuple[list, list]]:
        """user id -> (training samples, held-out samples) as the evaluator builds them from the data it
        replays (never read from the cloud): held-out samples have histories of everything before them."""
        if self._eval_samples is None:
            test = self.test.copy()
            test["day"] = self.cfg.days + 1
            raw = datasets.as_raw_frame(pd.concat([self.train, test], ignore_index=True), self.ml.device_id)
            gen = samplegen.generate(raw, items, self.ml.users, key=EVAL_KEY).samples
            out = {}
            for uid in self.user_ids:
                ss = gen.get(samplegen.pseudonym(str(uid), EVAL_KEY), [])
                out[uid] = ([s for s in ss if s.day <= self.cfg.days], [s for s in ss if s.day > self.cfg.days])
            self._eval_samples = out
        return self._eval_samples

    def eval_pages(self, users: Users, items: pd.DataFrame) -> dict[int, dict]:
        """user id -> the evaluation page's candidates (held-out samples, then the home page's items in
        the context of the training history), the clicks, and the training samples (calibration)."""
        from .global_model import sample_dict
        catalog = items["item_id"].to_numpy()
        seen = self.train.groupby("user_id")["item_id"].agg(set).to_dict()
        test = {int(u): g for u, g in self.test.groupby("user_id")}
        out = {}
        for uid, (train, heldout) in self.eval_samples(items).items():
            rows = test.get(uid)
            if not heldout or rows is None:
                continue
            clicked = set(rows.loc[rows["label"] == 1, "item_id"].astype(int))
            page = evaluation.page_items(uid, rows["item_id"].astype(int).tolist(),
                                         set(int(i) for i in seen.get(uid, ())) | set(rows["item_id"].astype(int)),
                                         catalog)
            shown = [{k: v for k, v in sample_dict(s).items() if k != "label"} for s in heldout]
            out[uid] = {"candidates": shown + users.candidates(uid, self.cfg.days, page), "n_shown": len(shown),
                        "labels": np.array([s.label for s in heldout], dtype=float),
                        "page_relevant": np.array([i in clicked for i in page], dtype=float),
                        "train": [sample_dict(s) for s in train],
                        "train_labels": np.array([s.label for s in train], dtype=float)}
        return out

    def _evaluate(self, platform: Platform, apps: dict, users: Users, items: pd.DataFrame) -> tuple[dict, dict]:
        """The users' evaluation pages: the devices score them with CoDA (`ctr`) and Local (`ctr_local`) in
        one ask each; Cloud is the last published global model, Calibration is Cloud plus the user's offset.
        Returns (arm -> summary, arm -> metric -> per-user values in user-id order)."""
        from .global_model import load_global
        from .tasklib import coda_module
        features, training = coda_module("features"), coda_module("training")
        pages = self.eval_pages(users, items)
        glob = load_global(platform.blob(platform.resource("coda/global_model").digest))  # the Cloud arm
        asked: dict[int, dict] = {}

        def page(uid: int, app: FleetApp) -> None:
            if uid in pages:
                asked[uid] = Users.evaluation_page(app, pages[uid]["candidates"], ["ctr", "ctr_local"])
        self._each(apps, "evaluation home pages", page)

        def cloud_scores(key: str) -> list[np.ndarray]:  # one batched prediction, split back per user
            flat = [c for u in order for c in pages[u][key]]
            probs = np.asarray(training.predict(glob, features.batch(flat, glob.config["hist_len"],
                                                                     glob.config["profile_dim"])), dtype=float)
            return np.split(probs, np.cumsum([len(pages[u][key]) for u in order])[:-1])
        order = sorted(asked)
        out: dict[int, evaluation.UserPage] = {}
        for uid, cloud, train_pred in zip(order, cloud_scores("candidates"), cloud_scores("train")):
            pg, n = pages[uid], pages[uid]["n_shown"]
            offset = evaluation.calibration_offset(pg["train_labels"], train_pred)
            arms = {"cloud": cloud, "calibration": evaluation.calibrate(cloud, offset),
                    "local": np.array(asked[uid]["ctr_local"]), "coda": np.array(asked[uid]["ctr"])}
            out[uid] = evaluation.UserPage(pg["labels"], pg["page_relevant"],
                                           {a: v[:n] for a, v in arms.items()}, {a: v[n:] for a, v in arms.items()})
        summaries, per_user = {}, {"users": order}
        for arm in evaluation.ARMS:
            summaries[arm], per_user[arm] = evaluation.arm_results(out, arm)
        return summaries, per_user

    def _cost(self, logs: dict[int, DeviceLog]) -> dict:
        walls = [r["wall_s"] for lg in logs.values() for r in lg.rounds]
        runs = [x for lg in logs.values() for r in lg.rounds for x in r["runs"]]
        failed = [x for x in runs if x[1] != "ok"]
        triggers = sum(lg.filter_runs for lg in logs.values())
        peak_child = max((x[3] for x in runs), default=0)
        extra = [r["extra_rss_mb"] for lg in logs.values() for r in lg.rounds]
        return {"round_wall_s_p50": float(np.median(walls)) if walls else None,
                "round_extra_rss_mb_p50": float(np.median(extra)) if extra else None,
                "round_extra_rss_mb_max": float(np.max(extra)) if extra else None,
                "round_wall_s_p90": float(np.percentile(walls, 90)) if walls else None,
                "task_runs": len(runs), "task_runs_failed": len(failed),
                "first_failure": failed[0] if failed else None,
                "sandbox_peak_memory_mb": peak_child / 1024,
                "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "kb_per_trigger": (sum(lg.bytes_down for lg in logs.values()) / 1024 / triggers) if triggers else None,
                "batches_pulled": sum(lg.batches for lg in logs.values())}

    def _diagnostics(self, logs: dict[int, DeviceLog]) -> dict:
        """What the tasks did: how much the filter kept, how often the gate let an update through, how
        often the devices restarted from a new global model (and whether they ended on the last one)."""
        last_global = self.global_models[-1]["digest"] if self.global_models else None
        received = kept = 0
        arms: dict[str, dict] = {}
        pages = [r["home_page"] for lg in logs.values() for r in lg.rounds if r.get("home_page")]
        example = ([self.titles.get(int(i), str(i)) for i in pages[0]["ranking"][:5]] if pages else None)
        for lg in logs.values():
            for r in lg.rounds:
                for name, value in r.get("values", []):
                    if name == "coda_filter" and isinstance(value, dict):
                        received += value.get("scored", 0)
                        kept += value.get("kept", 0)
                    elif name == "coda_train" and isinstance(value, dict):
                        for arm, v in value.items():
                            if not isinstance(v, dict):
                                continue
                            a = arms.setdefault(arm, {"runs": 0, "committed": 0, "skipped": 0, "gain": [],
                                                      "n_train": [], "restarted": 0, "base": {}})
                            a["runs"] += 1
                            a["restarted"] += bool(v.get("restarted"))
                            if v.get("base_resource"):  # the global model this device's M started from
                                a["base"][id(lg)] = v["base_resource"].get("digest")
                            a["skipped"] += bool(v.get("skipped"))
                            a["committed"] += bool(v.get("committed"))
                            if v.get("committed") and v.get("before") is not None and v.get("after") is not None:
                                # improvement in the gate's own metric: AUC up, or logloss down
                                sign = -1.0 if v.get("metric") == "logloss" else 1.0
                                a["gain"].append((v.get("metric", "auc"), sign * (v["after"] - v["before"])))
                            if v.get("n_train") is not None:
                                a["n_train"].append(v["n_train"])
        by_task: dict[str, list[float]] = {}
        for lg in logs.values():
            for r in lg.rounds:
                for name, _status, seconds, _kb, _err in r["runs"]:
                    by_task.setdefault(name, []).append(seconds or 0.0)
        out = {"run_seconds_p50": {n: float(np.median(v)) for n, v in sorted(by_task.items())},
               "runs_per_round": {n: len(v) / max(1, sum(len(lg.rounds) for lg in logs.values()))
                                  for n, v in sorted(by_task.items())},
               "filter_scored": received, "filter_kept": kept,
               "filter_keep_rate": kept / received if received else None,
               "home_pages": len(pages), "served_from": {s: sum(p["served_from"] == s for p in pages)
                                                          for s in sorted({p["served_from"] for p in pages})},
               "example_home_page_top5": example}
        for arm, a in arms.items():
            out[arm] = {"train_runs": a["runs"], "skipped": a["skipped"], "committed": a["committed"],
                        "commit_rate": a["committed"] / max(1, a["runs"] - a["skipped"]),
                        "mean_validation_improvement_when_committed": {
                            m: float(np.mean([g for mm, g in a["gain"] if mm == m]))
                            for m in sorted({mm for mm, _ in a["gain"]})},
                        "mean_train_samples": float(np.mean(a["n_train"])) if a["n_train"] else None,
                        "restarts_from_a_new_global": a["restarted"],
                        "devices_on_the_last_global": sum(d == last_global for d in a["base"].values()),
                        "devices_trained": len(a["base"])}
        return out

    # -- all seeds ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        out_dir = pathlib.Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {"config": asdict(cfg), "users": len(self.user_ids),
                   "split": datasets.split_stats(self.train, self.test), "seeds": {}}
        t0, cpu0 = time.perf_counter(), _cpu()
        for seed in cfg.seeds:
            with tempfile.TemporaryDirectory(prefix=f"walle-coda-{seed}-", dir=cfg.work_dir or work_root()) as tmp:
                results["seeds"][str(seed)] = self.run_seed(seed, pathlib.Path(tmp))
        t1 = time.perf_counter()
        results["summary"] = evaluation.summarize(results["seeds"])
        results["paired"] = evaluation.paired([s["per_user"] for s in results["seeds"].values()])
        results["evaluation"] = {"negatives": evaluation.NEGATIVES, "calibration_alpha": evaluation.ALPHA,
                                 "bootstrap_resamples": evaluation.BOOTSTRAP, "ks": list(evaluation.KS),
                                 "method": "evaluation.py: pages, arms, metrics and the two-stage bootstrap"}
        plot(results, out_dir / "results.png")
        results["report_seconds"] = time.perf_counter() - t1  # the bootstrap and the plot
        results["elapsed_s"] = time.perf_counter() - t0
        results["cpu_s"] = {k: v - cpu0[k] for k, v in _cpu().items()}  # this process and its sandbox children
        results["load_average"] = os.getloadavg()
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        return results


SHM = "/dev/shm"
SHM_NEEDED = 4 << 30  # ~1.5 MB per emulated device for 943 devices, with room to spare


def work_root() -> str | None:
    """The emulated fleet's disk: RAM (/dev/shm) when it has room, else the system's temp folder. The
    devices' and the platform's durability code runs all the same; on tmpfs its fsyncs and the final
    clean-up of ~30 files per device cost next to nothing (a real fleet has one disk per phone)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return SHM if st.f_bavail * st.f_frsize >= SHM_NEEDED and os.access(SHM, os.W_OK) else None


def _cpu() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user": me.ru_utime, "sys": me.ru_stime, "children_user": kids.ru_utime, "children_sys": kids.ru_stime}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS (Linux clear_refs 5) and return the current RSS in MB: the
    baseline a round's extra memory is measured against (exact when devices run one at a time)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


TABLE_METRICS = (("user_auc_mean", "per-user AUC"), ("pooled_auc", "pooled AUC"), ("pooled_logloss", "logloss"),
                 ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"))  # results.json also has HR@5, NDCG@5
PAIR_METRICS = (("auc", "per-user AUC"), ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("logloss", "per-user logloss"))
ARM_LABELS = {"cloud": "Cloud", "calibration": "Calibration", "local": "Local", "coda": "CoDA"}


def print_results(results: dict, console: Console) -> None:
    s = results["summary"]
    n_seeds = len(results["seeds"])
    first = next(iter(results["seeds"].values()))
    t = Table(title=f"Held-out test metrics ({results['users']} users, {results['config']['days']} days, "
                    + (f"mean ± std over {n_seeds} seeds)" if n_seeds > 1 else "one seed; --seeds 3 for a spread)"))
    t.add_column("arm")
    for _m, title in TABLE_METRICS:
        t.add_column(title)
    for arm in evaluation.ARMS:
        row = [ARM_LABELS[arm]]
        for metric, _title in TABLE_METRICS:
            m = s[arm].get(metric) or {"mean": None}
            cell = _fmt(m["mean"], "") if n_seeds == 1 or m["mean"] is None else f"{m['mean']:.4f} ± {m['std']:.4f}"
            if metric == "user_auc_mean":
                cell += f" ({first[arm]['users_with_auc']})"
            row.append(cell)
        t.add_row(*row)
    console.print(t)
    console.print(f"per-user AUC over the users with both classes (count in brackets); HR/NDCG over the "
                  f"{first['coda']['users_with_click']} users with a held-out click, on a page of their held-out "
                  f"items + {evaluation.NEGATIVES} never-rated ones", highlight=False)
    p = Table(title="Paired per-user differences (bold: the 95% bootstrap CI over users and seeds excludes 0)")
    for col in ("pair", "metric", "mean", "95% CI", "users"):
        p.add_column(col)
    for pair, by_metric in results["paired"].items():
        a, b = pair.split("-")
        for i, (metric, title) in enumerate(PAIR_METRICS):
            c = by_metric[metric]
            if c["mean"] is None:
                continue
            style = "bold" if c["lo"] > 0 or c["hi"] < 0 else None
            p.add_row(f"{ARM_LABELS[a]} − {ARM_LABELS[b]}" if i == 0 else "", title, f"{c['mean']:+.4f}",
                      f"[{c['lo']:+.4f}, {c['hi']:+.4f}]", str(c["users"]), style=style,
                      end_section=i == len(PAIR_METRICS) - 1)
    console.print(p)
    cost = first["cost"]
    c = Table(title="Per-device cost of one round (filter + train)")
    c.add_column("measure")
    c.add_column("walle (this machine)")
    c.add_column("paper (Taobao, phone)")
    c.add_row("wall time, p50", _fmt(cost["round_wall_s_p50"], "s"), f"{PAPER_COST['wall_s']} s")
    c.add_row("peak memory", f"sandbox {cost['sandbox_peak_memory_mb']:.0f} MB; host process "
              f"{cost['host_peak_rss_mb']:.0f} MB for the whole fleet", f"{PAPER_COST['memory_mb']} MB")
    c.add_row("downloaded per trigger", _fmt(cost["kb_per_trigger"], "KB"), f"{PAPER_COST['kb_per_trigger']} KB")
    c.add_row("task runs (failed)", f"{cost['task_runs']} ({cost['task_runs_failed']})", "")
    console.print(c)
    diag = first.get("diagnostics", {})
    if diag.get("example_home_page_top5"):
        console.print(f"the devices ranked {diag['home_pages']} home pages (served from {diag['served_from']}); "
                      f"one user's top 5: {'; '.join(diag['example_home_page_top5'])}", highlight=False)
    for arm in ("ctr", "ctr_local"):
        d = diag.get(arm)
        if d:
            console.print(f"{arm}: {d['train_runs']} train runs, commit rate {d['commit_rate']:.0%}, "
                          f"{d['restarts_from_a_new_global']} restarts from a new global model; "
                          f"{d['devices_on_the_last_global']}/{d['devices_trained']} devices end on the last one",
                          highlight=False)
    if diag.get("filter_keep_rate") is not None:
        console.print(f"filter keep rate {diag['filter_keep_rate']:.1%}; wall time {results['elapsed_s']:.0f} s "
                      f"({', '.join(f'{k} {v:.0f}s' for k, v in first['phase_seconds'].items())})", highlight=False)


def _fmt(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f} {unit}" if unit else f"{v:.4f}"
