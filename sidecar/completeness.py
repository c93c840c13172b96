"""How complete each symbol's series are: expected bars received, per session.

With a calendar, a session's expected bars on a timeframe are known: the buckets of its
open periods (a session, or its parts around a lunch break, cut at an early close), one
per session for a daily timeframe. A bucket is *expected* once its end has passed by
:data:`LATE_MS` (on the daemon's clock, scaled by a replay's speed); a bar *received*
is a stored closed bar that is not synthetic; *synthetic* counts gap fills; *late*
counts received bars that closed more than :data:`LATE_MS` after their bucket ended.

:class:`Completeness` keeps, per symbol and timeframe, which buckets of the current and
the previous session were received (synthetic, late), updated as the cycle closes bars
and as a rebuild stores re-aggregated ones (:meth:`Completeness.observe`), never by
scanning the store per cycle; the store is read once per symbol at start and after gap
repair (:meth:`Completeness.load`). A session roll moves current to previous (on
restart, the previous session is read from the store whatever happened meanwhile).
Extended-hours bars are neither expected nor counted (the regular session defines them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.series import Grid
from sidecar.timeframe import DAY_MS, Timeframe

#: A bar is late when it closes this long after its bucket ended (times the clock's speed);
#: a bucket is expected once its end passed by this long.
LATE_MS = 60_000
_DAY = Timeframe.parse("1d")


@dataclass(frozen=True, slots=True)
class SessionSpan:
    """One session: ``[lo, hi)`` holds its bars, ``close`` ends it, ``stamp`` is its daily
    bar's open time, ``periods`` its open periods (two around a lunch break)."""

    lo: int
    hi: int
    close: int
    stamp: int
    periods: tuple[tuple[int, int], ...]

    def expected(self, tf: Timeframe, until: int) -> int:
        """Buckets of ``tf`` in this session that ended by ``until``."""
        if tf.ms >= DAY_MS:
            return 1 if until >= self.close else 0
        n = 0
        ms = tf.ms
        for a, b in self.periods:
            if until >= b:
                n += -(-(b - a) // ms)
            elif until > a:
                n += (until - a) // ms
        return n


    def next_change(self, tf: Timeframe, until: int) -> int:
        """The first ``until`` after this one at which :meth:`expected` grows (never: a
        very large number)."""
        never = 2**62
        if tf.ms >= DAY_MS:
            return self.close if until < self.close else never
        ms = tf.ms
        for a, b in self.periods:
            if until < b:
                return a + ms if until < a else min(b, a + ((until - a) // ms + 1) * ms)
        return never


def session_at(calendar: MarketCalendar, t_ms: int) -> SessionSpan:
    """The session ``t_ms`` belongs to (the time after a close belongs to the session
    before it; the UTC day for a market that never closes)."""
    bucket = Grid(_DAY, calendar).bucket(t_ms)
    periods: tuple[tuple[int, int], ...] = ((bucket.lo, bucket.end),)
    if not calendar.always_open and calendar.session_span(t_ms) is not None:
        sess = calendar.sessions_between(bucket.lo, bucket.lo + 1)
        if sess and sess[0].break_start is not None and sess[0].break_end is not None:
            s = sess[0]
            periods = ((s.open, s.break_start), (s.break_end, s.close))  # type: ignore[assignment]
    return SessionSpan(bucket.lo, bucket.hi, bucket.end, bucket.t, periods)


#: Per timeframe, the masks of a track: received, synthetic and late bars of the current
#: session, then of the previous one (bit ``k``: the bucket ``k`` timeframes after the
#: session's ``lo``; bit 0 for a daily bar).
_RECV, _SYN, _LATE, _PREV = 0, 1, 2, 3
_SLOTS = 6


@dataclass(slots=True)
class _Group:
    """The symbols of one calendar in one session: the expected counts per timeframe, shared."""

    calendar: MarketCalendar
    cur: SessionSpan
    prev: SessionSpan
    #: Per timeframe: expected bars in the current and the previous session, as of ``until``.
    exp_now: list[int]
    exp_prev: list[int]
    #: When an expected count can change next (a bucket's end passed by the late window).
    next_change: int = -(2**62)
    version: int = 0
    #: Per timeframe: the ``version`` at which its expected counts last changed.
    changed: list[int] = field(default_factory=list)


class _Track:
    """One symbol: its session group and, per timeframe, the two sessions' masks."""

    __slots__ = ("dirty", "group", "masks", "seen", "seen_group", "views")

    def __init__(self, group: _Group, n: int, views: list[dict[str, Any]]) -> None:
        self.group = group
        self.masks = [0] * (_SLOTS * n)
        #: Bit ``i``: timeframe ``i``'s counts changed since :attr:`views` was built.
        self.dirty = 0
        #: The group and its version :attr:`views` was built for.
        self.seen_group = group
        self.seen = -1
        self.views = views


class Completeness:
    """Per symbol (with a calendar) and timeframe: expected, received, synthetic, late.

    Counting is idempotent: each session's received, synthetic and late bars are kept as
    bit masks over its buckets, so a bar seen again (a correction, a re-delivery, the
    store read at start or after gap repair) is counted once; a bar that arrives after
    newer ones (inside the correction window, or from gap repair) is counted when it
    comes, and a received bar replaces a synthetic one at its time. A bar is late when
    the cycle received it more than :data:`LATE_MS` after its bucket ended; bars read
    from the store are never late (:meth:`load`).
    """

    __slots__ = ("_groups", "_index", "_interned", "_late_ms", "_now", "_sessions", "_tracks",
                 "timeframes")

    def __init__(self, calendars: dict[str, MarketCalendar], timeframes: Sequence[Timeframe],
                 now_ms: int, *, speed: float = 1.0) -> None:
        self.timeframes = tuple(timeframes)
        self._index = {tf.name: i for i, tf in enumerate(self.timeframes)}
        self._late_ms = int(LATE_MS * max(1.0, speed))
        self._sessions: dict[tuple[str, int], SessionSpan] = {}
        self._groups: dict[tuple[str, int], _Group] = {}
        #: The view dicts, one per distinct value: most symbols share theirs.
        self._interned: dict[tuple[int, int, int, int, int, int], dict[str, Any]] = {}
        self._now = -1
        n = len(self.timeframes)
        by_calendar: dict[str, _Group] = {}
        empty = [self._view(0, 0, 0, 0, 0, 0)] * n
        tracks: dict[str, _Track] = {}
        for sym, cal in calendars.items():
            group = by_calendar.get(cal.name)
            if group is None:
                group = by_calendar[cal.name] = self._group(cal, now_ms)
            tracks[sym] = _Track(group, n, empty.copy())
        self._tracks = tracks

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._tracks

    # -- sessions ---------------------------------------------------------------------
    def _session(self, cal: MarketCalendar, t_ms: int) -> SessionSpan:
        """:func:`session_at`, built once per calendar and session."""
        span = None if cal.always_open else cal.session_span(t_ms)
        key = (cal.name, span[0] if span is not None else t_ms - t_ms % DAY_MS)
        out = self._sessions.get(key)
        if out is None:
            out = self._sessions[key] = session_at(cal, t_ms)
        return out

    def _group(self, cal: MarketCalendar, t_ms: int) -> _Group:
        cur = self._session(cal, t_ms)
        key = (cal.name, cur.lo)
        group = self._groups.get(key)
        if group is None:
            n = len(self.timeframes)
            if len(self._groups) > 64:  # sessions long gone
                self._groups = {k: g for k, g in self._groups.items() if g.cur.hi > cur.lo}
            group = self._groups[key] = _Group(cal, cur, self._session(cal, cur.lo - 1), [0] * n, [0] * n,
                                               changed=[0] * n)
        return group

    def _tick(self, now_ms: int) -> None:
        """Bring every group's expected counts to ``now_ms`` (once per cycle, per group)."""
        self._now = now_ms
        until = now_ms - self._late_ms
        for g in self._groups.values():
            if until < g.next_change:
                continue
            exp_now = [g.cur.expected(tf, until) for tf in self.timeframes]
            exp_prev = [g.prev.expected(tf, until) for tf in self.timeframes]
            g.version += 1
            for i, (a, b) in enumerate(zip(exp_now, exp_prev, strict=True)):
                if a != g.exp_now[i] or b != g.exp_prev[i]:
                    g.changed[i] = g.version
            g.exp_now, g.exp_prev = exp_now, exp_prev
            g.next_change = min(g.cur.next_change(tf, until) for tf in self.timeframes)

    # -- counting ---------------------------------------------------------------------
    def _roll(self, tr: _Track, t_ms: int) -> None:
        """Make the session of ``t_ms`` (later than the current one) the current one."""
        group = self._group(tr.group.calendar, t_ms)
        if group.cur.lo <= tr.group.cur.lo:
            return
        follows = group.cur.lo == tr.group.cur.hi
        m = tr.masks
        for base in range(0, len(m), _SLOTS):
            m[base + _PREV:base + _SLOTS] = m[base:base + _PREV] if follows else (0, 0, 0)
            m[base:base + _PREV] = (0, 0, 0)
        tr.group = group
        tr.dirty = (1 << len(self.timeframes)) - 1
        self._now = -1  # the new group's expected counts are due

    def observe(self, bars: Iterable[Bar], now_ms: int, *, history: bool = False) -> None:
        """Count the closed bars among ``bars`` (stored by the cycle at ``now_ms``).

        ``history``: read from or written to the store after the fact (start-up, gap
        repair, a rebuild): never late.
        """
        tracks, index, late_ms = self._tracks, self._index, self._late_ms
        for b in bars:
            if b.forming:
                continue
            tr = tracks.get(b.symbol)
            i = index.get(b.tf)
            if tr is None or i is None:
                continue
            tf = self.timeframes[i]
            ms = tf.ms
            t = b.t
            daily = ms >= DAY_MS
            g = tr.group
            if not daily and t >= g.cur.hi:
                self._roll(tr, t)
                g = tr.group
            if daily:
                span = g.cur if t == g.cur.stamp else g.prev if t == g.prev.stamp else None
                if span is None:
                    continue  # an older session
                bit, end = 1, span.close
            else:
                span = g.cur if g.cur.lo <= t else g.prev if g.prev.lo <= t else None
                if span is None:
                    continue  # an older session
                end = 0
                for lo, hi in span.periods:
                    if lo <= t < hi:
                        end = min(t + ms, hi)
                        break
                if not end:
                    cal = g.calendar
                    if cal.always_open or cal.known(t):
                        continue  # extended hours: the regular session defines completeness
                    end = t + ms
                bit = 1 << (t - span.lo) // ms
            base = _SLOTS * i + (0 if span is g.cur else _PREV)
            m = tr.masks
            if m[base] & bit:
                continue  # counted received already: a correction or a re-delivery
            if b.synthetic:
                if m[base + _SYN] & bit:
                    continue
                m[base + _SYN] |= bit
            else:
                m[base] |= bit
                m[base + _SYN] &= ~bit
                if not history and now_ms > end + late_ms:
                    m[base + _LATE] |= bit
            tr.dirty |= 1 << i

    def load(self, symbol: str, tf: str, bars: Sequence[Bar], now_ms: int) -> None:
        """Count ``symbol``'s stored closed bars on ``tf`` of the current and the previous
        session (``bars``, read from the store): what the masks lack is added, what they
        hold stays (bars the cycles counted while the store was read are not lost)."""
        tr = self._tracks.get(symbol)
        if tr is None or tf not in self._index:
            return
        if now_ms >= tr.group.cur.hi:
            self._roll(tr, now_ms)
        self.observe(bars, now_ms, history=True)

    # -- reading ----------------------------------------------------------------------
    def _view(self, received: int, expected: int, prev_received: int, prev_expected: int,
              synthetic: int, late: int) -> dict[str, Any]:
        """The view dict of these counts, one object per distinct value."""
        key = (received, expected, prev_received, prev_expected, synthetic, late)
        view = self._interned.get(key)
        if view is None:
            if len(self._interned) >= 16_384:
                self._interned.clear()
            view = self._interned[key] = {
                "session": _share(received, expected), "previous": _share(prev_received, prev_expected),
                "synthetic": synthetic, "late": late}
        return view

    def views(self, symbol: str, now_ms: int) -> list[dict[str, Any]] | None:
        """Per timeframe, the features' ``completeness`` of ``symbol``: ``session`` and
        ``previous`` (the share of the expected bars received, capped at 1; ``None``
        while none is expected), ``synthetic`` and ``late`` (current session).

        This runs for every symbol every cycle: the list is the same until a count
        changes, then only the changed timeframes' entries are replaced, by dicts shared
        between every symbol with the same counts (never mutate them).
        """
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        g = tr.group
        if now_ms >= g.cur.hi:
            self._roll(tr, now_ms)
            g = tr.group
        if now_ms != self._now:
            self._tick(now_ms)
        if tr.seen == g.version and tr.seen_group is g and not tr.dirty:
            return tr.views
        stale = tr.dirty
        if tr.seen_group is not g:
            stale = (1 << len(self.timeframes)) - 1
        seen, m, views = tr.seen, tr.masks, tr.views
        for i, changed in enumerate(g.changed):
            if stale >> i & 1 or changed > seen:
                base = _SLOTS * i
                views[i] = self._view(m[base].bit_count(), g.exp_now[i], m[base + _PREV].bit_count(),
                                      g.exp_prev[i], m[base + _SYN].bit_count(), m[base + _LATE].bit_count())
        tr.seen, tr.seen_group, tr.dirty = g.version, g, 0
        return views

    def report(self, symbol: str, now_ms: int) -> dict[str, dict[str, Any]] | None:
        """Per timeframe, the counts behind :meth:`views` (``/health``)."""
        views = self.views(symbol, now_ms)
        if views is None:
            return None
        tr = self._tracks[symbol]
        g, m = tr.group, tr.masks
        out: dict[str, dict[str, Any]] = {}
        for i, tf in enumerate(self.timeframes):
            now = [x.bit_count() for x in m[_SLOTS * i:_SLOTS * i + _PREV]]
            prev = [x.bit_count() for x in m[_SLOTS * i + _PREV:_SLOTS * (i + 1)]]
            out[tf.name] = {
                **views[i],
                "current": {"from": g.cur.lo, "expected": g.exp_now[i],
                            "received": now[_RECV], "synthetic": now[_SYN], "late": now[_LATE]},
                "prev": {"from": g.prev.lo, "expected": g.exp_prev[i],
                         "received": prev[_RECV], "synthetic": prev[_SYN], "late": prev[_LATE]},
            }
        return out

    def sessions(self, symbol: str, now_ms: int) -> tuple[int, int] | None:
        """``[from, to)`` spanning ``symbol``'s previous and current sessions (what :meth:`load` needs)."""
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        if now_ms >= tr.group.cur.hi:
            self._roll(tr, now_ms)
        g = tr.group
        return min(g.prev.lo, g.prev.stamp), max(g.cur.hi, g.cur.stamp + 1)


def _share(received: int, expected: int) -> float | None:
    return None if expected <= 0 else min(1.0, round(received / expected, 4))
