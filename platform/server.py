"""The platform's gRPC server: DeviceService and TunnelService for devices (device credential in the
metadata), AdminService for operators, and the standard grpc.health.v1 health service."""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import traceback
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from walle.protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

from .auth import bearer_token
from .errors import WalleError
from .service import Platform

log = logging.getLogger("walle.platform.server")
CHUNK = 64 * 1024
MAX_MESSAGE = 32 * 1024 * 1024


def _status(err: WalleError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.grpc_code)


def rpc(method: Callable) -> Callable:
    """Turn platform errors into gRPC statuses with the same message; log anything unexpected."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except WalleError as e:
            context.abort(_status(e), e.message)
        except grpc.RpcError:
            raise
        except Exception as e:  # a bug: say so without leaking internals
            if type(e).__name__ == "_AbortError" or context.code() is not None:
                raise
            log.error("%s failed:\n%s", method.__name__, traceback.format_exc())
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {type(e).__name__}")
    return wrapper


def stream_rpc(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except WalleError as e:
            context.abort(_status(e), e.message)
    return wrapper


class RevisionWatcher:
    """One thread polls the state revision and calls every `on_change` callback when it changes,
    whoever changed it (this server, another process, or the CLI on the data folder); it also
    flushes devices' last-seen times every few seconds."""

    def __init__(self, platform: Platform, interval: float = 0.2):
        self.platform = platform
        self.interval = interval
        self.revision = platform.state.revision()
        self.on_change: list[Callable[[int], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="walle-revision-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                rev = self.platform.state.revision()
                if time.monotonic() - last_flush > 5:
                    self.platform.flush_seen()
                    last_flush = time.monotonic()
            except Exception:
                log.exception("revision poll failed")
                continue
            if rev != self.revision:
                self.revision = rev
                for callback in list(self.on_change):
                    callback(rev)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, platform: Platform, watcher: RevisionWatcher):
        self.platform = platform
        self.watcher = watcher
        self._changed: asyncio.Event | None = None

    async def _device(self, context) -> str:
        try:
            return self.platform.credentials.verify(bearer_token(context))
        except WalleError as e:
            await context.abort(_status(e), e.message)

    async def GetActiveTasks(self, request, context):
        # The hot path, served on the event loop: no thread hop per poll (the sync server's
        # per-call cost dominated; our own work here is a few microseconds, memoised per revision).
        device_id = await self._device(context)
        try:
            return self.platform.active_tasks(device_id, request)
        except WalleError as e:
            await context.abort(_status(e), e.message)

    @stream_rpc
    def FetchBundle(self, request, context):
        self.platform.credentials.authenticate(context)
        data = self.platform.blob(request.digest)
        for off in range(0, max(len(data), 1), CHUNK):
            first = off == 0
            yield device_pb2.Chunk(data=data[off:off + CHUNK], total_size=len(data) if first else 0,
                                   digest=request.digest if first else "")

    def _wake(self) -> None:
        # on the loop: wake every waiting stream, then arm a fresh event for the next change
        event, self._changed = self._changed, asyncio.Event()
        if event is not None:
            event.set()

    async def WatchTasks(self, request, context):
        await self._device(context)
        if self._changed is None:
            self._changed = asyncio.Event()
            loop = asyncio.get_running_loop()
            self.watcher.on_change.append(lambda _rev: loop.call_soon_threadsafe(self._wake))
        seen = self.watcher.revision
        yield device_pb2.ListChanged(revision=str(seen))  # tells the device the stream is live
        while True:  # ends when the device disconnects (the coroutine is cancelled)
            event = self._changed
            if self.watcher.revision == seen:
                try:
                    await asyncio.wait_for(event.wait(), timeout=15)
                except asyncio.TimeoutError:
                    continue
            if self.watcher.revision != seen:
                seen = self.watcher.revision
                yield device_pb2.ListChanged(revision=str(seen))


class TunnelServicer(tunnel_pb2_grpc.TunnelServiceServicer):
    def __init__(self, platform: Platform):
        self.platform = platform

    @rpc
    def Upload(self, request_iterator, context):
        device_id = self.platform.credentials.authenticate(context)
        accepted = dups = max_seq = 0
        for batch in request_iterator:
            a, d, m = self.platform.upload(device_id, batch)
            accepted, dups, max_seq = accepted + a, dups + d, max(max_seq, m)
        return tunnel_pb2.UploadAck(accepted=accepted, duplicates=dups, max_seq=max_seq)

    @rpc
    def GetResource(self, request, context):
        self.platform.credentials.authenticate(context)
        return self.platform.resource(request.name, request.version)

    @stream_rpc
    def FetchResource(self, request, context):
        self.platform.credentials.authenticate(context)
        info = self.platform.resource(request.name, request.version)
        data = self.platform.blob(info.digest)
        for off in range(0, max(len(data), 1), CHUNK):
            first = off == 0
            yield device_pb2.Chunk(data=data[off:off + CHUNK], total_size=len(data) if first else 0,
                                   digest=info.digest if first else "")


def _admin_servicer(platform: Platform, authorize: Callable | None):
    """An AdminService servicer whose every method delegates to the Platform method of that name."""
    class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
        pass

    for name in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name:
        def make(name=name):
            def method(self, request, context):
                actor = authorize(context, name) if authorize else ""
                for field in ("actor", "author"):  # the authenticated operator, not what the client claims
                    if actor and field in request.DESCRIPTOR.fields_by_name:
                        setattr(request, field, actor)
                return getattr(platform, name)(request)
            method.__name__ = name
            return rpc(method)
        setattr(AdminServicer, name, make())
    return AdminServicer()


def operator_authorizer(platform: Platform) -> Callable:
    """Admin RPCs need an operator credential; the operator's name becomes the audit actor."""
    def authorize(context: grpc.ServicerContext, method: str) -> str:
        try:
            return platform.operators.verify(bearer_token(context))
        except WalleError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {e.message}")
    return authorize


def tls_credentials(platform: Platform) -> grpc.ServerCredentials:
    keys = platform.keys
    return grpc.ssl_server_credentials([(keys.server_key_pem, keys.server_cert_pem)])


def build_server(platform: Platform, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8,
                 extra: Callable[[grpc.Server], None] | None = None, authorize_admin: Callable | None = None,
                 credentials: grpc.ServerCredentials | None = None, reuseport: bool = False,
                 interceptors: tuple = ()):
    """Create and start a server; returns (server, bound port, stop function). Pass
    `credentials=tls_credentials(platform)` for TLS and `authorize_admin=operator_authorizer(platform)`
    to require operator credentials on the admin API (`walle platform serve` does both)."""
    # A grpc.aio server: GetActiveTasks is a coroutine on the loop; every other handler is plain
    # synchronous code run in the migration thread pool.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="walle-grpc-loop", daemon=True)
    loop_thread.start()
    watcher = RevisionWatcher(platform)
    health_servicer = health.HealthServicer()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="walle-rpc"),
            # SO_REUSEPORT only when several processes serve one port on purpose: otherwise a
            # stale server on the same port would silently take part of the traffic.
            options=[("grpc.so_reuseport", 1 if reuseport else 0),
                     ("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE)],
            interceptors=list(interceptors))  # e.g. walle.platform.metrics: calls counted per RPC
        device_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(platform, watcher), server)
        tunnel_pb2_grpc.add_TunnelServiceServicer_to_server(TunnelServicer(platform), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(_admin_servicer(platform, authorize_admin), server)
        if extra:
            extra(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for svc in ("", "walle.v1.DeviceService", "walle.v1.TunnelService", "walle.v1.AdminService"):
            health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {address} (port in use?)")
        await server.start()
        return server, bound

    try:
        server, bound = asyncio.run_coroutine_threadsafe(start(), loop).result()
    except BaseException:
        watcher.stop()
        loop.call_soon_threadsafe(loop.stop)
        raise

    def stop(grace: float = 1.0) -> None:
        health_servicer.enter_graceful_shutdown()
        watcher.stop()
        asyncio.run_coroutine_threadsafe(server.stop(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
        platform.flush_seen()

    return server, bound, stop
