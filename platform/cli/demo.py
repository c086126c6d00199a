"""`walle demo`: the end-to-end demo on embedded defaults."""
from __future__ import annotations

import click

from walle.protos.clikit import WalleCommand

from .context import Ctx, pass_ctx


@click.command("demo", cls=WalleCommand)
@click.option("--data-dir", "demo_dir", type=click.Path(file_okay=False), help="Keep part 1's platform data here (default: a temporary folder).")
@click.option("--users", default=0, show_default=True, type=int, help="MovieLens users to emulate (0 = all 943).")
@click.option("--days", default=3, show_default=True, type=int, help="Simulated days (day 1 trains the global model).")
@click.option("--seeds", default=1, show_default=True, type=int, help="Repeat the experiment with this many seeds.")
@click.option("--out", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="Where results.json and results.png go.")
@click.option("--workers", default=4, show_default=True, type=int, help="Device threads in the emulated fleet.")
@click.option("--skip-coda", is_flag=True, help="Only part 1 (release rules), no CoDA experiment.")
@click.option("--k", type=int, help="Cloud: users matched to each user (KNN's K; default 100).")
@click.option("--t", "t", type=int, help="Local samples of the last t days validate (default 1, time compressed).")
@click.option("--t-prime", "t_prime", type=int, help="Local samples of (t, t'] days train (default 3).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Task config of the CoDA releases (repeatable), as `walle release create --set`.")
@pass_ctx
def demo(obj: Ctx, demo_dir, users, days, seeds, out_dir, workers, skip_coda, k, t, t_prime, sets):
    """The end-to-end demo on embedded defaults: releases, then the CoDA work cycle on MovieLens-100k."""
    from ..demo import run_demo
    from ..taskconfig import parse_sets
    if days < 2:
        raise click.BadParameter("needs at least 2 days (day 1 trains the global model)", param_hint="--days")
    options = {key: v for key, v in (("k", k), ("t", t), ("t_prime", t_prime)) if v is not None}
    run_demo(obj, demo_dir, users=users, days=days, seeds=seeds, out_dir=out_dir, workers=workers,
             coda=not skip_coda, options=dict(options, task_config=parse_sets(sets)))


def register(main: click.Group) -> None:
    main.add_command(demo)
