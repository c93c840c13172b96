"""HTTP endpoints: ``/`` (status page), ``/health``, ``/ready``, ``/metrics``, and the
read API ``/v1/...`` (:mod:`sidecar.app.api`).

Read-only (GET only, nothing changes state); bound to 127.0.0.1 by default. Beyond
loopback every endpoint but ``/health`` and ``/ready`` asks for the bearer token
(``SIDECAR_HTTP_TOKEN``). ``/health``, ``/ready`` and ``/metrics`` are computed from
the loop's own state (no Redis or provider calls per request); ``/metrics`` is built
from the same report as ``/health``, so they never disagree. Labels range over the
configured sources and symbols only.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.app.api import ReadApi, add_api_routes
from sidecar.app.health import health_report
from sidecar.app.pipeline import CYCLE_BUCKETS_MS, Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.breaker import STATES
from sidecar.logs import redact
from sidecar.parse_worker import ParseWorker

STATUS_PAGE = Path(__file__).with_name("status.html")
STATUSES = ("ok", "degraded", "down")
#: ``asset_class`` label of a breaker that guards every class of its source.
ALL_CLASSES = "all"
#: What a load balancer or supervisor probes: answered without the token.
OPEN_PATHS = frozenset({"/health", "/ready"})
#: Request handler options: a request line long enough for 5,000 symbols in a query.
SERVER_ARGS: dict[str, Any] = {"max_line_size": 131_072}


@dataclass(slots=True)
class DaemonView:
    """What the HTTP handlers may look at."""

    pipeline: Pipeline
    ticker: SecondTicker
    ready: bool = False
    parse_worker: ParseWorker | None = None


VIEW = web.AppKey("view", DaemonView)
REGISTRY = web.AppKey("registry", CollectorRegistry)


def _ms_to_s(ms: float | None) -> float:
    return float("nan") if ms is None else ms / 1000


class _PipelineCollector(Collector):
    """Prometheus view of :func:`health_report` plus the cycle-duration histogram."""

    def __init__(self, view: DaemonView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view
        p = view.pipeline
        r = health_report(p, view.ticker, ready=view.ready, parse_worker=view.parse_worker)
        cycle, bars, sqlite = r["cycle"], r["bars"], r["sqlite"]

        status = GaugeMetricFamily("sidecar_status", "1 for the current status (ok, degraded, down)",
                                   labels=["status"])
        for name in STATUSES:
            status.add_metric([name], 1.0 if r["status"] == name else 0.0)
        yield status
        yield GaugeMetricFamily("sidecar_ready", "1 once history is loaded and a cycle ran",
                                value=1.0 if r["ready"] else 0.0)

        yield CounterMetricFamily("sidecar_cycles", "Cycles run", value=cycle["count"])
        yield CounterMetricFamily("sidecar_missed_ticks", "Ticks skipped by overrunning cycles",
                                  value=cycle["missed_ticks"])
        yield GaugeMetricFamily("sidecar_cycle_seconds", "Duration of the last cycle",
                                value=cycle["last_ms"] / 1000)
        window = p.stats.durations_ms.maxlen
        for q in ("p50", "p99"):
            yield GaugeMetricFamily(f"sidecar_cycle_{q}_seconds",
                                    f"{q} of the cycle duration over the last {window} cycles",
                                    value=_ms_to_s(cycle[f"{q}_ms"]))
        stats = p.stats
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*CYCLE_BUCKETS_MS, float("inf")), stats.duration_buckets, strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound / 1000), running))
        yield HistogramMetricFamily("sidecar_cycle_duration_seconds", "Cycle durations",
                                    buckets=buckets, sum_value=stats.duration_sum_ms / 1000)

        yield CounterMetricFamily("sidecar_bars_accepted", "Bars accepted by validation",
                                  value=bars["accepted"])
        yield CounterMetricFamily("sidecar_bars_duplicate", "Identical re-deliveries (not stored)",
                                  value=bars["duplicates"])
        yield GaugeMetricFamily("sidecar_bars_held_outliers", "Outliers held for confirmation",
                                value=bars["held_outliers"])
        rejected = CounterMetricFamily("sidecar_bars_rejected", "Bars rejected, by reason",
                                       labels=["reason"])
        for reason, n in sorted(bars["rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("sidecar_gaps", "Gaps recorded", value=bars["gaps"])

        yield GaugeMetricFamily("sidecar_sqlite_buffered_bars", "Bars waiting for the next flush",
                                value=sqlite["buffered"])
        yield CounterMetricFamily("sidecar_sqlite_flushed_bars", "Bars written to SQLite",
                                  value=sqlite["flushed_rows"])
        yield CounterMetricFamily("sidecar_sqlite_dropped_bars", "Bars dropped from a full buffer",
                                  value=sqlite["dropped"])
        yield GaugeMetricFamily("sidecar_sqlite_last_flush_timestamp_seconds",
                                "When the last flush finished (epoch s)",
                                value=_ms_to_s(sqlite["last_flush_ms"]))
        yield GaugeMetricFamily("sidecar_sqlite_up", "1 unless the last SQLite flush failed",
                                value=0.0 if sqlite["last_error"] else 1.0)
        redis = r["redis"]
        yield GaugeMetricFamily("sidecar_redis_up", "1 if the last Redis write succeeded",
                                value=1.0 if redis["ok"] else 0.0)
        yield GaugeMetricFamily("sidecar_redis_backlog_bars",
                                "Bars waiting for Redis (kept while writes fail)", value=redis["backlog"])
        yield GaugeMetricFamily("sidecar_redis_refill_pending",
                                "1 while Redis lacks bars SQLite has and a refill from SQLite is due",
                                value=1.0 if redis["refill_pending"] else 0.0)
        proc = r["process"]
        yield GaugeMetricFamily("sidecar_asyncio_tasks", "asyncio tasks alive in the daemon",
                                value=proc["asyncio_tasks"])
        if proc["rss_bytes"] is not None:
            yield GaugeMetricFamily("sidecar_resident_memory_bytes", "Resident memory of the daemon",
                                    value=proc["rss_bytes"])
            yield GaugeMetricFamily("sidecar_open_fds", "Open file descriptors of the daemon",
                                    value=proc["open_fds"])

        warmup = r["warmup"]
        symbols = GaugeMetricFamily("sidecar_warmup_symbols",
                                    "Symbols by warm-up state (live, warming, waiting)", labels=["state"])
        for state in ("live", "warming", "waiting"):
            symbols.add_metric([state], warmup[state])
        yield symbols
        yield GaugeMetricFamily("sidecar_warmup_done", "1 once every symbol's handles are open",
                                value=1.0 if warmup["done"] else 0.0)
        yield CounterMetricFamily("sidecar_warmup_history_bars", "History bars fetched at start-up",
                                  value=warmup["history_bars"])
        yield from self._parse_worker(r["parse_worker"])
        yield from self._sources(r["sources"])
        yield from self._circuits(b for info in r["sources"].values() for b in info.get("breakers", ()))
        yield from self._symbols(r["symbols"])
        yield from _completeness(r["symbols"])

    @staticmethod
    def _sources(sources: dict[str, Any]) -> Iterator[Metric]:
        circuit = GaugeMetricFamily("sidecar_source_circuit", "1 for the circuit's current state",
                                    labels=["source", "state"])
        requests = CounterMetricFamily("sidecar_source_requests", "Requests to a source",
                                       labels=["source"])
        errors = CounterMetricFamily("sidecar_source_errors", "Source errors", labels=["source"])
        success = GaugeMetricFamily("sidecar_source_last_success_timestamp_seconds",
                                    "Last call that returned bars (epoch s)", labels=["source"])
        budget = GaugeMetricFamily("sidecar_source_budget_remaining",
                                   "Requests the rate budget allows now", labels=["source"])
        budget_day = GaugeMetricFamily("sidecar_source_budget_remaining_today",
                                       "Requests left in the daily allowance", labels=["source"])
        for name, info in sources.items():
            for state in STATES:
                circuit.add_metric([name, state], 1.0 if info["circuit"] == state else 0.0)
            requests.add_metric([name], info["requests"])
            errors.add_metric([name], info["errors"])
            success.add_metric([name], _ms_to_s(info["last_success_ms"]))
            if info.get("budget_left") is not None:
                budget.add_metric([name], info["budget_left"])
            if info.get("budget_left_today") is not None:
                budget_day.add_metric([name], info["budget_left_today"])
        yield from (circuit, requests, errors, success, budget, budget_day)

    @staticmethod
    def _parse_worker(info: dict[str, Any]) -> Iterator[Metric]:
        """The parse worker (docs/configuration.md, SIDECAR_PARSE_PROCESS), when it runs."""
        if not info["enabled"]:
            return
        yield GaugeMetricFamily("sidecar_parse_worker_up", "1 while the parse worker process runs",
                                value=1.0 if info["alive"] else 0.0)
        yield CounterMetricFamily("sidecar_parse_worker_restarts", "Parse worker restarts",
                                  value=info["restarts"])
        yield CounterMetricFamily("sidecar_parse_worker_jobs", "Answers parsed by the parse worker",
                                  value=info["jobs"])
        yield CounterMetricFamily("sidecar_parse_worker_fallbacks",
                                  "Answers parsed in the daemon because the worker could not",
                                  value=info["fallbacks"])
        yield GaugeMetricFamily("sidecar_parse_worker_in_flight", "Jobs the parse worker holds now",
                                value=info["in_flight"])
        if info["cpu_s"] is not None:
            yield CounterMetricFamily("sidecar_parse_worker_cpu_seconds",
                                      "CPU time of the parse worker process", value=info["cpu_s"])

    @staticmethod
    def _circuits(breakers: Iterable[dict[str, Any]]) -> Iterator[Metric]:
        """Each breaker's state (one per source, or per source and asset class) and openings."""
        labels = ["source", "asset_class"]
        state = GaugeMetricFamily("sidecar_circuit_state", "1 for the circuit breaker's current state",
                                  labels=[*labels, "state"])
        opens = CounterMetricFamily("sidecar_circuit_opens", "Times the circuit breaker opened",
                                    labels=labels)
        success = GaugeMetricFamily("sidecar_circuit_last_success_timestamp_seconds",
                                    "Last call through the breaker that got an answer (epoch s)",
                                    labels=labels)
        for b in breakers:
            key = [b["source"], b["asset_class"] or ALL_CLASSES]
            for name in STATES:
                state.add_metric([*key, name], 1.0 if b["state"] == name else 0.0)
            opens.add_metric(key, b["opens"])
            success.add_metric(key, _ms_to_s(b["last_success_ms"]))
        yield from (state, opens, success)

    @staticmethod
    def _symbols(symbols: dict[str, Any]) -> Iterator[Metric]:
        age = GaugeMetricFamily("sidecar_symbol_bar_age_seconds",
                                "Age of the newest bar's open time", labels=["symbol"])
        updated = GaugeMetricFamily("sidecar_symbol_updated_age_seconds",
                                    "Time since a source last answered for the symbol", labels=["symbol"])
        stale = GaugeMetricFamily("sidecar_symbol_stale", "1 if the symbol is stale", labels=["symbol"])
        price = GaugeMetricFamily("sidecar_symbol_last_price", "Close of the newest bar",
                                  labels=["symbol"])
        tf_age = GaugeMetricFamily("sidecar_series_bar_age_seconds",
                                   "Age of the newest bar's open time, per timeframe",
                                   labels=["symbol", "tf"])
        tf_price = GaugeMetricFamily("sidecar_series_last_price", "Close of the newest bar, per timeframe",
                                     labels=["symbol", "tf"])
        tf_forming = GaugeMetricFamily("sidecar_series_forming", "1 if the newest bar is forming",
                                       labels=["symbol", "tf"])
        for sym, info in symbols.items():
            age.add_metric([sym], _ms_to_s(info["newest_bar_age_ms"]))
            updated.add_metric([sym], _ms_to_s(info["updated_age_ms"]))
            stale.add_metric([sym], 1.0 if info["stale"] else 0.0)
            price.add_metric([sym], float("nan") if info["last_price"] is None else info["last_price"])
            for tf, series in info.get("timeframes", {}).items():
                tf_age.add_metric([sym, tf], _ms_to_s(series["newest_bar_age_ms"]))
                tf_price.add_metric([sym, tf], float("nan") if series["last_price"] is None
                                    else series["last_price"])
                tf_forming.add_metric([sym, tf], 1.0 if series["forming"] else 0.0)
        yield from (age, updated, stale, price, tf_age, tf_price, tf_forming)


#: ``sidecar_completeness_symbols_below{threshold}``: the shares counted below.
COMPLETENESS_THRESHOLDS = (0.5, 0.9, 0.99)
#: Upper bounds of the ``sidecar_completeness_ratio`` histogram buckets.
COMPLETENESS_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


def _completeness(symbols: dict[str, Any]) -> Iterator[Metric]:
    """Completeness per timeframe, summed over symbols (per-symbol gauges would be 5,000
    series a timeframe): how many symbols are below each threshold, in the current and
    the previous session; a histogram of the current session's shares; synthetic and
    late bars of the current session."""
    below = GaugeMetricFamily("sidecar_completeness_symbols_below",
                              "Symbols whose share of expected bars received is below threshold",
                              labels=["tf", "session", "threshold"])
    synthetic = GaugeMetricFamily("sidecar_completeness_synthetic_bars",
                                  "Synthetic (gap-filled) bars in the current session, all symbols",
                                  labels=["tf"])
    late = GaugeMetricFamily("sidecar_completeness_late_bars",
                             "Bars that closed late in the current session, all symbols", labels=["tf"])
    shares: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, list[int]] = {}
    for info in symbols.values():
        for tf, series in info.get("timeframes", {}).items():
            c = series.get("completeness")
            if c is None:
                continue
            per = shares.setdefault(tf, {"session": [], "previous": []})
            for session in ("session", "previous"):
                if c[session] is not None:
                    per[session].append(c[session])
            n = counts.setdefault(tf, [0, 0])
            n[0] += c["synthetic"]
            n[1] += c["late"]
    ratio = HistogramMetricFamily("sidecar_completeness_ratio",
                                  "Share of expected bars received in the current session, over symbols",
                                  labels=["tf"])
    for tf, per in shares.items():
        for session, label in (("session", "current"), ("previous", "previous")):
            for bound in COMPLETENESS_THRESHOLDS:
                below.add_metric([tf, label, repr(bound)], sum(x < bound for x in per[session]))
        current = per["session"]
        buckets = [(repr(b), float(sum(x <= b for x in current))) for b in COMPLETENESS_BUCKETS]
        ratio.add_metric([tf], [*buckets, ("+Inf", float(len(current)))], sum(current))
        synthetic.add_metric([tf], counts[tf][0])
        late.add_metric([tf], counts[tf][1])
    yield from (below, ratio, synthetic, late)


def _json(data: Any, status: int = 200) -> web.Response:
    # Error texts can quote provider URLs: redact before anything leaves the process.
    return web.Response(text=redact(json.dumps(data)), status=status, content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    report = health_report(view.pipeline, view.ticker, ready=view.ready,
                           parse_worker=view.parse_worker)
    return _json(report, status=503 if report["status"] == "down" else 200)


async def _ready(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    ok = view.ready and view.pipeline.stats.first_cycle_done
    return _json({"ready": ok}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = redact(generate_latest(request.app[REGISTRY]).decode())
    return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status_page(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def metrics_registry(view: DaemonView) -> CollectorRegistry:
    """What ``/metrics`` serves: the daemon's own metrics (``sidecar_*``) and the standard
    process (``process_*``), platform (``python_info``) and GC (``python_gc_*``) collectors."""
    registry = CollectorRegistry()
    registry.register(_PipelineCollector(view))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def bearer_auth(token: str) -> Middleware:
    """401 for any path but :data:`OPEN_PATHS` without ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                return web.Response(text=json.dumps({"error": "missing or wrong bearer token"}),
                                    status=401, content_type="application/json",
                                    headers={"WWW-Authenticate": 'Bearer realm="sidecar"'})
        return await handler(request)

    return auth


def make_app(view: DaemonView, api: ReadApi | None = None, *, token: str | None = None) -> web.Application:
    """The daemon's endpoints; ``/v1/...`` with ``api``; ``token``: required as a bearer token."""
    app = web.Application(middlewares=[bearer_auth(token)] if token is not None else [])
    app[VIEW] = view
    app[REGISTRY] = metrics_registry(view)
    app.router.add_get("/", _status_page)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    if api is not None:
        add_api_routes(app, api)
    return app


async def start_http(view: DaemonView, host: str, port: int, api: ReadApi | None = None, *,
                     token: str | None = None) -> web.AppRunner:
    """Serve the endpoints; the daemon owns signals (``handle_signals=False``)."""
    runner = web.AppRunner(make_app(view, api, token=token), handle_signals=False, access_log=None,
                           shutdown_timeout=5.0, **SERVER_ARGS)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
