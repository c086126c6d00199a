"""`walle operator ...`: operator credentials (on the local data folder)."""
from __future__ import annotations

import click

from walle.protos.clikit import WalleGroup, json_option

from walle.protos import admin_pb2

from .context import Ctx, CutTable, console, data_dir_option, emit, pass_ctx, ts


@click.group("operator", cls=WalleGroup)
def operator_group():
    """Operator credentials for the admin API and dashboard (works on the local data folder)."""


@operator_group.command("create")
@click.argument("name")
@data_dir_option
@json_option
@pass_ctx
def operator_create(obj: Ctx, name):
    """Create (or re-issue) an operator token; shown once."""
    token = obj.platform().operators.create(name, actor=obj.actor)
    emit(obj, {"operator": name, "token": token},
         lambda d: console.print(f"operator {name} token: {token}", highlight=False))


@operator_group.command("revoke")
@click.argument("name")
@data_dir_option
@json_option
@pass_ctx
def operator_revoke(obj: Ctx, name):
    """Revoke an operator token."""
    obj.platform().operators.revoke(name, actor=obj.actor)
    emit(obj, {"operator": name, "revoked": True},
         lambda d: console.print(f"operator {name} revoked", highlight=False))


@operator_group.command("list")
@data_dir_option
@json_option
@pass_ctx
def operator_list(obj: Ctx):
    """Operators and whether their token is revoked (tokens themselves are stored only hashed)."""
    def human(reply):
        t = CutTable("operator", "created", "revoked")
        for o in reply.operators:
            t.add_row(o.name, ts(o.created_at), "yes" if o.revoked else "")
        t.show()
    emit(obj, obj.api().ListOperators(admin_pb2.Empty()), human)


def register(main: click.Group) -> None:
    main.add_command(operator_group)
