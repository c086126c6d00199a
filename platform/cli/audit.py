"""`walle audit`: who did what, when."""
from __future__ import annotations

import click

from walle.protos import admin_pb2
from walle.protos.clikit import WalleCommand, json_option

from .context import Ctx, CutTable, data_dir_option, emit, parse_since, pass_ctx, ts


@click.command("audit", cls=WalleCommand)
@click.option("--action", default="", help="Only this action (release.rollback), or a family ending in '.' (release.).")
@click.option("--exclude", "exclude", multiple=True,
              help="Leave out this action or family (repeatable), e.g. --exclude device. after a fleet run.")
@click.option("--actor", "who", default="", help="Only what this operator (or 'guard', 'fleet') did.")
@click.option("--target", default="", help="Only actions on this release, task, device or operator.")
@click.option("--since", default="", help="Only since: an age (10m, 2h, 7d), a date, or unix seconds.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 5000))
@data_dir_option
@json_option
@pass_ctx
def audit(obj: Ctx, action, exclude, who, target, since, limit):
    """The audit trail: who did what, when (newest first)."""
    def human(reply):
        t = CutTable("when", "who", "action", "target", "detail", long=("target", "detail"))
        for e in reply.entries:
            t.add_row(ts(e.ts), e.actor, e.action, e.target, e.detail)
        t.show()
    req = admin_pb2.AuditRequest(limit=limit, action=action, actor=who, target=target, since=parse_since(since),
                                 exclude_action=list(exclude))
    emit(obj, obj.api().GetAudit(req), human)


def register(main: click.Group) -> None:
    main.add_command(audit)
