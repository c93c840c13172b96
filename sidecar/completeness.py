"""How complete each symbol's series are: expected bars received, per session.

With a calendar, a session's expected bars on a timeframe are known: the buckets of its
open periods (a session, or its parts around a lunch break, cut at an early close), one
per session for a daily timeframe. A bucket is *expected* once its end has passed by
:data:`LATE_MS` (on the daemon's clock, scaled by a replay's speed); a bar *received*
is a stored closed bar that is not synthetic; *synthetic* counts gap fills; *late*
counts received bars that closed more than :data:`LATE_MS` after their bucket ended.

:class:`Completeness` keeps counters per symbol and timeframe for the current and the
previous session, updated as the cycle closes bars (:meth:`Completeness.observe`),
never by scanning the store per cycle; the store is read once per symbol at start and
after gap repair (:meth:`Completeness.load`). A session roll moves current to previous.
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


@dataclass(slots=True)
class Counts:
    """One session's counts on one timeframe."""

    received: int = 0
    synthetic: int = 0
    late: int = 0


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


@dataclass(slots=True)
class _Track:
    """One symbol: its session group and, per timeframe, the two sessions' counts."""

    group: _Group
    now: list[Counts]
    before: list[Counts]
    #: Per timeframe: the newest bar counted (older ones are corrections or repairs).
    newest: list[int]
    #: Bumped whenever a count changes; the views are rebuilt when it or the group's moved.
    version: int = 0
    seen: tuple[int, int, int] = (-1, -1, -1)
    views: list[dict[str, Any]] = field(default_factory=list)


class Completeness:
    """Per symbol (with a calendar) and timeframe: expected, received, synthetic, late."""

    __slots__ = ("_groups", "_index", "_late_ms", "_now", "_sessions", "_tracks", "timeframes")

    def __init__(self, calendars: dict[str, MarketCalendar], timeframes: Sequence[Timeframe],
                 now_ms: int, *, speed: float = 1.0) -> None:
        self.timeframes = tuple(timeframes)
        self._index = {tf.name: i for i, tf in enumerate(self.timeframes)}
        self._late_ms = int(LATE_MS * max(1.0, speed))
        self._sessions: dict[tuple[str, int], SessionSpan] = {}
        self._groups: dict[tuple[str, int], _Group] = {}
        self._now = -1
        n = len(self.timeframes)
        self._tracks: dict[str, _Track] = {
            sym: _Track(self._group(cal, now_ms), [Counts() for _ in range(n)],
                        [Counts() for _ in range(n)], [-1] * n)
            for sym, cal in calendars.items()}

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
            group = self._groups[key] = _Group(cal, cur, self._session(cal, cur.lo - 1), [0] * n, [0] * n)
        return group

    def _tick(self, now_ms: int) -> None:
        """Bring every group's expected counts to ``now_ms`` (once per cycle, per group)."""
        self._now = now_ms
        until = now_ms - self._late_ms
        for g in self._groups.values():
            if until < g.next_change:
                continue
            g.exp_now = [g.cur.expected(tf, until) for tf in self.timeframes]
            g.exp_prev = [g.prev.expected(tf, until) for tf in self.timeframes]
            g.next_change = min(g.cur.next_change(tf, until) for tf in self.timeframes)
            g.version += 1

    # -- counting ---------------------------------------------------------------------
    def _roll(self, tr: _Track, t_ms: int) -> None:
        """Make the session of ``t_ms`` (later than the current one) the current one."""
        group = self._group(tr.group.calendar, t_ms)
        if group.cur.lo <= tr.group.cur.lo:
            return
        follows = group.cur.lo == tr.group.cur.hi
        tr.before = tr.now if follows else [Counts() for _ in tr.now]
        tr.now = [Counts() for _ in tr.now]
        tr.group = group
        tr.version += 1
        self._now = -1  # the new group's expected counts are due

    def observe(self, bars: Iterable[Bar], now_ms: int) -> None:
        """Count the closed bars among ``bars`` (stored by the cycle at ``now_ms``)."""
        tracks, index = self._tracks, self._index
        for b in bars:
            if b.forming:
                continue
            tr = tracks.get(b.symbol)
            i = index.get(b.tf)
            if tr is None or i is None or b.t <= tr.newest[i]:
                continue
            tr.newest[i] = b.t
            tf = self.timeframes[i]
            daily = tf.ms >= DAY_MS
            if not daily and b.t >= tr.group.cur.hi:
                self._roll(tr, b.t)
            g = tr.group
            cal = g.calendar
            if daily:
                span = g.cur if b.t == g.cur.stamp else g.prev if b.t == g.prev.stamp else None
            else:
                span = g.cur if g.cur.lo <= b.t else g.prev if g.prev.lo <= b.t else None
            if span is None or (not daily and not cal.always_open and cal.period(b.t) is None
                                and cal.known(b.t)):
                continue  # an older session, or extended hours: not counted
            counts = (tr.now if span is g.cur else tr.before)[i]
            tr.version += 1
            if b.synthetic:
                counts.synthetic += 1
                continue
            counts.received += 1
            end = span.close if daily else min(b.t + tf.ms, cal.next_close(b.t) or b.t + tf.ms)
            if now_ms > end + self._late_ms:
                counts.late += 1

    def load(self, symbol: str, tf: str, bars: Sequence[Bar], now_ms: int) -> None:
        """Set ``symbol``'s counts on ``tf`` from its stored closed bars of the current and
        the previous session (``bars``, read from the store); late counts are kept."""
        tr = self._tracks.get(symbol)
        i = self._index.get(tf)
        if tr is None or i is None:
            return
        if now_ms >= tr.group.cur.hi:
            self._roll(tr, now_ms)
        late = tr.now[i].late, tr.before[i].late
        tr.now[i], tr.before[i] = Counts(late=late[0]), Counts(late=late[1])
        newest = tr.newest[i]
        tr.newest[i] = -1
        self.observe([b for b in bars if not b.forming], -(2**62))  # never late: history
        tr.now[i].late, tr.before[i].late = late
        tr.newest[i] = max(newest, tr.newest[i])
        tr.version += 1

    # -- reading ----------------------------------------------------------------------
    def views(self, symbol: str, now_ms: int) -> list[dict[str, Any]] | None:
        """Per timeframe, the features' ``completeness`` of ``symbol``: ``session`` and
        ``previous`` (the share of the expected bars received, capped at 1; ``None``
        while none is expected), ``synthetic`` and ``late`` (current session). The same
        dicts until something in them changes (this runs for every symbol every cycle)."""
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        if now_ms >= tr.group.cur.hi:
            self._roll(tr, now_ms)
        if now_ms != self._now:
            self._tick(now_ms)
        g = tr.group
        seen = (id(g), g.version, tr.version)
        if tr.seen != seen:
            tr.seen = seen
            tr.views = [{"session": _share(c.received, en), "previous": _share(p.received, ep),
                         "synthetic": c.synthetic, "late": c.late}
                        for c, p, en, ep in zip(tr.now, tr.before, g.exp_now, g.exp_prev, strict=True)]
        return tr.views

    def report(self, symbol: str, now_ms: int) -> dict[str, dict[str, Any]] | None:
        """Per timeframe, the counts behind :meth:`views` (``/health``)."""
        views = self.views(symbol, now_ms)
        if views is None:
            return None
        tr = self._tracks[symbol]
        g = tr.group
        out: dict[str, dict[str, Any]] = {}
        for i, tf in enumerate(self.timeframes):
            c, p = tr.now[i], tr.before[i]
            out[tf.name] = {
                **views[i],
                "current": {"from": g.cur.lo, "expected": g.exp_now[i],
                            "received": c.received, "synthetic": c.synthetic, "late": c.late},
                "prev": {"from": g.prev.lo, "expected": g.exp_prev[i],
                         "received": p.received, "synthetic": p.synthetic, "late": p.late},
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
