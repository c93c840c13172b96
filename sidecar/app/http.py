"""HTTP endpoints: ``/health``, ``/ready``, ``/metrics``. Read-only; bound to 127.0.0.1
by default. Everything is computed from the loop's own state (no I/O per request)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.app.health import health_report, process_report
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker


@dataclass(slots=True)
class DaemonView:
    """What the HTTP handlers may look at."""

    pipeline: Pipeline
    ticker: SecondTicker
    ready: bool = False


VIEW = web.AppKey("view", DaemonView)
REGISTRY = web.AppKey("registry", CollectorRegistry)


class _PipelineCollector(Collector):
    def __init__(self, view: DaemonView) -> None:
        self.view = view

    def collect(self):  # type: ignore[no-untyped-def]
        p, t = self.view.pipeline, self.view.ticker
        yield CounterMetricFamily("sidecar_cycles", "Cycles run", value=p.stats.cycles)
        yield CounterMetricFamily("sidecar_missed_ticks", "Ticks skipped by overrunning cycles",
                                  value=t.missed)
        yield GaugeMetricFamily("sidecar_cycle_seconds", "Duration of the last cycle",
                                value=p.stats.last_duration_ms / 1000)
        yield CounterMetricFamily("sidecar_bars_accepted", "Bars accepted by validation",
                                  value=p.validator.accepted)
        rejected = CounterMetricFamily("sidecar_bars_rejected", "Bars rejected, by reason",
                                       labels=["reason"])
        for reason, n in p.validator.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily("sidecar_sqlite_buffered_bars", "Bars waiting for the next flush",
                                value=p.store.buffered)
        yield CounterMetricFamily("sidecar_sqlite_flushed_bars", "Bars written to SQLite",
                                  value=p.store.flushed_rows)
        yield CounterMetricFamily("sidecar_sqlite_dropped_bars", "Bars dropped from a full buffer",
                                  value=p.store.dropped)
        yield GaugeMetricFamily("sidecar_redis_up", "1 if the last Redis write succeeded",
                                value=1 if p.stats.redis_ok else 0)
        errors = CounterMetricFamily("sidecar_source_errors", "Source errors", labels=["source"])
        for st in p.sources:
            errors.add_metric([st.name], st.errors)
        yield errors
        proc = process_report()
        yield GaugeMetricFamily("sidecar_asyncio_tasks", "asyncio tasks alive in the daemon",
                                value=proc["asyncio_tasks"])
        if proc["rss_bytes"] is not None:
            yield GaugeMetricFamily("sidecar_resident_memory_bytes", "Resident memory of the daemon",
                                    value=proc["rss_bytes"])
            yield GaugeMetricFamily("sidecar_open_fds", "Open file descriptors of the daemon",
                                    value=proc["open_fds"])


async def _health(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    report = health_report(view.pipeline, view.ticker, ready=view.ready)
    return web.json_response(report, status=503 if report["status"] == "down" else 200)


async def _ready(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    ok = view.ready and view.pipeline.stats.first_cycle_done
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(view: DaemonView) -> web.Application:
    app = web.Application()
    app[VIEW] = view
    registry = CollectorRegistry()
    registry.register(_PipelineCollector(view))
    app[REGISTRY] = registry
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_http(view: DaemonView, host: str, port: int) -> web.AppRunner:
    """Serve the endpoints; the daemon owns signals (``handle_signals=False``)."""
    runner = web.AppRunner(make_app(view), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
