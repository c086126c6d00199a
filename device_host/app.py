"""The app interface of a device host (paper 4.4.3): how the app on the device talks to the running host.

- `emit(name, payload)`: an app event (page view, exposure, click, any event a trigger names). It is
  appended to the device's app event log (`app_events.sqlite3`, read by tasks granted the "events" API
  with `events.read`, so no event is lost when queued runs coalesce) and queues the tasks it triggers.
- `ask(event, payload, task="")`: run a task now with that event and return its result (e.g. a
  `page_view:home` asks coda_infer to rank the page's candidates), within a deadline.

Three ways in, one behaviour:
- `AppServer`: gRPC (protos/app.proto) on the Unix domain socket `<data>/app/app.sock`. The folder is
  mode 0700 and the socket 0600, both owned by the host's user; a folder that others can write is
  refused (anyone could replace the socket).
- `AppClient(data_dir)`: the client of that socket (`walle device emit|ask`); it checks the socket's
  owner and mode before connecting, so it never talks to an impostor.
- `Device`: an app that hosts the device in-process (`Device(data_dir, platform=...).start()`, then
  `emit()` / `ask()` directly, no socket needed).
"""
from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import stat
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from walle.protos import app_pb2, app_pb2_grpc
from walle.protos.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable,
                                 WalleError, from_status)

SOCKET_DIR = "app"
SOCKET_NAME = "app.sock"
MAX_SOCKET_PATH = 107          # sun_path is 108 bytes with the terminating NUL
MAX_PAYLOAD_BYTES = 1 << 20
LOG_KEEP = 100_000             # the app event log keeps this many newest events
READ_LIMIT = 10_000


def socket_path(data_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(data_dir) / SOCKET_DIR / SOCKET_NAME


def _parse_payload(text: str, what: str) -> Any:
    if len(text) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"{what} payload is {len(text)} bytes; at most {MAX_PAYLOAD_BYTES}")
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{what} payload is not JSON: {e}") from None


def _check_owned(path: pathlib.Path, forbidden: int, rule: str) -> None:
    """`path` is owned by this user and has none of the `forbidden` mode bits (`rule` says why)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionDenied(f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})")
    if st.st_mode & forbidden:
        raise PermissionDenied(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; {rule}")


def _check_private_dir(path: pathlib.Path) -> None:
    _check_owned(path, 0o077, "the app socket folder must be accessible by its owner only (0700)")


def _check_data_dir(path: pathlib.Path) -> None:
    # others could replace the socket folder in a data folder they can write
    _check_owned(path, 0o022, "the data folder is writable by group or others: make it owner-writable only (chmod go-w)")


# -- the app event log ----------------------------------------------------------------------------
class AppEventLog:
    """The app's events in order, durable (SQLite WAL): tasks read behaviour from here by number."""

    def __init__(self, path: str | os.PathLike, keep: int = LOG_KEEP):
        self.keep = keep
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "ts_ms INTEGER NOT NULL, name TEXT NOT NULL, payload TEXT NOT NULL)")

    def append(self, name: str, payload: Any) -> int:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        with self._lock:
            cur = self._db.execute("INSERT INTO events (ts_ms, name, payload) VALUES (?, ?, ?)",
                                   (int(time.time() * 1000), name, text))
            seq = int(cur.lastrowid)
            if seq % 1000 == 0:  # trim now and then, not on every append
                self._db.execute("DELETE FROM events WHERE seq <= ?", (seq - self.keep,))
            return seq

    def read(self, after: int = 0, names: list[str] | None = None, limit: int = 1000) -> list[dict]:
        """Events with seq > after, oldest first; only `names` when given."""
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise InvalidArgument(f"after must be an event number >= 0, got {after!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= READ_LIMIT:
            raise InvalidArgument(f"limit must be an int in [1, {READ_LIMIT}], got {limit!r}")
        sql, params = "SELECT seq, ts_ms, name, payload FROM events WHERE seq > ?", [after]
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise InvalidArgument("names must be a list of event names")
            sql += f" AND name IN ({', '.join('?' for _ in names)})" if names else " AND 0"
            params += names
        sql += " ORDER BY seq LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, params + [limit]).fetchall()
        return [{"seq": s, "ts_ms": t, "name": n, "payload": json.loads(p)} for s, t, n, p in rows]

    def last_seq(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(value or 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def event_ops(log: AppEventLog):
    """Host-API ops for tasks granted the "events" API, beside events.emit."""

    def read(after: int = 0, names: list | None = None, limit: int = 1000) -> list[dict]:
        return log.read(after, names, limit)

    return {"events.read": read}


# -- emit and ask on a host -----------------------------------------------------------------------
def emit(host, name: str, payload: Any = None) -> tuple[list[str], int]:
    """Log an app event and queue the tasks it triggers: (task names, event number)."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidArgument(f"event name must be 1..64 characters, got {name!r}")
    payload = {} if payload is None else payload
    seq = host.app_log.append(name, payload)
    return host.emit(name, payload), seq


def ask(host, event: str, payload: Any = None, task: str = "", timeout_s: float = 0.0):
    """Run `task` (or the one installed task `event` triggers) now with the event; returns
    (task name, version, RunResult)."""
    if not isinstance(event, str) or not event or len(event) > 64:
        raise InvalidArgument(f"event name must be 1..64 characters, got {event!r}")
    if timeout_s < 0:
        raise InvalidArgument(f"timeout must be >= 0 seconds, got {timeout_s}")
    if not task:
        tasks = host.triggers.tasks_for_event(event)
        if not tasks:
            raise NotFound(f"no installed task is triggered by {event!r} (installed: "
                           f"{', '.join(sorted(host.installed())) or 'none'}); name one with task=")
        if len(tasks) > 1:
            raise FailedPrecondition(f"{event!r} triggers {len(tasks)} tasks ({', '.join(tasks)}); name one with task=")
        task = tasks[0]
    installed = host.store.get(task)
    if installed is None:
        raise NotFound(f"task {task!r} is not installed on device {host.device_id!r}")
    ev = {"name": event, "payload": {} if payload is None else payload, "ts_ms": int(time.time() * 1000)}
    result, events = host._run(task, ev, f"ask:{event}", wall_seconds=timeout_s or None)
    for name, payload in events:  # what the task emitted triggers the next tasks, as after a triggered run
        host.emit(name, payload)
    return task, installed.version, result


def answer(host, event: str, payload: Any = None, task: str = "", timeout_s: float = 0.0) -> Any:
    """`ask` for an app: the task's result; raises FailedPrecondition with the task's error when the run failed."""
    name, _version, result = ask(host, event, payload, task, timeout_s)
    if result.status != "ok":
        raise FailedPrecondition(f"{name} {result.status}: {(result.error or '').strip()[-500:]}")
    return result.value


def _reply(task: str, version: str, result) -> app_pb2.AskReply:
    reply = app_pb2.AskReply(task=task, version=version, status=result.status, error=result.error or "",
                             duration_s=float(result.duration_s or 0.0))
    if result.status == "ok":
        reply.result_json = json.dumps(result.value, separators=(",", ":"), default=str)
    return reply


# -- the socket server ----------------------------------------------------------------------------
class _Servicer(app_pb2_grpc.AppServiceServicer):
    def __init__(self, host):
        self.host = host

    def _abort(self, context, err: WalleError):
        context.abort(getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL), err.message)

    def Emit(self, request, context):
        try:
            tasks, seq = emit(self.host, request.name, _parse_payload(request.payload_json, "emit"))
        except WalleError as e:
            self._abort(context, e)
        return app_pb2.EmitReply(tasks=tasks, seq=seq)

    def Ask(self, request, context):
        timeout = request.timeout_s
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e6:  # the caller's gRPC deadline bounds the run too
            timeout = min(timeout, remaining) if timeout else remaining
        try:
            task, version, result = ask(self.host, request.event, _parse_payload(request.payload_json, "ask"),
                                        request.task, max(timeout, 0.0))
        except WalleError as e:
            self._abort(context, e)
        return _reply(task, version, result)


class AppServer:
    """Serves a host's app interface on <data>/app/app.sock until `stop()`."""

    def __init__(self, host, workers: int = 4):
        self.host = host
        data = pathlib.Path(host.data_dir)
        _check_data_dir(data)
        folder = data / SOCKET_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        _check_private_dir(folder)
        self.path = folder / SOCKET_NAME
        if len(str(self.path)) > MAX_SOCKET_PATH:
            raise InvalidArgument(f"app socket path {self.path} is {len(str(self.path))} characters; Unix sockets "
                                  f"allow {MAX_SOCKET_PATH}: use a shorter --data-dir")
        self.path.unlink(missing_ok=True)  # a stale socket of an earlier run
        self.server = grpc.server(futures.ThreadPoolExecutor(workers, thread_name_prefix="walle-app"))
        app_pb2_grpc.add_AppServiceServicer_to_server(_Servicer(host), self.server)
        self.server.add_insecure_port(f"unix:{self.path}")
        self.server.start()
        os.chmod(self.path, 0o600)

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait(grace + 1)
        self.path.unlink(missing_ok=True)


class AppClient:
    """The app's side of the socket (or a person's, through `walle device emit|ask`)."""

    def __init__(self, data_dir: str | os.PathLike, timeout: float = 30.0):
        self.path = socket_path(data_dir)
        if not self.path.exists():
            raise Unavailable(f"no app socket at {self.path}: is `walle device run --data-dir "
                              f"{pathlib.Path(data_dir)}` running?")
        _check_private_dir(self.path.parent)
        st = self.path.stat()
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionDenied(f"{self.path} is not a socket owned by this user with mode 0600")
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix:{self.path}")
        self.stub = app_pb2_grpc.AppServiceStub(self.channel)

    def _call(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _error_from_rpc(e) from None

    def emit(self, name: str, payload: Any = None) -> app_pb2.EmitReply:
        return self._call(self.stub.Emit, app_pb2.EmitRequest(name=name, payload_json=json.dumps(payload or {})),
                          self.timeout)

    def ask(self, event: str, payload: Any = None, task: str = "", timeout: float = 0.0) -> app_pb2.AskReply:
        req = app_pb2.AskRequest(event=event, payload_json=json.dumps(payload or {}), task=task, timeout_s=timeout)
        return self._call(self.stub.Ask, req, (timeout or self.timeout) + 5.0)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AppClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_from_rpc(e: grpc.RpcError) -> WalleError:
    code = e.code().name if e.code() else "UNKNOWN"
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Unavailable(f"device host did not answer: {code}: {e.details()}")
    return from_status(code, e.details() or "")


# -- the embeddable device -------------------------------------------------------------------------
class Device:
    """A device host inside the app's own process::

        dev = Device("/data/walle", platform="cloud.example:50051", attrs={"user_id": "u1"})
        dev.start()                                   # first sync, then background sync and triggers
        dev.emit("click", {"item_id": 42})
        page = dev.ask("page_view:home", {"candidates": [...]})   # -> the task's result (a dict)
        dev.close()

    `serve_socket=True` also serves the socket so other processes (or `walle device emit`) can talk to it.
    """

    def __init__(self, data_dir: str | os.PathLike, platform: str = "", *, attrs: dict | None = None,
                 sandbox: Any = None, serve_socket: bool = False, **host_kwargs: Any):
        from .host import DeviceHost
        self._own_sandbox = sandbox is None
        if sandbox is None:
            from .sandbox import Sandbox
            sandbox = Sandbox()
        self.sandbox = sandbox
        self.host = DeviceHost(data_dir, platform, attrs=attrs, sandbox=sandbox, **host_kwargs)
        self.serve_socket = serve_socket
        self.server: AppServer | None = None

    def start(self, watch: bool = True) -> None:
        self.host.sync_now()  # triggers are known before the app emits anything
        self.host.start(watch=watch)
        if self.serve_socket:
            self.server = AppServer(self.host)

    def emit(self, name: str, payload: Any = None) -> list[str]:
        return emit(self.host, name, payload)[0]

    def ask(self, event: str, payload: Any = None, task: str = "", timeout: float = 0.0) -> Any:
        """The task's result; raises FailedPrecondition with the task's error when the run failed."""
        return answer(self.host, event, payload, task, timeout)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.host.stop(flush_timeout=2)
        self.host.close()
        if self._own_sandbox:
            self.sandbox.close()
