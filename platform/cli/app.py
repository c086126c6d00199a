"""The `walle` root: global options, and the command groups, one module each.

Operator commands work on a local data folder (`--data-dir`) or talk to a running platform
(`--platform HOST:PORT`). Exit codes: 0 ok, 1 internal error, 2 invalid input, 3 not found,
4 already exists, 5 refused in the current state, 6 not authenticated/allowed, 7 quota, 8 unreachable."""
from __future__ import annotations

import logging

import click

from walle.protos.clikit import WalleGroup, json_option

from . import audit, demo, device, logs, operator, platform_cmd, release, task
from .context import DEFAULT_DATA_DIR, WIDE_KEY, Ctx


@click.group(cls=WalleGroup, lazy={"cloud": "walle.platform.coda.cli:cloud"},
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--platform", "platform_addr", envvar="WALLE_PLATFORM", metavar="HOST:PORT",
              help="Talk to a running platform server (default: work on --data-dir directly).")
@click.option("--data-dir", envvar="WALLE_DATA_DIR", type=click.Path(file_okay=False),
              help=f"Platform data folder for local use (default: ./{DEFAULT_DATA_DIR} if it exists; `platform init` makes it).")
@json_option
@click.option("--actor", envvar="WALLE_ACTOR", help="Who is acting, for the audit trail (default: login name).")
@click.option("--ca", envvar="WALLE_CA", type=click.Path(dir_okay=False),
              help="The platform's CA certificate for TLS (default: <data-dir>/pki/ca.pem).")
@click.option("--insecure", is_flag=True, help="Plaintext gRPC without server authentication (debugging only).")
@click.option("--wide", is_flag=True, envvar="WALLE_WIDE", help="Show long table cells whole (folded) instead of cut.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="walle")
@click.pass_context
def main(ctx, platform_addr, data_dir, actor, ca, insecure, wide, verbose):
    """walle: device-cloud collaborative machine learning.

    Remote commands authenticate with an operator token: WALLE_OPERATOR_TOKEN or operator_token
    in the config file."""
    logging.basicConfig(level=logging.WARNING - 10 * verbose,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.meta[WIDE_KEY] = wide
    ctx.obj = Ctx(platform_addr, data_dir, actor, ca, insecure)


for module in (platform_cmd, operator, task, release, device, logs, audit, demo):
    module.register(main)


if __name__ == "__main__":
    main()
