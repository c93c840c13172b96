"""The cycle plans within budgets: over a simulated day (the clock is driven, no sleeps)
no budget is exceeded, a daily quota lasts the whole day, and a symbol whose source
is not due is served from its last bar instead of falling through to a fallback."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.rate_budget import RateBudget
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

DAY0 = 1_763_769_600  # 2025-11-22 00:00 UTC, epoch seconds
SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE")


class BudgetedSource(Source):
    """Spends its budget like the real providers: one unit per symbol, refused when spent."""

    def __init__(self, name: str, budget: RateBudget, *, fail: bool = False) -> None:
        self.name = name
        self.budget = budget
        self.fail = fail
        self.sent: list[tuple[float, str]] = []

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        assert self.budget is not None
        out: LatestResult = {}
        for sym in symbols:
            if not self.budget.try_acquire(1):
                out[sym] = self.budget.exhausted()
                continue
            self.sent.append((now_ms / 1000, sym))
            if self.fail:
                out[sym] = ProviderError("unavailable", "down", source=self.name)
            else:
                t = tf.floor(now_ms)
                out[sym] = [Bar(sym, tf.name, t, 1.0, 1.0, 1.0, 1.0, 1.0, self.name, forming=True)]
        return out

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


async def test_budgets_hold_over_a_simulated_day(redis_store: RedisStore, bar_store: BarStore) -> None:
    now = Clock(float(DAY0))

    yahoo_like = BudgetedSource("primary", RateBudget("primary", per_minute=60, per_day=20_000,
                                                      clock=now, wall_clock=now), fail=True)
    yahoo_like.min_refresh_s = 5.0
    av_like = BudgetedSource("fallback", RateBudget("fallback", per_second=1, per_day=25,
                                                    clock=now, wall_clock=now))
    settings = Settings(symbols=SYMBOLS, sources=("primary", "fallback"),
                        timeframe=Timeframe.parse("1m"), market_hours=False)  # budgets over a whole day
    pipe = Pipeline(settings, [yahoo_like, av_like], redis_store, bar_store, clock=now)
    served_last = 0
    for second in range(86_400):
        now.t = DAY0 + second
        out = await pipe.router.fetch(int(now.t * 1000))
        served_last += sum(1 for s in SYMBOLS if s not in out and pipe.symbols[s].via == "last")

    # The failing primary never exceeds 60 a minute nor asks a symbol more often than every 5 s.
    by_minute: dict[int, int] = {}
    for t, _ in yahoo_like.sent:
        by_minute[int(t) // 60] = by_minute.get(int(t) // 60, 0) + 1
    assert max(by_minute.values()) <= 60
    for sym in SYMBOLS:
        times = [t for t, s in yahoo_like.sent if s == sym]
        assert all(b - a >= 5 for a, b in pairwise(times))
    # The fallback's 25 a day are spent across the whole day, never more than 1 a second.
    times = [t for t, _ in av_like.sent]
    assert len(times) <= 25
    assert len(times) >= 20  # spent, not hoarded
    assert times[-1] - DAY0 > 0.75 * 86_400  # still answering late in the day
    assert all(b - a >= 1 for a, b in pairwise(times))
    assert served_last > 0  # symbols not due were served from their last bar


async def test_not_due_symbol_is_held_not_asked_of_fallback(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    now = Clock(float(DAY0))

    primary = BudgetedSource("primary", RateBudget("primary", per_minute=6, clock=now,
                                                   wall_clock=now))
    fallback = BudgetedSource("fallback", RateBudget("fallback", per_minute=600, clock=now,
                                                     wall_clock=now))
    settings = Settings(symbols=("AAA",), sources=("primary", "fallback"),
                        timeframe=Timeframe.parse("1m"), market_hours=False)
    pipe = Pipeline(settings, [primary, fallback], redis_store, bar_store, clock=now)
    for second in range(60):
        now.t = DAY0 + second
        await pipe.run_cycle(int(now.t * 1000))
    assert len(primary.sent) == 6  # every 10 s: 6 a minute for one symbol
    assert fallback.sent == []  # the primary held the symbol between its refreshes
    assert pipe.symbols["AAA"].expect_ms == 10_000
    assert not pipe.symbols["AAA"].stale(int(now.t * 1000), settings.stale_after_ms)



def test_a_wall_clock_step_back_does_not_stall_a_symbol() -> None:
    """Due times are wall-clock: after the clock steps back by minutes, a symbol asked
    a second ago is due again rather than waiting three minutes for the clock."""
    from sidecar.app.planner import Planner

    source = BudgetedSource("p", RateBudget("p", per_minute=60, per_day=20_000))
    source.min_refresh_s = 5.0
    planner, t0 = Planner(), DAY0 * 1000
    interval = planner.interval_ms(source, lambda: 1, t0)
    assert interval >= 5_000
    planner.asked(source, "AAA", True, t0, interval)
    assert planner.plan(source, ["AAA"], t0 + 1_000).idle == ["AAA"]  # not due yet
    assert planner.plan(source, ["AAA"], t0 + 1_000 - 180_000).ask == ["AAA"]
