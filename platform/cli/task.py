"""`walle task ...`: submit and inspect task scripts (each version is a git commit)."""
from __future__ import annotations

import click
from rich.table import Table

from walle.protos import admin_pb2, bundle
from walle.protos.clikit import WalleGroup, json_option

from .context import Ctx, console, data_dir_option, emit, pass_ctx, split_ref, ts


@click.group("task", cls=WalleGroup)
def task_group():
    """Submit and inspect task scripts (each version is a git commit)."""


def _print_version(tv) -> None:
    verb = "submitted" if tv.created else "unchanged (identical to the latest version)"
    console.print(f"{tv.name}@{tv.version[:12]} {verb}  bundle {tv.bundle_digest[:19]}… ({tv.bundle_size} B)",
                  highlight=False)


@task_group.command("submit")
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-m", "--message", default="", help="Commit message.")
@data_dir_option
@json_option
@pass_ctx
def task_submit(obj: Ctx, task_dir, message):
    """Validate TASK_DIR and commit it as a new task version."""
    from ..manifest import validate_task_dir
    _manifest, files = validate_task_dir(task_dir)
    req = admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=message, author=obj.actor)
    emit(obj, obj.api().SubmitTask(req), _print_version)


@task_group.command("list")
@data_dir_option
@json_option
@pass_ctx
def task_list(obj: Ctx):
    """List tasks with their latest version."""
    def human(reply):
        t = Table("task", "latest", "submitted", "author", "message")
        for v in reply.tasks:
            t.add_row(v.name, v.version[:12], ts(v.created_at), v.author, v.message)
        console.print(t)
    emit(obj, obj.api().ListTasks(admin_pb2.Empty()), human)


@task_group.command("history")
@click.argument("name")
@data_dir_option
@json_option
@pass_ctx
def task_history(obj: Ctx, name):
    """Versions of a task, newest first."""
    def human(reply):
        t = Table("version", "submitted", "author", "message", "bundle")
        for v in reply.versions:
            t.add_row(v.version[:12], ts(v.created_at), v.author, v.message, v.bundle_digest[:19])
        console.print(t)
    emit(obj, obj.api().GetTaskHistory(admin_pb2.TaskRef(name=name)), human)


@task_group.command("diff")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
@data_dir_option
@json_option
@pass_ctx
def task_diff(obj: Ctx, name, v1, v2):
    """Unified diff of a task between two versions."""
    emit(obj, obj.api().DiffTask(admin_pb2.DiffRequest(name=name, v1=v1, v2=v2)),
         lambda r: click.echo(r.unified_diff or "(no differences)"))


@task_group.command("show")
@click.argument("ref", metavar="NAME[@VERSION]")
@data_dir_option
@json_option
@pass_ctx
def task_show(obj: Ctx, ref):
    """Show a task version: manifest and files."""
    name, version = split_ref(ref)

    def human(reply):
        v = reply.version
        console.print(f"[bold]{v.name}@{v.version}[/bold]  {ts(v.created_at)}  {v.author}: {v.message}", highlight=False)
        console.print(f"bundle {v.bundle_digest} ({v.bundle_size} B)", highlight=False)
        _print_libraries(v.manifest.libraries, reply)
        for p in v.manifest.config:  # what `release create --set KEY=VALUE` accepts
            bounds = f" in [{p.min_json or '-inf'}, {p.max_json or '+inf'}]" if p.min_json or p.max_json else ""
            choices = f" one of {', '.join(p.choices_json)}" if p.choices_json else ""
            click.echo(f"config {p.name}: {p.type} = {p.default_json}{bounds}{choices}  {p.help}".rstrip())
        for path in sorted(reply.files):
            console.rule(path)
            click.echo(reply.files[path])
    emit(obj, obj.api().ShowTask(admin_pb2.TaskRef(name=name, version=version)), human)


def _print_libraries(declared, reply) -> None:
    """The bundled library files (copied from tasks/_lib/ at submit) with their sha256."""
    from ..manifest import LIB_DIR
    lib_files = sorted(p for p in reply.files if p.startswith(LIB_DIR + "/"))
    if not declared and not lib_files:
        return
    click.echo(f"libraries: {', '.join(declared)}")
    for path in lib_files:
        click.echo(f"  {reply.digests.get(path, '?')}  {path}")


def register(main: click.Group) -> None:
    main.add_command(task_group)
