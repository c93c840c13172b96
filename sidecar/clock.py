"""The daemon's time: the wall clock, or a recording's time when replaying at speed.

Everything that asks "what time is it?" on the daemon's behalf (the cycle's bar grid,
validation windows, calendar decisions, feature timestamps, the ticker's tick labels,
``/health``) reads one :class:`Clock`. Both kinds are callables returning epoch seconds,
so either fits wherever a ``clock=`` callable is taken.

* :class:`WallClock`: the machine's time (or a test's driven clock).
* :class:`ReplayClock`: a recording's time advancing ``speed`` times faster than the
  wall clock paces it; it can be moved ahead at once over a stretch with nothing to
  replay (:meth:`ReplayClock.skip_to`) and stops when the recording is exhausted
  (:meth:`ReplayClock.finish`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def iso_ms(t_ms: int) -> str:
    """``t_ms`` as an ISO 8601 UTC time (``2024-11-29T18:00:00Z``)."""
    return datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WallClock:
    """The wall clock: its reading is ``wall()``; one wall second is one clock second."""

    __slots__ = ("_wall",)

    replaying = False
    speed = 1.0

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall

    def __call__(self) -> float:
        """Now, in epoch seconds."""
        return self._wall()

    def wall(self) -> float:
        """The wall clock that paces this one (epoch seconds)."""
        return self._wall()

    def at(self, wall_s: float) -> float:
        """This clock's reading at wall time ``wall_s``."""
        return wall_s

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows of the clock."""
        return {"replaying": False}


class ReplayClock:
    """A recording's time: starts at ``start_s`` and runs ``speed`` times the wall clock.

    It reads ``start_s`` until :meth:`begin` sets it running (the daemon's main loop
    starts). ``skip_to`` moves it ahead at once (a closed market with nothing recorded);
    ``finish`` stops it where it is (the recording is exhausted). It never goes back.
    """

    __slots__ = ("_finished_at", "_offset", "_wall", "_wall0", "speed", "start_s")

    replaying = True

    def __init__(self, start_s: float, speed: float, wall: Callable[[], float] = time.time) -> None:
        if not speed > 0:
            raise ValueError(f"replay speed must be positive, not {speed!r}")
        self.start_s = start_s
        self.speed = speed
        self._wall = wall
        self._wall0: float | None = None
        self._offset = 0.0  # seconds skipped ahead
        self._finished_at: float | None = None

    def __call__(self) -> float:
        """Now on the recording's timeline, in epoch seconds."""
        return self.at(self._wall())

    def wall(self) -> float:
        """The wall clock that paces this one (epoch seconds)."""
        return self._wall()

    def at(self, wall_s: float) -> float:
        """This clock's reading at wall time ``wall_s`` (skips made so far included)."""
        if self._finished_at is not None:
            return self._finished_at
        if self._wall0 is None:
            return self.start_s + self._offset
        return self.start_s + (wall_s - self._wall0) * self.speed + self._offset

    def begin(self) -> None:
        """Set it running from its current reading (once; later calls do nothing)."""
        if self._wall0 is None:
            self._wall0 = self._wall()

    @property
    def finished(self) -> bool:
        """The recording is exhausted: the clock stands still."""
        return self._finished_at is not None

    def skip_to(self, t_s: float) -> bool:
        """Move ahead to ``t_s`` at once (never back, never once finished); True if it moved."""
        if self._finished_at is not None:
            return False
        now = self()
        if t_s <= now:
            return False
        self._offset += t_s - now
        return True

    def finish(self) -> None:
        """Stop the clock at its current reading."""
        if self._finished_at is None:
            self._finished_at = self()

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows of the clock: replaying, at which recorded time."""
        now_ms = int(self() * 1000)
        return {"replaying": True, "speed": self.speed, "now_ms": now_ms, "now": iso_ms(now_ms),
                "exhausted": self.finished}


#: Either kind of clock.
Clock = WallClock | ReplayClock


def as_clock(clock: Clock | Callable[[], float]) -> Clock:
    """``clock`` if it is a :data:`Clock`, else a :class:`WallClock` read from the callable."""
    if isinstance(clock, (WallClock, ReplayClock)):
        return clock
    return WallClock(clock)
