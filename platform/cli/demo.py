"""`walle demo`: the end-to-end demo on embedded defaults."""
from __future__ import annotations

import os

import click

from walle.protos.clikit import WalleCommand

from .context import Ctx, pass_ctx


@click.command("demo", cls=WalleCommand)
@click.option("--data-dir", "demo_dir", type=click.Path(file_okay=False), help="Keep part 1's platform data here (default: a temporary folder).")
@click.option("--dataset", default="movielens-100k", show_default=True, metavar="NAME",
              help="The data set the users replay: movielens-100k (943 users), movielens-1m (6,040 users) or a "
                   "folder with catalog and behaviour files (docs/data-layout.md).")
@click.option("--users", default=0, show_default=True, type=int, help="Users to emulate, the first N by id (0 = all).")
@click.option("--days", default=3, show_default=True, type=int, help="Simulated days (day 1 trains the global model).")
@click.option("--seeds", default=1, show_default=True, type=int, help="Repeat the experiment with this many seeds.")
@click.option("--out", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="Where results.json and results.png go.")
@click.option("--workers", default=4, show_default=True, type=int, help="Device threads in the emulated fleet.")
@click.option("--k", default=100, show_default=True, type=click.IntRange(1), help="Neighbours per user in the cloud's matching (Algorithm 1).")
@click.option("--global-epochs", default=2, show_default=True, type=click.IntRange(1, 100), help="Epochs of the daily global model retraining.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Release config of the CoDA tasks, as `walle release create --set` (repeatable; e.g. sigma=0.5).")
@click.option("--work-dir", type=click.Path(file_okay=False, exists=True), help="Where the emulated platform and devices keep their data (default: /dev/shm when it has 4 GB free, else the temp folder).")
@click.option("--skip-coda", is_flag=True, help="Only part 1 (release rules), no CoDA experiment.")
@click.option("--t", "t", type=int, help="Local samples of the last t days validate (default 1, time compressed).")
@click.option("--t-prime", "t_prime", type=int, help="Local samples of (t, t'] days train (default 3).")
@pass_ctx
def demo(obj: Ctx, demo_dir, dataset, users, days, seeds, out_dir, workers, k, global_epochs, overrides, work_dir,
         skip_coda, t, t_prime):
    """The end-to-end demo on embedded defaults: releases, then the CoDA work cycle on MovieLens-100k
    (or another --dataset)."""
    from ..coda import datasets
    from ..demo import run_demo
    from ..taskconfig import parse_sets
    if dataset not in datasets.REGISTRY and not os.path.isdir(dataset):
        raise click.BadParameter(f"unknown data set {dataset!r}; known: {', '.join(datasets.names())}, or a folder "
                                 "in the documented layout (docs/data-layout.md)", param_hint="--dataset")
    if days < 2:
        raise click.BadParameter("needs at least 2 days (day 1 trains the global model)", param_hint="--days")
    options = {key: v for key, v in (("t", t), ("t_prime", t_prime)) if v is not None}
    run_demo(obj, demo_dir, dataset=dataset, users=users, days=days, seeds=seeds, out_dir=out_dir, workers=workers,
             coda=not skip_coda, coda_options=dict(options, k=k, global_epochs=global_epochs,
                                                   task_config=parse_sets(overrides), work_dir=work_dir or ""))


def register(main: click.Group) -> None:
    main.add_command(demo)
