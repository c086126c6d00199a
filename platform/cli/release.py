"""`walle release ...`: release task versions by hit rules; roll out, pause, roll back, revoke."""
from __future__ import annotations

import json

import click
from rich.table import Table

from walle.protos import admin_pb2
from walle.protos.clikit import WalleGroup, json_option

from .context import Ctx, console, data_dir_option, emit, pass_ctx, split_ref


@click.group("release", cls=WalleGroup)
def release_group():
    """Release task versions to devices by hit rules; roll out, pause, roll back, revoke."""


def _release_table(releases) -> None:
    t = Table("id", "task@version", "channel", "stage", "state", "rule", "deliv/ran/fail", "p50")
    for r in releases:
        s = r.stats
        t.add_row(r.id, f"{r.task}@{r.version[:8]}", r.channel, f"{r.stage} {r.rollout:g}%", r.state,
                  r.rule or "(all)", f"{s.delivered}/{s.ran}/{s.failed}", f"{s.p50_duration_s:.2f}s")
    console.print(t)


def _print_release(r) -> None:
    _release_table([r])
    if r.note:
        console.print(f"note: {r.note}", highlight=False)
    if r.allow:
        console.print(f"allow: {', '.join(r.allow)}", highlight=False)
    if r.deny:
        console.print(f"deny: {', '.join(r.deny)}", highlight=False)
    if r.config_json:
        click.echo("config: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in json.loads(r.config_json).items()))


def _ids(values) -> list[str]:
    return [i for v in values for i in v.split(",") if i.strip()]


@release_group.command("create")
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--rule", default="", help='Hit rule, e.g. \'os == "android" and app_version >= "2.3"\' (default: every device).')
@click.option("--rollout", type=float, default=None, help="Percent of the audience (sticky per user/device).")
@click.option("--stage", type=click.Choice(["beta", "gray", "full"]), default=None, help="beta: allow-list only; gray: a percentage; full: everyone matching.")
@click.option("--channel", default="", help="Release channel (default: stable).")
@click.option("--allow", multiple=True, help="User/device ids that always receive it (comma-separated, repeatable).")
@click.option("--deny", multiple=True, help="User/device ids that never receive it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Task config for this release (repeatable), checked against task.toml's [config]; "
                   "unset keys keep their defaults.")
@data_dir_option
@json_option
@pass_ctx
def release_create(obj: Ctx, ref, rule, rollout, stage, channel, allow, deny, sets):
    """Release NAME@VERSION (a commit id or unique prefix; NAME alone = latest)."""
    from ..taskconfig import parse_sets
    name, version = split_ref(ref)
    req = admin_pb2.CreateReleaseRequest(task=name, version=version, rule=rule, rollout=rollout or 0.0,
                                         has_rollout=rollout is not None, stage=stage or "", channel=channel,
                                         allow=_ids(allow), deny=_ids(deny), actor=obj.actor, config=parse_sets(sets))
    emit(obj, obj.api().CreateRelease(req), _print_release)


@release_group.command("list")
@click.option("--task", default="", help="Only this task.")
@click.option("--channel", default="", help="Only this channel.")
@click.option("--active", is_flag=True, help="Only releases devices may get: active, fallback or paused.")
@data_dir_option
@json_option
@pass_ctx
def release_list(obj: Ctx, task, channel, active):
    """Release history, newest first, with delivery and run figures."""
    emit(obj, obj.api().ListReleases(admin_pb2.ReleaseFilter(task=task, channel=channel, active_only=active)),
         lambda r: _release_table(r.releases))


@release_group.command("show")
@click.argument("release_id")
@data_dir_option
@json_option
@pass_ctx
def release_show(obj: Ctx, release_id):
    """One release with its health figures from device reports."""
    def human(r):
        _print_release(r)
        s = r.stats
        console.print(f"delivered {s.delivered}  ran {s.ran}  runs {s.runs}  failed {s.failed}  "
                      f"p50 {s.p50_duration_s:.3f}s  rejected {s.rejected}  rolled back {s.rolled_back}", highlight=False)
    emit(obj, obj.api().GetRelease(admin_pb2.ReleaseRef(id=release_id)), human)


@release_group.command("set-rollout")
@click.argument("release_id")
@click.argument("percent", type=float)
@click.option("--stage", type=click.Choice(["beta", "gray", "full"]), default=None, help="Move to a later stage.")
@data_dir_option
@json_option
@pass_ctx
def release_set_rollout(obj: Ctx, release_id, percent, stage):
    """Grow a release's rollout (it may only grow; devices already in stay in)."""
    req = admin_pb2.SetRolloutRequest(id=release_id, rollout=percent, stage=stage or "", actor=obj.actor)
    emit(obj, obj.api().SetRollout(req), _print_release)


def _state_command(cmd_name: str, method: str, doc: str):
    @release_group.command(cmd_name, help=doc)
    @click.argument("release_id")
    @data_dir_option
    @json_option
    @pass_ctx
    def cmd(obj: Ctx, release_id):
        emit(obj, getattr(obj.api(), method)(admin_pb2.ReleaseRef(id=release_id, actor=obj.actor)), _print_release)
    return cmd


_state_command("pause", "PauseRelease", "Pause a release: its devices fall back to the release before it.")
_state_command("resume", "ResumeRelease", "Resume a paused release.")
_state_command("revoke", "RevokeRelease", "Revoke a release for good: it is never delivered again.")


@release_group.command("rollback")
@click.argument("name")
@click.option("--to", "to_version", default="", help="Version to roll back to (default: the previous released version).")
@click.option("--channel", default="", help="Channel (default: stable).")
@data_dir_option
@json_option
@pass_ctx
def release_rollback(obj: Ctx, name, to_version, channel):
    """Roll a task back: a new release of an earlier version to the same audience (history is kept)."""
    req = admin_pb2.RollbackRequest(task=name, to_version=to_version, channel=channel, actor=obj.actor)
    emit(obj, obj.api().Rollback(req), _print_release)


def register(main: click.Group) -> None:
    main.add_command(release_group)
