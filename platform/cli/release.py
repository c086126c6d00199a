"""`walle release ...`: release task versions by hit rules; roll out, pause, roll back, revoke."""
from __future__ import annotations

import json

import click

from walle.protos import admin_pb2
from walle.protos.clikit import WalleGroup, json_option, to_jsonable
from walle.protos.errors import InvalidArgument, NotFound

from .context import Ctx, CutTable, console, data_dir_option, emit, pass_ctx, split_ref, ts


@click.group("release", cls=WalleGroup)
def release_group():
    """Release task versions to devices by hit rules; roll out, pause, roll back, revoke."""


def _release_table(releases) -> None:
    t = CutTable("id", "task@version", "state", "stage", "rule", "deliv/ran/fail", "p50", long=("rule",))
    for r in releases:
        s = r.stats
        channel = "" if r.channel in ("", "stable") else f" [{r.channel}]"
        t.add_row(r.id, f"{r.task}@{r.version[:8]}{channel}", r.state, f"{r.stage} {r.rollout:g}%",
                  r.rule or "(all)", f"{s.delivered}/{s.ran}/{s.failed}", f"{s.p50_duration_s:.2f}s")
    t.show()


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


def _percent(text: str | None) -> float:
    """"5%" or "5" (percent) -> 0.05."""
    if text is None:
        return 0.0
    raw = text.strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise InvalidArgument(f"--max-failure-rate {text!r} is not a percentage like 5%") from None
    if not 0 <= value <= 100:
        raise InvalidArgument(f"--max-failure-rate {text!r} must be between 0% and 100%")
    return value / 100


def guard_options(f):
    for opt in reversed((
        click.option("--max-failure-rate", default=None, metavar="PERCENT",
                     help="Guard: trip when more than this share of runs fail, e.g. 5%."),
        click.option("--min-runs", default=None, type=click.IntRange(1, None),
                     help="Guard: runs needed before it judges (default 50)."),
        click.option("--max-p99-seconds", default=None, type=click.FloatRange(0, None, min_open=True),
                     help="Guard: trip when the p99 run duration exceeds this."),
        click.option("--on-trip", type=click.Choice(["pause", "rollback"]), default=None,
                     help="What a tripped guard does (default: pause)."),
    )):
        f = opt(f)
    return f


def _guard_request(max_failure_rate, min_runs, max_p99_seconds, on_trip):
    if max_failure_rate is None and max_p99_seconds is None:
        if min_runs is not None or on_trip is not None:
            raise InvalidArgument("--min-runs and --on-trip need --max-failure-rate or --max-p99-seconds")
        return None
    return admin_pb2.ReleaseGuard(max_failure_rate=_percent(max_failure_rate), min_runs=min_runs or 50,
                                  max_p99_seconds=max_p99_seconds or 0.0, on_trip=on_trip or "pause")


def _guard_text(g) -> str:
    limits = []
    if g.max_failure_rate:
        limits.append(f"failure rate <= {g.max_failure_rate:.1%}")
    if g.max_p99_seconds:
        limits.append(f"p99 <= {g.max_p99_seconds:g}s")
    text = f"{' and '.join(limits)} once {g.min_runs} runs, else {g.on_trip}: {g.status}"
    if g.status == "tripped":
        detail = json.loads(g.trip_detail or "{}")
        text += f" at {ts(g.tripped_at)}: {detail.get('reason', '')}"
        text += f" -> rolled back as {g.action_release_id}" if g.action_release_id else " -> paused"
        if detail.get("action_error"):
            text += f" ({detail['action_error']})"
    return text


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
@guard_options
@data_dir_option
@json_option
@pass_ctx
def release_create(obj: Ctx, ref, rule, rollout, stage, channel, allow, deny, sets, **guard):
    """Release NAME@VERSION (a commit id or unique prefix; NAME alone = latest).

    With --max-failure-rate and/or --max-p99-seconds the release is guarded: once it has --min-runs
    runs, the platform pauses it (or rolls it back, --on-trip rollback) when a guard trips."""
    from ..taskconfig import parse_sets
    name, version = split_ref(ref)
    guard_req = _guard_request(**guard)  # bad guard options fail before anything is released
    req = admin_pb2.CreateReleaseRequest(task=name, version=version, rule=rule, rollout=rollout or 0.0,
                                         has_rollout=rollout is not None, stage=stage or "", channel=channel,
                                         allow=_ids(allow), deny=_ids(deny), actor=obj.actor, config=parse_sets(sets))
    rel = obj.api().CreateRelease(req)
    if guard_req is None:
        emit(obj, rel, _print_release)
        return
    guard_req.release_id, guard_req.actor = rel.id, obj.actor
    g = obj.api().SetReleaseGuard(guard_req)

    def human(_):
        _print_release(rel)
        console.print(f"guard: {_guard_text(g)}", highlight=False)
    emit(obj, {"release": to_jsonable(rel), "guard": to_jsonable(g)}, human)


@release_group.command("guard")
@click.argument("release_id")
@guard_options
@data_dir_option
@json_option
@pass_ctx
def release_guard(obj: Ctx, release_id, **guard):
    """Guard an existing release (replaces its guard; a tripped guard watches again)."""
    req = _guard_request(**guard)
    if req is None:
        raise InvalidArgument("give --max-failure-rate and/or --max-p99-seconds")
    req.release_id, req.actor = release_id, obj.actor
    emit(obj, obj.api().SetReleaseGuard(req), lambda g: console.print(f"{release_id} guard: {_guard_text(g)}",
                                                                      highlight=False))


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
    """One release: targeted / delivered / ran / failed / rejected devices, the top errors, its guard
    and its change log (see `walle logs --release ID` for the runs themselves)."""
    api = obj.api()
    health = api.GetReleaseHealth(admin_pb2.ReleaseRef(id=release_id))
    try:
        guard = api.GetReleaseGuard(admin_pb2.ReleaseRef(id=release_id))
    except NotFound:
        guard = None

    def human(_):
        r, s = health.release, health.release.stats
        _print_release(r)
        console.print(f"devices: targeted {health.targeted}  delivered {s.delivered}  ran {s.ran}  "
                      f"failed {health.failed_devices}  rejected {s.rejected}  rolled back {s.rolled_back}",
                      highlight=False)
        console.print(f"runs: {s.runs}  failed {s.failed}  p50 {s.p50_duration_s:.3f}s  "
                      f"p99 {health.p99_duration_s:.3f}s", highlight=False)
        if guard is not None:
            console.print(f"guard: {_guard_text(guard)}", highlight=False)
        if health.top_errors:
            t = CutTable("runs", "devices", "error", "e.g. device", long=("error",), title="top errors")
            for e in health.top_errors:
                t.add_row(e.runs, e.devices, e.error, e.example_device)
            t.show()
            console.print(f"first error in full ({health.top_errors[0].example_device}):", highlight=False)
            click.echo("\n".join("  " + line for line in health.top_errors[0].example.splitlines()))
        for line in health.changes:
            console.print(f"  {line}", highlight=False)
    emit(obj, {"health": to_jsonable(health), "guard": to_jsonable(guard) if guard is not None else None}, human)


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
