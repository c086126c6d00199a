"""The operator's read-only release dashboard: a small HTTP server (Starlette on uvicorn) that runs
in a background thread next to the gRPC server and serves one static page plus a JSON API.

The page (platform/dashboard_static/) polls `/api/overview` every 1.5 s, so a rollout can be
watched as it grows. Every API call needs the same operator credential as the admin API
(`Authorization: Bearer <operator token>`); the token is never accepted in a URL. Nothing here
writes release or task state: the only write is `Platform.flush_seen()`, which persists the
last-seen times the gRPC server already holds in memory so the fleet view is current.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from walle.protos import admin_pb2
from walle.protos.clikit import to_jsonable

from .auth import OperatorCredentials
from .errors import InvalidArgument, NotFound, Unauthenticated, WalleError
from .guards import guard_states
from .httpserve import serve_in_thread
from .releases import release_to_proto
from .service import Platform, to_dict

# resolve(): the strict editable install links each .py file, the page lives beside the source.
STATIC_DIR = pathlib.Path(__file__).resolve().parent / "dashboard_static"
FLEET_WINDOW_S = 24 * 3600  # "the fleet" = devices seen within the last day
MAX_RELEASES = 200          # newest first; each release costs a few aggregate queries per poll
MAX_DEVICES = 500           # device list rows (filter to find others)
RUNS_SHOWN = 8              # runs per list in the release drill-down

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503}

# No inline script or style anywhere: the page loads dashboard.js and dashboard.css as files.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class TokenVerifier(Protocol):
    def verify(self, token: str) -> str: ...


class _SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- read-only queries -------------------------------------------------------------------------------

def fleet(platform: Platform, now: int | None = None) -> dict[str, Any]:
    """Devices seen within FLEET_WINDOW_S (not revoked), counted by app version and by installed task
    version. A device's installed version of a task is its latest `installed` delivery report."""
    now = int(time.time()) if now is None else now
    since = now - FLEET_WINDOW_S
    counts = platform.state.fleet_counts(since)
    by_app, by_task, enrolled = counts["by_app_version"], counts["by_task"], counts["enrolled"]
    seen = sum(r["devices"] for r in by_app)
    return {"window_s": FLEET_WINDOW_S, "seen": seen, "enrolled": enrolled, "by_app_version": by_app,
            "by_task_version": by_task}


def overview(platform: Platform) -> dict[str, Any]:
    """Everything the page shows at once: tasks, releases with health figures and guards, fleet counts."""
    platform.flush_seen()  # last-seen times live in memory until flushed; the fleet view needs them
    tasks = [_task(t) for t in platform.ListTasks(admin_pb2.Empty()).tasks]
    rows = platform.state.releases()
    stats = platform.state.release_stats_many([r["id"] for r in rows[:MAX_RELEASES]])
    guards = guard_states(platform.state)
    releases = [dict(_release(release_to_proto(r, stats[r["id"]])), guard=guards.get(r["id"], ""))
                for r in rows[:MAX_RELEASES]]
    return {"server_time": time.time(), "tasks": tasks, "releases": releases, "releases_total": len(rows),
            "fleet": fleet(platform)}


def release_detail(platform: Platform, release_id: str) -> dict[str, Any]:
    """One release: convergence, top errors, guard, its latest failed runs and latest runs with logs."""
    ref = admin_pb2.ReleaseRef(id=release_id)
    health = to_jsonable(platform.GetReleaseHealth(ref))
    try:
        guard = to_jsonable(platform.GetReleaseGuard(ref))
    except NotFound:
        guard = None
    failed = platform.GetLogs(admin_pb2.LogRequest(release_id=release_id, status="failed", limit=RUNS_SHOWN))
    runs = platform.GetLogs(admin_pb2.LogRequest(release_id=release_id, limit=RUNS_SHOWN))
    return {"health": health, "guard": guard, "failed_runs": to_jsonable(failed)["entries"],
            "runs": to_jsonable(runs)["entries"]}


def devices(platform: Platform, query: str = "") -> dict[str, Any]:
    """Enrolled devices (newest seen first), with their failed-run counts; `query` filters by id or user."""
    platform.flush_seen()
    failed = platform.state.failed_runs_by_device()
    out = []
    for d in sorted(platform.ListDevices(admin_pb2.Empty()).devices, key=lambda d: -d.last_seen):
        user = json.loads(d.attrs_json or "{}").get("user_id", "")
        if query and query not in d.device_id and query not in user:
            continue
        out.append({"device_id": d.device_id, "user_id": user, "app_version": d.app_version,
                    "last_seen": d.last_seen, "revoked": d.revoked, "failed_runs": failed.get(d.device_id, 0)})
    return {"devices": out[:MAX_DEVICES], "total": len(out)}


def _task(tv: admin_pb2.TaskVersion) -> dict[str, Any]:
    return {"name": tv.name, "version": tv.version, "message": tv.message, "author": tv.author,
            "created_at": tv.created_at, "bundle_size": tv.bundle_size, "description": tv.manifest.description}


def _release(pb: admin_pb2.Release) -> dict[str, Any]:
    d = to_dict(pb)
    # MessageToDict drops zero/empty fields; the page wants every column present.
    for f in ("rule", "note", "channel", "created_by", "created_at", "rollout"):
        d.setdefault(f, 0 if f in ("created_at", "rollout") else "")
    d["created_at"] = int(d["created_at"])
    d["stats"] = {f.name: getattr(pb.stats, f.name) for f in admin_pb2.ReleaseStats.DESCRIPTOR.fields}
    d.pop("salt", None)  # the rollout salt is not the operator's concern and need not leave the server
    return d


# -- the HTTP app ------------------------------------------------------------------------------------

def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(platform: Platform, operators: TokenVerifier | None = None) -> Starlette:
    """The dashboard's ASGI app (exposed for embedding; start_dashboard serves it)."""
    if not (STATIC_DIR / "index.html").is_file():
        raise FileNotFoundError(f"dashboard page missing: {STATIC_DIR / 'index.html'}")
    if operators is None:
        operators = getattr(platform, "operators", None) or OperatorCredentials(platform.state)

    def api(handler: Callable[[Request], Any]) -> Callable[[Request], Response]:
        # Sync endpoints run in Starlette's thread pool; PlatformState keeps one SQLite connection per thread.
        def endpoint(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            try:
                operator = operators.verify(token)
                body = handler(request)
            except Unauthenticated as e:
                return JSONResponse({"error": e.message}, status_code=401,
                                    headers={"www-authenticate": 'Bearer realm="walle"'})
            except WalleError as e:
                return _error(HTTP_STATUS.get(e.grpc_code, 500), e.message)
            body["operator"] = operator
            return JSONResponse(body)
        return endpoint

    def get_overview(request: Request) -> dict:
        return overview(platform)

    def get_history(request: Request) -> dict:
        name = request.path_params["name"]
        return {"task": name, "versions": [_task(t) for t in
                                           platform.GetTaskHistory(admin_pb2.TaskRef(name=name)).versions]}

    def get_diff(request: Request) -> dict:
        name = request.path_params["name"]
        v1, v2 = request.query_params.get("v1", ""), request.query_params.get("v2", "")
        if not v1 or not v2:
            raise InvalidArgument("diff needs both query parameters v1 and v2 (task versions or unique prefixes)")
        reply = platform.DiffTask(admin_pb2.DiffRequest(name=name, v1=v1, v2=v2))
        return {"task": name, "v1": v1, "v2": v2, "unified_diff": reply.unified_diff}

    def get_release(request: Request) -> dict:
        return release_detail(platform, request.path_params["id"])

    def get_devices(request: Request) -> dict:
        return devices(platform, request.query_params.get("q", "").strip())

    def get_device(request: Request) -> dict:
        return to_jsonable(platform.GetDevice(admin_pb2.DeviceRef(device_id=request.path_params["id"])))

    def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no such page: {request.url.path}")

    routes = [
        Route("/", index),
        Route("/api/overview", api(get_overview)),
        Route("/api/tasks/{name}/history", api(get_history)),
        Route("/api/tasks/{name}/diff", api(get_diff)),
        Route("/api/releases/{id}", api(get_release)),
        Route("/api/devices", api(get_devices)),
        Route("/api/devices/{id}", api(get_device)),
        Mount("/static", StaticFiles(directory=STATIC_DIR)),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.add_middleware(_SecurityHeaders)
    return app


def start_dashboard(platform: Platform, host: str = "127.0.0.1", port: int = 0,
                    operators: TokenVerifier | None = None, *, certfile: str | os.PathLike | None = None,
                    keyfile: str | os.PathLike | None = None) -> tuple[int, Callable[[], None]]:
    """Serve the dashboard from a background thread; returns (bound port, stop function).

    With `certfile` and `keyfile` (PEM; e.g. the platform's pki/server.pem and pki/server-key.pem) it
    serves HTTPS, so operator tokens never cross the network in clear text; without, plain HTTP,
    which is only safe on 127.0.0.1 or behind a TLS-terminating proxy."""
    return serve_in_thread(build_app(platform, operators), host, port, certfile=certfile, keyfile=keyfile,
                           name="dashboard")
