"""`walle platform ...`: create the platform's keys, serve its APIs."""
from __future__ import annotations

import functools
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading

import click

from walle.protos.clikit import WalleGroup, json_option

from ..errors import FailedPrecondition, InvalidArgument
from .context import Ctx, console, data_dir_option, emit, err_console, pass_ctx


@click.group("platform", cls=WalleGroup)
def platform_group():
    """Run the cloud platform."""


@platform_group.command("init")
@data_dir_option
@click.option("--host", "hosts", multiple=True, help="Name or address the server certificate is for (repeatable; "
              "default: localhost, 127.0.0.1, ::1 and this machine's name).")
@click.option("--operator", default="admin", show_default=True, help="Name of the first operator.")
@click.option("--force", is_flag=True, help="Replace existing keys (enrolled devices must enroll again).")
@json_option
@pass_ctx
def platform_init(obj: Ctx, hosts, operator, force):
    """Create the platform's CA, server certificate, bundle-signing key and a first operator token."""
    from .. import pki
    from ..service import Platform
    data_dir = obj.init_data_dir
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
@data_dir_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0 = any free port). A port in use exits with code 5.")
@click.option("--workers", default=8, show_default=True, type=int,
              help="Threads for the synchronous handlers (polls and watch streams are async; more threads only contend for the GIL).")
@click.option("--insecure", "serve_insecure", is_flag=True,
              help="Serve plaintext gRPC and unsigned bundles (debugging only; devices cannot trust it).")
@click.option("--coda/--no-coda", default=True, show_default=True,
              help="Also serve the CoDA behaviour upload and sample-query service (catalog: `walle cloud catalog load`).")
@click.option("--coda-day-seconds", type=float, default=0, metavar="N",
              help="Close the CoDA work-cycle day every N seconds (compressed days); 0: days are closed by `walle cloud pipeline`.")
@click.option("--coda-kv", envvar="WALLE_CODA_KV", default="", metavar="URL",
              help="CoDA mapping store: redis://host:port/db for replicas sharing no disk (default: SQLite in the data folder).")
@click.option("--coda-raw-log", envvar="WALLE_CODA_RAW_LOG", default="", metavar="URL",
              help="CoDA raw behaviour log: postgresql://... (default: the state's PostgreSQL if any, else SQLite in the data folder).")
@click.option("--dashboard-port", type=click.IntRange(0, 65535), default=None, help="Also serve the read-only web dashboard on this port.")
@click.option("--blob-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve bundles and resources over HTTPS by digest on this port (resumable, cacheable).")
@click.option("--blob-url", default="", metavar="URL",
              help="Tell devices to download blobs from URL<sha256/hex> (a CDN in front of `platform export-blobs`).")
@click.option("--blob-public", is_flag=True,
              help="Serve blobs on --blob-port without a device credential (signed content, readable by anyone).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes sharing the port (SO_REUSEPORT); Python gRPC is CPU-bound per process.")
@click.option("--metrics-port", type=int, default=None,
              help="Expose Prometheus metrics (RPCs, latencies, watch streams, devices, release health) over HTTP "
                   "on this port (same --host).")
@click.option("--reuseport", is_flag=True, hidden=True, help="Internal: a worker process of --processes.")
@click.option("--blob-url-credential", is_flag=True, hidden=True,
              help="Internal: --blob-url is the first process's access-checked blob server.")
@pass_ctx
def platform_serve(obj: Ctx, host, port, workers, serve_insecure, coda, coda_day_seconds, coda_kv, coda_raw_log,
                   dashboard_port, blob_port,
                   blob_url, blob_public, metrics_port, processes, reuseport, blob_url_credential):
    """Serve the device, tunnel and admin gRPC APIs (TLS, operator-authenticated admin, health checking)."""
    from .. import pki
    from ..server import build_server, operator_authorizer, tls_credentials
    from ..service import Platform
    logging.getLogger("walle").setLevel(min(logging.getLogger().level, logging.INFO))
    data_dir = obj.data_dir
    insecure = serve_insecure or obj.insecure
    keys = None
    if insecure and not reuseport:
        err_console.print("[bold red]WARNING: --insecure: plaintext gRPC and UNSIGNED bundles. Anyone on the "
                          "network can read device traffic; devices that pinned keys will refuse these bundles."
                          "[/bold red]")
    else:
        keys = pki.load(data_dir)
    platform = Platform(data_dir, keys=keys)
    platform.blob_url_base, platform.blob_url_credential = blob_url, blob_url_credential
    if not platform.operators.any() and not reuseport:
        err_console.print("[yellow]no operator exists yet: admin calls will be refused; run "
                          "`walle platform init` (or `walle operator create`)[/yellow]")
    extra = None
    stop_clock = None
    if coda:
        from ..coda.cloud import KV_ENV, RAW_LOG_ENV, CodaCloud
        os.environ.update({k: v for k, v in ((KV_ENV, coda_kv), (RAW_LOG_ENV, coda_raw_log)) if v})  # for --processes
        coda_cloud = CodaCloud(platform, kv_url=coda_kv, raw_url=coda_raw_log)
        extra = coda_cloud.add_services
        if coda_day_seconds > 0 and not reuseport:
            stop_clock = coda_cloud.start_clock(coda_day_seconds)
    if processes > 1 and port == 0:
        raise InvalidArgument("--processes needs a fixed --port: the worker processes must share it")
    if processes > 1 and metrics_port is not None:
        raise InvalidArgument("--metrics-port counts one process's calls; use it with --processes 1")
    metrics = None
    if metrics_port is not None:
        from ..metrics import PlatformMetrics
        metrics = PlatformMetrics(platform)
    try:
        _server, bound, stop = build_server(platform, host=host, port=port, max_workers=workers, extra=extra,
                                            authorize_admin=operator_authorizer(platform),
                                            credentials=None if insecure else tls_credentials(platform),
                                            reuseport=processes > 1 or reuseport,
                                            interceptors=(metrics.interceptor(),) if metrics else ())
    except OSError as e:
        if stop_clock:
            stop_clock()
        raise FailedPrecondition(f"{e}; is another server running? choose another --port") from None
    children: list = []
    stop_dashboard = stop_metrics = stop_blobs = None
    # the dashboard and blob servers use the platform certificate
    pki_dir = pathlib.Path(data_dir) / "pki"
    tls = {} if insecure else {"certfile": str(pki_dir / "server.pem"), "keyfile": str(pki_dir / "server-key.pem")}
    try:
        if metrics is not None:
            try:
                mport, stop_metrics = metrics.serve(metrics_port, host)
            except OSError as e:
                raise FailedPrecondition(f"metrics port {metrics_port}: {e}; choose another --metrics-port") from None
            err_console.print(f"metrics on http://{host}:{mport}/metrics")
        if blob_port is not None and not reuseport:
            from ..blobs_http import start_blob_server
            try:
                _bport, stop_blobs = start_blob_server(platform, host=host, port=blob_port, public=blob_public,
                                                       url_base=blob_url, **tls)
            except OSError as e:
                raise FailedPrecondition(f"{e}; choose another --blob-port") from None
            err_console.print(f"blobs on {platform.blob_url_base}sha256/<hex>"
                              + (" (public)" if blob_public else " (device credential required)"))
        if processes > 1:
            args = [sys.executable, "-m", "walle.platform.cli", "--data-dir", str(data_dir), "platform", "serve",
                    "--host", host, "--port", str(bound), "--workers", str(workers), "--reuseport",
                    "--coda" if coda else "--no-coda", "--blob-url", platform.blob_url_base] + (["--insecure"] if insecure else []) \
                + (["--blob-url-credential"] if platform.blob_url_credential else [])
            children = [subprocess.Popen(args) for _ in range(processes - 1)]
        if not reuseport:
            err_console.print(f"walle platform serving on {host}:{bound} ({'PLAINTEXT' if insecure else 'TLS'}; "
                              f"{processes} process{'es' if processes > 1 else ''}; data: {platform.data_dir})")
        if dashboard_port is not None:
            from ..dashboard import start_dashboard
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
        if stop_blobs:
            stop_blobs()
        if stop_metrics:
            stop_metrics()
        if stop_clock:
            stop_clock()
        stop(2.0)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@platform_group.command("export-blobs")
@data_dir_option
@click.argument("folder", type=click.Path(file_okay=False))
@json_option
@pass_ctx
def platform_export_blobs(obj: Ctx, folder):
    """Write released bundles and published resources to FOLDER/sha256/<hex> for a static server or CDN
    (that content becomes public; announce it with `platform serve --blob-url`)."""
    from ..blobs_http import export_blobs
    from ..service import Platform
    written = export_blobs(Platform(obj.data_dir), folder)
    emit(obj, {"folder": str(folder), "written": written},
         lambda d: console.print(f"{d['written']} new blob(s) written to {d['folder']}/sha256/", highlight=False))


def register(main: click.Group) -> None:
    main.add_command(platform_group)
