"""Device-side commands, mounted by the main `walle` CLI: `walle device run` (one device host),
`walle device emit|ask` (talk to a running host through its app socket) and `walle fleet run`
(N emulated devices in one process)."""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sqlite3
import tempfile
import threading
import time

import click
import grpc

from walle.protos.clikit import WalleCommand, json_option, print_json, want_json
from walle.protos.errors import InvalidArgument, Unauthenticated, WalleError

from .identity import Credentials, IdentityError, credentials_path, parse_attrs

log = logging.getLogger("walle.device.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO  # a device host narrates by default
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("walle").setLevel(level)


def _sandbox(profile: str, allow_unconfined: bool, workers: int = 1):
    from .sandbox import Sandbox
    sb = Sandbox(profile=profile, allow_unconfined=allow_unconfined, workers=workers)
    caps = sb.capabilities
    log.info("sandbox ready: profile=%s seccomp=%s landlock=%s confined=%s%s", profile, caps.get("seccomp"),
             caps.get("landlock"), caps.get("confined"),
             "" if caps.get("confined") or allow_unconfined else
             " -- untrusted tasks will be REFUSED (use --allow-unconfined-tasks to run them with rlimits only)")
    return sb


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


@click.command("run", cls=WalleCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--platform", "platform_addr", envvar="WALLE_PLATFORM", metavar="HOST:PORT",
              help="Platform server address (default: the one in the credential file).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="This device's folder: credential, installed tasks, tunnel queue, storage, models.")
@click.option("--attrs", default="", help="Device attributes: user_id=u1,app_version=2.3.0,os=android,tags=a|b")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="Credential file from `walle device enroll --out` (copied into --data-dir).")
@click.option("--token", envvar="WALLE_DEVICE_TOKEN", help="Bearer token (with --device-id); prefer --token-file.")
@click.option("--device-id", default="", help="Device id that goes with --token.")
@click.option("--allow-unconfined-tasks", is_flag=True,
              help="Run tasks even where neither seccomp nor Landlock works (rlimits + RestrictedPython only).")
@click.option("--profile", type=click.Choice(["native", "android_sim"]), default="native", show_default=True,
              help="Sandbox profile; android_sim emulates an Android app's seccomp policy.")
@click.option("--once", is_flag=True, help="Sync once, run what is due, upload reports, and exit.")
@click.option("--event", "events", multiple=True, metavar="NAME[=JSON]",
              help="Emit an app event after the first sync (repeatable), e.g. hello='{\"who\": \"ann\"}'.")
@click.option("--metrics-port", type=int, default=None,
              help="Expose Prometheus metrics (runs, durations, installed tasks, queue) on 127.0.0.1:PORT.")
@click.option("-v", "--verbose", count=True, help="-v info (default), -vv debug.")
def device_run(platform_addr, data_dir, attrs, token_file, token, device_id, allow_unconfined_tasks, profile, once,
               events, metrics_port, verbose):
    """Run a device host: keep tasks in sync with the platform and run them in the sandbox."""
    _setup_logging(verbose)
    from .host import DeviceHost
    data = pathlib.Path(data_dir)
    try:
        attributes = parse_attrs(attrs)
        if token_file:
            cred = Credentials.load(token_file)
            cred = dataclasses.replace(cred, platform=platform_addr or cred.platform)
            cred.save(credentials_path(data))
        elif token:
            if not device_id:
                raise InvalidArgument("--token needs --device-id (or use --token-file)")
            cred = Credentials(device_id, token, platform_addr or "")
            log.warning("--token: no platform CA or bundle key pinned; plaintext gRPC and unsigned bundles "
                        "(use --token-file from `walle device enroll --out` for TLS and signature checks)")
            cred.save(credentials_path(data))
        else:
            cred = Credentials.load(credentials_path(data))
        address = platform_addr or cred.platform
        if not address:
            raise InvalidArgument("no platform address: pass --platform HOST:PORT")
        parsed_events = []
        for spec in events:
            name, _, raw = spec.partition("=")
            try:
                parsed_events.append((name, json.loads(raw) if raw else {}))
            except ValueError as e:
                raise InvalidArgument(f"--event {spec!r}: payload is not JSON: {e}") from None
    except IdentityError as e:
        raise InvalidArgument(str(e)) from None
    except OSError as e:   # e.g. the credential cannot be copied into a full data folder
        raise WalleError(f"cannot write the credential into {data}: {e.strerror or e}") from None
    from . import app
    sandbox = _sandbox(profile, allow_unconfined_tasks)
    try:
        host = DeviceHost(data, address, attrs=attributes, sandbox=sandbox, credentials=cred)
    except (OSError, sqlite3.Error) as e:  # a full or read-only disk: say so, no traceback
        sandbox.close()
        raise WalleError(f"cannot open the device's data folder {data}: {e} (is the disk full?)") from None
    log.info("device %s -> platform %s (attributes: %s)", cred.device_id, address,
             ", ".join(f"{k}={v}" for k, v in attributes.items()) or "none")
    stop_metrics = None
    if metrics_port is not None:
        from .metrics import DeviceMetrics
        mport, stop_metrics = DeviceMetrics(host).serve(metrics_port)
        log.info("metrics on http://127.0.0.1:%d/metrics", mport)
    try:
        # The first sync comes before any --event: an event fired before it would find no task installed.
        try:
            res = host.sync_now()
            log.info("in sync: %d installed, %d dropped, %d refused; now running: %s", len(res.installed),
                     len(res.dropped), len(res.rejected), ", ".join(sorted(host.installed())) or "nothing")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                host.sync.unauthenticated = e.details() or "unauthenticated"
                log.error("the platform refused this device's credential (%s); enroll it again", e.details())
            else:
                log.error("sync failed: %s: %s (running what is installed)", e.code().name, e.details())
        except (OSError, sqlite3.Error) as e:   # e.g. a full disk
            log.error("sync failed: %s (running what is installed)", e)
        for name, payload in parsed_events:
            tasks = app.emit(host, name, payload)[0]
            if tasks:
                log.info("event %s -> %s", name, ", ".join(tasks))
            else:
                log.warning("event %s triggers no installed task (installed: %s)", name,
                            ", ".join(sorted(host.installed())) or "none")
        if once:
            host.triggers.check_tables()
            runs = host.triggers.drain()
            ok = host.up.flush(timeout=10)
            log.info("%d runs; reports %s", runs, "uploaded" if ok else f"queued ({host.up.pending()} pending)")
        else:
            stop = threading.Event()
            _stop_on_signals(stop)
            host.start()
            server = app.AppServer(host)  # refuses (exit 6) a data folder others can write
            log.info("running; app socket %s; Ctrl-C to stop", server.path)
            try:
                while not stop.wait(1.0):
                    if host.sync.unauthenticated:
                        log.error("stopping: the platform no longer accepts this device's credential (%s)",
                                  host.sync.unauthenticated)
                        break
            finally:
                server.stop()
    finally:
        if stop_metrics is not None:
            stop_metrics()
        host.stop(flush_timeout=3)
        host.close()
        sandbox.close()
    if host.sync.unauthenticated:
        raise Unauthenticated(f"the platform refused this device's credential ({host.sync.unauthenticated}); "
                              "enroll it again")


def _payload(text: str) -> object:
    try:
        return json.loads(text) if text else {}
    except ValueError as e:
        raise InvalidArgument(f"payload is not JSON: {e}") from None


@click.command("emit", cls=WalleCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name")
@click.argument("payload", default="")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="The running device host's folder.")
@json_option
def device_emit(name, payload, data_dir):
    """Send an app event (NAME, optional JSON PAYLOAD) to a running device host: it is logged and
    queues the tasks it triggers."""
    from .app import AppClient
    with AppClient(data_dir) as client:
        reply = client.emit(name, _payload(payload))
    if want_json():
        print_json({"seq": reply.seq, "tasks": list(reply.tasks)})
    else:
        click.echo(f"event #{reply.seq} {name} -> {', '.join(reply.tasks) or 'no task'}")


@click.command("ask", cls=WalleCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("event")
@click.argument("payload", default="")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="The running device host's folder.")
@click.option("--task", default="", help="The task to ask (default: the one task EVENT triggers).")
@click.option("--timeout", default=0.0, type=float, help="Seconds (default: the task's own wall-clock limit).")
@json_option
def device_ask(event, payload, data_dir, task, timeout):
    """Run a task on a running device host now with EVENT and JSON PAYLOAD; print its result.
    Exit 0 when the task returned, 5 when it failed (its error is printed)."""
    from .app import AppClient
    with AppClient(data_dir) as client:
        reply = client.ask(event, _payload(payload), task=task, timeout=timeout)
    result = json.loads(reply.result_json) if reply.result_json else None
    if want_json():
        print_json({"task": reply.task, "version": reply.version, "status": reply.status,
                    "result": result, "error": reply.error, "duration_s": reply.duration_s})
    elif reply.status == "ok":
        click.echo(json.dumps(result))
    else:
        click.echo(f"error: {reply.task} {reply.status}: {reply.error.strip()}", err=True)
    if reply.status != "ok":
        raise click.exceptions.Exit(5)


@click.command("run", cls=WalleCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--devices", "n", required=True, type=click.IntRange(1, 100_000), help="How many devices to emulate.")
@click.option("--platform", "platform_addr", envvar="WALLE_PLATFORM", required=True, metavar="HOST:PORT",
              help="Platform server address.")
@click.option("--profile-file", type=click.Path(dir_okay=False, exists=True),
              help="Attribute profile (.json: weighted values) or per-device attributes (.jsonl).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for drawing attributes.")
@click.option("--duration", default=30.0, show_default=True, type=float,
              help="Seconds to stay in sync (a round on every platform change).")
@click.option("--base-dir", type=click.Path(file_okay=False), help="Devices' folders (default: a temporary folder).")
@click.option("--credentials-file", type=click.Path(dir_okay=False, exists=True),
              help="JSONL of {device_id, token}, one per device (default: enroll through the admin API).")
@click.option("--admin-token", envvar="WALLE_OPERATOR_TOKEN", default="", help="Operator token for enrolling devices.")
@click.option("--ca", envvar="WALLE_CA", type=click.Path(dir_okay=False, exists=True),
              help="The platform's CA certificate (TLS); without it the fleet uses plaintext (--insecure servers).")
@click.option("--event", "event", default="", metavar="NAME[=JSON]", help="Emit this app event on every device each round.")
@click.option("--allow-unconfined-tasks", is_flag=True, help="See `walle device run`.")
@click.option("--workers", default=32, show_default=True, type=click.IntRange(1, 256), help="Thread pool size.")
@click.option("--cleanup", is_flag=True,
              help="At the end, revoke the devices this run enrolled (temporary devices leave no live credentials).")
@click.option("-v", "--verbose", count=True)
def fleet_run(n, platform_addr, profile_file, seed, duration, base_dir, credentials_file, admin_token, ca, event,
              allow_unconfined_tasks, workers, cleanup, verbose):
    """Emulate N devices in one process: sync them after every release, run their tasks, print a summary."""
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    from rich.console import Console

    from walle.protos import admin_pb2, admin_pb2_grpc

    from .fleet import Fleet
    console = Console(stderr=True)
    base = pathlib.Path(base_dir or tempfile.mkdtemp(prefix="walle-fleet-"))
    ca_pem = pathlib.Path(ca).read_bytes() if ca else b""
    channel = Credentials("fleet", "-", platform_addr, ca_pem.decode()).channel(
        options=[("grpc.max_receive_message_length", 32 << 20)])
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    md = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()

    enrolled: list[str] = []

    def enroll(device_id: str, user_id: str) -> Credentials:
        reply = admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, actor="fleet", user_id=user_id),
                                   metadata=md, timeout=30)
        enrolled.append(reply.device_id)
        return Credentials(device_id, reply.token, platform_addr, reply.platform_ca_pem, reply.bundle_public_key.hex(),
                           user_id=reply.user_id)

    event_name, _, raw = event.partition("=")
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError as e:
        raise InvalidArgument(f"--event: payload is not JSON: {e}") from None
    sandbox = _sandbox("native", allow_unconfined_tasks, workers=2) if event_name else None
    fleet = None
    try:
        t0 = time.perf_counter()
        try:
            fleet = Fleet(n, platform_addr, base, profile_file=profile_file, seed=seed, sandbox=sandbox,
                          enroll=None if credentials_file else enroll, credentials_file=credentials_file,
                          workers=workers, channel=channel, progress=True)
        except IdentityError as e:
            raise InvalidArgument(f"cannot set up the fleet: {e}") from None
        console.print(f"{n} devices ready in {time.perf_counter() - t0:.1f}s (folders under {base})")

        def on_round(st):
            runs = fleet.emit_all(event_name, payload) if event_name else 0
            console.print(f"round: {st.synced}/{st.devices} synced, {st.installed} installs, {st.rejected} refused, "
                          f"{st.failed} failed, {st.elapsed_s:.2f}s" + (f", {runs} runs" if event_name else ""))
        fleet.run(duration, on_round=on_round)
        fleet.flush_all()
        fleet.print_summary(console)
    finally:
        if fleet is not None:
            fleet.close()
        if cleanup:  # also after a failed setup: the devices enrolled so far
            for device_id in enrolled:
                admin.RevokeDevice(admin_pb2.DeviceRef(device_id=device_id, actor="fleet"), metadata=md, timeout=30)
            console.print(f"revoked the {len(enrolled)} devices this run enrolled")
        channel.close()
        if sandbox is not None:
            sandbox.close()
        if not base_dir:
            import shutil
            shutil.rmtree(base, ignore_errors=True)  # our temporary folder
