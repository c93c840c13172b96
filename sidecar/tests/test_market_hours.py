"""Market hours in the running cycle: a closed market costs no request, leaves no gap and
no filler bar, keeps its features readable with ``market_open: false``, and ``/health``
counts it apart from stale symbols. Driven clock, real Redis and SQLite."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

import msgpack
import numpy as np
import talib

from sidecar.app.bootstrap import repair_gaps
from sidecar.app.health import assess, health_report
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar, get_calendar
from sidecar.features import FeatureEngine
from sidecar.redis_store import RedisStore
from sidecar.settings import IndicatorPeriods
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock, bar, settings
from sidecar.timeframe import Timeframe
from sidecar.validation import Validator, Verdict

MIN = 60_000
TF_1M = Timeframe.parse("1m")
NEW_YORK = ZoneInfo("America/New_York")


def ms(text: str) -> int:
    """Epoch ms of an ISO 8601 time with its offset."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


class ExchangeSource(Source):
    """An exchange feed: the last three minutes' bars that fall in open hours (the newest
    forming); every symbol asked is logged with the time it was asked at."""

    name = "exchange"

    def __init__(self, calendars: dict[str, MarketCalendar]) -> None:
        self.calendars = calendars
        self.asked: list[tuple[str, int]] = []

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        out: LatestResult = {}
        current = now_ms - now_ms % MIN
        for sym in symbols:
            self.asked.append((sym, now_ms))
            cal = self.calendars[sym]
            out[sym] = [
                bar(t, 100 + (t // MIN) % 50 * 0.1, symbol=sym, tf="1m", v=float(10 + (t // MIN) % 7),
                    src=self.name, forming=t == current)
                for t in (current - 2 * MIN, current - MIN, current) if cal.is_open(t)
            ]
        return out

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


def _step(nyse: MarketCalendar, now_ms: int) -> int:
    """Minute by minute around and during NYSE hours, in big steps while it is closed
    (the 24/7 symbol then has holes, which are real gaps for it)."""
    if nyse.is_open(now_ms) or nyse.is_open(now_ms - 3 * MIN):
        return MIN
    nxt = nyse.next_open(now_ms)
    assert nxt is not None
    return max(MIN, min(3_600_000, nxt - 2 * MIN - now_ms))


async def test_closed_market_spends_no_requests_and_records_no_gaps(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Wednesday before Thanksgiving 15:50 → the holiday → the 13:00 early close on Friday
    → the weekend → Monday 09:35 New York, for AAPL (NYSE) and BTCUSD (24/7)."""
    nyse, crypto = get_calendar("XNYS"), get_calendar("24/7")
    source = ExchangeSource({"AAPL": nyse, "BTCUSD": crypto})
    clock = Clock.from_ms(ms("2024-11-27T15:50:00-05:00"))
    pipe = Pipeline(settings(symbols=("AAPL", "BTCUSD"), sources=("exchange",), timeframe=TF_1M,
                             market_hours=True, fill_gaps=True),
                    [source], redis_store, bar_store, clock=clock)
    assert {s: c.name for s, c in pipe.calendars.items()} == {"AAPL": "XNYS", "BTCUSD": "24/7"}
    end = ms("2024-12-02T09:35:00-05:00")
    seen_closed: dict[str, dict[str, object]] = {}
    while int(clock.t_ms) <= end:
        now = int(clock.t_ms)
        await pipe.run_cycle(now)
        if not nyse.is_open(now) and not nyse.is_open(now - 2 * MIN):
            # Closed: AAPL's features are readable, say so, and outlive the usual 2 s.
            key = redis_store.keys.features("1m", "AAPL")
            raw = await redis_store.redis.get(key)
            assert raw is not None
            fmap = msgpack.unpackb(raw)
            assert fmap["market_open"] is False
            assert fmap["next_open"] == nyse.next_open(now)
            assert fmap["forming"] is False  # the last bar before the close was closed
            assert await redis_store.redis.pttl(key) > fmap["next_open"] - now
            seen_closed[datetime.fromtimestamp(now / 1000, NEW_YORK).strftime("%a")] = fmap
            status, reasons = assess(pipe, now)
            assert status == "ok", reasons
            assert not pipe.symbols["AAPL"].stale(now, pipe.settings.stale_after_ms)
        clock.t_ms = now + _step(nyse, now)
    await pipe.drain()
    await bar_store.flush()

    aapl_asks = [t for sym, t in source.asked if sym == "AAPL"]
    assert aapl_asks and all(nyse.is_open(t) or nyse.is_open(t - MIN) for t in aapl_asks)
    # Thursday (the holiday), Saturday and Sunday: not one request for AAPL.
    for day in ("2024-11-28", "2024-11-30", "2024-12-01"):
        lo, hi = ms(f"{day}T00:00:00-05:00"), ms(f"{day}T23:59:59-05:00")
        assert not [t for t in aapl_asks if lo <= t <= hi], day
        assert [t for sym, t in source.asked if sym == "BTCUSD" and lo <= t <= hi], day
    assert {"Thu", "Sat", "Sun"} <= set(seen_closed)

    assert await bar_store.gaps("AAPL", "1m") == []
    assert pipe.validator.gaps.get("AAPL") is None
    stored = await bar_store.bars_between("AAPL", "1m", 0, 2**62)
    assert not [b for b in stored if b.synthetic]
    assert all(nyse.is_open(b.t) for b in stored)
    # Wednesday's, Friday's and Monday's bars, with the sessions' last minutes closed.
    friday = [b for b in stored if ms("2024-11-29T00:00:00-05:00") <= b.t < ms("2024-11-30T00:00:00-05:00")]
    assert friday[0].t == ms("2024-11-29T09:30:00-05:00")
    assert friday[-1].t == ms("2024-11-29T12:59:00-05:00") and not friday[-1].forming
    assert len(friday) == 210
    # The 24/7 symbol skipped by the big steps has real gaps, filled (SIDECAR_FILL_GAPS).
    assert await bar_store.gaps("BTCUSD", "1m")

    # Open again on Monday: features say so and carry no next_open.
    fmap = msgpack.unpackb(await redis_store.redis.get(redis_store.keys.features("1m", "AAPL")))
    assert fmap["market_open"] is True and fmap["next_open"] is None


async def test_health_is_ok_when_every_market_is_closed(redis_store: RedisStore, bar_store: BarStore) -> None:
    nyse = get_calendar("XNYS")
    source = ExchangeSource({"AAPL": nyse, "MSFT": nyse})
    clock = Clock.from_ms(ms("2024-12-06T15:58:00-05:00"))  # a Friday
    pipe = Pipeline(settings(symbols=("AAPL", "MSFT"), sources=("exchange",), timeframe=TF_1M,
                             market_hours=True), [source], redis_store, bar_store, clock=clock)
    for _ in range(6):
        await pipe.run_cycle(int(clock.t_ms))
        clock.advance(60)
    saturday = ms("2024-12-07T12:00:00-05:00")
    clock.t_ms = saturday
    asked = len(source.asked)
    await pipe.run_cycle(saturday)
    assert len(source.asked) == asked
    assert assess(pipe, saturday) == ("ok", [])
    market = health_report(pipe, SecondTicker(), ready=True)["market"]
    assert (market["open"], market["closed"], market["stale"]) == (0, 2, 0)
    # Monday 09:30: open again, and both are asked.
    monday = ms("2024-12-09T09:30:00-05:00")
    clock.t_ms = monday
    await pipe.run_cycle(monday)
    assert len(source.asked) == asked + 2
    assert assess(pipe, monday) == ("ok", [])
    assert all(st.market_open and st.next_open is None for st in pipe.symbols.values())


async def test_gap_repair_does_not_ask_for_closed_hours(bar_store: BarStore) -> None:
    """A gap recorded across a weekend (before the calendar was known) asks no source."""
    nyse = get_calendar("XNYS")
    source = ExchangeSource({"AAPL": nyse})
    asked_history: list[tuple[int, int]] = []

    async def history(symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        asked_history.append((start_ms, end_ms))
        return []

    source.fetch_history = history  # type: ignore[method-assign]
    bar_store.add_gap("AAPL", "1m", ms("2024-12-06T16:00:00-05:00"), ms("2024-12-09T09:29:00-05:00"),
                      3929, False)
    await bar_store.flush()
    now = ms("2024-12-09T10:00:00-05:00")
    await repair_gaps("AAPL", TF_1M, [source], bar_store, now_ms=now, calendar=nyse)
    assert asked_history == []
    await repair_gaps("AAPL", TF_1M, [source], bar_store, now_ms=now, calendar=nyse)
    assert asked_history == []  # done: not tried again


def test_vwap_restarts_at_each_session_open() -> None:
    """VWAP per session equals TA-Lib's batch VWAP over that session's bars only, with
    sessions from the calendar (09:30 New York), not the UTC day."""
    nyse = get_calendar("XNYS")
    slots = (nyse.open_slots(ms("2024-11-29T09:30:00-05:00"), ms("2024-11-29T13:00:00-05:00"), MIN)
             + nyse.open_slots(ms("2024-12-02T09:30:00-05:00"), ms("2024-12-02T16:00:00-05:00"), MIN))
    rng = np.random.default_rng(7)
    bars = [bar(t, float(100 + rng.normal()), symbol="AAPL", v=float(rng.integers(1, 1000))) for t in slots]
    engine = FeatureEngine("AAPL", "1m", IndicatorPeriods(), sessions=nyse.session_bounds)
    got = [engine.update(b)[6] for b in bars]
    expected: list[float] = []
    for day in ("2024-11-29", "2024-12-02"):
        sess = [b for b in bars if nyse.session_open(b.t) == ms(f"{day}T09:30:00-05:00")]
        expected += talib.VWAP(np.array([b.h for b in sess]), np.array([b.l for b in sess]),
                               np.array([b.c for b in sess]), np.array([b.v for b in sess])).tolist()
    assert got == expected
    # Loading the same history opens the handle on the newest session only.
    loaded = FeatureEngine("AAPL", "1m", IndicatorPeriods(), sessions=nyse.session_bounds)
    loaded.load(bars)
    assert loaded.closed_values[6] == expected[-1]


def test_vwap_session_that_spans_utc_midnight() -> None:
    """Sydney opens at 10:00 local, 23:00 UTC the day before: one session, one VWAP, where
    a UTC-day anchor would restart it at midnight."""
    asx = get_calendar("XASX")
    (session,) = asx.sessions_between(ms("2024-12-02T10:00:00+11:00"), ms("2024-12-02T11:00:00+11:00"))
    assert session.open == ms("2024-12-01T23:00:00+00:00")
    rng = np.random.default_rng(3)
    bars = [bar(t, float(50 + rng.normal()), symbol="BHP", v=float(rng.integers(1, 500)))
            for t in asx.open_slots(session.open, session.close, MIN)]
    expected = talib.VWAP(np.array([b.h for b in bars]), np.array([b.l for b in bars]),
                          np.array([b.c for b in bars]), np.array([b.v for b in bars])).tolist()
    engine = FeatureEngine("BHP", "1m", IndicatorPeriods(), sessions=asx.session_bounds)
    assert [engine.update(b)[6] for b in bars] == expected
    utc = FeatureEngine("BHP", "1m", IndicatorPeriods())
    assert [utc.update(b)[6] for b in bars] != expected


def test_session_anchor_setting_overrides_the_calendar(redis_store: RedisStore, bar_store: BarStore) -> None:
    base = settings(symbols=("AAPL",), sources=("exchange",), timeframe=TF_1M, market_hours=True)
    source = ExchangeSource({"AAPL": get_calendar("XNYS")})
    own = Pipeline(base, [source], redis_store, bar_store)
    fixed = Pipeline(dataclasses.replace(base, session_anchor_min=0), [source], redis_store, bar_store)
    t = ms("2024-12-02T09:45:00-05:00")
    assert own.symbols["AAPL"].base.engine._bounds(t)[0] == ms("2024-12-02T09:30:00-05:00")
    assert fixed.symbols["AAPL"].base.engine._bounds(t)[0] == ms("2024-12-02T00:00:00+00:00")


def test_bars_outside_regular_hours_are_rejected() -> None:
    """Pre- and post-market bars, the entry some feeds stamp at the close, and a bar in
    Hong Kong's lunch break are counted as ``outside_session`` and not accepted."""
    nyse, hk = get_calendar("XNYS"), get_calendar("XHKG")
    validator = Validator(TF_1M, calendars={"AAPL": nyse, "0700": hk}, outlier_k=0.0)
    now = ms("2024-12-03T00:00:00+00:00")
    cases = [
        ("AAPL", "2024-12-02T15:59:00-05:00", Verdict.NEW),
        ("AAPL", "2024-12-02T16:00:00-05:00", Verdict.REJECTED),  # the close's "live" entry
        ("AAPL", "2024-12-02T17:30:00-05:00", Verdict.REJECTED),  # post-market
        ("AAPL", "2024-12-02T04:00:00-05:00", Verdict.REJECTED),  # pre-market
        ("0700", "2024-12-02T11:59:00+08:00", Verdict.NEW),
        ("0700", "2024-12-02T12:30:00+08:00", Verdict.REJECTED),  # lunch
        ("0700", "2024-12-02T13:00:00+08:00", Verdict.NEW),
    ]
    for sym, when, verdict in cases:
        outcome = validator.check(bar(ms(when), symbol=sym), now, symbol=sym)
        assert outcome.verdict is verdict, (sym, when)
    assert validator.rejected == {"outside_session": 4}
    assert validator.gaps.get("0700") is None  # 11:59 → 13:00 misses nothing
