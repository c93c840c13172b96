"""Helpers shared by the provider parsers: numbers, times, ordering, HTTP errors.

Pure functions only (no I/O), so every parser stays testable on recorded bodies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from sidecar.bar import MAX_EPOCH_MS, Bar
from sidecar.errors import ProviderError
from sidecar.timeframe import DAY_MS, Timeframe


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What a parser needs besides the body.

    ``symbol`` is the name the bars are labelled with (canonical, or the provider
    spelling passed through); ``now_ms`` decides which bar is still forming.
    """

    symbol: str
    tf: Timeframe
    src: str
    now_ms: int
    has_volume: bool = True

    @property
    def daily(self) -> bool:
        """Whether the bars are daily or longer (stamped 00:00 UTC of their date)."""
        return self.tf.ms >= DAY_MS


def decode_answer(body: bytes | str, status: int, source: str,
                  retry_after: float | None = None) -> Any:
    """Decode JSON; a non-JSON body is classified by its HTTP status when that is not 200."""
    try:
        return decode_json(body, source)
    except ProviderError:
        if status != 200:
            raise http_status_error(status, "(non-JSON body)", source, retry_after) from None
        raise


def decode_json(body: bytes | str, source: str, what: str = "body") -> Any:
    """Decode JSON or raise ``ProviderError("bad_response")`` (truncated, HTML, text).

    orjson first (1.5-2x faster on provider bodies); what it refuses and the standard
    library accepts (``NaN`` literals, integers beyond 64 bits, deep nesting) takes
    the ``json`` path, so the answer is the same either way.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        text = body[:80] if isinstance(body, str) else body[:80].decode("utf-8", "replace")
        raise ProviderError(
            "bad_response", f"{what} is not JSON: {text.strip()!r}", source=source
        ) from None


def to_float(value: Any) -> float:
    """A provider number (string, int, float, exponent form) as a float; ``ValueError`` if not."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"not finite: {value!r}")
    return out


def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The IANA zone ``name`` (``US/Eastern`` works), or ``default`` when missing/unknown."""
    if not isinstance(name, str) or not name or len(name) > 64:  # a body can carry anything here
        return ZoneInfo(default)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return ZoneInfo(default)


def day_ms(d: date) -> int:
    """00:00 UTC of calendar date ``d`` in epoch ms (daily bars are stamped so)."""
    return (d - date(1970, 1, 1)).days * DAY_MS


@lru_cache(maxsize=8_192)
def local_text_to_ms(text: str, tz: ZoneInfo, daily: bool) -> int:
    """A naive provider timestamp in ``tz`` to epoch ms UTC; ``ValueError`` if it is none.

    Daily bars (``daily``) keep their calendar date and are stamped 00:00 UTC.
    Cached: every symbol of a batch carries the same few timestamps.
    """
    text = text.strip()
    try:
        if daily or len(text) == 10:
            return day_ms(date.fromisoformat(text[:10]))
        naive = datetime.fromisoformat(text)
        if naive.tzinfo is None:
            naive = naive.replace(tzinfo=tz)
        return int(naive.timestamp() * 1000)
    except OverflowError:  # year 1 or 9999 shifted out of range by the zone
        raise ValueError(f"time out of range: {text!r}") from None


def epoch_to_daily_ms(t_ms: int, tz: ZoneInfo) -> int:
    """A daily bar stamped at any time of its day in ``tz`` -> 00:00 UTC of that date.

    ``ValueError`` when ``t_ms`` lies outside the years datetime can represent.
    """
    try:
        local = datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(tz)
    except (OverflowError, OSError):
        raise ValueError(f"time out of range: {t_ms}") from None
    return day_ms(local.date())


def to_epoch_ms(value: Any, unit_ms: int = 1) -> int:
    """A provider timestamp (a number of ``unit_ms``) as integer epoch ms; ``ValueError`` if not.

    Refuses non-finite numbers and anything beyond year 9999, which no store can hold.
    """
    t = int(to_float(value) * unit_ms)
    if not -MAX_EPOCH_MS <= t <= MAX_EPOCH_MS:
        raise ValueError(f"time out of range: {value!r}")
    return t


@dataclass(frozen=True, slots=True)
class RowFields:
    """A provider's names for the four prices and the volume of one row."""

    open: str = "open"
    high: str = "high"
    low: str = "low"
    close: str = "close"
    volume: str = "volume"


def rows_to_bars(rows: Iterable[Any], ctx: ParseContext, fields: RowFields,
                 open_time: Callable[[Mapping[str, Any]], int]) -> list[Bar]:
    """Bars of a provider's rows (objects), oldest first, via :func:`finish`.

    ``open_time(row)`` is the bar's open time in epoch ms. A row that is not an
    object, or lacks a price or a time that parses, is dropped; a volume that does not
    parse is ``None`` (as is every volume when ``ctx.has_volume`` is false); volumes are
    kept exactly as given, fractions included.
    """
    bars: list[Bar] = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        try:
            o, h, l, c = (to_float(row[k]) for k in (fields.open, fields.high, fields.low, fields.close))
            t = open_time(row)
        except (KeyError, ValueError, TypeError):
            continue  # a null or malformed row
        v: float | None = None
        if ctx.has_volume and row.get(fields.volume) is not None:
            try:
                v = to_float(row[fields.volume])
            except (ValueError, TypeError):  # e.g. a list where a number belongs
                v = None
        bars.append(Bar(ctx.symbol, ctx.tf.name, t, o, h, l, c, v, ctx.src))
    return finish(bars, ctx)


def finish(bars: list[Bar], ctx: ParseContext) -> list[Bar]:
    """Oldest first, one bar per open time (the later one wins), the open bar marked forming."""
    by_t: dict[int, Bar] = {}
    for bar in bars:
        by_t[bar.t] = bar
    out = [by_t[t] for t in sorted(by_t)]
    for bar in out:
        bar.forming = bar.t <= ctx.now_ms < bar.t + ctx.tf.ms
    return out


def http_status_error(
    status: int, detail: str, source: str, retry_after: float | None = None
) -> ProviderError:
    """The error class an HTTP status means when the body does not say better."""
    if status == 429:
        return ProviderError("rate_limited", f"HTTP 429 {detail}", source=source, retry_after=retry_after)
    if status == 401:
        return ProviderError("auth", f"HTTP 401 {detail}", source=source)
    if status == 403:
        return ProviderError("not_entitled", f"HTTP 403 {detail}", source=source)
    if status == 404:
        return ProviderError("unknown_symbol", f"HTTP 404 {detail}", source=source)
    if status >= 500 or status in (408, 425):
        return ProviderError("unavailable", f"HTTP {status} {detail}", source=source,
                             retry_after=retry_after)
    return ProviderError("bad_response", f"HTTP {status} {detail}", source=source)


def rebucket(bars: list[Bar], ctx: ParseContext) -> list[Bar]:
    """Fold finer clock-aligned bars (oldest first) into ``ctx.tf``'s session grid.

    For providers that only stamp bars on the clock's grid (Polygon, Alpha Vantage)
    when a series sits on a session's (US stocks' 1h bars open at 09:30, 10:30 ...):
    they are asked for ``ctx.tf.clock`` bars, folded here (first open, highest high,
    lowest low, last close, summed volume; ``None`` if any part has none).
    """
    grid = ctx.tf
    buckets: dict[int, Bar] = {}
    for bar in bars:
        t = grid.floor(bar.t)
        into = buckets.get(t)
        if into is None:
            buckets[t] = Bar(ctx.symbol, grid.name, t, bar.o, bar.h, bar.l, bar.c, bar.v, ctx.src)
            continue
        into.h, into.l, into.c = max(into.h, bar.h), min(into.l, bar.l), bar.c
        into.v = None if into.v is None or bar.v is None else into.v + bar.v
    return finish(list(buckets.values()), ctx)
