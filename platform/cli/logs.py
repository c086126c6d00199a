"""`walle logs`: what tasks did on devices: run reports with their log lines and errors (the task's
own traceback), filtered by release, task, device, status and time; `-f` follows new ones."""
from __future__ import annotations

import json
import time

import click

from walle.protos import admin_pb2
from walle.protos.clikit import WalleCommand, json_option, to_jsonable, want_json

from .context import Ctx, data_dir_option, parse_since, pass_ctx, ts


def format_entry(e) -> str:
    """One run: a header line, then its error (with traceback) and log lines, indented."""
    colour = "green" if e.status == "ok" else "red"
    head = (f"{ts(e.ts)}  {e.device_id}  {e.task}@{e.version[:8]}  {e.release_id or '-'}  "
            f"{click.style(e.status, fg=colour)}  {e.duration_s:.3f}s  {e.peak_memory_kb} KB  ({e.trigger})")
    body = [f"  | {line}" for line in e.lines]
    body += [f"  ! {line}" for line in e.error.rstrip().splitlines()]
    return "\n".join([head, *body])


@click.command("logs", cls=WalleCommand)
@click.option("--release", "release_id", default="", help="Only runs of this release.")
@click.option("--task", default="", help="Only runs of this task.")
@click.option("--device", "device_id", default="", help="Only runs on this device.")
@click.option("--status", default="", help="Only runs with this status (ok, error, timeout, ...; failed = not ok).")
@click.option("--since", default="", help="Only runs since: an age (10m, 2h, 7d), a date, or unix seconds.")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 5000), help="How many (newest).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new runs as devices report them (Ctrl-C stops).")
@click.option("--interval", default=1.0, show_default=True, type=float, help="With -f: seconds between polls.")
@data_dir_option
@json_option
@pass_ctx
def logs(obj: Ctx, release_id, task, device_id, status, since, limit, follow, interval):
    """Task runs on devices with their log lines and errors, oldest first (JSON: one object per line)."""
    req = admin_pb2.LogRequest(release_id=release_id, task=task, device_id=device_id, status=status,
                               since=parse_since(since), limit=limit)
    api = obj.api()

    def show(reply) -> None:
        for e in reversed(reply.entries):  # the reply is newest first; a log reads oldest first
            if want_json():
                click.echo(json.dumps(to_jsonable(e), sort_keys=True))
            else:
                click.echo(format_entry(e))

    reply = api.GetLogs(req)
    show(reply)
    if not follow:
        if not reply.entries and not want_json():
            click.echo("no runs reported" + (" for these filters" if any((release_id, task, device_id, status, since))
                                             else ""), err=True)
        return
    req.limit, req.since = 5000, 0
    try:
        while True:
            req.after = reply.cursor
            time.sleep(interval)
            reply = api.GetLogs(req)
            show(reply)
    except KeyboardInterrupt:
        pass


def register(main: click.Group) -> None:
    main.add_command(logs)

