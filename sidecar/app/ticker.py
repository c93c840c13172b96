"""Wakes on each wall-clock second boundary, without drift and without pile-up.

A cycle that overruns does not cause a burst of catch-up cycles: the ticks it
covered are skipped and counted in ``missed``. A wall clock that jumps backwards
or far forwards resynchronises (counted in ``clock_jumps``) instead of stalling
or bursting. Ticks are paced by the wall clock; on a replay clock
(:class:`~sidecar.clock.ReplayClock`) each is labelled with that clock's reading at
the wall-clock second.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from sidecar.clock import Clock, as_clock


class SecondTicker:
    """``await ticker.next()`` returns the epoch-ms of the next wall-clock tick (on a
    replay clock: that clock's reading then)."""

    __slots__ = ("_clock", "_last", "_sleep", "_step_ms", "_timeline", "clock_jumps",
                 "lateness_ms", "missed")

    #: A jump larger than this (forward) is a clock change, not missed ticks.
    MAX_CATCHUP_MS = 60_000

    def __init__(
        self,
        step_s: float = 1.0,
        clock: Clock | Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        """``clock``: the daemon's clock, or a callable wall clock (epoch seconds)."""
        self._step_ms = int(step_s * 1000)
        timeline = as_clock(clock)
        self._clock = timeline.wall
        self._timeline = timeline if timeline.replaying else None
        self._sleep = sleep or asyncio.sleep
        self._last: int | None = None
        self.missed = 0
        self.clock_jumps = 0
        self.lateness_ms = 0.0

    async def next(self, stop: asyncio.Event | None = None) -> int | None:
        """Sleep until the next tick; returns its time in ms, or ``None`` if ``stop`` was set."""
        step = self._step_ms
        now = self._clock() * 1000
        target = (math.floor(now / step) + 1) * step
        if self._last is not None:
            skipped = (target - self._last) // step - 1
            if target <= self._last and self._last - now < step:
                # A small step back (NTP slew): wait for the next tick, never repeat one.
                target = self._last + step
            # A clock that went backwards, or leapt forwards, is a jump, not missed ticks.
            elif target <= self._last or skipped * step > self.MAX_CATCHUP_MS:
                self.clock_jumps += 1
            elif skipped > 0:
                self.missed += skipped
        while True:
            now = self._clock() * 1000
            delay = (target - now) / 1000
            if delay <= 0:
                break
            if delay > step / 1000 * 2.5:  # the clock jumped back while we slept
                self.clock_jumps += 1
                target = (math.floor(now / step) + 1) * step
                continue
            if stop is not None:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return None
                except TimeoutError:
                    pass
            else:
                await self._sleep(delay)  # type: ignore[misc]
            # uvloop may wake a little early: loop until the boundary has passed.
        self.lateness_ms = self._clock() * 1000 - target
        self._last = int(target)
        if self._timeline is not None:
            return int(self._timeline.at(target / 1000) * 1000)
        return int(target)
