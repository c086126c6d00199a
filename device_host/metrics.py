"""Prometheus metrics a device host can expose locally (`walle device run --metrics-port N`):

  walle_device_runs_total{task,status}        task runs on this device
  walle_device_run_seconds{task}              histogram of run durations
  walle_device_installed_tasks                tasks installed now
  walle_device_uptunnel_pending               records queued for the cloud
  walle_device_sync_ok                        1 while the last sync succeeded and the credential holds

Same text format and HTTP endpoint as the platform's (walle.platform.metrics)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class DeviceMetrics:
    def __init__(self, host, registry: CollectorRegistry | None = None):
        self.host = host
        self.registry = registry or CollectorRegistry()
        self.runs = Counter("walle_device_runs", "task runs on this device", ["task", "status"],
                            registry=self.registry)
        self.run_seconds = Histogram("walle_device_run_seconds", "task run durations", ["task"],
                                     buckets=RUN_BUCKETS, registry=self.registry)
        self.registry.register(self)
        previous = host.on_run

        def on_run(name, result) -> None:  # chained: the host keeps one observer
            self.runs.labels(name, result.status).inc()
            self.run_seconds.labels(name).observe(float(result.duration_s or 0.0))
            if previous is not None:
                previous(name, result)
        host.on_run = on_run

    def collect(self):
        installed = GaugeMetricFamily("walle_device_installed_tasks", "tasks installed now")
        installed.add_metric([], len(self.host.installed()))
        yield installed
        pending = GaugeMetricFamily("walle_device_uptunnel_pending", "records queued for the cloud")
        pending.add_metric([], self.host.up.pending())
        yield pending
        ok = GaugeMetricFamily("walle_device_sync_ok", "1 while the last sync succeeded and the credential holds")
        ok.add_metric([], 0 if (self.host.sync.last_error or self.host.sync.unauthenticated) else 1)
        yield ok

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
        return serve_registry(self.registry, port, host)


def serve_registry(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"
                   ) -> tuple[int, Callable[[], None]]:
    """Serve a registry's /metrics over HTTP from a background thread; returns (bound port, stop)."""
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return server.server_port, stop
