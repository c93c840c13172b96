"""The daemon's health, computed from state the loop already keeps (no I/O)."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from typing import Any

from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


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


def health_report(pipeline: Pipeline, ticker: SecondTicker, *, ready: bool) -> dict[str, Any]:
    """``/health`` JSON: status ok/degraded/down with the reasons behind it."""
    now_ms = int(time.time() * 1000)
    stats = pipeline.stats
    reasons: list[str] = []
    stale_after = pipeline.settings.stale_after_ms

    symbols: dict[str, Any] = {}
    fresh = 0
    for sym, st in pipeline.symbols.items():
        bar = st.forming or st.last
        age = None if st.updated_ms is None else now_ms - st.updated_ms
        is_fresh = not st.stale(now_ms, stale_after)
        fresh += is_fresh
        symbols[sym] = {
            "newest_bar_t": bar.t if bar else None,
            "newest_bar_age_ms": None if bar is None else now_ms - bar.t,
            "updated_age_ms": age,
            "last_price": bar.c if bar else None,
            "src": bar.src if bar else None,
            "stale": not is_fresh,
            "via": st.via,
            "refresh_interval_ms": st.expect_ms,
        }

    sources: dict[str, Any] = {}
    for state in pipeline.sources:
        failing = state.last_error_ms is not None and (
            state.last_success_ms is None or state.last_error_ms > state.last_success_ms
        )
        info: dict[str, Any] = {
            "circuit": "closed",
            "last_success_ms": state.last_success_ms,
            "last_error_class": state.last_error_class,
            "last_error_ms": state.last_error_ms,
            "errors": state.errors,
            "requests": state.requests,
            "synthetic": state.source.synthetic,
        }
        info.update(state.status())
        sources[state.name] = info
        if info["circuit"] != "closed" or failing:
            reasons.append(f"source {state.name}: {info['circuit']}, {state.last_error_class}")

    collecting = stats.first_cycle_done and now_ms - stats.last_tick_ms < 5_000
    if not stats.redis_ok:
        reasons.append(f"redis unreachable: {stats.redis_last_error}")
    if pipeline.store.last_error:
        reasons.append(f"sqlite: {pipeline.store.last_error}")
    stale = len(symbols) - fresh
    if stale:
        reasons.append(f"{stale} of {len(symbols)} symbols stale")
    if not collecting:
        status = "down"
        reasons.insert(0, "not collecting: no cycle in the last 5 s")
    elif fresh == 0:
        status = "down"
    elif reasons:
        status = "degraded"
    else:
        status = "ok"

    durations = list(stats.durations_ms)
    validator = pipeline.validator
    return {
        "status": status,
        "reasons": reasons,
        "ready": ready,
        "now_ms": now_ms,
        "timeframe": pipeline.tf.name,
        "cycle": {
            "count": stats.cycles,
            "last_tick_ms": stats.last_tick_ms,
            "last_ms": round(stats.last_duration_ms, 3),
            "p50_ms": None if not durations else round(statistics.median(durations), 3),
            "p99_ms": _pct(durations, 0.99),
            "missed_ticks": ticker.missed,
            "clock_jumps": ticker.clock_jumps,
            "last_lateness_ms": round(ticker.lateness_ms, 3),
        },
        "bars": {
            "accepted": validator.accepted,
            "duplicates": validator.duplicates,
            "held_outliers": validator.held,
            "rejected": dict(validator.rejected),
            "gaps": sum(len(g) for g in validator.gaps.values()),
        },
        "redis": {"ok": stats.redis_ok, "last_error": stats.redis_last_error},
        "sqlite": {
            "buffered": pipeline.store.buffered,
            "flushed_rows": pipeline.store.flushed_rows,
            "dropped": pipeline.store.dropped,
            "last_flush_ms": pipeline.store.last_flush_ms,
            "last_error": pipeline.store.last_error,
        },
        "sources": sources,
        "process": process_report(),
        "symbols": symbols,
    }
