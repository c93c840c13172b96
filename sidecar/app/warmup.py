"""Start-up warm-up, in the background while the 1-second cycles already run.

:meth:`Pipeline.begin_warmup` (in line, one read of every symbol's newest stored
bars) puts each symbol in warm-up: it is served from its first bar with its
features flagged ``warming``. :func:`warm_up` then, concurrently:

- fetches the warm window (``SIDECAR_WARM_BARS``, within ``SIDECAR_BOOTSTRAP_DAYS``)
  of the symbols with nothing stored, a bounded number of symbols at a time, each
  request within its source's range limits and budget (:func:`backfill_symbol`
  waits for a budget rather than giving up);
- opens each symbol's handles on the warm window (:meth:`Pipeline.warm_symbol`: the
  stores reconciled, then the window laid under the bars the cycles applied meanwhile),
  after which its features equal TA-Lib batch on that window and are no longer
  flagged.

History written after the cycles began never goes through the validator, so it
records no gap; the history is fetched up to the time of the request, so it meets
the first live bars. The rest of ``SIDECAR_BOOTSTRAP_DAYS`` follows, one symbol
at a time, once every symbol is warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sidecar.app.bootstrap import DAY_MS, backfill_symbol
from sidecar.app.pipeline import Pipeline
from sidecar.redis_store import RedisStore
from sidecar.sources import Source
from sidecar.sqlite_store import BarStore

log = logging.getLogger("sidecar.warmup")

#: Symbols whose warm window is being fetched at once (each source's budget bounds it further).
FETCH_CONCURRENCY = 16
#: Symbols whose stores are reconciled and handles opened at once.
STORE_CONCURRENCY = 4
#: A budget refusal waits this long before the range goes to the next source.
BUDGET_WAIT_S = 120.0


async def warm_up(pipeline: Pipeline, sources: list[Source], store: BarStore,
                  redis_store: RedisStore, cold: list[str], *,
                  stopping: Callable[[], bool] = lambda: False,
                  clock: Callable[[], float] = time.time) -> None:
    """Warm every symbol of ``pipeline`` (``cold``: those with nothing stored), then
    backfill the rest of the bootstrap days of the cold ones."""
    s = pipeline.settings
    progress = pipeline.warmup
    cold_set = set(cold)
    fetch_gate = asyncio.Semaphore(FETCH_CONCURRENCY)
    store_gate = asyncio.Semaphore(STORE_CONCURRENCY)
    started = time.perf_counter()
    if cold:
        log.warning("bootstrap needed: symbols without stored bars",
                    extra={"symbols": len(cold), "days": s.bootstrap_days})

    async def one(sym: str) -> None:
        try:
            if sym in cold_set:
                async with fetch_gate:
                    now_ms = int(clock() * 1000)
                    grid = pipeline.grids[sym]
                    end = grid.floor(now_ms)  # closed bars: up to the one forming now
                    start = max(end - max(s.warm_bars, 1) * grid.ms, end - s.bootstrap_days * DAY_MS)
                    result = await backfill_symbol(sym, grid, sources, store, start_ms=start, end_ms=end,
                                                   now_ms=now_ms, redis_store=redis_store,
                                                   redis_keep=s.bars_cap, budget_wait_s=BUDGET_WAIT_S)
                    progress.history_bars += result.bars
                    progress.history_requests += result.requests
                    log.info("bootstrap warm-up window", extra=result.as_dict())
            async with store_gate:
                await pipeline.warm_symbol(sym)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The cycles' rebuild takes over (from the stores, after the next cycle).
            progress.failed += 1
            log.error("warm-up failed", extra={"symbol": sym, "error": str(exc)})
            pipeline.history_changed(sym)
            pipeline.symbols[sym].rebuilding = None

    await asyncio.gather(*(one(sym) for sym in pipeline.symbols))
    progress.finished_ms = int(clock() * 1000)
    log.info("warm-up finished", extra={
        "symbols": len(pipeline.symbols), "cold": len(cold), "history_bars": progress.history_bars,
        "failed": progress.failed, "seconds": round(time.perf_counter() - started, 3)})
    if cold:
        await _rest_of_bootstrap(pipeline, sources, store, cold, stopping, clock)


async def _rest_of_bootstrap(pipeline: Pipeline, sources: list[Source], store: BarStore,
                             cold: list[str], stopping: Callable[[], bool],
                             clock: Callable[[], float]) -> None:
    """The bootstrap days older than the warm window, one symbol after another."""
    s = pipeline.settings
    for sym in cold:
        if stopping():
            return
        now_ms = int(clock() * 1000)
        grid = pipeline.grids[sym]
        end = grid.floor(now_ms)
        full_start = end - s.bootstrap_days * DAY_MS
        if full_start >= end - max(s.warm_bars, 1) * grid.ms:
            continue  # the warm window covered it
        try:
            result = await backfill_symbol(sym, grid, sources, store, start_ms=full_start, end_ms=end,
                                           now_ms=now_ms, budget_wait_s=BUDGET_WAIT_S)
        except Exception as exc:  # the next start resumes it (progress is kept per request)
            log.error("bootstrap failed", extra={"symbol": sym, "error": str(exc)})
            continue
        pipeline.warmup.history_bars += result.bars
        pipeline.warmup.history_requests += result.requests
        # The higher timeframes were folded from the warm window: the older days now too.
        await pipeline.fold_history(sym, full_start, end - max(s.warm_bars, 1) * grid.ms)
        log.info("bootstrap done", extra=result.as_dict())
    log.info("bootstrap finished", extra={"symbols": len(cold), "days": s.bootstrap_days})
