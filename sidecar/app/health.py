"""The daemon's health, computed from state the loop already keeps (no I/O).

``status`` is ``down`` when the daemon is not collecting (no cycle for 5 s, or no
symbol whose market is open has a fresh bar), ``degraded`` when something is wrong
but bars still flow (a source's circuit is not closed or its last call failed, Redis
unreachable, SQLite failing, some symbols stale), else ``ok``. ``reasons`` says why.
A symbol whose market is closed (its calendar) is counted apart, never as stale.
Times are the daemon's clock (the recording's time while replaying at speed, when
``clock`` says so); whether cycles still come is judged by the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any

from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.parse_worker import ParseWorker

log = logging.getLogger("sidecar.health")

#: No cycle for this long means the daemon is not collecting.
NOT_COLLECTING_MS = 5_000
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_report() -> dict[str, Any]:
    """Resident memory, open file descriptors and asyncio tasks of this process (Linux
    ``/proc``; ``None`` where unavailable): what a soak watches for leaks."""
    try:
        with open("/proc/self/statm") as f:
            rss: int | None = int(f.read().split()[1]) * _PAGE
        fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        rss, fds = None, None
    return {
        "pid": os.getpid(),
        "rss_bytes": rss,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "open_fds": fds,
        "asyncio_tasks": len(asyncio.all_tasks()),
    }


def assess(pipeline: Pipeline, now_ms: int | None = None,
           parse_worker: ParseWorker | None = None) -> tuple[str, list[str]]:
    """``(status, reasons)`` — cheap enough to run after every cycle."""
    clock = pipeline.clock
    now_ms = int(clock() * 1000) if now_ms is None else now_ms
    stats = pipeline.stats
    stale_after = pipeline.stale_after_ms
    reasons: list[str] = []
    reasons.extend(pipeline.router.reasons())
    if parse_worker is not None and parse_worker.state not in ("alive", "closed"):
        reasons.append(f"parse worker {parse_worker.state}: answers parsed in the daemon "
                       f"(last error: {parse_worker.last_error})")
    if not stats.redis_ok:
        reasons.append(f"redis unreachable: {stats.redis_last_error}")
    if pipeline.store.last_error:
        reasons.append(f"sqlite: {pipeline.store.last_error}")
    total = len(pipeline.symbols)
    # A symbol whose market is closed is neither fresh nor stale: nothing new is due.
    trading = [st for st in pipeline.symbols.values() if st.market_open]
    fresh = sum(not st.stale(now_ms, stale_after) for st in trading)
    if fresh < len(trading):
        reasons.append(f"{len(trading) - fresh} of {total} symbols stale")
    idle_ms = (clock.wall() * 1000 - stats.last_wall_ms if clock.replaying
               else now_ms - stats.last_tick_ms)
    if not (stats.first_cycle_done and idle_ms < NOT_COLLECTING_MS):
        reasons.insert(0, f"not collecting: no cycle in the last {NOT_COLLECTING_MS // 1000} s")
        return "down", reasons
    if fresh == 0 and trading:
        reasons.insert(0, "no symbol has a fresh bar")
        return "down", reasons
    return ("degraded" if reasons else "ok"), reasons


class StatusLog:
    """Logs one line when the status changes (never per cycle)."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: str | None = None

    def observe(self, status: str, reasons: list[str]) -> bool:
        """Record ``status``; log and return True when it differs from the last one."""
        if status == self.status:
            return False
        level = logging.INFO if status == "ok" else logging.WARNING
        log.log(level, f"status {status}", extra={"status": status, "previous": self.status,
                                                   "reasons": reasons})
        self.status = status
        return True


def warmup_report(pipeline: Pipeline) -> dict[str, Any]:
    """Start-up warm-up (:meth:`~sidecar.app.history.History.status`)."""
    return pipeline.history.status()


def health_report(pipeline: Pipeline, ticker: SecondTicker, *, ready: bool,
                  parse_worker: ParseWorker | None = None) -> dict[str, Any]:
    """``/health`` JSON: status ok/degraded/down with the reasons behind it."""
    now_ms = int(pipeline.clock() * 1000)
    stats = pipeline.stats
    stale_after = pipeline.stale_after_ms
    status, reasons = assess(pipeline, now_ms, parse_worker)

    calendars, extended, completeness = pipeline.calendars, pipeline.extended, pipeline.completeness
    symbols: dict[str, Any] = {}
    for sym, st in pipeline.symbols.items():
        cal = calendars.get(sym)
        symbols[sym] = st.status(
            now_ms, stale_after, calendar=None if cal is None else cal.name,
            extended_hours=None if cal is None else "include" if sym in extended else "exclude",
            completeness=completeness.report(sym, now_ms))
    sources = pipeline.router.status()
    return {
        "status": status,
        "reasons": reasons,
        "ready": ready and stats.first_cycle_done,
        "now_ms": now_ms,
        "clock": pipeline.clock.status(),
        "timeframe": pipeline.tf.name,
        "timeframes": [tf.name for tf in pipeline.timeframes],
        "cycle": {
            **stats.status(),
            "missed_ticks": ticker.missed,
            "clock_jumps": ticker.clock_jumps,
            "last_lateness_ms": round(ticker.lateness_ms, 3),
        },
        "bars": pipeline.validator.status(),
        "redis": pipeline.writer.status(),
        "sqlite": pipeline.store.status(),
        "warmup": warmup_report(pipeline),
        "sources": sources,
        "parse_worker": ({"enabled": False} if parse_worker is None
                         else {"enabled": True, **parse_worker.status()}),
        "process": process_report(),
        "market": _market(pipeline, now_ms),
        "symbols": symbols,
    }


def _market(pipeline: Pipeline, now_ms: int) -> dict[str, Any]:
    """How many symbols trade now, how many wait for their market to open, how many are
    stale; per asset class, how many include extended hours and how many exclude them."""
    stale_after = pipeline.stale_after_ms
    states = pipeline.symbols.values()
    closed = sum(not st.market_open for st in states)
    by_class: dict[str, dict[str, int]] = {}
    for sym, asset in pipeline.asset_classes.items():
        choice = "include" if sym in pipeline.extended else "exclude"
        counts = by_class.setdefault(asset, {"include": 0, "exclude": 0})
        counts[choice] += 1
    return {
        "hours": pipeline.settings.market_hours,
        "open": len(pipeline.symbols) - closed,
        "closed": closed,
        "stale": sum(st.stale(now_ms, stale_after) for st in states),
        "extended_hours": by_class,
    }
