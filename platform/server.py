"""The platform's gRPC server: DeviceService and TunnelService for devices (device credential in the
metadata), AdminService for operators, and the standard grpc.health.v1 health service.

Every handler is a coroutine on one event loop. Blocking platform work (SQLite, git, blob reads) runs
in a bounded thread pool (the loop's default executor, via asyncio.to_thread); no pool thread ever
waits on the loop or on a client, so a client that cancels or vanishes mid-stream costs nothing once
its coroutine is cancelled. One interceptor translates errors for every service, and stop() is bounded."""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
import weakref
from concurrent import futures
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from walle.protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc

from .auth import bearer_token
from .errors import Unauthenticated, WalleError
from .service import Platform

log = logging.getLogger("walle.platform.server")
access_log = logging.getLogger("walle.platform.access")
CHUNK = 64 * 1024
MAX_MESSAGE = 32 * 1024 * 1024
ADMIN_PREFIX = "/walle.v1.AdminService/"

# The operator an admin call authenticated as, for its access-log line (set by the handler, read by
# the interceptor wrapping it: both run in the call's task, so they share this context).
_actor: contextvars.ContextVar[str] = contextvars.ContextVar("walle_actor", default="-")


# -- one error translation for every service ----------------------------------------------------------
class ErrorTranslation:
    """Known errors (WalleError) become their gRPC status with the same message and no traceback; any
    other exception is a bug: INTERNAL to the client (naming the method, not the internals) and a
    traceback in the log. Admin calls also get one access-log line: actor, method, outcome, time.

    A stand-in for the server that `register` functions add their services to: every handler is
    wrapped once, as it is registered (a server interceptor would run again for every call, a cost
    each GetActiveTasks and upload paid)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TranslatedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service, {m: _wrap(h, f"/{service}/{m}") if h is not None else h for m, h in handlers.items()})

    def __getattr__(self, name: str):
        return getattr(self._server, name)


class _TranslatedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails):
        handler = self._inner.service(details)
        if handler is None:
            return None
        key = (details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = _wrap(handler, details.method)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    name = method.rsplit("/", 1)[-1]
    admin = method.startswith(ADMIN_PREFIX)
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attr)
    if inspect.isasyncgenfunction(behavior):
        async def run(request, context):
            # Written with context.write so that a cancelled call closes the generator right here.
            stream = behavior(request, context)
            try:
                async for message in stream:
                    await context.write(message)
            finally:
                await stream.aclose()
    elif inspect.iscoroutinefunction(behavior):
        run = behavior
    else:  # a synchronous handler would run in (and could block) a pool thread: refused when called
        async def run(request, context):
            raise TypeError(f"{method}: handlers must be coroutines or async generators (got {behavior!r})")

    def done(t0: float, context, outcome: str, detail: str = "") -> None:
        # logged before the status goes out, so the line exists once the client has its answer
        if admin:
            tail = f" ({detail[:200]})" if detail else ""
            access_log.info("admin %s by %s from %s: %s in %.1f ms%s", name, _actor.get(), context.peer(), outcome,
                            (time.perf_counter() - t0) * 1000, tail)

    async def translated(request, context):
        t0 = time.perf_counter()
        try:
            result = await run(request, context)
        except WalleError as e:
            if not isinstance(e, Unauthenticated):
                log.debug("%s refused: %s: %s", method, e.grpc_code, e.message)
            done(t0, context, e.grpc_code, e.message)
            await context.abort(getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL), e.message)
        except asyncio.CancelledError:
            done(t0, context, "CANCELLED")
            raise
        except grpc.aio.AbortError:  # a handler aborted by itself
            code = context.code()
            done(t0, context, code.name if isinstance(code, grpc.StatusCode) else "ABORTED")
            raise
        except Exception as e:
            log.exception("%s failed (a bug): %s: %s", method, type(e).__name__, e)
            done(t0, context, "INTERNAL", f"{type(e).__name__}: {e}")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(e).__name__}")
        done(t0, context, "OK")
        return result

    return make(translated, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


async def blocking(fn: Callable, *args):
    """Run blocking platform work in the server's bounded pool; the loop stays free."""
    return await asyncio.to_thread(fn, *args)


def device_of(platform: Platform, context) -> str:
    """The calling device's id from its credential; raises Unauthenticated."""
    return platform.credentials.verify(bearer_token(context))


class RevisionWatcher:
    """One thread waits for the state revision to change and calls every `on_change` callback when
    it does, whoever changed it (this server, another replica, or the CLI on the data folder): pushed
    on PostgreSQL, polled on SQLite (see PlatformState.wait_revision). It also flushes devices'
    last-seen times every few seconds."""

    def __init__(self, platform: Platform, interval: float = 0.5):
        self.platform = platform
        self.interval = interval  # the longest wait: bounds how long stop() takes
        self.revision = platform.state.revision()
        self.on_change: list[Callable[[int], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="walle-revision-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set():
            try:
                rev = self.platform.state.wait_revision(self.revision, self.interval)
                if time.monotonic() - last_flush > 5:
                    self.platform.flush_seen()
                    last_flush = time.monotonic()
            except Exception:
                log.exception("revision poll failed")
                self._stop.wait(self.interval)
                continue
            if rev != self.revision:
                self.revision = rev
                for callback in list(self.on_change):
                    callback(rev)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


async def _send_blob(context, data: bytes, digest: str) -> None:
    for off in range(0, max(len(data), 1), CHUNK):
        first = off == 0
        await context.write(device_pb2.Chunk(data=data[off:off + CHUNK], total_size=len(data) if first else 0,
                                              digest=digest if first else ""))


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, platform: Platform, watcher: RevisionWatcher):
        self.platform = platform
        self.watcher = watcher
        self._changed: asyncio.Event | None = None

    async def GetActiveTasks(self, request: bytes, context) -> bytes:
        # The hot path, served on the loop without a thread hop: registered with no (de)serializers
        # (add_device_service), it takes the request's bytes and answers with a reply serialized
        # once per decision and revision.
        return self.platform.active_tasks_bytes(device_of(self.platform, context), request)

    async def FetchBundle(self, request, context):
        await blocking(self.platform.authorize_blob, device_of(self.platform, context), request.digest)
        await _send_blob(context, await blocking(self.platform.blob, request.digest), request.digest)

    def _wake(self) -> None:
        # on the loop: wake every waiting stream, then arm a fresh event for the next change
        event, self._changed = self._changed, asyncio.Event()
        if event is not None:
            event.set()

    async def WatchTasks(self, request, context):
        device_of(self.platform, context)
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
                    pass
            device_of(self.platform, context)  # or when its credential is revoked or expires
            if self.watcher.revision != seen:
                seen = self.watcher.revision
                yield device_pb2.ListChanged(revision=str(seen))


class _Handlers:
    """Collects what a generated add_*Servicer_to_server function registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def generated_handlers(add_servicer: Callable, servicer) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """(service name, method -> handler) as the generated `add_servicer` would register them, so a
    caller can swap a method's (de)serializers for pre-serialized bytes before registering."""
    got = _Handlers()
    add_servicer(servicer, got)
    return got.service, dict(got.handlers)


def register_handlers(server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_device_service(server: grpc.aio.Server, servicer: DeviceServicer) -> None:
    """DeviceService as generated, except GetActiveTasks takes and returns bytes: its replies are
    serialized once, not per request, and a memoised request is never parsed."""
    service, handlers = generated_handlers(device_pb2_grpc.add_DeviceServiceServicer_to_server, servicer)
    handlers["GetActiveTasks"] = grpc.unary_unary_rpc_method_handler(servicer.GetActiveTasks)
    register_handlers(server, service, handlers)


class TunnelServicer(tunnel_pb2_grpc.TunnelServiceServicer):
    def __init__(self, platform: Platform):
        self.platform = platform

    async def Upload(self, request_iterator, context):
        device_id = device_of(self.platform, context)
        accepted = dups = max_seq = 0
        async for batch in request_iterator:
            a, d, m = await blocking(self.platform.upload, device_id, batch)
            accepted, dups, max_seq = accepted + a, dups + d, max(max_seq, m)
        return tunnel_pb2.UploadAck(accepted=accepted, duplicates=dups, max_seq=max_seq)

    async def UploadBatch(self, request, context):
        a, d, m = await blocking(self.platform.upload, device_of(self.platform, context), request)
        return tunnel_pb2.UploadAck(accepted=a, duplicates=d, max_seq=m)

    async def GetResource(self, request, context):
        await blocking(self.platform.authorize_resource, device_of(self.platform, context))
        return await blocking(self.platform.resource, request.name, request.version)

    async def FetchResource(self, request, context):
        await blocking(self.platform.authorize_resource, device_of(self.platform, context))
        info = await blocking(self.platform.resource, request.name, request.version)
        await _send_blob(context, await blocking(self.platform.blob, info.digest), info.digest)


def _admin_servicer(platform: Platform, authorize: Callable | None):
    """An AdminService servicer whose every method delegates to the Platform method of that name."""
    class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
        pass

    for name in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name:
        def make(name=name):
            async def method(self, request, context):
                actor = authorize(context, name) if authorize else ""
                if actor:
                    _actor.set(actor)
                for field in ("actor", "author"):  # the authenticated operator, not what the client claims
                    if actor and field in request.DESCRIPTOR.fields_by_name:
                        setattr(request, field, actor)
                return await blocking(getattr(platform, name), request)
            method.__name__ = name
            return method
        setattr(AdminServicer, name, make())
    return AdminServicer()


def operator_authorizer(platform: Platform) -> Callable:
    """Admin RPCs need an operator credential; the operator's name becomes the audit actor."""
    def authorize(context, method: str) -> str:
        try:
            return platform.operators.verify(bearer_token(context))
        except Unauthenticated as e:
            raise Unauthenticated(f"{method}: {e.message}") from None
    return authorize


def tls_credentials(platform: Platform) -> grpc.ServerCredentials:
    keys = platform.keys
    return grpc.ssl_server_credentials([(keys.server_key_pem, keys.server_cert_pem)])


# -- the server ---------------------------------------------------------------------------------------
_running: "weakref.WeakSet[LoopServer]" = weakref.WeakSet()


def running_servers() -> list["LoopServer"]:
    """Servers started and not stopped yet (the test suite checks none is left behind)."""
    return [s for s in list(_running) if not s.stopped]


class LoopServer:
    """A grpc.aio server with its own event-loop thread and a bounded pool for blocking work.

    `register(server)` adds the servicers (coroutine handlers only); `on_start`/`on_stop` run on the
    loop. stop() never waits without a bound: grace for calls in flight, then every call is cancelled,
    then the loop and the pool shut down; it returns within about grace + 10 s whatever handlers do."""

    def __init__(self, register: Callable[[grpc.aio.Server], None], *, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8, credentials: grpc.ServerCredentials | None = None, reuseport: bool = False,
                 on_start: Callable[[], Awaitable[None]] | None = None,
                 on_stop: Callable[[], Awaitable[None]] | None = None, name: str = "walle",
                 interceptors: tuple = ()):
        self.address = f"{host}:{port}"
        self.stopped = False
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self.pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-rpc")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-grpc-loop", daemon=True)
        self._thread.start()

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(
                # interceptors (e.g. walle.platform.metrics) see the status the handlers' ErrorTranslation
                # settles on
                interceptors=list(interceptors),
                # SO_REUSEPORT only when several processes serve one port on purpose: otherwise a
                # stale server on the same port would silently take part of the traffic.
                options=[("grpc.so_reuseport", 1 if reuseport else 0),
                         ("grpc.max_receive_message_length", MAX_MESSAGE),
                         ("grpc.max_send_message_length", MAX_MESSAGE)])
            register(ErrorTranslation(server))
            try:
                bound = (server.add_secure_port(self.address, credentials) if credentials
                         else server.add_insecure_port(self.address))
            except RuntimeError:
                bound = 0
            if bound == 0:
                raise OSError(f"cannot listen on {self.address}: the address is in use or not available here")
            if on_start:
                await on_start()
            await server.start()
            return server, bound

        try:
            self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=60)
        except BaseException:
            self._close(0.0)
            raise
        self.address = f"{host}:{self.port}"
        _running.add(self)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _shutdown(self, grace: float) -> None:
        if self._on_stop:
            await self._on_stop()
        # stop accepting calls, let calls in flight finish for `grace`, then cancel them
        await self.server.stop(grace)
        # a handler that swallowed its cancellation is cancelled again; then async generators close
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await self.loop.shutdown_asyncgens()

    def stop(self, grace: float = 1.0) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(grace), self.loop).result(timeout=grace + 5)
        except futures.TimeoutError:
            log.warning("server %s: calls still running %.1f s after the grace period; stopping anyway",
                        self.address, 5.0)
        except Exception:
            log.exception("server %s: shutdown failed; stopping anyway", self.address)
        self._close(5.0)

    def _close(self, timeout: float) -> None:
        """Stop the loop, then the pool: queued work is dropped, running work gets `timeout` to end."""
        self.stopped = True
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # the loop has already closed
            pass
        self._thread.join(timeout=timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for t in list(getattr(self.pool, "_threads", ())):
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("server %s: %s still busy after stop", self.address, t.name)
        _running.discard(self)


def build_server(platform: Platform, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8,
                 extra: Callable[[grpc.aio.Server], None] | None = None, authorize_admin: Callable | None = None,
                 credentials: grpc.ServerCredentials | None = None, reuseport: bool = False,
                 interceptors: tuple = ()):
    """Create and start a server; returns (server, bound port, stop function). Pass
    `credentials=tls_credentials(platform)` for TLS and `authorize_admin=operator_authorizer(platform)`
    to require operator credentials on the admin API (`walle platform serve` does both). `extra`
    registers more services (coroutine handlers only, like the CoDA sample service)."""
    watcher = RevisionWatcher(platform)
    health_servicer = health.aio.HealthServicer()

    def register(server: grpc.aio.Server) -> None:
        add_device_service(server, DeviceServicer(platform, watcher))
        tunnel_pb2_grpc.add_TunnelServiceServicer_to_server(TunnelServicer(platform), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(_admin_servicer(platform, authorize_admin), server)
        if extra:
            extra(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    async def on_start() -> None:
        for svc in ("", "walle.v1.DeviceService", "walle.v1.TunnelService", "walle.v1.AdminService"):
            await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)

    async def on_stop() -> None:
        await health_servicer.enter_graceful_shutdown()

    try:
        server = LoopServer(register, host=host, port=port, max_workers=max_workers, credentials=credentials,
                            reuseport=reuseport, on_start=on_start, on_stop=on_stop, interceptors=interceptors)
    except BaseException:
        watcher.stop()
        raise

    def stop(grace: float = 1.0) -> None:
        server.stop(grace)
        watcher.stop()
        platform.flush_seen()

    return server.server, server.port, stop
