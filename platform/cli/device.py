"""`walle device ...` and `walle fleet ...`: enroll devices, preview what they receive; the device
host's own commands (`device run`, `fleet run`) live in walle.device_host.cli and load on demand."""
from __future__ import annotations

import json
import os

import click
from rich.table import Table

from walle.protos import admin_pb2
from walle.protos.clikit import WalleGroup, json_option

from .context import Ctx, console, data_dir_option, emit, parse_attrs, pass_ctx, ts


@click.group("device", cls=WalleGroup, lazy={"run": "walle.device_host.cli:device_run",
                                             "emit": "walle.device_host.cli:device_emit",
                                             "ask": "walle.device_host.cli:device_ask"})
def device_group():
    """Enroll devices, preview what they receive, run a device host."""


@device_group.command("enroll")
@click.option("--device-id", default="", help="Device id (default: generated).")
@click.option("--ttl", "ttl", default=0, type=int, help="Credential lifetime in seconds (0 = no expiry).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the credential to this file (mode 0600).")
@click.option("--user-id", default="", help="Bind the device to this user: rules, allow-lists, uploads and samples "
                                            "use it, never the user_id the device reports.")
@data_dir_option
@json_option
@pass_ctx
def device_enroll(obj: Ctx, device_id, ttl, out, user_id):
    """Register a device and print its credential (shown once; the platform keeps only a hash)."""
    reply = obj.api().EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, ttl_seconds=ttl, actor=obj.actor,
                                                           user_id=user_id))
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"device_id": reply.device_id, "token": reply.token, "platform": obj.platform_addr or "",
                       "user_id": reply.user_id,
                       "ca_pem": reply.platform_ca_pem, "bundle_public_key": reply.bundle_public_key.hex()}, f)
    emit(obj, reply, lambda r: console.print(f"device {r.device_id}\ntoken {r.token}", highlight=False))


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
        t = Table("device", "enrolled", "last seen", "app version", "revoked")
        for d in reply.devices:
            t.add_row(d.device_id, ts(d.enrolled_at), ts(d.last_seen), d.app_version or "-", "yes" if d.revoked else "")
        console.print(t)
    emit(obj, obj.api().ListDevices(admin_pb2.Empty()), human)


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
