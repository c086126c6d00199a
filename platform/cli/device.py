"""`walle device ...` and `walle fleet ...`: enroll devices, preview what they receive; the device
host's own commands (`device run`, `fleet run`) live in walle.device_host.cli and load on demand."""
from __future__ import annotations

import json
import pathlib

import click

from walle.protos import admin_pb2
from walle.protos.clikit import WalleGroup, json_option
from walle.protos.errors import AlreadyExists

from .context import Ctx, CutTable, console, data_dir_option, emit, parse_attrs, pass_ctx, ts


@click.group("device", cls=WalleGroup, lazy={"run": "walle.device_host.cli:device_run",
                                             "emit": "walle.device_host.cli:device_emit",
                                             "ask": "walle.device_host.cli:device_ask"})
def device_group():
    """Enroll devices, preview what they receive, run a device host."""


@device_group.command("enroll")
@click.option("--device-id", default="", help="Device id (default: generated).")
@click.option("--ttl", "ttl", default=0, type=int, help="Credential lifetime in seconds (0 = no expiry).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Credential file to write, mode 0600 (default: ./DEVICE_ID.credentials.json).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--user-id", default="", help="Bind the device to this user: rules, allow-lists, uploads and samples "
                                            "use it, never the user_id the device reports.")
@data_dir_option
@json_option
@pass_ctx
def device_enroll(obj: Ctx, device_id, ttl, out, force, user_id):
    """Register a device and write its credential to a file (mode 0600) for `walle device run --token-file`.

    The token is never printed: the platform keeps only its hash, the file is the only copy."""
    from walle.device_host.identity import Credentials
    if out and pathlib.Path(out).exists() and not force:
        raise AlreadyExists(f"{out} exists; pass --force to overwrite it or choose another --out")
    reply = obj.api().EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, ttl_seconds=ttl, actor=obj.actor,
                                                           user_id=user_id))
    path = pathlib.Path(out or f"{reply.device_id}.credentials.json")
    Credentials(reply.device_id, reply.token, obj.platform_addr or "", reply.platform_ca_pem,
                reply.bundle_public_key.hex(), user_id=reply.user_id).save(path)
    emit(obj, {"device_id": reply.device_id, "user_id": reply.user_id, "credentials_file": str(path),
               "ttl_seconds": ttl},
         lambda d: console.print(f"device {d['device_id']} enrolled{' for user ' + d['user_id'] if d['user_id'] else ''}; "
                                 f"credential written to {d['credentials_file']} (mode 0600; the only copy of its "
                                 "token)", highlight=False))


@device_group.command("revoke")
@click.argument("device_id")
@data_dir_option
@json_option
@pass_ctx
def device_revoke(obj: Ctx, device_id):
    """Revoke a device's credential: its calls get UNAUTHENTICATED from now on."""
    emit(obj, obj.api().RevokeDevice(admin_pb2.DeviceRef(device_id=device_id, actor=obj.actor)),
         lambda d: console.print(f"device {d.device_id} revoked", highlight=False))


@device_group.command("list")
@data_dir_option
@json_option
@pass_ctx
def device_list(obj: Ctx):
    """Enrolled devices and when they were last seen."""
    def human(reply):
        t = CutTable("device", "enrolled", "last seen", "app", "revoked", long=("device",))
        for d in reply.devices:
            t.add_row(d.device_id, ts(d.enrolled_at), ts(d.last_seen), d.app_version or "-", "yes" if d.revoked else "")
        t.show()
    emit(obj, obj.api().ListDevices(admin_pb2.Empty()), human)


@device_group.command("show")
@click.argument("device_id")
@data_dir_option
@json_option
@pass_ctx
def device_show(obj: Ctx, device_id):
    """One device: bound user, attributes as last reported, installed versions, last runs and errors."""
    from .logs import format_entry

    def human(r):
        d = r.device
        console.print(f"[bold]{d.device_id}[/bold]  user {r.user_id or '-'}  enrolled {ts(d.enrolled_at)}  "
                      f"last seen {ts(d.last_seen)}" + ("  [red]REVOKED[/red]" if d.revoked else ""), highlight=False)
        attrs = json.loads(d.attrs_json or "{}")
        console.print("attributes: " + (", ".join(f"{k}={v}" for k, v in sorted(attrs.items()) if v not in ("", []))
                                        or "none reported yet"), highlight=False)
        t = CutTable("task", "version", "release", "status", "when", "error", long=("error",), title="installed")
        for i in r.installed:
            t.add_row(i.task, i.version[:12], i.release_id, i.status, ts(i.ts), (i.error.splitlines() or [""])[0])
        t.show()
        for title, entries in (("last runs", r.last_runs), ("last errors", r.errors)):
            console.print(f"[bold]{title}[/bold]" + ("" if entries else ": none"))
            for e in reversed(entries):
                click.echo(format_entry(e))
    emit(obj, obj.api().GetDevice(admin_pb2.DeviceRef(device_id=device_id)), human)


@device_group.command("preview")
@click.option("--attrs", required=True, help="Device attributes: user_id=u1,app_version=2.3.0,os=android,tags=a|b")
@data_dir_option
@json_option
@pass_ctx
def device_preview(obj: Ctx, attrs):
    """What a device with these attributes would receive, and which release decided it."""
    def human(reply):
        if not reply.tasks:
            console.print("no tasks")
        for t in reply.tasks:
            console.print(f"[bold]{t.name}@{t.version[:12]}[/bold] from {t.release_id} ({t.bundle_digest[:19]}…)",
                          highlight=False)
            if t.config_json:  # the release's task config this device would run with
                click.echo(f"  config {t.config_json}")
        for line in reply.explanation:
            console.print(f"  {line}", highlight=False)
    emit(obj, obj.api().Preview(parse_attrs(attrs)), human)


@click.group("fleet", cls=WalleGroup, lazy={"run": "walle.device_host.cli:fleet_run"})
def fleet_group():
    """Run many emulated devices on this machine."""


def register(main: click.Group) -> None:
    main.add_command(device_group)
    main.add_command(fleet_group)
