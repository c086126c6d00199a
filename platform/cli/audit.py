"""`walle audit`: who did what, when."""
from __future__ import annotations

import click
from rich.table import Table

from walle.protos import admin_pb2
from walle.protos.clikit import WalleCommand, json_option

from .context import Ctx, console, data_dir_option, emit, pass_ctx, ts


@click.command("audit", cls=WalleCommand)
@click.option("--limit", default=50, show_default=True, type=int)
@data_dir_option
@json_option
@pass_ctx
def audit(obj: Ctx, limit):
    """The audit trail: who did what, when."""
    def human(reply):
        t = Table("when", "who", "action", "target", "detail")
        for e in reply.entries:
            t.add_row(ts(e.ts), e.actor, e.action, e.target, e.detail)
        console.print(t)
    emit(obj, obj.api().GetAudit(admin_pb2.AuditRequest(limit=limit)), human)


def register(main: click.Group) -> None:
    main.add_command(audit)
