"""One symbol's series on one timeframe, and how base bars fold into higher timeframes.

A :class:`Series` owns a symbol's bars on one timeframe: its newest closed bar, its
forming bar, its feature handles (:class:`~sidecar.features.FeatureEngine`) and, for a
timeframe above the base, the aggregate of the base bars of its current bucket. The
base series is fed by the sources; every higher one is built from the base bars in
the daemon, on one grid per market (:class:`Grid`):

* intraday buckets are anchored at each open period's start in exchange time (the
  session open, and the end of a lunch break) and cut at its end: US stocks' 1h bars
  are 09:30-10:30 ... 15:30-16:00 New York; a market that never closes (crypto) and a
  symbol without a calendar use the clock's grid from 00:00 UTC (the symbol's session
  grid, :meth:`~sidecar.timeframe.Timeframe.on_session`, where its source has one);
* a daily bar is one session, stamped 00:00 UTC of its session date in exchange time
  (the date its session closes on; the UTC day for a market that never closes), the
  way the sources stamp providers' daily bars.

Extended hours: for a symbol that includes them, the base bars outside the regular
session stay in the base series; the regular session alone makes the higher buckets
(:meth:`Grid.holds`), as the providers' regular-hours hourly and daily bars do.

The aggregation law (:func:`aggregate`): open of the first base bar, highest high,
lowest low, close of the last, volumes summed in time order (``None`` when any base
bar has none). A bucket without base bars has no bar.

A higher bar is forming until its bucket is complete: its last base bar closed, a
base bar of a later bucket arrived, or the bucket's end passed by one base bar's
length with no base bar forming in it. A revised base bar in a bucket already folded
marks that bucket dirty: it is re-aggregated from the stored base bars and the
handles reopened after the cycle (:class:`~sidecar.app.history.History`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgpack

from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.features import FeatureEngine, Values
from sidecar.timeframe import Timeframe

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Bucket:
    """One higher bar's span: base bars with ``lo <= t < hi`` belong to it, it is
    complete at ``end`` and stamped ``t``."""

    t: int
    lo: int
    hi: int
    end: int


class Grid:
    """The buckets of one timeframe on one market (see the module docstring)."""

    __slots__ = ("_zone", "calendar", "daily", "fallback", "regular_only", "tf")

    def __init__(self, tf: Timeframe, calendar: MarketCalendar | None,
                 fallback: Timeframe | None = None, *, regular_only: bool = False) -> None:
        """``fallback``: the grid where the calendar says nothing (no calendar, closed
        time, years it does not cover); ``tf`` on the clock's grid if not given.
        ``regular_only``: the base series holds extended-hours bars, left out here."""
        self.tf = tf
        self.calendar = calendar
        self.regular_only = regular_only and calendar is not None
        self.daily = tf.ms >= DAY_MS
        self.fallback = fallback or tf
        self._zone = ZoneInfo(calendar.zone) if calendar is not None else None

    def holds(self, t_ms: int) -> bool:
        """Whether the base bar opening at ``t_ms`` folds into this timeframe: always,
        but an extended-hours bar of a ``regular_only`` grid."""
        if not self.regular_only:
            return True
        cal = self.calendar
        assert cal is not None
        return cal.period(t_ms) is not None or not cal.known(t_ms)

    def bucket(self, t_ms: int) -> Bucket:
        """The bucket of the base bar opening at ``t_ms``."""
        cal = self.calendar
        ms = self.tf.ms
        if self.daily:
            span = cal.session_span(t_ms) if cal is not None else None
            if span is None or self._zone is None:
                lo = t_ms - t_ms % DAY_MS
                return Bucket(lo, lo, lo + DAY_MS, lo + DAY_MS)
            open_, close, next_open = span
            day = datetime.fromtimestamp((close - 1) / 1000, tz=UTC).astimezone(self._zone).date()
            stamp = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
            return Bucket(stamp, open_, next_open, close)
        period = cal.period(t_ms) if cal is not None else None
        if period is None:
            lo = self.fallback.floor(t_ms)
            return Bucket(lo, lo, lo + ms, lo + ms)
        start, close = period
        lo = start + (t_ms - start) // ms * ms
        hi = min(lo + ms, close)
        return Bucket(lo, lo, hi, hi)


def aggregate(symbol: str, tf: str, t: int, bars: Sequence[Bar], *, forming: bool = False) -> Bar:
    """The bar of ``bars`` (oldest first, at least one) on timeframe ``tf`` stamped ``t``:
    first open, highest high, lowest low, last close, volumes summed in order (``None``
    if any is missing); the last bar's source; synthetic if any is."""
    first = bars[0]
    h, l, v = first.h, first.l, first.v
    synthetic = first.synthetic
    for b in bars[1:]:
        if b.h > h:
            h = b.h
        if b.l < l:
            l = b.l
        v = None if v is None or b.v is None else v + b.v
        synthetic = synthetic or b.synthetic
    last = bars[-1]
    return Bar(symbol, tf, t, first.o, h, l, last.c, v, last.src, forming, synthetic)


def _merge(acc: Bar, b: Bar, forming: bool) -> Bar:
    """``acc`` with ``b`` (a later base bar) folded in."""
    v = None if acc.v is None or b.v is None else acc.v + b.v
    return Bar(acc.symbol, acc.tf, acc.t, acc.o, acc.h if acc.h >= b.h else b.h,
               acc.l if acc.l <= b.l else b.l, b.c, v, b.src, forming, acc.synthetic or b.synthetic)


def aggregate_all(grid: Grid, symbol: str, bars: Iterable[Bar]) -> list[tuple[Bucket, list[Bar]]]:
    """``bars`` (closed base bars, oldest first) grouped by ``grid``'s buckets, oldest first."""
    out: list[tuple[Bucket, list[Bar]]] = []
    holds = grid.holds
    for b in bars:
        if not holds(b.t):
            continue
        if out and out[-1][0].lo <= b.t < out[-1][0].hi:
            out[-1][1].append(b)
        else:
            out.append((grid.bucket(b.t), [b]))
    return out


class Series:
    """A symbol's series on one timeframe: closed and forming bar, feature handles,
    and (above the base) the fold of base bars into its buckets.

    ``up`` is the next timeframe's series: a closed base bar folds into this one and
    is handed on up (:meth:`fold`). The rebuild machinery: ``needs_rebuild`` (the
    handles must be reopened on stored history) and ``rebuilding`` (while a rebuild
    reads history: every closed bar applied meanwhile, by open time).
    """

    __slots__ = ("_done_hi", "_forming_bucket", "_peek_bar", "_peek_engine", "_peek_t", "_peek_values",
                 "_view_acc", "_view_base", "_view_done_hi", "_view_out", "acc", "base_ms", "bucket", "dirty",
                 "engine", "forming", "grid", "last", "n_base", "needs_rebuild", "packed", "rebuilding",
                 "symbol", "tf", "up")

    def __init__(self, symbol: str, tf: Timeframe, engine: FeatureEngine, grid: Grid | None = None,
                 base_ms: int = 0) -> None:
        """``grid`` and ``base_ms`` (the base timeframe's length) for a higher timeframe."""
        self.symbol = symbol
        self.tf = tf
        self.engine = engine
        self.grid = grid
        self.base_ms = base_ms
        self.up: Series | None = None
        self.forming: Bar | None = None
        self.last: Bar | None = None  # newest closed bar
        self.needs_rebuild = False
        self.rebuilding: dict[int, Bar] | None = None
        #: The features map last written to Redis, packed (:attr:`features` decodes it).
        self.packed: bytes | None = None
        #: The aggregate of the closed base bars of the current bucket, and how many.
        self.acc: Bar | None = None
        self.bucket: Bucket | None = None
        self.n_base = 0
        #: Buckets already folded that a revised base bar changed, by ``lo``.
        self.dirty: dict[int, Bucket] = {}
        self._done_hi = -1  # ``hi`` of the newest complete bucket
        self._forming_bucket: Bucket | None = None  # cache: the bucket of the base forming bar
        # What view() last saw (base forming bar, aggregate, done_hi) and made (a fresh
        # series has seen nothing: done_hi -2 matches no state).
        self._view_base: Bar | None = None
        self._view_acc: Bar | None = None
        self._view_done_hi = -2
        self._view_out: Bar | None = None
        # What values() last peeked: the bar, on which handles (and their newest closed
        # bar's time), and the values.
        self._peek_bar: Bar | None = None
        self._peek_engine: FeatureEngine | None = None
        self._peek_t: int | None = None
        self._peek_values: Values = []

    @property
    def features(self) -> dict[str, Any] | None:
        """The features map last written to Redis (``None`` before the first)."""
        return None if self.packed is None else msgpack.unpackb(self.packed)

    @property
    def done_hi(self) -> int:
        """``hi`` of the newest bucket folded and complete (``-1``: none yet)."""
        return self._done_hi

    # -- closed bars ------------------------------------------------------------------
    def close(self, bar: Bar) -> None:
        """Commit a closed bar to the handles (and to a rebuild in flight)."""
        self.engine.update(bar)
        self.last, self.forming = bar, None
        if self.rebuilding is not None:
            self.rebuilding[bar.t] = bar

    def revise(self, bar: Bar) -> None:
        """A closed bar already committed changed: the handles are reopened."""
        if self.last is not None and bar.t == self.last.t:
            self.last = bar
        self.needs_rebuild = True
        if self.rebuilding is not None:
            self.rebuilding[bar.t] = bar

    # -- folding base bars upward -----------------------------------------------------
    def fold(self, base: Bar) -> list[Bar]:
        """Fold a closed base bar into this timeframe and every one above; returns the
        higher bars that closed."""
        out: list[Bar] = []
        grid = self.grid
        assert grid is not None
        if grid.regular_only and not grid.holds(base.t):
            return out  # an extended-hours bar: the base series' alone, here and above
        b = self.bucket
        if b is not None and b.lo <= base.t < b.hi:
            assert self.acc is not None
            self.acc = _merge(self.acc, base, False)
            self.n_base += 1
        elif base.t < self._done_hi or (b is not None and base.t < b.lo):
            self.mark_dirty(base.t)  # late into a bucket already folded
        else:
            if self.acc is not None:
                out.append(self._finish())
            b = self.bucket = grid.bucket(base.t)
            self.acc = aggregate(self.symbol, self.tf.name, b.t, [base])
            self.n_base = 1
        if self.acc is not None and self.bucket is not None and base.t + self.base_ms >= self.bucket.end:
            out.append(self._finish())
        if self.up is not None:
            out += self.up.fold(base)
        return out

    def mark_dirty(self, base_t: int) -> None:
        """The base bar at ``base_t`` was revised: its bucket is re-aggregated here and above."""
        assert self.grid is not None
        if not self.grid.holds(base_t):
            return
        b = self.grid.bucket(base_t)
        self.dirty[b.lo] = b
        self.needs_rebuild = True
        if self.up is not None:
            self.up.mark_dirty(base_t)

    def _finish(self) -> Bar:
        acc, b = self.acc, self.bucket
        assert acc is not None and b is not None
        closed = Bar(acc.symbol, acc.tf, acc.t, acc.o, acc.h, acc.l, acc.c, acc.v, acc.src, False,
                     acc.synthetic)
        self.close(closed)
        self._done_hi = b.hi
        self.acc, self.bucket, self.n_base = None, None, 0
        return closed

    def settle(self, now_ms: int, base_forming: Bar | None) -> list[Bar]:
        """Close the current bucket if it is complete: a base bar of a later bucket is
        forming, or its end passed (by one base bar) with no base bar forming in it."""
        b = self.bucket
        if self.acc is None or b is None:
            return []
        if base_forming is not None and self.grid is not None and self.grid.regular_only \
                and not self.grid.holds(base_forming.t):
            base_forming = None  # extended hours: the bucket ends on the clock
        if base_forming is not None:
            if base_forming.t >= b.hi:
                return [self._finish()]
            if base_forming.t >= b.lo:
                return []
        if now_ms >= b.end + self.base_ms:
            return [self._finish()]
        return []

    def view(self, base_forming: Bar | None) -> bool:
        """Set the forming bar: the current bucket's closed base bars with the base
        forming bar (or the bar a base forming bar opens). Returns whether it changed;
        a bar equal to the one it replaces is not replaced (nothing to store again)."""
        acc = self.acc
        if (base_forming is self._view_base and acc is self._view_acc and self._done_hi == self._view_done_hi
                and self.forming is self._view_out):
            return False  # nothing it is made of changed
        b = self.bucket
        bar: Bar | None = None
        if base_forming is not None and self.grid is not None and self.grid.regular_only \
                and not self.grid.holds(base_forming.t):
            base_forming = None
        if base_forming is not None and base_forming.t >= self._done_hi:
            if b is not None and b.lo <= base_forming.t < b.hi:
                assert acc is not None
                bar = _merge(acc, base_forming, True)
            elif b is None or base_forming.t >= b.hi:
                fb = self._forming_bucket
                if fb is None or not fb.lo <= base_forming.t < fb.hi:
                    assert self.grid is not None
                    fb = self._forming_bucket = self.grid.bucket(base_forming.t)
                bar = aggregate(self.symbol, self.tf.name, fb.t, [base_forming], forming=True)
        if bar is None and acc is not None:
            bar = Bar(acc.symbol, acc.tf, acc.t, acc.o, acc.h, acc.l, acc.c, acc.v, acc.src, True,
                      acc.synthetic)
        old = self.forming
        changed = not (bar is old or (bar is not None and old is not None and bar.t == old.t
                                      and bar.same_values(old) and bar.src == old.src
                                      and bar.synthetic == old.synthetic))
        if changed:
            self.forming = bar
        self._view_base, self._view_acc, self._view_done_hi = base_forming, acc, self._done_hi
        self._view_out = self.forming
        return changed

    def restart(self, bucket: Bucket | None, parts: Sequence[Bar], done_hi: int) -> None:
        """Set the current bucket's aggregate from its closed base bars ``parts``."""
        self.bucket = bucket if parts else None
        self.acc = aggregate(self.symbol, self.tf.name, bucket.t, parts) if parts and bucket else None
        self.n_base = len(parts)
        self._done_hi = max(self._done_hi, done_hi)

    def status(self, now_ms: int, rsi: float | None, completeness: dict[str, Any] | None = None,
               ) -> dict[str, Any]:
        """This timeframe in a symbol's ``/health`` row: its newest bar (forming, else
        closed) and its age at ``now_ms``, ``rsi`` (of its features map), how many base
        bars its forming bar holds (above the base), whether its handles are rebuilt, and
        its ``completeness`` when given."""
        bar = self.forming or self.last
        row: dict[str, Any] = {
            "newest_bar_t": bar.t if bar else None,
            "newest_bar_age_ms": None if bar is None else now_ms - bar.t,
            "last_price": bar.c if bar else None,
            "forming": bar.forming if bar else None,
            "rsi": rsi,
            "base_bars": self.n_base if self.grid is not None else None,
            "rebuilding": self.rebuilding is not None or self.needs_rebuild,
        }
        if completeness is not None:
            row["completeness"] = completeness
        return row

    # -- features ---------------------------------------------------------------------
    def current(self) -> tuple[Bar, Values] | None:
        """The newest bar (forming, else closed) and its feature values; ``None`` without one."""
        bar = self.forming or self.last
        if bar is None:
            return None
        return bar, self.values(bar)

    def values(self, bar: Bar) -> Values:
        """The feature values of ``bar`` (the forming bar, else the newest closed one);
        a forming bar peeked already on the same handles is not peeked again."""
        engine = self.engine
        if not bar.forming:
            return engine.closed_values
        if bar is self._peek_bar and engine is self._peek_engine and engine.last_closed_t == self._peek_t:
            return self._peek_values
        values = self._peek_values = engine.peek(bar)
        self._peek_bar, self._peek_engine, self._peek_t = bar, engine, engine.last_closed_t
        return values
