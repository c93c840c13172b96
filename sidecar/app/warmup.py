"""Start-up warm-up, in the background while the 1-second cycles already run.

:meth:`Pipeline.begin_warmup` (in line, one read of every symbol's newest stored
bars) puts each symbol in warm-up: it is served from its first bar with its
features flagged ``warming``. :func:`warm_up` then, concurrently:

- fetches the warm window (``SIDECAR_WARM_BARS``, within ``SIDECAR_BOOTSTRAP_DAYS``)
  of the symbols with nothing stored, a bounded number of symbols at a time, each
  request within its source's range limits and budget (:func:`backfill_symbol`
  waits for a budget rather than giving up);
- opens each cold symbol's handles on the bars just fetched
  (:meth:`Pipeline.open_fetched`: nothing else is stored of it but the bars the
  cycles applied meanwhile, which are laid over them), with no read back, and
  copies them to Redis in batches of several symbols;
- opens each stored symbol's handles on its warm window (:meth:`Pipeline.warm_symbol`:
  the stores reconciled, then the window laid under the bars the cycles applied
  meanwhile).

After that a symbol's features equal TA-Lib batch on that window and are no longer
flagged. Everything here runs between cycles (:mod:`sidecar.foreground`): large
inserts and ``sim``'s history are made in worker threads that step aside while a
cycle runs, and each handle opening waits for the running cycle to end.

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

from redis.exceptions import RedisError

from sidecar import foreground
from sidecar.app.bootstrap import DAY_MS, backfill_symbol
from sidecar.app.pipeline import Pipeline
from sidecar.app.reconcile import compare_process
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sources import Source
from sidecar.sqlite_store import BarStore

log = logging.getLogger("sidecar.warmup")

#: Symbols whose warm window is being fetched at once (each source's budget bounds it further).
FETCH_CONCURRENCY = 16
#: Batches of stored symbols whose stores are reconciled and handles opened at once.
STORE_CONCURRENCY = 2
#: Stored symbols reconciled together (one Redis round trip, one worker-thread call).
STORE_BATCH = 50
#: Bars per Redis write of history (one script call; a cycle waits for at most one).
REDIS_BATCH = 5_000
#: Bars waiting for Redis at most: past it, fetching waits for the writes (bounded memory).
REDIS_QUEUE_BARS = 50_000
#: From this many stored symbols their stores are compared in a second process.
PROCESS_MIN_SYMBOLS = 200
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

    async def fetch(sym: str) -> None:
        """Fetch a cold symbol's warm window and open its handles on it."""
        try:
            async with fetch_gate:
                now_ms = int(clock() * 1000)
                grid = pipeline.grids[sym]
                end = grid.floor(now_ms)  # closed bars: up to the one forming now
                start = max(end - max(s.warm_bars, 1) * grid.ms, end - s.bootstrap_days * DAY_MS)
                result = await backfill_symbol(sym, grid, sources, store, start_ms=start, end_ms=end,
                                               now_ms=now_ms, budget_wait_s=BUDGET_WAIT_S, keep=True)
                progress.history_bars += result.bars
                progress.history_requests += result.requests
                log.info("bootstrap warm-up window", extra=result.as_dict())
                fetched, result.fetched = result.fetched or [], None
                # The cycles' bars since warm-up began may be stored in the window already.
                known = {b.t for b in fetched}.union(t for t in pipeline.symbols[sym].rebuilding or {}
                                                     if start <= t < end)
                if result.stored <= len(known):
                    # All the stores hold of it (but the live bars): open on it, no read back.
                    # Within the gate: the symbols fetched wait for their Redis copy in turn.
                    await foreground.wait_idle()
                    pipeline.open_fetched(sym, fetched)
                    await redis_writer.put(fetched[-s.bars_cap:])
                    return
                del fetched  # not held while it waits for the stores' turn
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed([sym], exc)
            return
        await from_stores([sym])  # earlier runs stored part of the window: as a stored symbol

    async def from_stores(batch: list[str]) -> None:
        """Reconcile the stores of symbols with history stored and open their handles."""
        try:
            async with store_gate:
                await foreground.wait_idle()
                await pipeline.warm_symbols(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed([sym for sym in batch if pipeline.symbols[sym].warming], exc)

    def failed(symbols: list[str], exc: Exception) -> None:
        """The cycles' rebuild takes over (from the stores, after the next cycle)."""
        for sym in symbols:
            progress.failed += 1
            log.error("warm-up failed", extra={"symbol": sym, "error": str(exc)})
            pipeline.warm_up_failed(sym)

    redis_writer = _RedisHistory(redis_store, pipeline)
    flushing = asyncio.ensure_future(redis_writer.run())
    warm = [sym for sym in pipeline.symbols if sym not in cold_set]
    if len(warm) >= PROCESS_MIN_SYMBOLS:
        pipeline.warm_pool = compare_process()
    try:
        batches = [warm[i:i + STORE_BATCH] for i in range(0, len(warm), STORE_BATCH)]
        await asyncio.gather(*(fetch(sym) for sym in cold), *(from_stores(b) for b in batches))
        await redis_writer.close()
        await flushing
    finally:
        flushing.cancel()
        if pipeline.warm_pool is not None:
            pipeline.warm_pool.shutdown(wait=False, cancel_futures=True)
            pipeline.warm_pool = None
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


class _RedisHistory:
    """Copies history to Redis in batches of about :data:`REDIS_BATCH` bars (several
    symbols' to a call), one call at a time and only between cycles. At most
    :data:`REDIS_QUEUE_BARS` wait: :meth:`put` waits for room, so fetching goes at
    the pace of the writes. A Redis that fails has the rest refilled from SQLite
    once it answers."""

    def __init__(self, redis_store: RedisStore, pipeline: Pipeline) -> None:
        self.redis = redis_store
        self.pipeline = pipeline
        self.queue: asyncio.Queue[list[Bar] | None] = asyncio.Queue()
        self.queued = 0  # bars in the queue and in the batch being written
        self.room = asyncio.Event()
        self.failed = False

    async def put(self, bars: list[Bar]) -> None:
        """Queue ``bars`` for Redis, once there is room for them."""
        while self.queued >= REDIS_QUEUE_BARS and not self.failed:
            self.room.clear()
            await self.room.wait()
        if bars and not self.failed:
            self.queued += len(bars)
            self.queue.put_nowait(bars)

    async def close(self) -> None:
        """No more bars: :meth:`run` returns once the queued ones are written."""
        self.queue.put_nowait(None)

    async def run(self) -> None:
        """Write the queued bars until :meth:`close`: what is queued at once goes in
        batches, a lone symbol's bars at once."""
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                batch, closing = list(item), False
                while len(batch) < REDIS_BATCH and not self.queue.empty():
                    more = self.queue.get_nowait()
                    if more is None:
                        closing = True
                        break
                    batch.extend(more)
                for i in range(0, len(batch), REDIS_BATCH):
                    await self._write(batch[i:i + REDIS_BATCH])
                self.queued -= len(batch)
                self.room.set()
                if closing:
                    return
        finally:
            self.failed = self.failed or self.queued > 0  # stopped early: nothing waits on it
            self.room.set()

    async def _write(self, bars: list[Bar]) -> None:
        if self.failed:
            return
        await foreground.wait_idle()
        try:
            await self.redis.write_history(bars, chunk=REDIS_BATCH)
        except (RedisError, OSError) as exc:
            self.failed = True
            self.room.set()
            log.warning("warm-up: redis unreachable; history is in sqlite only",
                        extra={"bars": len(bars), "error": str(exc)})
            self.pipeline.redis_lacks_history()
