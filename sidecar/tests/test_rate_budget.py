"""Rate budgets: windows, daily reset at 00:00 UTC, back-off; a simulated day never exceeds."""

from __future__ import annotations

import itertools
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


def _ny(text: str) -> float:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("America/New_York")).timestamp()


def test_daily_quota_paced_over_open_hours_across_a_weekend_and_a_weekday():
    """Alpha Vantage's 25 a day for NYSE symbols: nothing asked on Saturday and Sunday; on
    Monday the 25 are spread over 09:30-16:00 New York, the last ones near the close
    (over 24 h, a third would still be left at the close). Driven wall clock, minute steps;
    the pacing is set the way the router sets it for a source's symbols."""
    from sidecar.app.router import CLOSE_GRACE_MS, pace_over_open_hours
    from sidecar.calendars import get_calendar

    nyse = get_calendar("XNYS")
    c = Clock(_ny("2024-12-07T00:00"))  # a Saturday

    def day_of(paced: bool) -> list[float]:
        c.t = _ny("2024-12-07T00:00")
        budget = RateBudget("alphavantage", per_second=1, per_day=25, clock=c, wall_clock=c)
        if paced:
            pace_over_open_hours(budget, [nyse, nyse])
            assert budget.open_hours is not None
        sent: list[float] = []
        due = 0.0
        while c.t < _ny("2024-12-10T00:00"):
            # Asked while open and for the close's grace, as the pipeline asks.
            asked = nyse.is_open(int(c.t * 1000)) or nyse.is_open(int(c.t * 1000) - CLOSE_GRACE_MS)
            if asked and c.t >= due and budget.try_acquire():
                sent.append(c.t)
                due = c.t + budget.pace_s()
            c.t += 60
        return sent

    sent = day_of(paced=True)
    assert len(sent) == 25
    assert all(_ny("2024-12-09T09:30") <= t <= _ny("2024-12-09T16:00") for t in sent)
    assert sent[-1] >= _ny("2024-12-09T15:30")
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert max(gaps) <= 23_400 / 24 + 60  # the 24 left after the open over 6.5 h, plus a step
    unpaced = day_of(paced=False)
    assert 15 <= len(unpaced) <= 18  # 6.5 h at one per 1,368 s
    # A source serving a symbol without a calendar (24/7) keeps the whole day.
    other = RateBudget("x", per_day=25, clock=c, wall_clock=c)
    pace_over_open_hours(other, [nyse, None])
    assert other.open_hours is None
