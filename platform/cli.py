"""The `walle` command line.

Operator commands work on a local data folder (`--data-dir`) or talk to a running platform
(`--platform HOST:PORT`). Exit codes: 0 ok, 1 internal error, 2 invalid input, 3 not found,
4 already exists, 5 refused in the current state, 6 not authenticated/allowed, 7 quota, 8 unreachable."""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
import signal
import sys
import threading

import click
from rich.console import Console
from rich.table import Table

from walle.protos import admin_pb2, bundle, device_pb2

from . import config as config_mod
from .errors import FailedPrecondition, InvalidArgument, WalleError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
DEFAULT_DATA_DIR = "walle-data"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def platform_address(text: str) -> str:
    """A --platform value checked as HOST:PORT (port 1..65535): a typo must not dial somewhere else."""
    m = _ADDRESS.match(text.strip())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise InvalidArgument(f"--platform {text!r} is not HOST:PORT with a port in 1..65535 (e.g. localhost:50051)")
    return text.strip()


def absolute(path: str | os.PathLike) -> str:
    """Paths are resolved once, against the directory the command was started in."""
    return os.path.abspath(os.path.expanduser(path))


def existing_data_dir(path: str | os.PathLike) -> str:
    path = absolute(path)
    if not os.path.isdir(path):
        raise InvalidArgument(f"no platform data folder at {path}: create one with "
                              f"`walle --data-dir {path} platform init`")
    return path


# -- plumbing ---------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, platform: str | None, data_dir: str | None, as_json: bool, actor: str | None,
                 ca: str | None = None, insecure: bool = False):
        self.cfg = config_mod.load()
        addr = platform or self.cfg.get("platform")
        self.platform_addr = platform_address(addr) if addr else None
        configured = data_dir or self.cfg.get("data_dir")
        self.data_dir_given = absolute(configured) if configured else None
        self.as_json = as_json
        self.actor = actor or self.cfg.get("actor", "operator")
        self.ca = ca or self.cfg.get("ca")
        self.insecure = insecure or str(self.cfg.get("insecure", "")).lower() in ("1", "true", "yes")
        self._api = None

    @property
    def data_dir(self) -> str:
        """The platform data folder (absolute). Never made up on the fly: it comes from --data-dir,
        WALLE_DATA_DIR or data_dir in the config file, else ./walle-data, and it must exist (only
        `walle platform init` creates one), so a typo never shows an empty platform."""
        if not self.data_dir_given and not os.path.isdir(DEFAULT_DATA_DIR):
            raise InvalidArgument(f"no platform data folder: pass --data-dir DIR (or set WALLE_DATA_DIR, or data_dir "
                                  f"in {config_mod.config_path()}), or talk to a server with --platform HOST:PORT; "
                                  f"`walle platform init` creates one (default ./{DEFAULT_DATA_DIR})")
        return existing_data_dir(self.data_dir_given or DEFAULT_DATA_DIR)

    def channel(self):
        """A channel to --platform: TLS checked against the platform CA unless --insecure."""
        import grpc
        if self.insecure:
            err_console.print("[bold red]WARNING: --insecure: plaintext gRPC, no server authentication[/bold red]")
            return grpc.insecure_channel(self.platform_addr)
        ca = self.ca or (pathlib.Path(self.data_dir_given or DEFAULT_DATA_DIR) / "pki" / "ca.pem")
        try:
            root = pathlib.Path(ca).read_bytes()
        except OSError:
            raise InvalidArgument(f"no platform CA certificate at {ca}: pass --ca FILE (from `walle platform init`) "
                                  f"or --insecure for a plaintext server") from None
        return grpc.secure_channel(self.platform_addr, grpc.ssl_channel_credentials(root_certificates=root))

    def api(self):
        """The AdminService: remote when --platform is given, else the local data folder."""
        if self._api is None:
            if self.platform_addr:
                from .client import RemoteAdmin
                token = self.cfg.get("operator_token", "")
                md = (("authorization", f"Bearer {token}"),) if token else ()
                self._api = RemoteAdmin(self.channel(), metadata=md)
            else:
                from .service import Platform
                self._api = Platform(self.data_dir)
        return self._api


def json_option(f):
    def cb(ctx, _param, value):
        if value:
            ctx.find_object(Ctx).as_json = True
        return value
    return click.option("--json", "json_", is_flag=True, expose_value=False, callback=cb,
                        help="Print machine-readable JSON.")(f)


def emit(ctx: Ctx, message, human) -> None:
    if ctx.as_json:
        from .service import to_dict
        data = to_dict(message) if hasattr(message, "DESCRIPTOR") else message
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(message)


def parse_attrs(text: str) -> device_pb2.DeviceInfo:
    """`user_id=u1,app_version=2.3.0,tags=a|b` -> DeviceInfo."""
    info = device_pb2.DeviceInfo()
    fields = {f.name for f in device_pb2.DeviceInfo.DESCRIPTOR.fields} - {"installed"}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise InvalidArgument(f"--attrs: {part!r} is not KEY=VALUE")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in fields:
            raise InvalidArgument(f"--attrs: unknown attribute {key!r}; known: {', '.join(sorted(fields))}")
        if key == "tags":
            info.tags.extend(t for t in value.split("|") if t)
        else:
            setattr(info, key, value)
    return info


def split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("@")
    if not name:
        raise InvalidArgument(f"{ref!r} is not NAME or NAME@VERSION")
    return name, version


def _ts(t: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


class WalleGroup(click.Group):
    """Turns platform errors into one red line and a meaningful exit code, and mounts commands
    that live in other modules (the device host, the CoDA cloud) only when they are asked for."""

    lazy: dict[str, str] = {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib
            module, _, attr = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WalleError as e:
            err_console.print(f"[red]error:[/red] {e.message}", highlight=False)
            sys.exit(e.exit_code)


class RootGroup(WalleGroup):
    lazy = {"cloud": "walle.platform.coda.cli:cloud"}


class LazyGroup(WalleGroup):
    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--platform", "platform_addr", envvar="WALLE_PLATFORM", metavar="HOST:PORT",
              help="Talk to a running platform server (default: work on --data-dir directly).")
@click.option("--data-dir", envvar="WALLE_DATA_DIR", type=click.Path(file_okay=False),
              help=f"Platform data folder for local use (default: ./{DEFAULT_DATA_DIR}).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--actor", envvar="WALLE_ACTOR", help="Who is acting, for the audit trail (default: login name).")
@click.option("--ca", envvar="WALLE_CA", type=click.Path(dir_okay=False),
              help="The platform's CA certificate for TLS (default: <data-dir>/pki/ca.pem).")
@click.option("--insecure", is_flag=True, help="Plaintext gRPC without server authentication (debugging only).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="walle")
@click.pass_context
def main(ctx, platform_addr, data_dir, as_json, actor, ca, insecure, verbose):
    """walle: device-cloud collaborative machine learning.

    Remote commands authenticate with an operator token: WALLE_OPERATOR_TOKEN or operator_token
    in the config file."""
    logging.basicConfig(level=logging.WARNING - 10 * verbose,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Ctx(platform_addr, data_dir, as_json, actor, ca, insecure)


# -- platform ---------------------------------------------------------------------------------------
@main.group("platform")
def platform_group():
    """Run the cloud platform."""


@platform_group.command("init")
@click.option("--data-dir", "init_dir", type=click.Path(file_okay=False), help="Data folder (default: global --data-dir).")
@click.option("--host", "hosts", multiple=True, help="Name or address the server certificate is for (repeatable; "
              "default: localhost, 127.0.0.1, ::1 and this machine's name).")
@click.option("--operator", default="admin", show_default=True, help="Name of the first operator.")
@click.option("--force", is_flag=True, help="Replace existing keys (enrolled devices must enroll again).")
@json_option
@click.pass_obj
def platform_init(obj: Ctx, init_dir, hosts, operator, force):
    """Create the platform's CA, server certificate, bundle-signing key and a first operator token."""
    from . import pki
    from .service import Platform
    data_dir = absolute(init_dir or obj.data_dir_given or DEFAULT_DATA_DIR)
    keys = pki.init(data_dir, list(hosts) or None, force=force)
    token = Platform(data_dir, keys=keys).operators.create(operator, actor=obj.actor)
    out = {"data_dir": str(data_dir), "ca": str(pathlib.Path(data_dir) / "pki" / "ca.pem"), "operator": operator,
           "operator_token": token, "bundle_public_key": keys.bundle_public_key.hex()}

    def human(d):
        line = functools.partial(console.print, highlight=False, soft_wrap=True)  # unwrapped: copy-pasteable
        line(f"keys written to {d['data_dir']}/pki (private keys mode 0600)")
        line(f"operator {d['operator']} token (shown once): {d['operator_token']}")
        line(f"  export WALLE_OPERATOR_TOKEN={d['operator_token']} WALLE_CA={d['ca']}")
    emit(obj, out, human)


@platform_group.command("serve")
@click.option("--data-dir", "serve_dir", type=click.Path(file_okay=False), help="Data folder (default: global --data-dir).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0 = any free port). A port in use exits with code 5.")
@click.option("--workers", default=8, show_default=True, type=int,
              help="Threads for the synchronous handlers (polls and watch streams are async; more threads only contend for the GIL).")
@click.option("--insecure", "serve_insecure", is_flag=True,
              help="Serve plaintext gRPC and unsigned bundles (debugging only; devices cannot trust it).")
@click.option("--coda/--no-coda", default=True, show_default=True,
              help="Also serve the CoDA behaviour upload and sample-query service (MovieLens catalogue).")
@click.option("--dashboard-port", type=click.IntRange(0, 65535), default=None, help="Also serve the read-only web dashboard on this port.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes sharing the port (SO_REUSEPORT); Python gRPC is CPU-bound per process.")
@click.option("--reuseport", is_flag=True, hidden=True, help="Internal: a worker process of --processes.")
@click.pass_obj
def platform_serve(obj: Ctx, serve_dir, host, port, workers, serve_insecure, coda, dashboard_port, processes,
                   reuseport):
    """Serve the device, tunnel and admin gRPC APIs (TLS, operator-authenticated admin, health checking)."""
    import subprocess

    from . import pki
    from .server import build_server, operator_authorizer, tls_credentials
    from .service import Platform
    logging.getLogger("walle").setLevel(min(logging.getLogger().level, logging.INFO))
    data_dir = existing_data_dir(serve_dir) if serve_dir else obj.data_dir
    insecure = serve_insecure or obj.insecure
    keys = None
    if insecure and not reuseport:
        err_console.print("[bold red]WARNING: --insecure: plaintext gRPC and UNSIGNED bundles. Anyone on the "
                          "network can read device traffic; devices that pinned keys will refuse these bundles."
                          "[/bold red]")
    else:
        keys = pki.load(data_dir)
    platform = Platform(data_dir, keys=keys)
    if not platform.operators.any() and not reuseport:
        err_console.print("[yellow]no operator exists yet: admin calls will be refused; run "
                          "`walle platform init` (or `walle operator create`)[/yellow]")
    extra = None
    if coda:
        from .coda import movielens
        from .coda.cloud import CodaCloud
        ml = movielens.load()
        extra = CodaCloud(platform, items=ml.items, users=ml.users).add_services
    if processes > 1 and port == 0:
        raise InvalidArgument("--processes needs a fixed --port: the worker processes must share it")
    try:
        _server, bound, stop = build_server(platform, host=host, port=port, max_workers=workers, extra=extra,
                                            authorize_admin=operator_authorizer(platform),
                                            credentials=None if insecure else tls_credentials(platform),
                                            reuseport=processes > 1 or reuseport)
    except OSError as e:
        raise FailedPrecondition(f"{e}; is another server running? choose another --port") from None
    children: list = []
    stop_dashboard = None
    try:
        if processes > 1:
            args = [sys.executable, "-m", "walle.platform.cli", "--data-dir", str(data_dir), "platform", "serve",
                    "--host", host, "--port", str(bound), "--workers", str(workers), "--reuseport",
                    "--coda" if coda else "--no-coda"] + (["--insecure"] if insecure else [])
            children = [subprocess.Popen(args) for _ in range(processes - 1)]
        if not reuseport:
            err_console.print(f"walle platform serving on {host}:{bound} ({'PLAINTEXT' if insecure else 'TLS'}; "
                              f"{processes} process{'es' if processes > 1 else ''}; data: {platform.data_dir})")
        if dashboard_port is not None:
            from .dashboard import start_dashboard
            pki_dir = pathlib.Path(data_dir) / "pki"
            tls = {} if insecure else {"certfile": str(pki_dir / "server.pem"), "keyfile": str(pki_dir / "server-key.pem")}
            try:
                dport, stop_dashboard = start_dashboard(platform, host=host, port=dashboard_port, **tls)
            except OSError as e:
                raise FailedPrecondition(f"{e}; choose another --dashboard-port") from None
            err_console.print(f"dashboard on {'http' if insecure else 'https'}://{host}:{dport}/"
                              + ("" if insecure else f" (trust {pki_dir / 'ca.pem'} in the browser)"))
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        if not reuseport:
            err_console.print("shutting down")
    finally:  # bounded: stop() cancels what is still running after its grace period
        for child in children:
            child.terminate()
        if stop_dashboard:
            stop_dashboard()
        stop(2.0)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@main.group("operator")
def operator_group():
    """Operator credentials for the admin API and dashboard (works on the local data folder)."""


@operator_group.command("create")
@click.argument("name")
@json_option
@click.pass_obj
def operator_create(obj: Ctx, name):
    """Create (or re-issue) an operator token; shown once."""
    from .service import Platform
    token = Platform(obj.data_dir).operators.create(name, actor=obj.actor)
    emit(obj, {"operator": name, "token": token}, lambda d: console.print(f"operator {name} token: {token}",
                                                                          highlight=False))


@operator_group.command("revoke")
@click.argument("name")
@click.pass_obj
def operator_revoke(obj: Ctx, name):
    """Revoke an operator token."""
    from .service import Platform
    Platform(obj.data_dir).operators.revoke(name, actor=obj.actor)
    console.print(f"operator {name} revoked", highlight=False)


# -- tasks ------------------------------------------------------------------------------------------
@main.group("task")
def task_group():
    """Submit and inspect task scripts (each version is a git commit)."""


def _print_version(tv) -> None:
    verb = "submitted" if tv.created else "unchanged (identical to the latest version)"
    console.print(f"{tv.name}@{tv.version[:12]} {verb}  bundle {tv.bundle_digest[:19]}… ({tv.bundle_size} B)",
                  highlight=False)


@task_group.command("submit")
@click.argument("task_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-m", "--message", default="", help="Commit message.")
@json_option
@click.pass_obj
def task_submit(obj: Ctx, task_dir, message):
    """Validate TASK_DIR and commit it as a new task version."""
    from .manifest import validate_task_dir
    _manifest, files = validate_task_dir(task_dir)
    req = admin_pb2.SubmitTaskRequest(archive=bundle.pack(files), message=message, author=obj.actor)
    emit(obj, obj.api().SubmitTask(req), _print_version)


@task_group.command("list")
@json_option
@click.pass_obj
def task_list(obj: Ctx):
    """List tasks with their latest version."""
    def human(reply):
        t = Table("task", "latest", "submitted", "author", "message")
        for v in reply.tasks:
            t.add_row(v.name, v.version[:12], _ts(v.created_at), v.author, v.message)
        console.print(t)
    emit(obj, obj.api().ListTasks(admin_pb2.Empty()), human)


@task_group.command("history")
@click.argument("name")
@json_option
@click.pass_obj
def task_history(obj: Ctx, name):
    """Versions of a task, newest first."""
    def human(reply):
        t = Table("version", "submitted", "author", "message", "bundle")
        for v in reply.versions:
            t.add_row(v.version[:12], _ts(v.created_at), v.author, v.message, v.bundle_digest[:19])
        console.print(t)
    emit(obj, obj.api().GetTaskHistory(admin_pb2.TaskRef(name=name)), human)


@task_group.command("diff")
@click.argument("name")
@click.argument("v1")
@click.argument("v2")
@json_option
@click.pass_obj
def task_diff(obj: Ctx, name, v1, v2):
    """Unified diff of a task between two versions."""
    emit(obj, obj.api().DiffTask(admin_pb2.DiffRequest(name=name, v1=v1, v2=v2)),
         lambda r: click.echo(r.unified_diff or "(no differences)"))


@task_group.command("show")
@click.argument("ref", metavar="NAME[@VERSION]")
@json_option
@click.pass_obj
def task_show(obj: Ctx, ref):
    """Show a task version: manifest and files."""
    name, version = split_ref(ref)

    def human(reply):
        v = reply.version
        console.print(f"[bold]{v.name}@{v.version}[/bold]  {_ts(v.created_at)}  {v.author}: {v.message}", highlight=False)
        console.print(f"bundle {v.bundle_digest} ({v.bundle_size} B)", highlight=False)
        for path in sorted(reply.files):
            console.rule(path)
            click.echo(reply.files[path])
    emit(obj, obj.api().ShowTask(admin_pb2.TaskRef(name=name, version=version)), human)


# -- releases ---------------------------------------------------------------------------------------
@main.group("release")
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
@json_option
@click.pass_obj
def release_create(obj: Ctx, ref, rule, rollout, stage, channel, allow, deny):
    """Release NAME@VERSION (a commit id or unique prefix; NAME alone = latest)."""
    name, version = split_ref(ref)
    req = admin_pb2.CreateReleaseRequest(task=name, version=version, rule=rule, rollout=rollout or 0.0,
                                         has_rollout=rollout is not None, stage=stage or "", channel=channel,
                                         allow=_ids(allow), deny=_ids(deny), actor=obj.actor)
    emit(obj, obj.api().CreateRelease(req), _print_release)


@release_group.command("list")
@click.option("--task", default="", help="Only this task.")
@click.option("--channel", default="", help="Only this channel.")
@click.option("--active", is_flag=True, help="Only active or paused releases.")
@json_option
@click.pass_obj
def release_list(obj: Ctx, task, channel, active):
    """Release history, newest first, with delivery and run figures."""
    emit(obj, obj.api().ListReleases(admin_pb2.ReleaseFilter(task=task, channel=channel, active_only=active)),
         lambda r: _release_table(r.releases))


@release_group.command("show")
@click.argument("release_id")
@json_option
@click.pass_obj
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
@json_option
@click.pass_obj
def release_set_rollout(obj: Ctx, release_id, percent, stage):
    """Grow a release's rollout (it may only grow; devices already in stay in)."""
    req = admin_pb2.SetRolloutRequest(id=release_id, rollout=percent, stage=stage or "", actor=obj.actor)
    emit(obj, obj.api().SetRollout(req), _print_release)


def _simple_release_cmd(cmd_name: str, method: str, doc: str):
    @release_group.command(cmd_name, help=doc)
    @click.argument("release_id")
    @json_option
    @click.pass_obj
    def cmd(obj: Ctx, release_id):
        emit(obj, getattr(obj.api(), method)(admin_pb2.ReleaseRef(id=release_id, actor=obj.actor)), _print_release)
    return cmd


_simple_release_cmd("pause", "PauseRelease", "Pause a release: its devices fall back to the release before it.")
_simple_release_cmd("resume", "ResumeRelease", "Resume a paused release.")
_simple_release_cmd("revoke", "RevokeRelease", "Revoke a release for good: it is never delivered again.")


@release_group.command("rollback")
@click.argument("name")
@click.option("--to", "to_version", default="", help="Version to roll back to (default: the previous released version).")
@click.option("--channel", default="", help="Channel (default: stable).")
@json_option
@click.pass_obj
def release_rollback(obj: Ctx, name, to_version, channel):
    """Roll a task back: a new release of an earlier version to the same audience (history is kept)."""
    req = admin_pb2.RollbackRequest(task=name, to_version=to_version, channel=channel, actor=obj.actor)
    emit(obj, obj.api().Rollback(req), _print_release)


# -- devices ----------------------------------------------------------------------------------------
@main.group("device", cls=LazyGroup, lazy={"run": "walle.device_host.cli:device_run"})
def device_group():
    """Enroll devices, preview what they receive, run a device host."""


@device_group.command("enroll")
@click.option("--device-id", default="", help="Device id (default: generated).")
@click.option("--ttl", "ttl", default=0, type=int, help="Credential lifetime in seconds (0 = no expiry).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the credential to this file (mode 0600).")
@json_option
@click.pass_obj
def device_enroll(obj: Ctx, device_id, ttl, out):
    """Register a device and print its credential (shown once; the platform keeps only a hash)."""
    reply = obj.api().EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, ttl_seconds=ttl, actor=obj.actor))
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"device_id": reply.device_id, "token": reply.token, "platform": obj.platform_addr or "",
                       "ca_pem": reply.platform_ca_pem, "bundle_public_key": reply.bundle_public_key.hex()}, f)
    emit(obj, reply, lambda r: console.print(f"device {r.device_id}\ntoken {r.token}", highlight=False))


@device_group.command("revoke")
@click.argument("device_id")
@json_option
@click.pass_obj
def device_revoke(obj: Ctx, device_id):
    """Revoke a device's credential: its calls get UNAUTHENTICATED from now on."""
    emit(obj, obj.api().RevokeDevice(admin_pb2.DeviceRef(device_id=device_id, actor=obj.actor)),
         lambda d: console.print(f"device {d.device_id} revoked", highlight=False))


@device_group.command("list")
@json_option
@click.pass_obj
def device_list(obj: Ctx):
    """Enrolled devices and when they were last seen."""
    def human(reply):
        t = Table("device", "enrolled", "last seen", "app version", "revoked")
        for d in reply.devices:
            t.add_row(d.device_id, _ts(d.enrolled_at), _ts(d.last_seen), d.app_version or "-", "yes" if d.revoked else "")
        console.print(t)
    emit(obj, obj.api().ListDevices(admin_pb2.Empty()), human)


@device_group.command("preview")
@click.option("--attrs", required=True, help="Device attributes: user_id=u1,app_version=2.3.0,os=android,tags=a|b")
@json_option
@click.pass_obj
def device_preview(obj: Ctx, attrs):
    """What a device with these attributes would receive, and which release decided it."""
    def human(reply):
        if not reply.tasks:
            console.print("no tasks")
        for t in reply.tasks:
            console.print(f"[bold]{t.name}@{t.version[:12]}[/bold] from {t.release_id} ({t.bundle_digest[:19]}…)",
                          highlight=False)
        for line in reply.explanation:
            console.print(f"  {line}", highlight=False)
    emit(obj, obj.api().Preview(parse_attrs(attrs)), human)


@main.group("fleet", cls=LazyGroup, lazy={"run": "walle.device_host.cli:fleet_run"})
def fleet_group():
    """Run many emulated devices on this machine."""


# -- audit ------------------------------------------------------------------------------------------
@main.command("audit")
@click.option("--limit", default=50, show_default=True, type=int)
@json_option
@click.pass_obj
def audit(obj: Ctx, limit):
    """The audit trail: who did what, when."""
    def human(reply):
        t = Table("when", "who", "action", "target", "detail")
        for e in reply.entries:
            t.add_row(_ts(e.ts), e.actor, e.action, e.target, e.detail)
        console.print(t)
    emit(obj, obj.api().GetAudit(admin_pb2.AuditRequest(limit=limit)), human)


# -- demo -------------------------------------------------------------------------------------------
@main.command("demo")
@click.option("--data-dir", "demo_dir", type=click.Path(file_okay=False), help="Keep part 1's platform data here (default: a temporary folder).")
@click.option("--users", default=0, show_default=True, type=int, help="MovieLens users to emulate (0 = all 943).")
@click.option("--days", default=3, show_default=True, type=int, help="Simulated days (day 1 trains the global model).")
@click.option("--seeds", default=1, show_default=True, type=int, help="Repeat the experiment with this many seeds.")
@click.option("--out", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="Where results.json and results.png go.")
@click.option("--workers", default=4, show_default=True, type=int, help="Device threads in the emulated fleet.")
@click.option("--skip-coda", is_flag=True, help="Only part 1 (release rules), no CoDA experiment.")
@click.pass_obj
def demo(obj: Ctx, demo_dir, users, days, seeds, out_dir, workers, skip_coda):
    """The end-to-end demo on embedded defaults: releases, then the CoDA work cycle on MovieLens-100k."""
    from .demo import run_demo
    if days < 2:
        raise click.BadParameter("needs at least 2 days (day 1 trains the global model)", param_hint="--days")
    run_demo(obj, demo_dir, users=users, days=days, seeds=seeds, out_dir=out_dir, workers=workers,
             coda=not skip_coda)


if __name__ == "__main__":
    main()
