"""History: fill the SQLite store (and Redis) from the sources that serve history.

Used at start when the store is empty ("bootstrap needed"), by ``python -m sidecar
backfill``, and in the background for gaps the validator recorded. Each source is
asked within its range limits (:meth:`Source.history_limits`: Yahoo 1m at most 8
days per request and only the last 30 days, ...) and its budget (a refusal waits
for the budget up to ``budget_wait_s``, else the next source takes over). Progress
is kept in the store's ``meta`` table (``backfill:{symbol}:{tf}`` = the covered
range, ``gaps:{symbol}:{tf}`` = the newest gap handled) after every request, so an
interrupted run resumes where it stopped; upserts make a repeated chunk harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from sidecar import foreground
from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.errors import ProviderError
from sidecar.rate_budget import BudgetExhausted
from sidecar.redis_store import RedisStore
from sidecar.sources.base import Source
from sidecar.sqlite_store import BarStore
from sidecar.timeframe import DAY_MS, Timeframe
from sidecar.validation import validate_history

log = logging.getLogger("sidecar.bootstrap")

__all__ = ["DAY_MS", "BackfillResult", "backfill_symbol", "repair_gaps"]

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class BackfillResult:
    """What one symbol's backfill asked for and what it got.

    ``got_first``/``got_last`` span the bars the store holds in the asked range
    afterwards; ``bars`` counts what this run fetched.
    """

    symbol: str
    tf: str
    source: str | None
    asked_start: int
    asked_end: int
    got_first: int | None = None
    got_last: int | None = None
    bars: int = 0
    rejected: int = 0
    requests: int = 0
    #: Bars the store holds in the asked range afterwards (this run's and earlier runs').
    stored: int = 0
    error: str | None = None
    #: False when the bars could not be copied to Redis (they are in SQLite only).
    in_redis: bool = True
    #: Why part of the range was not asked (a source's range limit), per source.
    limited: list[str] = field(default_factory=list)
    #: The bars this run stored, oldest first (only when asked to keep them).
    fetched: list[Bar] | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "symbol": self.symbol, "tf": self.tf, "source": self.source,
            "asked": [self.asked_start, self.asked_end],
            "got": [self.got_first, self.got_last], "bars": self.bars, "stored": self.stored,
            "rejected": self.rejected, "requests": self.requests, "error": self.error,
            "limited": self.limited,
        }

    def _got(self, bars: list[Bar]) -> None:
        self.bars += len(bars)
        self.got_first = min(bars[0].t, self.got_first if self.got_first is not None else bars[0].t)
        self.got_last = max(bars[-1].t, self.got_last if self.got_last is not None else bars[-1].t)


def _first_open(grid: Timeframe, t_ms: int | None) -> int | None:
    """The first bar open at or after ``t_ms`` on ``grid``."""
    if t_ms is None:
        return None
    floor = grid.floor(t_ms)
    return floor if floor == t_ms else floor + grid.ms


async def _chunk(source: Source, symbol: str, tf: Timeframe, start: int, end: int, now_ms: int,
                 store: BarStore, result: BackfillResult, budget_wait_s: float, sleep: Sleep) -> None:
    """Fetch, validate and store ``[start, end)`` with one request, waiting for budget if allowed."""
    while True:
        try:
            result.requests += 1
            raw = await source.fetch_history(symbol, tf, start, end)
            break
        except BudgetExhausted as exc:
            result.requests -= 1  # nothing was sent
            wait = exc.retry_after
            if wait is None or wait > budget_wait_s:
                raise
            await sleep(max(wait, 0.05))
    await foreground.wait_idle()  # a large answer is checked between cycles
    bars, rejected = validate_history(raw, source.grid(symbol, tf), now_ms)
    bars = [b for b in bars if start <= b.t < end]
    result.rejected += sum(rejected.values())
    if bars:
        await store.write_history(bars)
        result._got(bars)
        if result.fetched is not None:
            result.fetched.extend(bars)


async def _walk(source: Source, symbol: str, tf: Timeframe, start: int, end: int, *, downward: bool,
                now_ms: int, chunk_ms: int, store: BarStore, result: BackfillResult,
                budget_wait_s: float, sleep: Sleep,
                advanced: Callable[[int], Awaitable[None]]) -> None:
    """Cover ``[start, end)`` in chunks of ``chunk_ms``; ``advanced(edge)`` after each one."""
    if downward:
        cursor = end
        while cursor > start:
            lo = max(start, cursor - chunk_ms)
            await _chunk(source, symbol, tf, lo, cursor, now_ms, store, result, budget_wait_s, sleep)
            cursor = lo
            await advanced(cursor)
    else:
        cursor = start
        while cursor < end:
            hi = min(end, cursor + chunk_ms)
            await _chunk(source, symbol, tf, cursor, hi, now_ms, store, result, budget_wait_s, sleep)
            cursor = hi
            await advanced(cursor)


async def backfill_symbol(
    symbol: str,
    tf: Timeframe,
    sources: list[Source],
    store: BarStore,
    *,
    start_ms: int,
    end_ms: int,
    now_ms: int,
    chunk_ms: int = 7 * DAY_MS,
    redis_store: RedisStore | None = None,
    redis_keep: int = 5_000,
    budget_wait_s: float = 0.0,
    sleep: Sleep = asyncio.sleep,
    keep: bool = False,
) -> BackfillResult:
    """Backfill ``[start_ms, end_ms)`` for one symbol, source by source in priority order.

    Each source covers what its range limits allow (newest first); what lies beyond
    them is asked of the next source. ``chunk_ms`` is the request span for sources
    without a span limit. ``keep``: the stored bars are also returned
    (:attr:`BackfillResult.fetched`, one per open time, oldest first).
    """
    result = BackfillResult(symbol, tf.name, None, start_ms, end_ms, fetched=[] if keep else None)
    progress_key = f"backfill:{symbol}:{tf.name}"
    saved = await store.get_meta(progress_key)
    # Coverage of earlier runs is [low, high): fetch what is newer, then what is older.
    low, high = end_ms, end_ms
    if saved:
        state = json.loads(saved)
        low, high = int(state["low"]), int(state["high"])
        if high <= start_ms or low >= end_ms or low >= high:  # no overlap: start afresh
            low, high = end_ms, end_ms
        elif low > start_ms or high < end_ms:
            log.info("backfill resumes", extra={"symbol": symbol, "covered": [low, high]})

    async def walk(source: Source, chunk: int, lo: int, hi: int, upward: bool) -> None:
        """Cover ``[lo, hi)``, moving the coverage edge (and saving it) after every request."""

        async def advanced(edge: int) -> None:
            nonlocal low, high
            if upward:
                high = edge
            else:
                low = edge
            await store.set_meta(progress_key, json.dumps({"low": low, "high": high}))

        await _walk(source, symbol, tf, lo, hi, downward=not upward, now_ms=now_ms, chunk_ms=chunk,
                    store=store, result=result, budget_wait_s=budget_wait_s, sleep=sleep,
                    advanced=advanced)

    for source in sources:
        if low <= start_ms and high >= end_ms:
            break
        if not source.can_serve(symbol):
            continue
        grid = source.grid(symbol, tf)
        limits = source.history_limits(grid)
        earliest = _first_open(grid, limits.earliest(now_ms))
        chunk = limits.span_ms or chunk_ms
        result.source = source.name
        result.error = None
        try:
            if high < end_ms:  # newer than the coverage: upward, extending ``high``
                lo = max(high, start_ms, earliest if earliest is not None else high)
                if lo > high:  # this source cannot reach back to the coverage: restart it
                    low = high = lo
                await walk(source, chunk, lo, end_ms, upward=True)
            floor = max(start_ms, earliest) if earliest is not None else start_ms
            if low > floor:  # older than the coverage: downward, extending ``low``
                await walk(source, chunk, floor, low, upward=False)
            if low > start_ms and earliest is not None and earliest > start_ms:
                result.limited.append(f"{source.name}: history reaches back "
                                      f"{limits.lookback_ms // DAY_MS if limits.lookback_ms else 0} days")
        except ProviderError as exc:
            result.error = exc.error_class
            log.warning("backfill stopped", extra={"symbol": symbol, "source": source.name,
                                                   "error_class": exc.error_class})
            continue
    # What was obtained: the stored range, including what earlier (interrupted) runs got.
    result.got_first, result.got_last, result.stored = await store.span(
        symbol, tf.name, start_ms, end_ms)
    if result.fetched is not None:
        result.fetched = sorted({b.t: b for b in result.fetched}.values(), key=lambda b: b.t)
    if redis_store is not None and result.bars:
        recent = await store.last_bars(symbol, tf.name, redis_keep)
        result.in_redis = await _copy_to_redis(redis_store, recent)
    return result


async def _copy_to_redis(redis_store: RedisStore, bars: list[Bar]) -> bool:
    """Copy backfilled bars to Redis; SQLite has them, so a Redis that is down only costs
    a warning, and False (the caller has Redis refilled from SQLite once it answers)."""
    try:
        await redis_store.write_history(bars)
    except (RedisError, OSError) as exc:
        log.warning("backfill: redis unreachable; the bars are in sqlite only",
                    extra={"bars": len(bars), "error": str(exc)})
        return False
    return True


async def repair_gaps(
    symbol: str,
    tf: Timeframe,
    sources: list[Source],
    store: BarStore,
    *,
    now_ms: int,
    redis_store: RedisStore | None = None,
    budget_wait_s: float = 0.0,
    sleep: Sleep = asyncio.sleep,
    calendar: MarketCalendar | None = None,
) -> BackfillResult:
    """Backfill the gaps the validator recorded for ``symbol`` (oldest first), as above.

    With the symbol's ``calendar``, a gap that lies wholly in closed hours (recorded before
    the calendar was known) is done without asking any source.

    A gap is done when a source answered for its range (with bars, or with none:
    a market closed overnight); a gap no source could answer is retried next time.
    The newest gap done is kept in ``meta`` (``gaps:{symbol}:{tf}``).
    """
    key = f"gaps:{symbol}:{tf.name}"
    saved = await store.get_meta(key)
    through = int(saved) if saved else -1
    todo = [(start, end) for start, end, _missing, _filled in await store.gaps(symbol, tf.name)
            if start > through]
    result = BackfillResult(symbol, tf.name, None, todo[0][0] if todo else 0,
                            todo[-1][1] + tf.ms if todo else 0)
    for start, end in todo:
        if calendar is not None and not calendar.open_slots(start, end + tf.ms, tf.ms):
            through = start
            await store.set_meta(key, str(through))
            continue
        answered = False
        for source in sources:
            if not source.can_serve(symbol):
                continue
            grid = source.grid(symbol, tf)
            limits = source.history_limits(grid)
            earliest = _first_open(grid, limits.earliest(now_ms))
            lo = max(start, earliest) if earliest is not None else start
            if lo > end:
                continue  # beyond this source's reach

            async def nothing(_edge: int) -> None:
                return None

            try:
                await _walk(source, symbol, tf, lo, end + tf.ms, downward=False, now_ms=now_ms,
                            chunk_ms=limits.span_ms or 7 * DAY_MS, store=store, result=result,
                            budget_wait_s=budget_wait_s, sleep=sleep, advanced=nothing)
            except ProviderError as exc:
                result.error = exc.error_class
                continue
            result.source, answered = source.name, True
            break
        if not answered:
            break  # keep the order: this gap and the newer ones are tried again later
        through = start
        await store.set_meta(key, str(through))
    if redis_store is not None and result.bars:
        result.in_redis = await _copy_to_redis(redis_store, await store.bars_between(
            symbol, tf.name, result.got_first or 0, (result.got_last or 0) + 1))
    if todo:
        log.info("gaps repaired", extra=result.as_dict())
    return result
