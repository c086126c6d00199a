"""`walle cloud ...`: run the CoDA cloud pipeline on a platform data folder."""
from __future__ import annotations

import json
import math
import time

import click
from rich.console import Console
from rich.table import Table

from walle.protos.clikit import WalleGroup, json_option, print_json

from ..cli.context import Ctx, data_dir_option, pass_ctx

console = Console(stderr=True)


@click.group("cloud", cls=WalleGroup)
def cloud():
    """The CoDA cloud side: ingestion, samples, matching, mappings."""


@cloud.command("pipeline")
@click.option("--day", type=int, default=None,
              help="Re-process this day without advancing the clock (default: close today and advance to the next day).")
@click.option("--force", is_flag=True, help="Close today even if another process seems to be closing it (it died).")
@click.option("--global-model", "global_epochs", type=int, default=0, metavar="EPOCHS",
              help="Also train the global model on the closed day's samples and publish it (0: no).")
@data_dir_option
@click.option("--replay-movielens", "replay_days", type=int, default=0, metavar="N_DAYS",
              help="First ingest --dataset's logs for --day as if every user's device had uploaded them, "
                   "with the data spread over N_DAYS simulated days (the last 10%% of each user is held out).")
@click.option("--dataset", default="movielens-100k", show_default=True, metavar="NAME",
              help="With --replay-movielens: a data set name (`walle cloud dataset list`) or a folder in the "
                   "documented layout.")
@click.option("--users", type=int, default=0, help="With --replay-movielens: only the first N users (0 = all).")
@click.option("--k", type=int, default=100, show_default=True, help="Neighbours per user (Algorithm 1).")
@click.option("--kv", envvar="WALLE_CODA_KV", default="",
              help="Mapping store URL: sqlite:///path or redis://host:port/db (default: embedded SQLite).")
@click.option("--raw-log", envvar="WALLE_CODA_RAW_LOG", default="", metavar="URL",
              help="Raw behaviour log URL: sqlite:///path or postgresql://... (default: the state's PostgreSQL if any, "
                   "else SQLite in the data folder).")
@click.option("--scheduler", default=None,
              help="Dask scheduler address (tcp://host:port) for sample generation and, above 300,000 users, "
                   "matching; default: local.")
@click.option("--match-nprobe", type=click.IntRange(min=1), default=16, show_default=True,
              help="Matching on the --scheduler cluster: lists searched per list of users. Raise it when the "
                   "reported matching recall is too low (more CPU).")
@json_option
@pass_ctx
def pipeline(root: Ctx, day, force, global_epochs, replay_days, dataset, users, k, kv, raw_log, scheduler,
             match_nprobe):
    """Close the work-cycle day: samples -> matching -> mappings for today's uploads, then advance the
    day. Runs beside a serving platform on the same data folder and store (the day is shared state)."""
    from walle.platform.service import Platform

    from . import datasets
    from .cloud import CodaCloud
    platform = Platform(root.data_dir)
    if replay_days:
        if day is None:
            raise click.BadParameter("--replay-movielens needs --day", param_hint="--day")
        ml = datasets.load(dataset).first_users(users)
        coda = CodaCloud(platform, items=ml.items, users=ml.users, kv_url=kv, raw_url=raw_log, k=k, scheduler=scheduler,
                         match_nprobe=match_nprobe)
        coda.today = day
    else:
        coda = CodaCloud(platform, kv_url=kv, raw_url=raw_log, k=k, scheduler=scheduler, global_epochs=global_epochs,
                         match_nprobe=match_nprobe)
    advance = day is None
    day = coda.today if advance else day
    ingested = 0
    with console.status(f"day {day}") as status:
        if replay_days:
            if not 1 <= day <= replay_days:
                raise click.BadParameter(f"--day must be within 1..{replay_days}", param_hint="--day")
            train, _test = datasets.assign_days(ml.inter, replay_days)
            todays = train[train["day"] == day]
            for uid, rows in todays.groupby("user_id"):
                recs = datasets.replay_logs(rows, uid, day)
                a, _d = coda.raw.add(ml.device_id(uid), str(uid), recs, day=day)
                ingested += a
            status.update(f"day {day}: ingested {ingested} replayed records")
        t0 = time.perf_counter()
        if advance:
            result = coda.close_day(force=force, progress=lambda msg: status.update(msg))
        else:
            result = coda.run_day(day, progress=lambda msg: status.update(msg))
        elapsed = time.perf_counter() - t0
    summary = {"day": day, "today": coda.today, "ingested": ingested, "raw_rows": result.raw_rows, "users": result.users,
               "samples": result.samples, "matched_users": result.matched_users, "batches": result.batches,
               "stored_samples": result.stored_samples, "expired": result.expired,
               "mean_top10_cosine": _rounded(result.vector_top10_cosine),
               "matching_recall": _rounded(result.matching_recall),
               "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "total_seconds": round(elapsed, 3)}
    if root.as_json:
        print_json(summary)
        return
    t = Table("step", "result", "seconds", title=f"CoDA cloud pipeline, day {day}")
    t.add_row("ingestion", f"{ingested} new records ({result.raw_rows} rows of history)", f"{result.seconds['load']:.2f}")
    t.add_row("samples", f"{result.samples} samples, {result.users} user vectors", f"{result.seconds['samples']:.2f}")
    t.add_row("matching", f"{result.matched_users} users matched, K={k}, mean top-10 cosine "
              f"{result.vector_top10_cosine:.3f}, recall@K {result.matching_recall:.3f} (200 sampled users)",
              f"{result.seconds['matching']:.2f}")
    t.add_row("mappings", f"{result.batches} batches, {result.stored_samples} samples stored, "
              f"{result.expired} expired", f"{result.seconds['mappings']:.2f}")
    Console().print(t)


def _rounded(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 4)  # NaN is not JSON: fewer than 2 users, no matching


@cloud.group("catalog", cls=WalleGroup)
def catalog_group():
    """The item catalog (ids, categories, item features) devices and the pipeline use."""


@catalog_group.command("load")
@click.argument("file", type=click.Path(dir_okay=False))
@data_dir_option
@json_option
@pass_ctx
def catalog_load(root: Ctx, file):
    """Load a catalog file (CSV or Parquet; layout in docs/data-layout.md) and publish it to devices
    as the resource coda/catalog. Category ids of an earlier catalog are kept."""
    from walle.platform.service import Platform

    from . import catalog
    from .cloud import CodaCloud
    coda = CodaCloud(Platform(root.data_dir))
    doc, ref = coda.load_catalog(catalog.read_file(file), actor=root.actor)
    out = {"resource": ref.name, "version": ref.version, "digest": ref.digest, "items": len(doc["items"]),
           "categories": len(doc["categories"]), "features": sorted(doc["features"])}
    if root.as_json:
        print_json(out)
    else:
        Console().print(f"catalog {ref.name}@{ref.version}: {out['items']} items, {out['categories']} categories, "
                        f"features {', '.join(out['features']) or 'none'}", highlight=False)


@cloud.group("dataset", cls=WalleGroup)
def dataset_group():
    """Public data sets the demo replays, and their conversion to the documented layout."""


@dataset_group.command("list")
@json_option
@pass_ctx
def dataset_list(root: Ctx):
    """The registered data sets, the package that ships each, and how to cite it."""
    from . import datasets
    rows = [{"name": s.name, "default": s.name == datasets.DEFAULT, "summary": s.summary, "install": s.install,
             "citation": s.citation, "licence": s.licence} for s in datasets.REGISTRY.values()]
    if root.as_json:
        print_json(rows)
        return
    t = Table("name", "data", "installed by", title="data sets (walle demo --dataset NAME)")
    for r in rows:
        t.add_row(r["name"] + (" (default)" if r["default"] else ""), r["summary"], r["install"])
    Console().print(t)


@dataset_group.command("export")
@click.argument("name")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--users", type=int, default=0, help="Only the first N users (0 = all).")
@click.option("--parquet", is_flag=True, help="Write Parquet instead of CSV.")
@json_option
@pass_ctx
def dataset_export(root: Ctx, name, folder, users, parquet):
    """Convert data set NAME to the documented layout in FOLDER: catalog (for `walle cloud catalog
    load`), behaviour log and user profiles. `walle demo --dataset FOLDER` replays the folder. The files
    are derived from licensed data: keep them out of version control."""
    from . import datasets
    ds = datasets.load(name).first_users(users)
    files = datasets.export(ds, folder, parquet=parquet)
    out = {"dataset": ds.name, "users": int(ds.inter["user_id"].nunique()), "behaviour_rows": len(ds.inter),
           "items": len(ds.items), "files": {k: str(v) for k, v in files.items()}}
    if root.as_json:
        print_json(out)
    else:
        Console().print(f"{ds.name}: {out['users']} users, {out['behaviour_rows']} behaviour rows, {out['items']} items "
                        f"-> {', '.join(out['files'].values())}", highlight=False)


@cloud.command("global-model")
@click.option("--day", type=int, required=True, help="Train on the samples of the days up to this one.")
@click.option("--days-back", type=int, default=7, show_default=True, help="How many days of samples to use.")
@data_dir_option
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default="coda/global_model", show_default=True, help="Resource name devices download.")
@json_option
@pass_ctx
def global_model(root: Ctx, day, days_back, epochs, seed, name):
    """Train the global DIN model on recent samples and publish it as a versioned resource. Items and
    their categories come from the loaded catalog (`walle cloud catalog load`), as in the pipeline."""
    from walle.protos import admin_pb2
    from walle.platform.errors import FailedPrecondition
    from walle.platform.service import Platform

    from . import samples as samplegen
    from .global_model import catalog_config, train_global
    platform = Platform(root.data_dir)
    from .cloud import CodaCloud
    coda = CodaCloud(platform)
    items = coda.items
    if items.empty:
        raise FailedPrecondition("no item catalog: load one first with `walle cloud catalog load FILE`")
    with console.status("generating samples"):
        raw = coda.raw.frame(day_range=(max(0, day - 365), day))
        pool = []
        for d in range(max(1, day - days_back + 1), day + 1):
            gen = samplegen.generate(raw[raw["day"] <= d], items, coda.users, key=coda.key, day=d)
            pool.extend(s for ss in gen.samples.values() for s in ss)
    if not pool:
        raise FailedPrecondition(f"no samples up to day {day}: upload logs or run `walle cloud pipeline` first")
    with console.status(f"training on {len(pool)} samples"):
        data, metrics = train_global(pool, epochs=epochs, seed=seed, catalog=catalog_config(items))
    params = platform.PublishResource(admin_pb2.PublishResourceRequest(
        name=name, data=data, metadata_json=json.dumps({"metrics": metrics, "day": day}), actor=root.actor))
    out = {"resource": params.name, "version": params.version, "digest": params.digest, "bytes": params.size,
           "metrics": metrics}
    if root.as_json:
        print_json(out)
    else:
        Console().print(f"published {params.name}@{params.version} ({params.size / 1024:.0f} KB, "
                        f"{metrics['n_train']} samples, train AUC {metrics['train_auc']:.3f})",
                        highlight=False)
