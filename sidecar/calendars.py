"""When each symbol's market is open: exchange calendars, the FX week, 24/7.

A :class:`MarketCalendar` holds a market's open periods as two sorted lists of epoch
milliseconds (``[open, close)``, a lunch break splitting a session in two) and answers
every question with a bisect, so the hot path can ask for thousands of symbols a
second. Exchange calendars (holidays, early closes, DST) come from
``exchange_calendars``; only the session bounds are read, never its per-minute arrays.

Calendar names (the mapping's ``calendar`` key, see ``symbols.toml``):

* any ``exchange_calendars`` name or alias: ``XNYS`` (``NYSE``, ``NASDAQ``), ``XLON``
  (``LSE``), ``XETR`` (``XETRA``), ``XTKS`` (``TOKYO``, ``JPX``), ``XHKG`` (``HKEX``,
  ``HONG_KONG``), ...;
* ``FX``: Sunday 17:00 to Friday 17:00 New York, one session per day from 17:00;
* ``24/7``: always open, one session per UTC day (crypto).

Outside the years an exchange calendar covers (about 20 back, 1 ahead) nothing is
known: the market counts as open there, as if it had no calendar.

Extended hours (pre- and post-market, :func:`extended_calendar`): ``exchange_calendars``
knows regular sessions only, so the extended bounds come from :data:`EXTENDED_HOURS`,
a per-exchange offset from each regular session's open and close (XNYS: 04:00 to the
09:30 open, the close to 20:00, 17:00 after a 13:00 early close), laid on the exchange's
own sessions (holidays and early closes included).
"""

from __future__ import annotations

import threading
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from sidecar.timeframe import DAY_MS

#: The calendar of symbols that trade around the clock (crypto).
ALWAYS_OPEN = "24/7"
#: The FX week: Sunday 17:00 to Friday 17:00 New York.
FX = "FX"
_NEW_YORK = ZoneInfo("America/New_York")
#: Years the FX week is laid out for.
_FX_YEARS = (2000, 2040)
#: Names accepted besides exchange_calendars' own names and aliases.
_ALIASES = {
    "NYSE": "XNYS", "NASDAQ": "XNYS", "LSE": "XLON", "LONDON": "XLON", "XETRA": "XETR",
    "TOKYO": "XTKS", "JPX": "XTKS", "HKEX": "XHKG", "HONG_KONG": "XHKG", "HONGKONG": "XHKG",
    "24/5": FX, "FOREX": FX, "CRYPTO": ALWAYS_OPEN,
}


@dataclass(frozen=True, slots=True)
class Session:
    """One trading session: ``open`` to ``close`` (epoch ms), with its break if it has one."""

    open: int
    close: int
    break_start: int | None = None
    break_end: int | None = None


class MarketCalendar:
    """A market's open periods; every query is a bisect over precomputed lists.

    ``opens[i]``/``closes[i]`` bound the ``i``-th open period; ``session_of[i]`` is the
    open of the session it belongs to (the morning's open for an afternoon after a
    lunch break). ``always_open``: no closed time at all (then the session is the UTC day).
    """

    __slots__ = ("_closes", "_opens", "_session_closes", "_session_of", "_session_opens",
                 "always_open", "name", "zone")

    def __init__(self, name: str, zone: str, periods: list[tuple[int, int, int]],
                 *, always_open: bool = False) -> None:
        """``periods``: ``(open, close, session open)`` in epoch ms, sorted, not overlapping."""
        self.name = name
        self.zone = zone
        self.always_open = always_open
        self._opens = [p[0] for p in periods]
        self._closes = [p[1] for p in periods]
        self._session_of = [p[2] for p in periods]
        opens: list[int] = []
        closes: list[int] = []
        for _start, end, sess in periods:
            if not opens or opens[-1] != sess:
                opens.append(sess)
                closes.append(end)
            else:
                closes[-1] = end
        self._session_opens = opens
        self._session_closes = closes

    # -- range ----------------------------------------------------------------------
    def known(self, t_ms: int) -> bool:
        """Whether ``t_ms`` lies within the years this calendar covers."""
        return self.always_open or (bool(self._opens) and self._opens[0] <= t_ms < self._closes[-1])

    # -- queries --------------------------------------------------------------------
    def is_open(self, t_ms: int) -> bool:
        """Whether the market is open at ``t_ms`` (the open minute is open, the close is not)."""
        if self.always_open:
            return True
        i = bisect_right(self._opens, t_ms) - 1
        if i < 0:
            return True  # before the covered years: unknown, taken as open
        return t_ms < self._closes[i] or i == len(self._opens) - 1  # past the covered years: open

    def next_open(self, t_ms: int) -> int | None:
        """When the market next opens after ``t_ms`` (the end of a break included);
        ``None`` for a market that never closes or past the covered years."""
        if self.always_open:
            return None
        i = bisect_right(self._opens, t_ms)
        return self._opens[i] if i < len(self._opens) else None

    def next_close(self, t_ms: int) -> int | None:
        """When the open period containing ``t_ms`` ends (``None``: closed now, or never)."""
        if self.always_open:
            return None
        i = bisect_right(self._opens, t_ms) - 1
        if i < 0 or t_ms >= self._closes[i]:
            return None
        return self._closes[i]

    def session_open(self, t_ms: int) -> int:
        """The open of the session ``t_ms`` belongs to: the latest session open at or
        before it (a break and the time after the close belong to that session)."""
        return self.session_bounds(t_ms)[0]

    def session_bounds(self, t_ms: int) -> tuple[int, int]:
        """``[lo, hi)``: from the open of ``t_ms``'s session to the next session's open.

        Every bar opening in it belongs to the same session (VWAP anchoring). Outside the
        covered years, and for a market that never closes, the session is the UTC day.
        """
        if not self.always_open:
            opens = self._session_opens
            j = bisect_right(opens, t_ms) - 1
            if 0 <= j < len(opens) - 1:
                return opens[j], opens[j + 1]
        lo = t_ms - t_ms % DAY_MS
        return lo, lo + DAY_MS

    def period(self, t_ms: int) -> tuple[int, int] | None:
        """``[open, close)`` of the open period (a session, or its part before or after a
        break) containing ``t_ms``; ``None`` while closed, for a market that never closes,
        or outside the covered years."""
        if self.always_open or not self.known(t_ms):
            return None
        i = bisect_right(self._opens, t_ms) - 1
        if i < 0 or t_ms >= self._closes[i]:
            return None
        return self._opens[i], self._closes[i]

    def session_span(self, t_ms: int) -> tuple[int, int, int] | None:
        """``(open, close, next open)`` of the session ``t_ms`` belongs to (the time after
        a close belongs to the session before it); ``None`` for a market that never closes
        or outside the covered years."""
        if self.always_open:
            return None
        opens = self._session_opens
        j = bisect_right(opens, t_ms) - 1
        if 0 <= j < len(opens) - 1:
            return opens[j], self._session_closes[j], opens[j + 1]
        return None

    def sessions_between(self, start_ms: int, end_ms: int) -> list[Session]:
        """The sessions overlapping ``[start_ms, end_ms)``, oldest first."""
        if self.always_open:
            first = start_ms - start_ms % DAY_MS
            return [Session(t, t + DAY_MS) for t in range(first, end_ms, DAY_MS)]
        opens, closes = self._session_opens, self._session_closes
        j = max(0, bisect_right(closes, start_ms))
        out: list[Session] = []
        while j < len(opens) and opens[j] < end_ms:
            lo, hi = opens[j], closes[j]
            i = bisect_left(self._opens, lo)
            brk_start = brk_end = None
            if i + 1 < len(self._opens) and self._session_of[i + 1] == lo:
                brk_start, brk_end = self._closes[i], self._opens[i + 1]
            out.append(Session(lo, hi, brk_start, brk_end))
            j += 1
        return out

    def open_periods(self, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """The open periods overlapping ``[start_ms, end_ms)``, clipped to it (all of it
        for a market that never closes or outside the covered years)."""
        if end_ms <= start_ms:
            return []
        if self.always_open or not self.known(start_ms) or not self.known(end_ms - 1):
            return [(start_ms, end_ms)]
        out: list[tuple[int, int]] = []
        i = max(0, bisect_right(self._opens, start_ms) - 1)
        while i < len(self._opens) and self._opens[i] < end_ms:
            lo, hi = max(start_ms, self._opens[i]), min(end_ms, self._closes[i])
            if lo < hi:
                out.append((lo, hi))
            i += 1
        return out

    def open_slots(self, start_ms: int, end_ms: int, step_ms: int) -> list[int]:
        """The bar open times ``start_ms + k * step_ms`` before ``end_ms`` whose bar
        ``[t, t + step_ms)`` overlaps open time: the bars a series should have there."""
        if end_ms <= start_ms:
            return []
        if self.always_open or not self.known(start_ms) or not self.known(end_ms - 1):
            return list(range(start_ms, end_ms, step_ms))
        opens, closes = self._opens, self._closes
        out: list[int] = []
        i = max(0, bisect_right(opens, start_ms) - 1)
        # Bars overlapping period i: t in (open - step, close), on the grid, within range.
        while i < len(opens) and opens[i] < end_ms:
            lo = max(start_ms, opens[i] - step_ms + 1)
            k = -((start_ms - lo) // step_ms)  # ceil((lo - start) / step)
            t = start_ms + k * step_ms
            if out and t <= out[-1]:
                t = out[-1] + step_ms
            hi = min(end_ms, closes[i])
            while t < hi:
                out.append(t)
                t += step_ms
            i += 1
        return out


def open_ms(calendars: Iterable[MarketCalendar], start_ms: int, end_ms: int) -> int:
    """How long, within ``[start_ms, end_ms)``, at least one of ``calendars`` is open."""
    spans = sorted(p for cal in calendars for p in cal.open_periods(start_ms, end_ms))
    total, reach = 0, start_ms
    for lo, hi in spans:
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total


# -- building -------------------------------------------------------------------------

def resolve(name: str) -> str:
    """The canonical calendar name of ``name``; raises ``ValueError`` for an unknown one."""
    text = name.strip()
    upper = text.upper().replace(" ", "_")
    if upper in (FX, ALWAYS_OPEN):
        return upper
    if upper in _ALIASES:
        return _ALIASES[upper]
    import exchange_calendars as xcals

    names = set(xcals.get_calendar_names(include_aliases=True))
    for candidate in (text, upper):
        if candidate in names:
            resolved: str = xcals.resolve_alias(candidate)
            return resolved
    raise ValueError(f"unknown calendar {name!r} (e.g. XNYS, XLON, XETR, XTKS, XHKG, FX, 24/7)")


def _ms(nanos: int) -> int:
    return nanos // 1_000_000


def _exchange(name: str) -> MarketCalendar:
    import exchange_calendars as xcals

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices about pandas' API
        cal = xcals.get_calendar(name)
    nat = -(2**63)
    periods: list[tuple[int, int, int]] = []
    for o, c, bs, be in zip(cal.opens_nanos.tolist(), cal.closes_nanos.tolist(),
                            cal.break_starts_nanos.tolist(), cal.break_ends_nanos.tolist(),
                            strict=True):
        start, end = _ms(o), _ms(c)
        if bs != nat and be != nat and start < _ms(bs) < _ms(be) < end:
            periods.append((start, _ms(bs), start))
            periods.append((_ms(be), end, start))
        else:
            periods.append((start, end, start))
    return MarketCalendar(name, str(cal.tz), periods)


def _fx() -> MarketCalendar:
    """Sunday 17:00 to Friday 17:00 New York, one session per day starting 17:00."""
    periods: list[tuple[int, int, int]] = []
    day = datetime(_FX_YEARS[0], 1, 2).date()  # a Sunday
    end = datetime(_FX_YEARS[1], 1, 1).date()
    five = time(17, 0)
    while day < end:
        if day.weekday() in (6, 0, 1, 2, 3):  # sessions open Sunday .. Thursday 17:00
            lo = int(datetime.combine(day, five, _NEW_YORK).timestamp() * 1000)
            hi = int(datetime.combine(day + timedelta(days=1), five, _NEW_YORK).timestamp() * 1000)
            periods.append((lo, hi, lo))
        day += timedelta(days=1)
    return MarketCalendar(FX, "America/New_York", periods)


#: Extended hours per exchange: how long before each regular open the pre-market starts
#: and how long after each regular close the post-market ends.
EXTENDED_HOURS: dict[str, tuple[timedelta, timedelta]] = {
    "XNYS": (timedelta(hours=5, minutes=30), timedelta(hours=4)),
}
#: Suffix of an extended calendar's name (``XNYS+ext``).
EXTENDED_SUFFIX = "+ext"


def has_extended(name: str) -> bool:
    """Whether the extended hours of calendar ``name`` are known (:data:`EXTENDED_HOURS`)."""
    return resolve(name) in EXTENDED_HOURS


def _extended(regular: MarketCalendar) -> MarketCalendar:
    """One open period per session, from the pre-market open to the post-market close;
    a session opens at its pre-market open (the VWAP anchor of extended-hours series)."""
    pre, post = (int(d.total_seconds() * 1000) for d in EXTENDED_HOURS[regular.name])
    periods = [(s.open - pre, s.close + post, s.open - pre)
               for s in regular.sessions_between(regular._opens[0], regular._closes[-1])]
    return MarketCalendar(regular.name + EXTENDED_SUFFIX, regular.zone, periods)


def extended_calendar(name: str) -> MarketCalendar:
    """Calendar ``name`` with its extended hours: open from each session's pre-market open
    to its post-market close. Raises ``ValueError`` where they are not known."""
    key = resolve(name)
    if key not in EXTENDED_HOURS:
        raise ValueError(f"no extended hours known for calendar {key} "
                         f"(known: {', '.join(sorted(EXTENDED_HOURS))})")
    regular = get_calendar(key)
    ext = _cache.get(key + EXTENDED_SUFFIX)
    if ext is None:
        with _lock:
            ext = _cache.setdefault(key + EXTENDED_SUFFIX, _extended(regular))
    return ext


_cache: dict[str, MarketCalendar] = {}
_lock = threading.Lock()


def get_calendar(name: str) -> MarketCalendar:
    """The calendar called ``name`` (built once per process, then shared)."""
    key = resolve(name)
    cal = _cache.get(key)
    if cal is not None:
        return cal
    with _lock:
        cal = _cache.get(key)
        if cal is None:
            if key == ALWAYS_OPEN:
                cal = MarketCalendar(ALWAYS_OPEN, "UTC", [], always_open=True)
            elif key == FX:
                cal = _fx()
            else:
                cal = _exchange(key)
            _cache[key] = cal
    return cal


def regular_open(name: str) -> tuple[str, int]:
    """``(time zone, minutes after local midnight)`` of the calendar's current regular open."""
    key = resolve(name)
    if key == ALWAYS_OPEN:
        return "UTC", 0
    if key == FX:
        return "America/New_York", 17 * 60
    import exchange_calendars as xcals

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = xcals.get_calendar(key)
    opens_at: time = cal.open_times[-1][1]
    return str(cal.tz), opens_at.hour * 60 + opens_at.minute
