"""Bar timeframes (``1s``, ``1m``, ``5m``, ``1h``, ``1d`` ...) and time alignment.

Most series sit on the clock's grid (an hourly bar opens at 10:00 UTC). Exchange
sessions can shift it: US stocks' hourly bars open at 09:30, 10:30 ... New York
time (Yahoo, Twelve Data). :meth:`Timeframe.on_session` returns the timeframe on
such a session grid; ``floor`` and ``is_aligned`` then follow the session.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"^([1-9][0-9]{0,3})([smhd])\Z")
_SESSION_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])\s+(\S+)\Z")
DAY_MS = 86_400_000
#: Two instants on either side of the usual DST switch, to see every UTC offset of a zone.
_PROBES_MS = (1_705_276_800_000, 1_721_001_600_000)  # 2024-01-15, 2024-07-15


@dataclass(frozen=True, slots=True)
class Session:
    """Where a market's day of intraday bars starts: ``open_min`` minutes after local midnight."""

    zone: str
    open_min: int

    @classmethod
    def parse(cls, text: str) -> Session:
        """``"09:30 America/New_York"``; raises ``ValueError`` on anything else."""
        match = _SESSION_RE.match(text.strip())
        if not match:
            raise ValueError(f"not a session: {text!r} (expected e.g. '09:30 America/New_York')")
        try:
            ZoneInfo(match.group(3))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {match.group(3)!r}") from None
        return cls(match.group(3), int(match.group(1)) * 60 + int(match.group(2)))

    def utc_offset_ms(self, t_ms: int) -> int:
        """The zone's UTC offset at ``t_ms``."""
        offset = datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(ZoneInfo(self.zone)).utcoffset()
        return int(offset.total_seconds() * 1000) if offset is not None else 0

    def __str__(self) -> str:
        return f"{self.open_min // 60:02d}:{self.open_min % 60:02d} {self.zone}"


#: The US equity regular session (NYSE, Nasdaq).
US_EQUITY_SESSION = Session("America/New_York", 9 * 60 + 30)


@lru_cache(maxsize=1_024)
def _phases(tf_ms: int, session: Session) -> frozenset[int]:
    # Cached: sources ask for every symbol's grid every cycle, and zone lookups are slow.
    return frozenset((session.open_min * 60_000 - session.utc_offset_ms(t)) % tf_ms for t in _PROBES_MS)


@dataclass(frozen=True, slots=True)
class Timeframe:
    """A fixed-length bar period; ``name`` is its canonical spelling (``"1m"``).

    ``session`` is set only when the bars sit on a session's grid rather than the clock's.
    """

    name: str
    ms: int
    session: Session | None = None

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        """Parse ``"1m"``-style text; raises ``ValueError`` on anything else."""
        match = _PATTERN.match(text.strip())
        if not match:
            raise ValueError(f"not a timeframe: {text!r} (expected e.g. 1s, 1m, 5m, 1h, 1d)")
        count, unit = int(match.group(1)), match.group(2)
        return cls(f"{count}{unit}", count * _UNITS_MS[unit])

    @classmethod
    def of_ms(cls, ms: int) -> Timeframe:
        """The clock timeframe of ``ms`` milliseconds, in the largest unit that divides it."""
        for unit in ("d", "h", "m", "s"):
            if ms % _UNITS_MS[unit] == 0:
                return cls(f"{ms // _UNITS_MS[unit]}{unit}", ms)
        raise ValueError(f"{ms} ms is not a whole number of seconds")

    def _phases(self, session: Session) -> frozenset[int]:
        """Where ``session``'s grid sits relative to the clock's, per UTC offset of its zone."""
        return _phases(self.ms, session)

    def on_session(self, session: Session | None) -> Timeframe:
        """This timeframe on ``session``'s bar grid; ``self`` when that grid is the clock's.

        Daily and longer bars keep their 00:00 UTC stamps.
        """
        if session is None or self.ms >= DAY_MS or self._phases(session) == {0}:
            return replace(self, session=None) if self.session is not None else self
        return replace(self, session=session)

    @property
    def clock(self) -> Timeframe:
        """The largest clock-aligned timeframe whose bars tile this one's (itself if clock-aligned).

        A provider that only stamps bars on the clock's grid is asked for these and
        its bars are folded into this timeframe's (see ``sources._parsing.rebucket``).
        """
        if self.session is None:
            return self
        step = self.ms
        for phase in self._phases(self.session):
            step = math.gcd(step, phase)
        return Timeframe.of_ms(step)

    def floor(self, t_ms: int) -> int:
        """Open time of the bar that contains ``t_ms``."""
        if self.session is None:
            return t_ms - t_ms % self.ms
        shift = self.session.utc_offset_ms(t_ms) - self.session.open_min * 60_000
        return t_ms - (t_ms + shift) % self.ms

    def is_aligned(self, t_ms: int) -> bool:
        """Whether ``t_ms`` is a bar open time on this timeframe's grid."""
        return self.floor(t_ms) == t_ms

    def __str__(self) -> str:
        return self.name
