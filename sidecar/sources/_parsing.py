"""Helpers shared by the provider parsers: numbers, times, the row loop, ordering.

Pure functions only (no I/O), so every parser stays testable on recorded bodies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from sidecar.bar import MAX_EPOCH_MS, Bar
from sidecar.errors import ProviderError
from sidecar.sources.errors import http_status_error
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
    """A provider's names for the four prices and the volume of one row: keys of an
    object, or positions in a sequence (a row of columns zipped together)."""

    open: str | int = "open"
    high: str | int = "high"
    low: str | int = "low"
    close: str | int = "close"
    volume: str | int = "volume"


#: One parsed row: ``(t, o, h, l, c, v)``.
Row = tuple[int, float, float, float, float, float | None]


def parse_row(row: Any, fields: RowFields, open_time: Callable[[Any], int],
              has_volume: bool) -> Row | None:
    """One provider row (an object or a sequence) as ``(t, o, h, l, c, v)``; ``None``
    when it is not a row, or lacks a price or a time that parses.

    ``open_time(row)`` is the bar's open time in epoch ms. A volume that does not parse
    is ``None`` (as is every volume without ``has_volume``); volumes are kept exactly as
    given, fractions included.
    """
    # Every cycle's hot loop (one row per symbol per bar asked): prices that are strings
    # take float() directly; anything else goes through to_float's checks.
    try:
        o, h, l, c = row[fields.open], row[fields.high], row[fields.low], row[fields.close]
        if type(o) is str and type(h) is str and type(l) is str and type(c) is str:
            o, h, l, c = float(o), float(h), float(l), float(c)
            if not (math.isfinite(o) and math.isfinite(h) and math.isfinite(l) and math.isfinite(c)):
                return None
        else:
            o, h, l, c = to_float(o), to_float(h), to_float(l), to_float(c)
        t = open_time(row)
    except (KeyError, IndexError, ValueError, TypeError, OverflowError):
        return None  # not a row, or a null or malformed one
    v: float | None = None
    if has_volume:
        try:
            volume = row[fields.volume]
            if volume is not None and volume != "":
                v = to_float(volume)
        except (KeyError, IndexError, ValueError, TypeError, OverflowError):
            v = None  # missing, or e.g. a list where a number belongs
    return (t, o, h, l, c, v)


def row_bars(rows: Iterable[Any], ctx: ParseContext, fields: RowFields,
             open_time: Callable[[Any], int]) -> list[Bar]:
    """Bars of a provider's rows in the answer's order (see :func:`parse_row`);
    rows that are not bars are dropped."""
    symbol, tf_name, src, has_volume = ctx.symbol, ctx.tf.name, ctx.src, ctx.has_volume
    bars: list[Bar] = []
    for row in rows:
        parsed = parse_row(row, fields, open_time, has_volume)
        if parsed is not None:
            t, o, h, l, c, v = parsed
            bars.append(Bar(symbol, tf_name, t, o, h, l, c, v, src))
    return bars


def rows_to_bars(rows: Iterable[Any], ctx: ParseContext, fields: RowFields,
                 open_time: Callable[[Any], int]) -> list[Bar]:
    """Bars of a provider's rows, oldest first, via :func:`row_bars` and :func:`finish`."""
    return finish(row_bars(rows, ctx, fields, open_time), ctx)


def finish(bars: list[Bar], ctx: ParseContext) -> list[Bar]:
    """Oldest first, one bar per open time (the later one wins), the open bar marked forming."""
    by_t: dict[int, Bar] = {}
    for bar in bars:
        by_t[bar.t] = bar
    out = [by_t[t] for t in sorted(by_t)]
    for bar in out:
        bar.forming = bar.t <= ctx.now_ms < bar.t + ctx.tf.ms
    return out


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
