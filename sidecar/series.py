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
length with no base bar forming in it.

Corrections are redone in memory, in the cycle that brings them. Each series keeps
its newest closed bars (``recent``, up to ``reach`` of them) apart from the handles
on every closed bar before them (``behind``); the handles in use are ``behind``
advanced over ``recent``. A corrected bar within ``recent`` is replaced there and
the handles redone from a copy of ``behind`` (:meth:`Series.redo`), exactly what
the handles would be had the corrected series come in order. A higher series also
keeps the aggregate of the base bars of the bucket the base's ``recent`` begins in
that left it (its *tail*, :meth:`Series.leave`): with the base bars still in
``recent``, every bucket a correction within reach falls in is re-aggregated without
reading a store (:meth:`Series.regroup`). A revised base bar beyond that reach, or
a bucket the cycle cannot re-aggregate, marks the bucket dirty: it is re-aggregated
from the stored base bars and the handles reopened after the cycle
(:class:`~sidecar.app.history.History`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import msgpack

from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.features import FeatureEngine, Values
from sidecar.timeframe import Timeframe

DAY_MS = 86_400_000

#: At most this many base bars back a correction is redone in memory (deeper: rebuilt).
MAX_REACH = 64


def reach_of(window_bars: int, base_ms: int, tf_ms: int) -> int:
    """How many closed bars a series keeps in ``recent`` (:class:`Series`) for corrections
    up to ``window_bars`` base bars back (at most :data:`MAX_REACH`): the base keeps
    the window and its newest bar; a higher series the buckets those base bars span
    back to back, with one to spare (a session break or a short bucket may spread
    them over more: such a correction is rebuilt)."""
    base = min(window_bars, MAX_REACH) + 1
    if tf_ms <= base_ms:
        return base
    return min(base, (base - 1) * base_ms // tf_ms + 3)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One higher bar's span: base bars with ``lo <= t < hi`` belong to it, it is
    complete at ``end`` and stamped ``t``."""

    t: int
    lo: int
    hi: int
    end: int


class Regroup(NamedTuple):
    """A higher bucket to re-aggregate in memory (:meth:`Series.regroup`): its parts
    (the tail's aggregate first, if any, then base bars), and how many base bars they hold."""

    bucket: Bucket
    parts: list[Bar]
    n_base: int


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
                 "_view_acc", "_view_base", "_view_done_hi", "_view_out", "acc", "base_ms", "behind",
                 "bucket", "dirty", "engine", "forming", "grid", "last", "n_base", "needs_rebuild", "packed",
                 "reach", "rebuilding", "recent", "symbol", "tail_acc", "tail_blind", "tail_bucket", "tail_n",
                 "tf", "up")

    def __init__(self, symbol: str, tf: Timeframe, engine: FeatureEngine, grid: Grid | None = None,
                 base_ms: int = 0, reach: int = 1) -> None:
        """``grid`` and ``base_ms`` (the base timeframe's length) for a higher timeframe;
        ``reach``: how many of the newest closed bars a correction is redone over
        (:func:`reach_of`). ``engine`` holds every closed bar so far."""
        self.symbol = symbol
        self.tf = tf
        self.engine = engine
        #: The handles on every closed bar before ``recent`` (``engine`` is these advanced
        #: over ``recent``).
        self.behind = engine.copy()
        #: The newest closed bars (oldest first), up to ``reach`` (one more after a
        #: correction inserted a missing bar).
        self.recent: deque[Bar] = deque()
        self.reach = reach
        #: Above the base: the bucket of the newest base bar that left the base's ``recent``
        #: and the aggregate of that bucket's base bars that left it (``None``: not known,
        #: see ``tail_blind``), and how many they are.
        self.tail_bucket: Bucket | None = None
        self.tail_acc: Bar | None = None
        self.tail_n = 0
        #: Base bars up to this open time may have left the base's ``recent`` unseen here
        #: (history read at start or in a rebuild): a bucket reaching back to it has no known tail.
        self.tail_blind = -1
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
    def close(self, bar: Bar) -> Bar | None:
        """Commit a closed bar to the handles (and to a rebuild in flight); returns the
        bar it pushed out of ``recent`` (now in ``behind``), if any."""
        self.engine.update(bar)
        self.last, self.forming = bar, None
        if self.rebuilding is not None:
            self.rebuilding[bar.t] = bar
        recent = self.recent
        recent.append(bar)
        if len(recent) > self.reach:
            old = recent.popleft()
            self.behind.update(old)
            return old
        return None

    def revise(self, bar: Bar) -> None:
        """A closed bar already committed changed: the handles are reopened on stored
        history after the cycle (:class:`~sidecar.app.history.History`)."""
        if self.last is not None and bar.t == self.last.t:
            self.last = bar
        self.needs_rebuild = True
        if self.rebuilding is not None:
            self.rebuilding[bar.t] = bar

    def reaches(self, t_ms: int) -> bool:
        """Whether a closed bar opening at ``t_ms`` (up to the newest) can be redone in
        memory (:meth:`redo`): it is newer than every bar ``behind`` holds, and the
        handles are not waiting to be reopened on stored history."""
        if self.needs_rebuild or self.rebuilding is not None:
            return False
        floor = self.behind.last_closed_t
        return floor is None or t_ms > floor

    def place(self, bar: Bar) -> None:
        """Put a closed bar within reach (:meth:`reaches`) in ``recent``: in place of the
        one it corrects, or between its neighbours (a missing bar that came); the
        handles are left as they are (:meth:`replay`)."""
        recent = self.recent
        i = len(recent)
        while i and recent[i - 1].t > bar.t:
            i -= 1
        if i and recent[i - 1].t == bar.t:
            recent[i - 1] = bar
        else:
            recent.insert(i, bar)

    def redo(self, bar: Bar) -> None:
        """A closed bar within reach (:meth:`reaches`) changed, or one missing between
        the closed bars came: :meth:`place` it, then :meth:`replay`."""
        self.place(bar)
        self.replay()

    def replay(self) -> None:
        """Redo the handles from a copy of ``behind`` over ``recent``."""
        recent = self.recent
        engine = self.behind.copy()
        update = engine.update
        for b in recent:
            update(b)
        self.engine = engine
        self.last = recent[-1]

    def reopen(self, behind: FeatureEngine, recent: Sequence[Bar]) -> None:
        """Open the handles on ``behind`` (every closed bar before ``recent``) advanced
        over ``recent`` (the newest closed bars, oldest first; those past ``reach`` go
        into ``behind``)."""
        cut = max(0, len(recent) - self.reach)
        for b in recent[:cut]:
            behind.update(b)
        kept = recent[cut:]
        engine = behind.copy()
        for b in kept:
            engine.update(b)
        self.behind, self.engine, self.recent = behind, engine, deque(kept)

    # -- the tail of the base's recent bars ------------------------------------------
    def leave(self, base: Bar) -> None:
        """The base bar ``base`` left the base's ``recent``: fold it into the tail."""
        grid = self.grid
        assert grid is not None
        if grid.regular_only and not grid.holds(base.t):
            return
        tb = self.tail_bucket
        if tb is not None and tb.lo <= base.t < tb.hi:
            if self.tail_acc is not None:
                self.tail_acc = _merge(self.tail_acc, base, False)
            self.tail_n += 1
            return
        tb = self.tail_bucket = grid.bucket(base.t)
        known = tb.lo > self.tail_blind
        self.tail_acc = aggregate(self.symbol, self.tf.name, tb.t, [base]) if known else None
        self.tail_n = 1

    def set_tail(self, base: Sequence[Bar], floor: int | None, known_from: int) -> None:
        """Set the tail from ``base`` (closed base bars, oldest first: every stored one from
        ``known_from`` on) where the base's ``recent`` begins after ``floor`` (the newest
        base bar before it; ``None``: none)."""
        grid = self.grid
        assert grid is not None
        self.tail_bucket, self.tail_acc, self.tail_n = None, None, 0
        if floor is None:
            self.tail_blind = -1
            return
        left = [b for b in base if b.t <= floor and grid.holds(b.t)]
        if not left or left[-1].t < known_from:
            self.tail_blind = floor  # its last base bar is not known: no bucket up to it has a tail
            return
        self.tail_blind = known_from - 1
        tb = self.tail_bucket = grid.bucket(left[-1].t)
        parts = [b for b in left if b.t >= tb.lo]
        self.tail_n = len(parts)
        if tb.lo > self.tail_blind:
            self.tail_acc = aggregate(self.symbol, self.tf.name, tb.t, parts)

    def regroup(self, base_recent: Iterable[Bar], t_ms: int) -> Regroup | None:
        """The bucket of the base bar opening at ``t_ms`` (held here, :meth:`Grid.holds`)
        with its parts: the tail, if the bucket is the tail's, then its base bars in
        ``base_recent`` (the base's ``recent``). ``None`` if the bucket's bar cannot be
        re-aggregated in memory: its tail is not known, or it is neither the current
        bucket nor a complete one within reach (:meth:`reaches`)."""
        grid = self.grid
        assert grid is not None
        b = grid.bucket(t_ms)
        parts: list[Bar] = []
        n = 0
        tb = self.tail_bucket
        if tb is not None and tb.lo == b.lo:
            if self.tail_acc is None:
                return None
            parts.append(self.tail_acc)
            n = self.tail_n
        elif tb is None and b.lo <= self.tail_blind:
            return None
        current = self.bucket
        is_current = current is not None and current.lo == b.lo
        if not is_current and not (b.hi <= self._done_hi and self.reaches(b.t)):
            return None
        holds = grid.holds
        ring = [x for x in base_recent if b.lo <= x.t < b.hi and holds(x.t)]
        return Regroup(b, parts + ring, n + len(ring))

    def refold(self, group: Regroup) -> Bar | None:
        """Set the bar of ``group``'s bucket (the current one, or a complete one) from its
        parts (:meth:`regroup`); returns the closed bar that changed (``None``: the current
        bucket's aggregate changed)."""
        bucket = group.bucket
        bar = aggregate(self.symbol, self.tf.name, bucket.t, group.parts)
        current = self.bucket
        if current is not None and current.lo == bucket.lo:
            self.acc = bar
            self.n_base = group.n_base
            return None
        self.redo(bar)
        return bar

    # -- folding base bars upward -----------------------------------------------------
    def fold(self, base: Bar, base_recent: Sequence[Bar] | None = None,
             refolded: list[Bar] | None = None) -> list[Bar]:
        """Fold a closed base bar into this timeframe and every one above; returns the
        higher bars that closed.

        A base bar late into a bucket already complete (a base bar of a later bucket
        came first, or the clock closed it) re-aggregates that bucket's bar from ``base_recent`` (the base's
        ``recent``, holding it; ``None``: out of reach) where it can (:meth:`regroup`):
        the bar, changed or new, goes to ``refolded`` (to the bars returned if not
        given). Otherwise the bucket is marked dirty here and above, for the rebuild."""
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
            group = None if base_recent is None else self.regroup(base_recent, base.t)
            if group is None:
                self.mark_dirty(base.t)
            else:
                changed = self.refold(group)  # a complete bucket's bar: never None
                assert changed is not None
                (out if refolded is None else refolded).append(changed)
        else:
            if self.acc is not None:
                out.append(self._finish())
            b = self.bucket = grid.bucket(base.t)
            self.acc = aggregate(self.symbol, self.tf.name, b.t, [base])
            self.n_base = 1
        if self.acc is not None and self.bucket is not None and base.t + self.base_ms >= self.bucket.end:
            out.append(self._finish())
        if self.up is not None:
            out += self.up.fold(base, base_recent, refolded)
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
        self.close(closed)  # a higher series' bar leaving ``recent`` concerns no other series
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
