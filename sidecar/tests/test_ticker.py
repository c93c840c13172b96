"""SecondTicker driven by a fake wall clock: whole seconds, no repeats, no bursts, no stalls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sidecar.app.ticker import SecondTicker

START = 1_727_827_200.0  # a whole second, epoch seconds


class FakeClock:
    """Wall clock in epoch seconds; ``sleep`` advances it (optionally early or late)."""

    def __init__(self, t: float, *, early_s: float = 0.0, late_s: float = 0.0) -> None:
        self.t = t
        self.early_s = early_s
        self.late_s = late_s
        self.slept: list[float] = []
        self.on_sleep: Callable[[FakeClock], None] | None = None

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        assert delay > 0, "the ticker must never sleep for a non-positive delay"
        self.slept.append(delay)
        assert len(self.slept) < 10_000, "the ticker is spinning"
        if self.on_sleep is not None:
            hook, self.on_sleep = self.on_sleep, None
            hook(self)
            return
        # Early wake-ups advance a little less than asked, but time always moves on.
        self.t += max(delay - self.early_s, 1e-4) + self.late_s


def make(clock: FakeClock) -> SecondTicker:
    return SecondTicker(1.0, clock=clock, sleep=clock.sleep)


def ms(t_s: float) -> int:
    return round(t_s * 1000)


async def test_ticks_land_on_whole_seconds_in_order() -> None:
    clock = FakeClock(START + 0.3)
    ticker = make(clock)
    ticks = []
    for _ in range(10):
        tick = await ticker.next()
        assert tick is not None
        assert tick % 1000 == 0
        assert clock() * 1000 >= tick  # never early
        ticks.append(tick)
        clock.t += 0.123  # the cycle's work
    first = ms(START) + 1000
    assert ticks == [first + 1000 * i for i in range(10)]
    assert ticker.missed == 0 and ticker.clock_jumps == 0


async def test_first_tick_from_exact_boundary_is_the_next_second() -> None:
    clock = FakeClock(START)
    ticker = make(clock)
    assert await ticker.next() == ms(START) + 1000
    assert clock.slept == [pytest.approx(1.0)]


async def test_no_tick_runs_twice_when_cycles_take_no_time() -> None:
    clock = FakeClock(START + 0.999)
    ticker = make(clock)
    ticks = [await ticker.next() for _ in range(20)]
    assert ticks == [ms(START) + 1000 * (i + 1) for i in range(20)]
    assert len(set(ticks)) == len(ticks)
    assert ticker.missed == 0


async def test_tick_returned_exactly_on_boundary_is_not_repeated() -> None:
    clock = FakeClock(START + 0.5)
    ticker = make(clock)
    t1 = await ticker.next()
    assert clock() == pytest.approx(START + 1.0)
    clock.t = START + 1.0  # exactly on the tick that was just returned
    t2 = await ticker.next()
    assert (t1, t2) == (ms(START) + 1000, ms(START) + 2000)


async def test_overrun_skips_and_counts_missed_ticks_without_burst() -> None:
    clock = FakeClock(START + 0.2)
    ticker = make(clock)
    t1 = await ticker.next()
    assert t1 is not None
    clock.t += 2.5  # a cycle that took 2.5 s covers the next two ticks
    t2 = await ticker.next()
    assert t2 == t1 + 3000
    assert ticker.missed == 2
    assert clock() * 1000 >= t2
    # Back on track: one tick per second, the skipped ones are not replayed.
    t3 = await ticker.next()
    assert t3 == t2 + 1000
    assert ticker.missed == 2 and ticker.clock_jumps == 0


async def test_overrun_of_a_fraction_misses_nothing() -> None:
    clock = FakeClock(START + 0.2)
    ticker = make(clock)
    t1 = await ticker.next()
    clock.t += 0.95
    assert await ticker.next() == t1 + 1000
    assert ticker.missed == 0


@pytest.mark.parametrize("back_s", [120.0, 600.0, 3_600.0])
async def test_clock_jump_back_between_ticks_resynchronises(back_s: float) -> None:
    clock = FakeClock(START + 0.1)
    ticker = make(clock)
    await ticker.next()
    clock.t -= back_s
    before = clock.t
    tick = await ticker.next()
    # The next whole second of the new timeline, reached within a second: no stall.
    assert tick == (int(before) + 1) * 1000
    assert clock.t - before <= 1.0
    assert ticker.clock_jumps == 1
    assert ticker.missed == 0
    follow = [await ticker.next() for _ in range(3)]
    assert follow == [tick + 1000, tick + 2000, tick + 3000]
    assert ticker.clock_jumps == 1 and ticker.missed == 0


async def test_clock_jump_back_while_sleeping_resynchronises() -> None:
    clock = FakeClock(START + 0.25)
    ticker = make(clock)
    await ticker.next()

    def jump(c: FakeClock) -> None:
        c.t -= 300.0  # NTP stepped the clock back five minutes while we slept

    clock.on_sleep = jump
    before = clock.t
    n_sleeps = len(clock.slept) + 1  # the sleep during which the jump happens advances nothing
    tick = await ticker.next()
    assert tick is not None
    assert tick == (int(before - 300.0) + 1) * 1000
    assert ticker.clock_jumps >= 1
    assert ticker.missed == 0
    # No stall: total fake time slept after the jump is under one period.
    assert sum(clock.slept[n_sleeps:]) <= 1.0 + 1e-9
    assert await ticker.next() == tick + 1000


@pytest.mark.parametrize("forward_s", [120.0, 900.0])
async def test_clock_jump_forward_resynchronises_without_burst(forward_s: float) -> None:
    clock = FakeClock(START + 0.4)
    ticker = make(clock)
    t1 = await ticker.next()
    assert t1 is not None
    clock.t += forward_s
    jumped = clock.t
    t2 = await ticker.next()
    assert t2 == (int(jumped) + 1) * 1000  # the next second of the new timeline
    assert t2 > t1 + 1000 * forward_s - 1000
    assert ticker.clock_jumps == 1
    assert ticker.missed == 0  # a clock change is not thousands of missed ticks
    assert [await ticker.next() for _ in range(3)] == [t2 + 1000, t2 + 2000, t2 + 3000]
    assert ticker.clock_jumps == 1


async def test_early_wakeups_never_produce_an_early_tick() -> None:
    clock = FakeClock(START + 0.3, early_s=0.0007)  # uvloop-style: wakes up to 0.7 ms early
    ticker = make(clock)
    ticks = []
    for _ in range(5):
        tick = await ticker.next()
        assert tick is not None
        assert clock() * 1000 >= tick
        assert ticker.lateness_ms >= 0.0
        ticks.append(tick)
        clock.t += 0.05
    assert ticks == [ms(START) + 1000 * (i + 1) for i in range(5)]
    # Each tick needed more than one sleep: the ticker looped instead of trusting the wake-up.
    assert len(clock.slept) > 5
    assert ticker.missed == 0 and ticker.clock_jumps == 0


async def test_lateness_is_reported() -> None:
    clock = FakeClock(START + 0.5, late_s=0.03)
    ticker = make(clock)
    tick = await ticker.next()
    assert tick == ms(START) + 1000
    assert ticker.lateness_ms == pytest.approx(30.0, abs=1e-3)


async def test_custom_step() -> None:
    clock = FakeClock(START + 0.1)
    ticker = SecondTicker(0.25, clock=clock, sleep=clock.sleep)
    ticks = [await ticker.next() for _ in range(4)]
    assert ticks == [ms(START) + 250 * (i + 1) for i in range(4)]


#: A step whose next tick is an hour away on a clock that never moves: only the stop
#: event can end the wait, and the bound on it fails a hang, not a slow machine.
HOUR_S = 3_600.0


async def test_stop_event_interrupts_the_wait_for_a_tick() -> None:
    frozen = FakeClock(START + 0.05)
    ticker = SecondTicker(HOUR_S, clock=frozen)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, stop.set)
    result = await asyncio.wait_for(ticker.next(stop), 60.0)
    assert result is None
    assert ticker.missed == 0


async def test_stop_event_already_set() -> None:
    ticker = SecondTicker(HOUR_S, clock=FakeClock(START + 0.05))
    stop = asyncio.Event()
    stop.set()
    assert await asyncio.wait_for(ticker.next(stop), 60.0) is None


async def test_stop_event_unset_still_ticks() -> None:
    clock = FakeClock(START + 0.999)  # 1 ms of real waiting before the tick
    ticker = SecondTicker(1.0, clock=clock)
    stop = asyncio.Event()

    def advance() -> None:
        clock.t = START + 1.0

    asyncio.get_running_loop().call_later(0.01, advance)
    assert await asyncio.wait_for(ticker.next(stop), 5.0) == ms(START) + 1000


async def test_small_clock_step_back_does_not_repeat_a_tick() -> None:
    clock = FakeClock(START + 0.2)
    ticker = make(clock)
    t1 = await ticker.next()
    clock.t -= 0.5  # NTP steps the clock back half a second right after the tick
    t2 = await ticker.next()
    assert t2 == t1 + 1000  # waits for the next tick instead of repeating one
