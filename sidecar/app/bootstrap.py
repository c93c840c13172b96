"""History: fill the SQLite store (and Redis) from the sources that serve history.

Used at start when the store is empty ("bootstrap needed") and by
``python -m sidecar backfill``. Works newest-first in chunks, records its progress
in the store's ``meta`` table after each chunk, and resumes there if interrupted;
upserts make a repeated chunk harmless (no duplicates).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from sidecar.errors import ProviderError
from sidecar.redis_store import RedisStore
from sidecar.sources.base import Source
from sidecar.sqlite_store import BarStore
from sidecar.timeframe import Timeframe
from sidecar.validation import validate_history

log = logging.getLogger("sidecar.bootstrap")

DAY_MS = 86_400_000


@dataclass(slots=True)
class BackfillResult:
    """What one symbol's backfill asked for and what it got."""

    symbol: str
    tf: str
    source: str | None
    asked_start: int
    asked_end: int
    got_first: int | None = None
    got_last: int | None = None
    bars: int = 0
    rejected: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "symbol": self.symbol, "tf": self.tf, "source": self.source,
            "asked": [self.asked_start, self.asked_end],
            "got": [self.got_first, self.got_last], "bars": self.bars,
            "rejected": self.rejected, "error": self.error,
        }


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
) -> BackfillResult:
    """Backfill ``[start_ms, end_ms)`` for one symbol from the first source that serves it."""
    result = BackfillResult(symbol, tf.name, None, start_ms, end_ms)
    progress_key = f"backfill:{symbol}:{tf.name}"
    saved = await store.get_meta(progress_key)
    # Coverage of earlier runs is [low, high): fetch what is newer, then what is older.
    low, high = end_ms, end_ms
    if saved:
        state = json.loads(saved)
        low, high = int(state["low"]), int(state["high"])
        if high <= start_ms or low >= end_ms:  # no overlap: start afresh
            low, high = end_ms, end_ms
        elif low > start_ms or high < end_ms:
            log.info("backfill resumes", extra={"symbol": symbol, "covered": [low, high]})
    todo = [(max(high, start_ms), end_ms, False), (start_ms, min(low, end_ms), True)]
    for source in sources:
        if not source.can_serve(symbol):
            continue
        result.source = source.name
        result.error = None
        try:
            for range_start, range_end, extends_low in todo:
                cursor = range_end
                while cursor > range_start:
                    chunk_start = max(range_start, cursor - chunk_ms)
                    raw = await source.fetch_history(symbol, tf, chunk_start, cursor)
                    bars, rejected = validate_history(raw, source.grid(symbol, tf), now_ms)
                    bars = [b for b in bars if chunk_start <= b.t < cursor]
                    result.rejected += sum(rejected.values())
                    if bars:
                        await store.write_history(bars)
                        result.bars += len(bars)
                        result.got_first = min(bars[0].t, result.got_first or bars[0].t)
                        result.got_last = max(bars[-1].t, result.got_last or bars[-1].t)
                    cursor = chunk_start
                    if extends_low:
                        low = cursor
                        await store.set_meta(progress_key, json.dumps({"low": low, "high": high}))
                if not extends_low:
                    high = end_ms
                    low = min(low, range_start) if low < end_ms else range_start
                    await store.set_meta(progress_key, json.dumps({"low": low, "high": high}))
        except ProviderError as exc:
            result.error = exc.error_class
            log.warning("backfill stopped", extra={"symbol": symbol, "source": source.name,
                                                   "error_class": exc.error_class})
            continue
        if redis_store is not None and result.bars:
            recent = await store.last_bars(symbol, tf.name, redis_keep)
            await redis_store.write_history(recent)
        break
    return result
