"""Rate budgets: windows, daily reset at 00:00 UTC, back-off; a simulated day never exceeds."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.tests.helpers import Clock

DAY = 86_400




def test_per_second_and_minute_windows():
    c = Clock(1_700_000_000.0)
    b = RateBudget("x", per_second=1, per_minute=5, clock=c, wall_clock=c)
    assert b.try_acquire() and not b.try_acquire()
    for _ in range(4):
        c.t += 1.0
        assert b.try_acquire()
    c.t += 1.0
    assert not b.try_acquire() and b.remaining() == 0
    assert 0 < b.wait_time() <= 60
    c.t += b.wait_time()
    assert b.try_acquire()


def test_cost_larger_than_window_never_granted():
    c = Clock(0.0)
    b = RateBudget("td", per_minute=8, clock=c, wall_clock=c)
    assert not b.try_acquire(9) and b.wait_time(9) == float("inf")
    assert b.try_acquire(8) and not b.try_acquire(1)
    with pytest.raises(ValueError):
        b.try_acquire(0)


def test_daily_budget_resets_at_midnight_utc():
    c = Clock(1_700_006_400.0 - 10)  # 10 s before a UTC midnight (1_700_006_400 % 86400 == 0)
    assert 1_700_006_400 % DAY == 0
    b = RateBudget("av", per_day=2, clock=c, wall_clock=c)
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    assert b.seconds_to_reset() == pytest.approx(10)
    c.t += 10
    assert b.try_acquire()


def test_back_off_and_exhaust_day():
    c = Clock(1_700_006_400.0 + 100)
    b = RateBudget("p", per_minute=5, per_day=100, clock=c, wall_clock=c)
    b.back_off(30)
    assert b.remaining() == 0 and not b.try_acquire()
    err = b.exhausted()
    assert isinstance(err, BudgetExhausted) and err.error_class == "rate_limited"
    assert err.retry_after == pytest.approx(30)
    c.t += 30
    assert b.try_acquire()
    b.exhaust_day()
    assert not b.try_acquire()
    c.t += DAY
    assert b.try_acquire()
    assert b.status()["day_used"] == 1


@pytest.mark.parametrize(
    ("kwargs", "cost"),
    [({"per_minute": 8, "per_day": 800}, (1, 8)),  # Twelve Data credits, batches
     ({"per_second": 1, "per_day": 25}, (1, 1)),  # Alpha Vantage
     ({"per_minute": 5}, (1, 1))],  # Polygon
)
def test_simulated_day_never_exceeds(kwargs, cost):
    rng = random.Random(7)
    c = Clock(1_700_006_400.0 - 3_600)  # start an hour before midnight: crosses a reset
    b = RateBudget("sim", clock=c, wall_clock=c, **kwargs)
    sent: list[tuple[float, int]] = []
    while c.t < 1_700_006_400.0 + DAY:
        n = rng.randint(*cost)
        if b.try_acquire(n):
            sent.append((c.t, n))
        c.t += rng.choice((0.0, 0.25, 0.5, 1.0, 3.0))
    assert sent
    per_day = Counter()
    per_minute = Counter()
    per_second = Counter()
    for t, n in sent:
        per_day[int(t // DAY)] += n
        per_minute[int(t // 60)] += n
        per_second[int(t)] += n
    if "per_day" in kwargs:
        assert max(per_day.values()) <= kwargs["per_day"]
        assert max(per_day.values()) == kwargs["per_day"]  # and the budget is usable to the end
    if "per_minute" in kwargs:
        assert max(per_minute.values()) <= kwargs["per_minute"]
        # sliding check: no 60 s span ever holds more than the limit
        times = [t for t, _ in sent]
        j = 0
        window = 0
        for i, (t, n) in enumerate(sent):
            window += n
            while times[j] <= t - 60:
                window -= sent[j][1]
                j += 1
            assert window <= kwargs["per_minute"], i
    if "per_second" in kwargs:
        assert max(per_second.values()) <= kwargs["per_second"]
