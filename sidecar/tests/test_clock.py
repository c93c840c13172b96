"""The daemon's clock: the wall clock, and a recording's time replayed at speed."""

from __future__ import annotations

import pytest

from sidecar.app.ticker import SecondTicker
from sidecar.clock import ReplayClock, WallClock, as_clock, iso_ms
from sidecar.tests.helpers import Clock

REC = 1_732_545_000.0  # 2024-11-25 14:30 UTC: a recorded session's open


def test_wall_clock_reads_its_callable() -> None:
    wall = Clock(1_800_000_000.0)
    clock = as_clock(wall)
    assert isinstance(clock, WallClock) and not clock.replaying and clock.speed == 1.0
    assert clock() == clock.wall() == 1_800_000_000.0
    assert clock.at(5.0) == 5.0
    assert as_clock(clock) is clock
    assert clock.status() == {"replaying": False}


def test_replay_clock_runs_at_speed_once_begun() -> None:
    wall = Clock(1_800_000_000.0)
    clock = ReplayClock(REC, 10_000.0, wall=wall)
    assert clock() == REC
    wall.advance(3)  # start-up: the recording's time waits
    assert clock() == REC
    clock.begin()
    wall.advance(0.5)
    assert clock() == REC + 5_000
    assert clock.at(wall.t + 1) == REC + 15_000
    assert clock.wall() == wall.t


def test_replay_clock_skips_ahead_never_back_and_stops_when_finished() -> None:
    wall = Clock(1_800_000_000.0)
    clock = ReplayClock(REC, 100.0, wall=wall)
    clock.begin()
    assert not clock.skip_to(REC - 10)
    assert clock.skip_to(REC + 3_600)
    assert clock() == REC + 3_600
    wall.advance(1)
    assert clock() == REC + 3_700  # runs on from where it skipped to
    clock.finish()
    wall.advance(60)
    assert clock() == REC + 3_700 and clock.finished
    assert not clock.skip_to(REC + 10**6)
    status = clock.status()
    assert status == {"replaying": True, "speed": 100.0, "now_ms": int((REC + 3_700) * 1000),
                      "now": iso_ms(int((REC + 3_700) * 1000)), "exhausted": True}
    assert status["now"] == "2024-11-25T15:31:40Z"


def test_replay_clock_refuses_a_speed_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        ReplayClock(REC, 0.0)


async def test_ticker_paces_by_the_wall_and_labels_ticks_with_the_replay_time() -> None:
    wall = Clock(1_800_000_000.3)

    async def sleep(delay: float) -> None:
        wall.advance(delay)

    clock = ReplayClock(REC, 1_000.0, wall=wall)
    clock.begin()
    ticker = SecondTicker(1.0, clock=clock, sleep=sleep)
    ticks = [await ticker.next() for _ in range(3)]
    # Wall seconds 1_800_000_001, ..._002, ..._003: 0.7 s, 1.7 s, 2.7 s after the start.
    assert ticks == [int((REC + k) * 1000) for k in (700, 1_700, 2_700)]
    assert ticker.missed == 0 and ticker.clock_jumps == 0
