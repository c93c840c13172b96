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
class _Track:
    """One symbol: its current and previous session, and per timeframe their counts."""

    calendar: MarketCalendar
    cur: SessionSpan
    prev: SessionSpan
    now: list[Counts]
    before: list[Counts]
    #: Per timeframe: the newest bar counted (older ones are corrections or repairs).
    newest: list[int]
    #: Per timeframe: the map the features carry, and what it was built from.
    views: list[dict[str, Any] | None] = field(default_factory=list)
    keys: list[tuple[int, ...] | None] = field(default_factory=list)


class Completeness:
    """Per symbol (with a calendar) and timeframe: expected, received, synthetic, late."""

    __slots__ = ("_index", "_late_ms", "_tracks", "timeframes")

    def __init__(self, calendars: dict[str, MarketCalendar], timeframes: Sequence[Timeframe],
                 now_ms: int, *, speed: float = 1.0) -> None:
        self.timeframes = tuple(timeframes)
        self._index = {tf.name: i for i, tf in enumerate(self.timeframes)}
        self._late_ms = int(LATE_MS * max(1.0, speed))
        n = len(self.timeframes)
        self._tracks: dict[str, _Track] = {}
        for sym, cal in calendars.items():
            cur = session_at(cal, now_ms)
            self._tracks[sym] = _Track(cal, cur, session_at(cal, cur.lo - 1),
                                       [Counts() for _ in range(n)], [Counts() for _ in range(n)],
                                       [-1] * n, [None] * n, [None] * n)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._tracks

    # -- counting ---------------------------------------------------------------------
    def _roll(self, tr: _Track, t_ms: int) -> None:
        """Make the session of ``t_ms`` (later than the current one) the current one."""
        new = session_at(tr.calendar, t_ms)
        if new.lo <= tr.cur.lo:
            return
        follows = new.lo == tr.cur.hi
        tr.prev = tr.cur if follows else session_at(tr.calendar, new.lo - 1)
        tr.before = tr.now if follows else [Counts() for _ in tr.now]
        tr.now = [Counts() for _ in tr.now]
        tr.cur = new

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
            if not daily and b.t >= tr.cur.hi:
                self._roll(tr, b.t)
            if daily:
                span = tr.cur if b.t == tr.cur.stamp else tr.prev if b.t == tr.prev.stamp else None
            else:
                span = tr.cur if tr.cur.lo <= b.t else tr.prev if tr.prev.lo <= b.t else None
            if span is None or (not daily and tr.calendar.period(b.t) is None
                                and tr.calendar.known(b.t) and not tr.calendar.always_open):
                continue  # an older session, or extended hours: not counted
            counts = (tr.now if span is tr.cur else tr.before)[i]
            if b.synthetic:
                counts.synthetic += 1
                continue
            counts.received += 1
            end = span.close if daily else min(b.t + tf.ms, tr.calendar.next_close(b.t) or b.t + tf.ms)
            if now_ms > end + self._late_ms:
                counts.late += 1

    def load(self, symbol: str, tf: str, bars: Sequence[Bar], now_ms: int) -> None:
        """Set ``symbol``'s counts on ``tf`` from its stored closed bars of the current and
        the previous session (``bars``, read from the store); late counts are kept."""
        tr = self._tracks.get(symbol)
        i = self._index.get(tf)
        if tr is None or i is None:
            return
        if now_ms >= tr.cur.hi:
            self._roll(tr, now_ms)
        late = tr.now[i].late, tr.before[i].late
        tr.now[i], tr.before[i] = Counts(late=late[0]), Counts(late=late[1])
        newest = tr.newest[i]
        tr.newest[i] = -1
        self.observe([b for b in bars if not b.forming], -(2**62))  # never late: history
        tr.now[i].late, tr.before[i].late = late
        tr.newest[i] = max(newest, tr.newest[i])

    # -- reading ----------------------------------------------------------------------
    def view(self, symbol: str, i: int, now_ms: int) -> dict[str, Any] | None:
        """The features' ``completeness`` of ``symbol`` on the ``i``-th timeframe:
        ``session`` and ``previous`` (share of the expected bars received, capped at 1;
        ``None`` while none is expected), ``synthetic`` and ``late`` (current session).
        The same dict until something in it changes."""
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        if now_ms >= tr.cur.hi:
            self._roll(tr, now_ms)
        tf = self.timeframes[i]
        until = now_ms - self._late_ms
        exp_now, exp_prev = tr.cur.expected(tf, until), tr.prev.expected(tf, until)
        c, p = tr.now[i], tr.before[i]
        key = (tr.cur.lo, exp_now, exp_prev, c.received, c.synthetic, c.late, p.received)
        if tr.keys[i] != key:
            tr.keys[i] = key
            tr.views[i] = {"session": _share(c.received, exp_now),
                           "previous": _share(p.received, exp_prev),
                           "synthetic": c.synthetic, "late": c.late}
        return tr.views[i]

    def report(self, symbol: str, now_ms: int) -> dict[str, dict[str, Any]] | None:
        """Per timeframe, the counts behind :meth:`view` (``/health``)."""
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        out: dict[str, dict[str, Any]] = {}
        until = now_ms - self._late_ms
        for i, tf in enumerate(self.timeframes):
            view = self.view(symbol, i, now_ms)
            assert view is not None
            c, p = tr.now[i], tr.before[i]
            out[tf.name] = {
                **view,
                "current": {"from": tr.cur.lo, "expected": tr.cur.expected(tf, until),
                            "received": c.received, "synthetic": c.synthetic, "late": c.late},
                "prev": {"from": tr.prev.lo, "expected": tr.prev.expected(tf, until),
                         "received": p.received, "synthetic": p.synthetic, "late": p.late},
            }
        return out

    def sessions(self, symbol: str, now_ms: int) -> tuple[int, int] | None:
        """``[from, to)`` spanning ``symbol``'s previous and current sessions (what :meth:`load` needs)."""
        tr = self._tracks.get(symbol)
        if tr is None:
            return None
        if now_ms >= tr.cur.hi:
            self._roll(tr, now_ms)
        return min(tr.prev.lo, tr.prev.stamp), max(tr.cur.hi, tr.cur.stamp + 1)


def _share(received: int, expected: int) -> float | None:
    return None if expected <= 0 else min(1.0, round(received / expected, 4))
