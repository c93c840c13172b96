"""Request budgets: sliding per-second/per-minute windows plus a daily quota.

In the style of aiolimiter, time is read from injectable clocks: ``clock`` is a
monotonic ``loop.time``-like callable (seconds) for the windows and back-off, and
``wall_clock`` gives epoch seconds for the daily quota, which resets at 00:00 UTC.
With :attr:`RateBudget.open_hours` (the markets of the symbols it serves), the daily
quota is paced over the hours they are open, not over the whole day.
:meth:`RateBudget.try_acquire` never waits: it either takes the cost from every
window and the day, or takes nothing and returns ``False``. A sliding window of
``limit`` per ``period`` guarantees that no interval of that length (so also no
calendar minute/second) ever sees more than ``limit`` units.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sidecar.errors import ProviderError

_DAY_S = 86_400


class BudgetExhausted(ProviderError):
    """``rate_limited`` raised or returned *locally*: nothing was sent to the provider.

    Circuit breakers treat it as neutral (neither a failure nor a success).
    """

    def __init__(self, message: str, *, source: str = "", retry_after: float | None = None) -> None:
        super().__init__("rate_limited", message, source=source, retry_after=retry_after)


class _Window:
    """A sliding window: at most ``limit`` units within any ``period`` seconds."""

    __slots__ = ("_log", "_used", "limit", "period")

    def __init__(self, limit: int, period: float) -> None:
        if limit < 0 or period <= 0:
            raise ValueError("window needs limit >= 0 and period > 0")
        self.limit = limit
        self.period = period
        self._log: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - self.period:
            _, cost = self._log.popleft()
            self._used -= cost

    def remaining(self, now: float) -> int:
        self._expire(now)
        return self.limit - self._used

    def take(self, now: float, cost: int) -> None:
        self._log.append((now, cost))
        self._used += cost

    def next_free(self, now: float, cost: int) -> float:
        """Seconds until ``cost`` units fit (``inf`` if never)."""
        self._expire(now)
        if cost > self.limit:
            return float("inf")
        need = self._used + cost - self.limit
        if need <= 0:
            return 0.0
        freed = 0
        for t, c in self._log:
            freed += c
            if freed >= need:
                return max(0.0, t + self.period - now)
        return float("inf")  # pragma: no cover - unreachable by construction


class RateBudget:
    """A provider's request budget; ``cost`` is requests or credits."""

    __slots__ = (
        "_blocked_until",
        "_clock",
        "_day",
        "_day_used",
        "_per_day",
        "_sent_total",
        "_wall",
        "_windows",
        "name",
        "open_hours",
    )

    def __init__(
        self,
        name: str,
        *,
        per_second: int | None = None,
        per_minute: int | None = None,
        per_day: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._windows: list[_Window] = []
        if per_second is not None:
            self._windows.append(_Window(per_second, 1.0))
        if per_minute is not None:
            self._windows.append(_Window(per_minute, 60.0))
        if per_day is not None and per_day < 0:
            raise ValueError("per_day must be >= 0")
        self._per_day = per_day
        self._clock = clock
        self._wall = wall_clock
        self._day = int(wall_clock() // _DAY_S)
        self._day_used = 0
        self._blocked_until = float("-inf")
        self._sent_total = 0
        #: ``(start, end)`` epoch seconds -> seconds some market it serves is open between
        #: them; ``None``: always (the daily quota is spread over the whole day).
        self.open_hours: Callable[[float, float], float] | None = None

    def _roll_day(self) -> None:
        day = int(self._wall() // _DAY_S)
        if day != self._day:
            self._day = day
            self._day_used = 0

    def remaining(self) -> int:
        """Units that could be acquired right now (0 while backing off)."""
        self._roll_day()
        now = self._clock()
        if now < self._blocked_until:
            return 0
        left = [w.remaining(now) for w in self._windows]
        if self._per_day is not None:
            left.append(self._per_day - self._day_used)
        return max(0, min(left)) if left else 1 << 30

    def try_acquire(self, cost: int = 1) -> bool:
        """Take ``cost`` units if every window and the day allow it; never waits."""
        if cost <= 0:
            raise ValueError("cost must be positive")
        if self.remaining() < cost:
            return False
        now = self._clock()
        for w in self._windows:
            w.take(now, cost)
        self._day_used += cost
        self._sent_total += cost
        return True

    def back_off(self, seconds: float) -> None:
        """Refuse everything for ``seconds`` (after a 429); extends, never shortens."""
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))

    def exhaust_day(self) -> None:
        """The provider says the daily quota is spent: refuse until 00:00 UTC."""
        self._roll_day()
        if self._per_day is not None:
            self._day_used = max(self._day_used, self._per_day)
        else:
            self.back_off(self.seconds_to_reset())

    def seconds_to_reset(self) -> float:
        """Seconds until the daily quota resets (00:00 UTC)."""
        wall = self._wall()
        return (int(wall // _DAY_S) + 1) * _DAY_S - wall

    def wait_time(self, cost: int = 1) -> float:
        """Seconds until ``cost`` units would be granted (``inf`` if never)."""
        self._roll_day()
        now = self._clock()
        wait = max(0.0, self._blocked_until - now)
        for w in self._windows:
            wait = max(wait, w.next_free(now, cost))
        if self._per_day is not None:
            if cost > self._per_day:
                return float("inf")
            if self._day_used + cost > self._per_day:
                wait = max(wait, self.seconds_to_reset())
        return wait

    def pace_s(self, cost: int = 1) -> float:
        """Seconds between two requests of ``cost`` units that this budget sustains.

        Every window must hold at its limit indefinitely, and what is left of the
        day is spread over the time until the daily reset (00:00 UTC), so a quota
        lasts the whole day instead of running out in its first minutes; with
        :attr:`open_hours`, over the open time left until the reset (nothing open
        until then: one request per reset, none is due anyway).
        """
        self._roll_day()
        pace = 0.0
        for w in self._windows:
            pace = max(pace, float("inf") if w.limit == 0 else w.period * cost / w.limit)
        if self._per_day is not None:
            left = self._per_day - self._day_used
            reset = self.seconds_to_reset()
            span = reset
            if self.open_hours is not None:
                wall = self._wall()
                span = self.open_hours(wall, wall + reset) or reset
            pace = max(pace, reset if left < cost else span * cost / left)
        return pace

    def exhausted(self, message: str = "") -> BudgetExhausted:
        """The error to return when this budget refuses a request."""
        wait = self.wait_time()
        text = message or f"{self.name} budget spent (retry in {wait:.0f}s)"
        return BudgetExhausted(text, source=self.name, retry_after=None if wait == float("inf") else wait)

    def status(self) -> dict[str, Any]:
        """Budget facts for ``/health``."""
        self._roll_day()
        now = self._clock()
        out: dict[str, Any] = {
            "remaining_now": self.remaining(),
            "sent_total": self._sent_total,
            "backing_off_s": round(max(0.0, self._blocked_until - now), 3),
        }
        if self._per_day is not None:
            out["day_used"] = self._day_used
            out["day_limit"] = self._per_day
        for w in self._windows:
            out[f"window_{w.period:g}s"] = {"limit": w.limit, "left": w.remaining(now)}
        return out
