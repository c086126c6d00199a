"""Prometheus metrics for the platform server (the standard text format, scraped over HTTP):

  walle_rpc_requests_total{service,method,code}   every gRPC call, by its final status code
  walle_rpc_latency_seconds{service,method}       histogram of call durations (streams: until they end)
  walle_rpc_streams_open{service,method}          response streams open now (WatchTasks: devices watching)
  walle_devices_enrolled / walle_devices_seen{window="5m"|"1h"|"24h"}
  walle_release_{delivered_devices,ran_devices,runs,failed_runs,rejected_devices}{release,task,state}
  walle_release_guard_tripped{release}            1 once a release's guard tripped

RPCs are counted by a gRPC server interceptor (`interceptor()`, passed to build_server); `observe_rpc`
is the one function it calls, so another interceptor can report the same figures. Fleet and release
figures are read from the platform state at scrape time. Each PlatformMetrics has its own registry."""
from __future__ import annotations

import inspect
import time
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from walle.device_host.metrics import serve_registry

from .guards import guard_states

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SEEN_WINDOWS = {"5m": 300, "1h": 3600, "24h": 86400}
MAX_RELEASES = 200  # newest releases exported (label cardinality stays bounded)


def _split(method: str) -> tuple[str, str]:
    """"/walle.v1.DeviceService/GetActiveTasks" -> ("walle.v1.DeviceService", "GetActiveTasks")."""
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


def _code(context, exc: BaseException | None) -> str:
    try:
        code = context.code()
    except Exception:
        code = None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name if hasattr(code, "name") else str(code)
    if exc is None:
        return "OK"
    if isinstance(exc, grpc.RpcError) and exc.code() is not None:
        return exc.code().name
    return "CANCELLED" if type(exc).__name__ == "CancelledError" else "UNKNOWN"


class PlatformMetrics:
    def __init__(self, platform=None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("walle_rpc_requests", "gRPC calls by final status code",
                                ["service", "method", "code"], registry=self.registry)
        self.latency = Histogram("walle_rpc_latency_seconds", "gRPC call duration (streams: until they end)",
                                 ["service", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.streams = Gauge("walle_rpc_streams_open", "response streams open now",
                             ["service", "method"], registry=self.registry)
        if platform is not None:
            self.registry.register(_StateCollector(platform))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished call (`method` as gRPC names it: /package.Service/Method)."""
        service, name = _split(method)
        self.requests.labels(service, name, code).inc()
        self.latency.labels(service, name).observe(seconds)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
        """Serve /metrics over HTTP from a background thread; returns (bound port, stop)."""
        return serve_registry(self.registry, port, host)


class _Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: PlatformMetrics):
        self.m = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, field)
            if behavior is not None:
                return handler._replace(**{field: self._wrap(method, behavior, handler.response_streaming)})
        return handler

    def _wrap(self, method: str, behavior, streaming: bool):
        m = self.m
        # keep the handler's kind: coroutine / async generator run on the loop, the rest in the thread pool
        if inspect.isasyncgenfunction(behavior):
            async def wrapped(request, context):
                call = _Call(m, method, stream=True)
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as e:
                    call.exc = e
                    raise
                finally:
                    call.done(context)
        elif inspect.iscoroutinefunction(behavior):  # streams too, when they write with context.write
            async def wrapped(request, context):
                call = _Call(m, method, stream=streaming)
                try:
                    return await behavior(request, context)
                except BaseException as e:
                    call.exc = e
                    raise
                finally:
                    call.done(context)
        elif streaming:
            def wrapped(request, context):
                call = _Call(m, method, stream=True)
                try:
                    yield from behavior(request, context)
                except BaseException as e:
                    call.exc = e
                    raise
                finally:
                    call.done(context)
        else:
            def wrapped(request, context):
                call = _Call(m, method)
                try:
                    return behavior(request, context)
                except BaseException as e:
                    call.exc = e
                    raise
                finally:
                    call.done(context)
        return wrapped


class _Call:
    """One call being timed; streams count as open until they end."""

    def __init__(self, metrics: PlatformMetrics, method: str, stream: bool = False):
        self.m, self.method, self.stream, self.exc = metrics, method, stream, None
        self.t0 = time.perf_counter()
        if stream:
            metrics.streams.labels(*_split(method)).inc()

    def done(self, context) -> None:
        # counted before the stream closes: a scrape never sees it neither open nor finished
        self.m.observe_rpc(self.method, _code(context, self.exc), time.perf_counter() - self.t0)
        if self.stream:
            self.m.streams.labels(*_split(self.method)).dec()


class _StateCollector:
    """Fleet and release-health figures, read from the platform state at each scrape."""

    def __init__(self, platform):
        self.platform = platform

    def collect(self):
        p = self.platform
        p.flush_seen()
        db, now = p.state.db, int(time.time())
        enrolled = GaugeMetricFamily("walle_devices_enrolled", "enrolled devices, not revoked")
        enrolled.add_metric([], db.execute("SELECT COUNT(*) FROM devices WHERE revoked = 0").fetchone()[0])
        yield enrolled
        seen = GaugeMetricFamily("walle_devices_seen", "devices that polled within the window", labels=["window"])
        for label, seconds in SEEN_WINDOWS.items():
            seen.add_metric([label], db.execute("SELECT COUNT(*) FROM devices WHERE revoked = 0 AND last_seen >= ?",
                                                [now - seconds]).fetchone()[0])
        yield seen
        rows = p.state.releases()[:MAX_RELEASES]
        stats = p.state.release_stats_many([r["id"] for r in rows])
        families = {k: GaugeMetricFamily(f"walle_release_{name}", help_, labels=["release", "task", "state"])
                    for k, name, help_ in (
                        ("delivered", "delivered_devices", "devices that reported the version installed"),
                        ("ran", "ran_devices", "devices with at least one run"),
                        ("runs", "runs", "runs reported"),
                        ("failed", "failed_runs", "runs whose status is not ok"),
                        ("rejected", "rejected_devices", "devices that refused the install"))}
        for r in rows:
            for key, fam in families.items():
                fam.add_metric([r["id"], r["task"], r["state"]], stats[r["id"]][key])
        yield from families.values()
        tripped = GaugeMetricFamily("walle_release_guard_tripped", "1 once the release's guard tripped",
                                    labels=["release"])
        for rid, status in guard_states(p.state).items():
            tripped.add_metric([rid], 1 if status == "tripped" else 0)
        yield tripped
