"""Where a bar is checked before anything stores it.

:func:`check_bar` holds the rules one bar must pass on its own (prices, volume,
alignment, clock). :class:`Validator` adds the rules that need memory of what was
already accepted per symbol: ordering, revisions, corrections, duplicates,
outliers (held, not stored) and gaps (recorded, optionally filled with bars
marked synthetic). With a symbol's trading calendar, only bars whose time overlaps
its regular hours are expected (a weekend, a holiday or a lunch break is no gap) and
accepted: a bar outside them is rejected as ``outside_session``, unless the symbol
includes extended hours and the bar lies in its extended session (such bars are
accepted, never expected: a pre-market minute without trades is no gap).
Every rejection is counted by reason and logged once.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.bar import MAX_EPOCH_MS, Bar
from sidecar.calendars import MarketCalendar
from sidecar.timeframe import Timeframe

log = logging.getLogger("sidecar.validation")

#: Gap filling never makes up more than this many bars at once (weekends, halts).
MAX_FILL_BARS = 1_000
#: Gaps logged a line each among those not yet taken from :attr:`Validator.new_gaps` (a
#: cycle's: after a restart every symbol has one); the pipeline logs how many in all.
GAP_LOG_LINES = 20


class Verdict(enum.Enum):
    NEW = "new"  # a bar newer than anything stored for the symbol
    REVISION = "revision"  # the newest bar again, with other values
    CORRECTION = "correction"  # an older, already stored bar with other values
    DUPLICATE = "duplicate"  # identical to what is stored: nothing to do
    HELD = "held"  # an outlier, kept aside until confirmed or dropped
    REJECTED = "rejected"


_INF = math.inf


def price_reason(bar: Bar) -> str | None:
    """The reason ``bar``'s prices or volume are invalid, or ``None`` if they pass."""
    o, h, l, c, v = bar.o, bar.h, bar.l, bar.c, bar.v
    # 0 < x < inf: finite and positive in one comparison each (NaN compares false).
    if not (0.0 < o < _INF and 0.0 < h < _INF and 0.0 < l < _INF and 0.0 < c < _INF):
        return "bad_price"
    if h < o or h < c:
        return "high_below_open_close"
    if l > o or l > c:
        return "low_above_open_close"
    if v is not None and not 0.0 <= v < _INF:
        return "bad_volume"
    return None


def check_bar(bar: Bar, tf: Timeframe, now_ms: int, skew_ms: int) -> str | None:
    """The reason ``bar`` is invalid on its own, or ``None`` if it passes."""
    reason = price_reason(bar)
    if reason is not None:
        return reason
    if bar.tf != tf.name:
        return "wrong_timeframe"
    if not 0 <= bar.t <= MAX_EPOCH_MS:  # before 1970 or past 9999: a garbled stamp
        return "bad_time"
    if not tf.is_aligned(bar.t):
        return "misaligned_time"
    if bar.t > now_ms + skew_ms:
        return "future"
    return None


def validate_history(
    bars: Iterable[Bar], tf: Timeframe, now_ms: int, skew_ms: int = 2_000
) -> tuple[list[Bar], Counter[str]]:
    """Check a list of history bars: per-bar rules, then one bar per open time.

    Returns the accepted bars oldest first (a later bar with the same time
    replaces an earlier one) and the rejection counts by reason.
    """
    rejected: Counter[str] = Counter()
    by_time: dict[int, Bar] = {}
    for bar in bars:
        reason = check_bar(bar, tf, now_ms, skew_ms)
        if reason is not None:
            rejected[reason] += 1
            continue
        if bar.t in by_time:
            rejected["duplicate"] += 1
        by_time[bar.t] = bar
    return [by_time[t] for t in sorted(by_time)], rejected


@dataclass(slots=True)
class Gap:
    """Bars missing between two stored bars: open times ``start`` .. ``end`` inclusive."""

    symbol: str
    start: int
    end: int
    missing: int
    filled: bool = False


@dataclass(slots=True)
class _SymbolState:
    newest: Bar | None = None
    recent: dict[int, Bar] = field(default_factory=dict)  # t -> bar, the correction window
    ranges: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    range_sum: float = 0.0
    held: Bar | None = None
    vetted_t: int = -1  # the open time of the last bar that passed check_bar (-1: none yet)


@dataclass(slots=True)
class Outcome:
    """What to do with one incoming bar: store ``bars`` (may be empty; read it, never change it:
    every duplicate shares one outcome)."""

    verdict: Verdict
    bars: list[Bar]
    reason: str | None = None


_DUPLICATE = Outcome(Verdict.DUPLICATE, [])


class Validator:
    """Stateful validation per symbol for one timeframe."""

    __slots__ = (
        "_calendars",
        "_correction_ms",
        "_extended",
        "_fill_gaps",
        "_grids",
        "_outlier_k",
        "_recent_cap",
        "_skew_ms",
        "_states",
        "_tf",
        "_window",
        "accepted",
        "duplicates",
        "gaps",
        "held",
        "new_gaps",
        "rejected",
    )

    def __init__(
        self,
        tf: Timeframe,
        *,
        skew_ms: int = 2_000,
        outlier_k: float = 15.0,
        outlier_window: int = 50,
        correction_window_bars: int = 10,
        fill_gaps: bool = False,
        grids: Mapping[str, Timeframe] | None = None,
        calendars: Mapping[str, MarketCalendar] | None = None,
        extended: Mapping[str, MarketCalendar] | None = None,
    ) -> None:
        """``calendars``: per symbol, the market hours its bars are expected in (gaps);
        ``extended``: per symbol including extended hours, the hours its bars are accepted in."""
        self._tf = tf
        self._calendars = dict(calendars or {})
        self._extended = dict(extended or {})
        #: Symbols whose bars sit on a session grid (``Timeframe.on_session``), by symbol.
        self._grids = {sym: g for sym, g in (grids or {}).items() if g.session is not None}
        self._skew_ms = skew_ms
        self._outlier_k = outlier_k
        self._window = outlier_window
        self._correction_ms = correction_window_bars * tf.ms
        #: Stored bars kept per symbol before the ones older than the window are dropped.
        self._recent_cap = 2 * (correction_window_bars + 1) + 4
        self._fill_gaps = fill_gaps
        self._states: dict[str, _SymbolState] = {}
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.duplicates = 0
        self.held = 0
        self.gaps: dict[str, deque[Gap]] = {}
        #: Gaps found since the caller last cleared this list (to persist them).
        self.new_gaps: list[Gap] = []

    def status(self) -> dict[str, Any]:
        """What validation did so far: bars accepted, duplicates, outliers held, rejections
        by reason, gaps recorded (``/health``'s ``bars``)."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "held_outliers": self.held,
            "rejected": dict(self.rejected),
            "gaps": sum(len(g) for g in self.gaps.values()),
        }

    # -- state ----------------------------------------------------------------
    def _state(self, symbol: str) -> _SymbolState:
        st = self._states.get(symbol)
        if st is None:
            st = _SymbolState(ranges=deque(maxlen=self._window))
            self._states[symbol] = st
        return st

    def prime(self, symbol: str, bars: Iterable[Bar]) -> None:
        """Teach the validator what is already stored (oldest first), e.g. at start."""
        st = self._state(symbol)
        for bar in bars:
            self._remember(st, bar)

    def newest(self, symbol: str) -> Bar | None:
        st = self._states.get(symbol)
        return st.newest if st else None

    def held_bar(self, symbol: str) -> Bar | None:
        st = self._states.get(symbol)
        return st.held if st else None

    def _remember(self, st: _SymbolState, bar: Bar) -> None:
        if st.newest is None or bar.t >= st.newest.t:
            if st.newest is None or bar.t > st.newest.t:
                rng = bar.h - bar.l
                if len(st.ranges) == st.ranges.maxlen:
                    st.range_sum -= st.ranges[0]
                st.ranges.append(rng)
                st.range_sum += rng
            st.newest = bar
        st.recent[bar.t] = bar
        if len(st.recent) > self._recent_cap:
            cutoff = st.newest.t - self._correction_ms
            for t in [t for t in st.recent if t < cutoff]:
                del st.recent[t]

    # -- the check --------------------------------------------------------------
    def check(self, bar: Bar, now_ms: int, symbol: str | None = None) -> Outcome:
        """Decide what happens to ``bar``; counts and logs rejections.

        ``symbol``: the symbol that was asked for; a bar labelled otherwise is rejected
        (``wrong_symbol``), whatever the source put in it.
        """
        if symbol is not None and bar.symbol != symbol:
            return self._reject(bar, "wrong_symbol")
        st = self._states.get(bar.symbol)
        known: Bar | None = None
        if st is not None:
            known = st.recent.get(bar.t)
            # Most bars of a cycle are re-deliveries of stored ones (a source repeats the
            # last closed bars): they passed every rule when they first came.
            if known is not None and (known is bar or (known.tf == bar.tf and known.same_values(bar))):
                self.duplicates += 1
                return _DUPLICATE
            grid = self._grids.get(bar.symbol, self._tf)
            if bar.t == st.vetted_t and bar.tf == grid.name:
                # A revision of a bar whose open time already passed the time rules (the
                # forming bar, every cycle): only the prices and the clock (which may have
                # stepped back) can fail now; the verdict is the one check_bar would give.
                reason = price_reason(bar)
                if reason is None and bar.t > now_ms + self._skew_ms:
                    reason = "future"
            else:
                reason = self._vet(bar, grid, now_ms)
        else:
            reason = self._vet(bar, self._grids.get(bar.symbol, self._tf), now_ms)
        if reason is not None:
            return self._reject(bar, reason)
        if st is None:
            st = self._state(bar.symbol)
        st.vetted_t = bar.t
        newest = st.newest
        if (known is not None and known is newest and known.tf == bar.tf and st.held is None
                and not self._is_outlier(st, bar, reference=known.c)):
            # The newest bar revised, nothing held, no jump: what the general path below
            # does for it (no gap, no new range), in short.
            st.newest = bar
            st.recent[bar.t] = bar
            self.accepted += 1
            return Outcome(Verdict.REVISION, [bar])
        if newest is None:
            self._remember(st, bar)
            self.accepted += 1
            return Outcome(Verdict.NEW, [bar])

        if bar.t < newest.t:
            known = st.recent.get(bar.t)
            if known is not None and known.same_values(bar):
                self.duplicates += 1
                return _DUPLICATE
            if newest.t - bar.t > self._correction_ms:
                return self._reject(bar, "stale")
            st.recent[bar.t] = bar
            self.accepted += 1
            return Outcome(Verdict.CORRECTION, [bar])

        if bar.t == newest.t and newest.same_values(bar):
            self.duplicates += 1
            return _DUPLICATE

        out: list[Bar] = []
        if st.held is not None:
            held, st.held = st.held, None
            if held.t == bar.t or not self._is_outlier(st, bar, reference=held.c):
                # The market confirmed the jump: the held bar was real.
                if held.t != bar.t:
                    log.info("outlier confirmed", extra={"symbol": bar.symbol, "t": held.t})
                    out.extend(self._accept_new(st, held))
            else:
                self._reject(held, "outlier")
        if self._is_outlier(st, bar, reference=st.newest.c if st.newest else bar.o):
            st.held = bar
            self.held += 1
            log.warning(
                "outlier held",
                extra={"symbol": bar.symbol, "t": bar.t, "o": bar.o, "h": bar.h, "l": bar.l,
                       "c": bar.c, "ref": st.newest.c if st.newest else None},
            )
            return Outcome(Verdict.HELD, out)
        verdict = Verdict.REVISION if st.newest is not None and bar.t == st.newest.t else Verdict.NEW
        out.extend(self._accept_new(st, bar))
        return Outcome(verdict, out)

    def _accept_new(self, st: _SymbolState, bar: Bar) -> list[Bar]:
        out: list[Bar] = []
        newest = st.newest
        step = self._tf.ms
        times = self._missing(bar.symbol, newest.t + step, bar.t) if newest is not None else range(0)
        if newest is not None and times:
            gap = Gap(bar.symbol, times[0], times[-1], len(times))
            if self._fill_gaps and gap.missing <= MAX_FILL_BARS:
                gap.filled = True
                p = newest.c
                out.extend(
                    Bar(bar.symbol, bar.tf, t, p, p, p, p, 0.0 if bar.v is not None else None,
                        "gapfill", forming=False, synthetic=True)
                    for t in times
                )
                for filler in out:
                    self._remember(st, filler)
            self.gaps.setdefault(bar.symbol, deque(maxlen=100)).append(gap)
            self.new_gaps.append(gap)
            if len(self.new_gaps) <= GAP_LOG_LINES:
                log.info(
                    "gap detected",
                    extra={"symbol": bar.symbol, "start": gap.start, "end": gap.end,
                           "missing": gap.missing, "filled": gap.filled},
                )
        self._remember(st, bar)
        self.accepted += 1
        out.append(bar)
        return out

    def _missing(self, symbol: str, start: int, end: int) -> Sequence[int]:
        """Open times of the bars expected in ``[start, end)``: every grid step, or with a
        calendar only the bars overlapping its open hours."""
        calendar = self._calendars.get(symbol)
        if calendar is None or end <= start:
            return range(start, end, self._tf.ms)
        return calendar.open_slots(start, end, self._tf.ms)

    def _is_outlier(self, st: _SymbolState, bar: Bar, reference: float) -> bool:
        if self._outlier_k <= 0.0 or len(st.ranges) < 10:
            return False
        # Floor the typical range so a flat market does not make every tick an outlier.
        typical = max(st.range_sum / len(st.ranges), reference * 1e-4)
        bound = self._outlier_k * typical
        return abs(bar.c - reference) > bound or bar.h - bar.l > bound

    def _vet(self, bar: Bar, grid: Timeframe, now_ms: int) -> str | None:
        """:func:`check_bar`, then the symbol's regular hours: a bar wholly outside them
        (pre- or post-market, a provider's entry stamped at the close) is ``outside_session``
        unless it lies in the extended hours the symbol includes."""
        reason = check_bar(bar, grid, now_ms, self._skew_ms)
        if reason is None and self._calendars:
            calendar = self._calendars.get(bar.symbol)
            if calendar is not None and not calendar.open_slots(bar.t, bar.t + grid.ms, grid.ms):
                ext = self._extended.get(bar.symbol)
                if ext is None or not ext.open_slots(bar.t, bar.t + grid.ms, grid.ms):
                    return "outside_session"
        return reason

    def _reject(self, bar: Bar, reason: str) -> Outcome:
        self.rejected[reason] += 1
        if reason == "outside_session":  # routine (extended-hours feeds): counted, not warned
            log.debug("bar outside regular hours", extra={"symbol": bar.symbol, "t": bar.t})
            return Outcome(Verdict.REJECTED, [], reason)
        log.warning(
            "bar rejected",
            extra={"reason": reason, "symbol": bar.symbol, "tf": bar.tf, "t": bar.t, "o": bar.o,
                   "h": bar.h, "l": bar.l, "c": bar.c, "v": bar.v, "src": bar.src},
        )
        return Outcome(Verdict.REJECTED, [], reason)
