"""The CoDA work cycle end to end (paper Figure 1) on MovieLens-100k, and its evaluation.

This is a harness: it plays the operator (submit and release the three CoDA tasks), the cloud
(the platform server with the CoDA services, the daily pipeline, the global model) and the app on
every emulated device (upload the day's behaviour, record the user's own samples, pull matched
batches, raise the events that trigger the tasks). Everything between them goes over real gRPC on
127.0.0.1, and every task runs in the device host's sandbox.

Evaluation: each user's last 10% of interactions is held out (never uploaded, never matched,
never trained on) and scored at the end by three models that start from the same global model:
Cloud (the global model only), Local (fine-tuned on the user's own samples, same Algorithm 3 gate)
and CoDA (local + filtered outside samples)."""
from __future__ import annotations

import json
import math
import pathlib
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from walle.protos import admin_pb2, bundle, coda_pb2

from .. import manifest as manifest_mod
from .. import pki
from ..demo import tasks_dir
from ..server import build_server, tls_credentials
from ..service import Platform
from . import movielens
from . import samples as samplegen
from .cloud import CodaCloud
from .plot import plot

TASKS = ("coda_filter", "coda_train", "coda_infer")
MAX_OUTSIDE = 200          # the outside table's size limit (paper 5.2)
PAPER_COST = {"wall_s": 0.7, "memory_mb": 120, "kb_per_trigger": 19.4}


@dataclass
class Config:
    users: int = 0            # 0 = every MovieLens user
    days: int = 3             # simulated work cycles; day 1 only feeds the global model
    seeds: tuple[int, ...] = (0,)
    k: int = 100
    t: int = 0                # validation: today's local samples (the paper's t = 3 days, time compressed)
    t_prime: int = 2          # local samples older than this are dropped (the paper's t' = 7)
    global_epochs: int = 2
    workers: int = 4          # device threads in the emulated fleet
    task_config: dict = field(default_factory=dict)  # per-release config overrides (sigma, epochs, lr, ...)
    out_dir: str = "demo-output"


@dataclass
class DeviceLog:
    rounds: list = field(default_factory=list)   # per device-day: wall, filter/train results
    bytes_down: int = 0
    batches: int = 0
    filter_runs: int = 0


class Experiment:
    def __init__(self, cfg: Config, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console()
        self.ml = movielens.load()
        inter = self.ml.inter
        if cfg.users:
            inter = inter[inter["user_id"].isin(sorted(inter["user_id"].unique())[:cfg.users])]
        self.user_ids = sorted(int(u) for u in inter["user_id"].unique())
        self.train, self.test = movielens.assign_days(inter, cfg.days)
        items = self.ml.items
        self.item_ids = items["item_id"].to_numpy()
        self.item_cats = {int(i): [int(c) for c in cs] for i, cs in zip(items["item_id"], items["genre_ids"])}
        self.titles = dict(zip(items["item_id"].astype(int), items["title"]))
        self.seen_items = {int(u): set(g) for u, g in self.train.groupby("user_id")["item_id"]}

    # -- one seed -------------------------------------------------------------------------------
    def run_seed(self, seed: int, work: pathlib.Path) -> dict:
        from walle.device_host.fleet import Fleet
        from walle.device_host.sandbox import Sandbox

        from walle.device_host.identity import Credentials
        cfg, con = self.cfg, self.console
        keys = pki.init(work / "platform")  # TLS and signed bundles, as in production
        platform = Platform(work / "platform", keys=keys)
        coda = CodaCloud(platform, items=self.ml.items, users=self.ml.users, k=cfg.k)
        _server, port, stop = build_server(platform, port=0, extra=coda.add_services,
                                           credentials=tls_credentials(platform))
        address = f"localhost:{port}"
        sandbox = Sandbox(workers=2)  # models train in the sandboxed children, in parallel
        fleet = channel = None
        try:
            self._release_tasks(platform, seed)
            profile = work / "devices.jsonl"
            with profile.open("w") as f:
                for u in self.user_ids:
                    f.write(json.dumps({"device_id": movielens.device_id(u), "user_id": str(u), "os": "android",
                                        "app_version": "2.3.0", "region": "cn"}) + "\n")
            def enroll(did: str, user: str) -> Credentials:  # each device pins the CA and the bundle key
                r = platform.EnrollDevice(admin_pb2.EnrollRequest(device_id=did, actor="demo", user_id=user))
                return Credentials(did, r.token, address, r.platform_ca_pem, r.bundle_public_key.hex(), user_id=user)

            channel = Credentials("demo", "-", address, keys.ca_pem.decode()).channel()
            fleet = Fleet(len(self.user_ids), address, work / "devices", profile_file=profile, sandbox=sandbox,
                          enroll=enroll, workers=cfg.workers, seed=seed, channel=channel)
            devices = {movielens.device_id(u): d for u, d in zip(self.user_ids, fleet.devices)}
            stats = fleet.sync_all()
            logs = {did: DeviceLog() for did in devices}
            installed = fleet.installed_counts()
            counts = ", ".join(f"{ref.split('@')[0]} x{n}" for ref, n in sorted(installed.items()))
            con.print(f"seed {seed}: {len(devices)} devices synced; installed {counts}", highlight=False)
            global_blob = b""
            for day in range(1, cfg.days + 1):
                coda.today = day
                self._each(fleet, f"day {day}: upload logs", lambda did, d: self._upload(d, did, day))
                res = coda.run_day(day)
                con.print(f"  day {day}: cloud {res.samples} samples, {res.matched_users} users matched, "
                          f"{res.batches} batches ({sum(res.seconds.values()):.1f}s)", highlight=False)
                todays = coda.day_samples[day]
                if day == 1:
                    global_blob = self._global_model(platform, todays, seed)
                self._each(fleet, f"day {day}: devices", lambda did, d: self._device_day(
                    d, logs[did], day, todays.get(coda.pseudonym_of_device(did), []), seed))
            fleet.flush_all()
            metrics = self._evaluate(coda, devices, global_blob)
            metrics["cost"] = self._cost(logs)
            metrics["diagnostics"] = self._diagnostics(logs)
            metrics["release_stats"] = {r.task: {"delivered": r.stats.delivered, "ran": r.stats.ran,
                                                 "runs": r.stats.runs, "failed": r.stats.failed}
                                        for r in platform.ListReleases(admin_pb2.ReleaseFilter()).releases}
            metrics["sync"] = {"p50_s": getattr(stats, "p50", None)}
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
        compressed t / t', the seed, and any overrides), like `walle release create ... --set`."""
        overrides = {"t": self.cfg.t, "t_prime": self.cfg.t_prime, "seed": seed, **self.cfg.task_config}
        tasks = {name: manifest_mod.validate_task_dir(tasks_dir() / name) for name in TASKS}
        unknown = sorted(set(overrides) - {p.name for m, _f in tasks.values() for p in m.config})
        if unknown:
            raise ValueError(f"task config overrides {unknown} are declared by none of {', '.join(TASKS)}")
        for name, (m, files) in tasks.items():
            keys = {p.name for p in m.config}
            tv = platform.SubmitTask(admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), author="demo",
                                                                 message=f"{name} for the demo"))
            platform.CreateRelease(admin_pb2.CreateReleaseRequest(
                task=name, version=tv.version, rule='app_version >= "1.0"', actor="demo",
                config={k: str(v) for k, v in overrides.items() if k in keys}))

    def _each(self, fleet, label: str, fn) -> None:
        items = [(d.device_id, d) for d in fleet.devices]
        errors = []
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as prog:
            bar = prog.add_task(label, total=len(items))
            futs = [fleet.pool.submit(fn, did, d) for did, d in items]
            for f in futs:
                try:
                    f.result()
                except Exception as e:  # one device failing must not stop the fleet; it is reported
                    errors.append(e)
                prog.advance(bar)
        if errors:
            self.console.print(f"  [yellow]{label}: {len(errors)} device(s) failed; first: {errors[0]!r}[/yellow]")

    # -- the app on a device ----------------------------------------------------------------------
    def _upload(self, dev, did: str, day: int) -> None:
        uid = int(did.rsplit("-", 1)[1])
        for _seq, log in movielens.replay_logs(self.train, uid, day):
            dev.up.send("behavior", log.SerializeToString())
        dev.up.flush(timeout=30)

    def _device_day(self, dev, log: DeviceLog, day: int, own: list, seed: int) -> None:
        from walle.device_host.coda_rows import sample_to_row
        from walle.device_host.sample_client import SampleClient
        st = dev.storage
        st.put("coda", "today", day)
        st.put("coda", "experiment.local_arm", True)
        if own:
            st.insert("coda", "local", [sample_to_row(s) for s in own])
        if day == 1:
            return  # the first day's data trains the global model; devices start the next day
        rss0 = _reset_peak_rss()
        t0 = time.perf_counter()
        runs = []
        dev.on_run = lambda name, result: runs.append((name, result))
        client = SampleClient(dev.channel, dev.credentials.metadata)
        # One pull a day of what fits the outside table (at most 12 batches; a merged batch of up
        # to 40 may overshoot the 200 rows, which the filter's forced cleanup trims).
        have = st.count("coda", "outside") if "outside" in st.table_names("coda") else 0
        room = (MAX_OUTSIDE - have) // 25
        pulled = client.pull(day, max_batches=min(room, 12)) if room > 0 else []
        for b in pulled:
            st.insert("coda", "outside", [sample_to_row(s, batch_id=b.batch_id, state="new", score=None)
                                          for s in b.samples])
            log.bytes_down += b.wire_bytes
            log.batches += 1
        if pulled:
            dev.emit("batch_received", {"day": day, "batches": [b.batch_id for b in pulled]})
            log.filter_runs += 1
            dev.triggers.drain()
            dev.triggers.check_tables()  # coda_train fires at 100 filtered samples
            dev.triggers.drain()
        dev.emit("batches_exhausted", {"day": day})
        dev.triggers.drain()
        wall, extra_mb = time.perf_counter() - t0, _peak_rss_mb() - rss0  # the round: filter + train
        self._page_view(dev, day)
        dev.on_run = None
        log.rounds.append({"day": day, "wall_s": wall, "extra_rss_mb": extra_mb,
                           "runs": [(n, r.status, r.duration_s, r.peak_memory_kb, r.error[-2000:] if r.error else "")
                                    for n, r in runs],
                           "values": [(n, r.value) for n, r in runs if r.status == "ok"]})

    def _page_view(self, dev, day: int) -> None:
        """The app opens its home page: 20 candidate items the user has not rated, in the context of
        the user's latest history; coda_infer ranks them with the personal model."""
        latest = dev.storage.query("coda", "local", order_by="-ts", limit=1)
        if not latest:
            return
        row = latest[0]
        uid = int(dev.device_id.rsplit("-", 1)[1])
        seen = self.seen_items.get(uid, set())
        rng = np.random.default_rng(uid * 1000 + day)
        pool = [int(i) for i in rng.choice(self.item_ids, size=60, replace=False) if int(i) not in seen][:20]
        cands = [{"item_id": i, "item_cats": self.item_cats[i], "hist_items": row["hist_items"],
                  "hist_cats": row["hist_cats"], "profile": row["profile"]} for i in pool]
        dev.emit("page_view:home", {"candidates": cands})
        dev.triggers.drain()

    # -- the cloud's global model -----------------------------------------------------------------
    def _global_model(self, platform: Platform, todays: dict, seed: int) -> bytes:
        from .global_model import catalog_config, train_global
        pool = [s for ss in todays.values() for s in ss]
        data, metrics = train_global(pool, epochs=self.cfg.global_epochs, seed=seed,
                                     catalog=catalog_config(self.ml.items))
        platform.PublishResource(admin_pb2.PublishResourceRequest(
            name="coda/global_model", data=data, metadata_json=json.dumps({"metrics": metrics, "seed": seed}),
            actor="demo"))
        self.console.print(f"  global model: {metrics['n_train']} samples, train AUC {metrics['train_auc']:.3f}, "
                           f"published as coda/global_model ({len(data) / 1024:.0f} KB)", highlight=False)
        return data

    # -- evaluation -----------------------------------------------------------------------------
    def test_samples(self, key: bytes) -> dict[str, list[coda_pb2.Sample]]:
        """Held-out samples: the test tail of each user, with histories of everything before it."""
        import pandas as pd
        test = self.test.copy()
        test["day"] = self.cfg.days + 1
        both = pd.concat([self.train, test], ignore_index=True)
        raw = movielens.as_raw_frame(both)
        gen = samplegen.generate(raw, self.ml.items, self.ml.users, key=key, day=self.cfg.days + 1)
        return gen.samples

    def _evaluate(self, coda: CodaCloud, devices: dict, global_blob: bytes) -> dict:
        from .global_model import load_global, sample_dict
        from .tasklib import coda_module
        features, training, metrics = coda_module("features"), coda_module("training"), coda_module("metrics")
        auc, logloss = metrics.auc, metrics.logloss
        tests = self.test_samples(coda.key)
        glob = load_global(global_blob)
        arms = {"cloud": [], "local": [], "coda": []}
        per_user = {a: [] for a in arms}
        for did, dev in devices.items():
            user = coda.pseudonym_of_device(did)
            samples = tests.get(user)
            if not samples:
                continue
            arr = features.batch([sample_dict(s) for s in samples], glob.config["hist_len"],
                                 glob.config["profile_dim"])
            y = arr.label.astype(float)
            for arm, model in (("cloud", glob), ("local", self._device_net(dev, "ctr_local") or glob),
                               ("coda", self._device_net(dev, "ctr") or glob)):
                p = training.predict(model, arr)
                arms[arm].append((y, p))
                per_user[arm].append((auc(y, p), logloss(y, p)))
        out = {}
        for arm in arms:
            y = np.concatenate([a for a, _ in arms[arm]])
            p = np.concatenate([b for _, b in arms[arm]])
            aucs = [a for a, _ in per_user[arm] if a is not None]
            out[arm] = {"user_auc_mean": float(np.mean(aucs)), "users_with_auc": len(aucs),
                        "pooled_auc": auc(y, p), "user_logloss_mean": float(np.mean([l for _, l in per_user[arm]])),
                        "pooled_logloss": logloss(y, p), "test_samples": int(len(y))}
        return out

    @staticmethod
    def _device_net(dev, name: str):
        """A device's stored model (M) as the library's DIN, read by the harness, not the device."""
        from walle.platform.errors import NotFound

        from .tasklib import coda_module
        try:
            got = dev.models.scope("coda").load(name)
        except NotFound:  # coda_train never ran on this device: it would serve the global model
            return None
        net = coda_module("din").DIN(got["meta"]["config"])
        net.set_params(got["params"])
        return net

    def _cost(self, logs: dict[str, DeviceLog]) -> dict:
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

    def _diagnostics(self, logs: dict[str, DeviceLog]) -> dict:
        """What the tasks did: how much the filter kept, how often the gate let an update through."""
        received = kept = 0
        arms: dict[str, dict] = {}
        infer_s = [x[2] for lg in logs.values() for r in lg.rounds for x in r["runs"] if x[0] == "coda_infer"]
        example = None
        for lg in logs.values():
            for r in lg.rounds:
                for name, value in r.get("values", []):
                    if name == "coda_infer" and isinstance(value, dict) and example is None:
                        example = [self.titles.get(int(i), str(i)) for i in value.get("ranking", [])[:5]]
                    if name == "coda_filter" and isinstance(value, dict):
                        received += value.get("scored", 0)
                        kept += value.get("kept", 0)
                    elif name == "coda_train" and isinstance(value, dict):
                        for arm, v in value.items():
                            if not isinstance(v, dict):
                                continue
                            a = arms.setdefault(arm, {"runs": 0, "committed": 0, "skipped": 0, "gain": [],
                                                      "n_train": []})
                            a["runs"] += 1
                            a["skipped"] += bool(v.get("skipped"))
                            a["committed"] += bool(v.get("committed"))
                            if v.get("committed") and v.get("before") is not None and v.get("after") is not None:
                                # improvement in the gate's own metric: AUC up, or logloss down
                                sign = -1.0 if v.get("metric") == "logloss" else 1.0
                                a["gain"].append((v.get("metric", "auc"), sign * (v["after"] - v["before"])))
                            if v.get("n_train") is not None:
                                a["n_train"].append(v["n_train"])
        out = {"filter_scored": received, "filter_kept": kept,
               "filter_keep_rate": kept / received if received else None,
               "infer_runs": len(infer_s), "infer_ms_p50": float(np.median(infer_s)) * 1000 if infer_s else None,
               "example_home_page_top5": example}
        for arm, a in arms.items():
            out[arm] = {"train_runs": a["runs"], "skipped": a["skipped"], "committed": a["committed"],
                        "commit_rate": a["committed"] / max(1, a["runs"] - a["skipped"]),
                        "mean_validation_improvement_when_committed": {
                            m: float(np.mean([g for mm, g in a["gain"] if mm == m]))
                            for m in sorted({mm for mm, _ in a["gain"]})},
                        "mean_train_samples": float(np.mean(a["n_train"])) if a["n_train"] else None}
        return out

    # -- all seeds ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        out_dir = pathlib.Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {"config": asdict(cfg), "users": len(self.user_ids),
                   "split": movielens.split_stats(self.train, self.test), "seeds": {}}
        t0 = time.perf_counter()
        for seed in cfg.seeds:
            with tempfile.TemporaryDirectory(prefix=f"walle-coda-{seed}-") as tmp:
                results["seeds"][str(seed)] = self.run_seed(seed, pathlib.Path(tmp))
        results["elapsed_s"] = time.perf_counter() - t0
        results["summary"] = summarize(results["seeds"])
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        plot(results, out_dir / "results.png")
        return results


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


def summarize(seeds: dict) -> dict:
    out = {}
    for arm in ("cloud", "local", "coda"):
        out[arm] = {}
        for metric in ("user_auc_mean", "pooled_auc", "user_logloss_mean", "pooled_logloss"):
            vals = [s[arm][metric] for s in seeds.values() if s[arm][metric] is not None]
            out[arm][metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)) if len(vals) > 1 else 0.0}
    return out


def print_results(results: dict, console: Console) -> None:
    s = results["summary"]
    n_seeds = len(results["seeds"])
    t = Table(title=f"Held-out test metrics ({results['users']} users, "
                    + (f"mean ± std over {n_seeds} seeds)" if n_seeds > 1 else "one seed; --seeds 3 for a spread)"))
    for col in ("arm", "per-user AUC", "pooled AUC", "per-user logloss", "pooled logloss"):
        t.add_column(col)
    for arm in ("cloud", "local", "coda"):
        row = [arm.capitalize() if arm != "coda" else "CoDA"]
        for metric in ("user_auc_mean", "pooled_auc", "user_logloss_mean", "pooled_logloss"):
            m = s[arm][metric]
            row.append(f"{m['mean']:.4f} ± {m['std']:.4f}" if n_seeds > 1 else f"{m['mean']:.4f}")
        t.add_row(*row)
    console.print(t)
    cost = next(iter(results["seeds"].values()))["cost"]
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
    diag = next(iter(results["seeds"].values())).get("diagnostics", {})
    if diag.get("example_home_page_top5"):
        console.print(f"coda_infer ranked {diag['infer_runs']} home pages (p50 {diag['infer_ms_p50']:.0f} ms in the "
                      f"sandbox); one user's top 5: {'; '.join(diag['example_home_page_top5'])}", highlight=False)


def _fmt(v, unit: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f} {unit}"
