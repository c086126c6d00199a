"""Device-side commands, mounted by the main `walle` CLI: `walle device run` (one device host) and
`walle fleet run` (N emulated devices in one process)."""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sqlite3
import sys
import tempfile
import threading
import time

import click
import grpc

from .identity import Credentials, IdentityError, credentials_path, parse_attrs

log = logging.getLogger("walle.device.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO  # a device host narrates by default
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("walle").setLevel(level)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
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
              help="Emit an app event after syncing (repeatable), e.g. hello='{\"who\": \"ann\"}'.")
@click.option("-v", "--verbose", count=True, help="-v info (default), -vv debug.")
def device_run(platform_addr, data_dir, attrs, token_file, token, device_id, allow_unconfined_tasks, profile, once,
               events, verbose):
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
                _fail("--token needs --device-id (or use --token-file)")
            cred = Credentials(device_id, token, platform_addr or "")
            log.warning("--token: no platform CA or bundle key pinned; plaintext gRPC and unsigned bundles "
                        "(use --token-file from `walle device enroll --out` for TLS and signature checks)")
            cred.save(credentials_path(data))
        else:
            cred = Credentials.load(credentials_path(data))
        address = platform_addr or cred.platform
        if not address:
            _fail("no platform address: pass --platform HOST:PORT")
        parsed_events = []
        for spec in events:
            name, _, raw = spec.partition("=")
            try:
                parsed_events.append((name, json.loads(raw) if raw else {}))
            except ValueError as e:
                _fail(f"--event {spec!r}: payload is not JSON: {e}")
    except IdentityError as e:
        _fail(str(e))
    except OSError as e:   # e.g. the credential cannot be copied into a full data folder
        _fail(f"cannot write the credential into {data}: {e.strerror or e}", 1)
    sandbox = _sandbox(profile, allow_unconfined_tasks)
    try:
        host = DeviceHost(data, address, attrs=attributes, sandbox=sandbox, credentials=cred)
    except (OSError, sqlite3.Error) as e:  # a full or read-only disk: say so, no traceback
        sandbox.close()
        _fail(f"cannot open the device's data folder {data}: {e} (is the disk full?)", 1)
    log.info("device %s -> platform %s (attributes: %s)", cred.device_id, address,
             ", ".join(f"{k}={v}" for k, v in attributes.items()) or "none")
    try:
        if once:
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
                log.info("event %s -> %s", name, ", ".join(host.emit(name, payload)) or "no task")
            host.triggers.check_tables()
            runs = host.triggers.drain()
            ok = host.up.flush(timeout=10)
            log.info("%d runs; reports %s", runs, "uploaded" if ok else f"queued ({host.up.pending()} pending)")
            code = 1 if host.sync.unauthenticated else 0
        else:
            stop = threading.Event()
            _stop_on_signals(stop)
            host.start()
            for name, payload in parsed_events:
                host.emit(name, payload)
            log.info("running; Ctrl-C to stop")
            while not stop.wait(1.0):
                if host.sync.unauthenticated:
                    log.error("stopping: the platform no longer accepts this device's credential (%s)",
                              host.sync.unauthenticated)
                    break
            code = 1 if host.sync.unauthenticated else 0
    finally:
        host.stop(flush_timeout=3)
        host.close()
        sandbox.close()
    sys.exit(code)


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("-v", "--verbose", count=True)
def fleet_run(n, platform_addr, profile_file, seed, duration, base_dir, credentials_file, admin_token, ca, event,
              allow_unconfined_tasks, workers, verbose):
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

    def enroll(device_id: str) -> Credentials:
        reply = admin.EnrollDevice(admin_pb2.EnrollRequest(device_id=device_id, actor="fleet"), metadata=md, timeout=30)
        return Credentials(device_id, reply.token, platform_addr, reply.platform_ca_pem, reply.bundle_public_key.hex())

    event_name, _, raw = event.partition("=")
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError as e:
        _fail(f"--event: payload is not JSON: {e}")
    sandbox = _sandbox("native", allow_unconfined_tasks, workers=2) if event_name else None
    try:
        t0 = time.perf_counter()
        fleet = Fleet(n, platform_addr, base, profile_file=profile_file, seed=seed, sandbox=sandbox,
                      enroll=None if credentials_file else enroll, credentials_file=credentials_file,
                      workers=workers, channel=channel, progress=True)
    except (IdentityError, grpc.RpcError) as e:
        detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
        _fail(f"cannot set up the fleet: {detail}")
    console.print(f"{n} devices ready in {time.perf_counter() - t0:.1f}s (folders under {base})")

    def on_round(st):
        runs = fleet.emit_all(event_name, payload) if event_name else 0
        console.print(f"round: {st.synced}/{st.devices} synced, {st.installed} installs, {st.rejected} refused, "
                      f"{st.failed} failed, {st.elapsed_s:.2f}s" + (f", {runs} runs" if event_name else ""))
    try:
        fleet.run(duration, on_round=on_round)
        fleet.flush_all()
        fleet.print_summary(console)
    finally:
        fleet.close()
        channel.close()
        if sandbox is not None:
            sandbox.close()
        if not base_dir:
            import shutil
            shutil.rmtree(base, ignore_errors=True)  # our temporary folder
