"""`walle task ...`: submit and inspect task scripts (each version is a git commit)."""
from __future__ import annotations

import click

from walle.protos import admin_pb2, bundle
from walle.protos.clikit import WalleGroup, json_option
from walle.protos.errors import InvalidArgument

from .context import Ctx, CutTable, console, data_dir_option, emit, pass_ctx, split_ref, ts


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
        t = CutTable("task", "latest", "submitted", "author", "message", long=("message",))
        for v in reply.tasks:
            t.add_row(v.name, v.version[:12], ts(v.created_at), v.author, v.message)
        t.show()
    emit(obj, obj.api().ListTasks(admin_pb2.Empty()), human)


@task_group.command("history")
@click.argument("name")
@data_dir_option
@json_option
@pass_ctx
def task_history(obj: Ctx, name):
    """Versions of a task, newest first."""
    def human(reply):
        t = CutTable("version", "submitted", "author", "message", "bundle", long=("message",))
        for v in reply.versions:
            t.add_row(v.version[:12], ts(v.created_at), v.author, v.message, v.bundle_digest[7:19])
        t.show()
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


@task_group.command("new")
@click.argument("name")
@click.option("--dir", "parent", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Create the task folder inside this folder.")
@json_option
@pass_ctx
def task_new(obj: Ctx, name, parent):
    """Create a new task folder NAME from a template that passes `walle task submit` (event and
    schedule triggers, storage, a log line), with a storage.json to seed `walle task run`."""
    from ..scaffold import new_task
    path = new_task(name, parent)
    emit(obj, {"task": name, "folder": str(path), "files": sorted(p.name for p in path.iterdir())},
         lambda d: console.print(f"created {d['folder']}/ ({', '.join(d['files'])})\n"
                                 f"  try it:  walle task run {d['folder']} --event app_open='{{\"screen\": \"home\"}}'\n"
                                 f"  then:    walle task submit {d['folder']} -m \"first version\"", highlight=False))


@task_group.command("run")
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--event", "event_spec", required=True, metavar="NAME[=JSON]",
              help="What triggers the run: an app event NAME with a JSON payload, or 'schedule' / 'table_rows'.")
@click.option("--storage-from", type=click.Path(exists=True, dir_okay=False),
              help='Seed the task\'s storage: JSON {"kv": {key: value}, "tables": {table: [rows]}}.')
@click.option("--storage", "storage_path", type=click.Path(dir_okay=False),
              help="Keep storage in this SQLite file across runs (default: a temporary one).")
@click.option("--allow-unconfined", is_flag=True, help="Run even where neither seccomp nor Landlock works.")
@json_option
@pass_ctx
def task_run(obj: Ctx, task_dir, event_spec, storage_from, storage_path, allow_unconfined):
    """Run TASK_DIR once, locally, in the real device sandbox, before any submit: prints its logs,
    result, run report and resource use. Exits 0 when the run ends ok, 1 when it does not."""
    import json

    from walle.device_host.localrun import run_task_dir
    name, _, raw = event_spec.partition("=")
    try:
        payload = json.loads(raw) if raw else None
    except ValueError as e:
        raise InvalidArgument(f"--event {event_spec!r}: payload is not JSON: {e}") from None
    run = run_task_dir(task_dir, name, payload, storage_path=storage_path, storage_from=storage_from,
                       allow_unconfined=allow_unconfined)

    def human(r):
        for w in r.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        console.print(f"[bold]event[/bold] ({r.trigger}): {json.dumps(r.event)}", highlight=False)
        console.print("[bold]logs[/bold]" + ("" if r.logs else ": none"))
        for line in r.logs:
            click.echo(f"  | {line}")
        if r.status == "ok":
            console.print(f"[bold]result[/bold]: {json.dumps(r.value)}", highlight=False)
        else:
            console.print(f"[bold red]{r.status}[/bold red]:", highlight=False)
            click.echo("\n".join("  ! " + line for line in r.error.splitlines()))
        console.print(f"[bold]run report[/bold]: status {r.status}, {r.duration_s:.3f} s, peak memory "
                      f"{r.peak_memory_kb} KB; {len(r.events)} events emitted, {r.uploads} tunnel records queued",
                      highlight=False)
        console.print(f"[bold]storage[/bold]: keys {', '.join(r.storage_keys) or 'none'}; tables "
                      f"{', '.join(f'{t} ({n} rows)' for t, n in r.storage_tables.items()) or 'none'}", highlight=False)
    emit(obj, run.to_dict(), lambda _d: human(run))
    if run.status != "ok":
        raise click.exceptions.Exit(1)


def register(main: click.Group) -> None:
    main.add_command(task_group)
