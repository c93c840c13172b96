"""Several timeframes per symbol: higher bars built from the base bars on each market's
session grid, corrections and forming bars included, features bit-identical to TA-Lib
batch per timeframe. Driven clock, real Redis and SQLite.

The grid oracle is exchange_calendars' own ``trading_index`` (session-anchored
intervals, cut at the close), not the daemon's :class:`~sidecar.series.Grid`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.calendars import get_calendar
from sidecar.redis_store import RedisStore
from sidecar.series import Grid
from sidecar.sources.polygon import parse_aggs
from sidecar.sources.yahoo import parse_chart
from sidecar.sqlite_store import BarStore
from sidecar.tests.fake_providers import fixture
from sidecar.tests.helpers import (
    Clock,
    MinuteFeed,
    assert_features,
    check_forming,
    check_live,
    cycle_at,
    driven_pipeline,
    features_of,
    lasting_store,
    law,
    same,
    walk,
)
from sidecar.timeframe import Timeframe

MIN = 60_000
DAY = 86_400_000
NEW_YORK = ZoneInfo("America/New_York")
TFS = tuple(Timeframe.parse(x) for x in ("1m", "5m", "15m", "1h", "1d"))


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# -- the oracle ------------------------------------------------------------------------

def oracle_buckets(calendar: str | None, tf: Timeframe, ts: Sequence[int]) -> dict[int, int]:
    """Base open time -> the stamp of its higher bar, from exchange_calendars' trading
    index (intraday), its sessions (daily, stamped 00:00 UTC of the session date), or
    the UTC clock for a market that never closes."""
    if calendar is None:
        return {t: t - t % (DAY if tf.ms >= DAY else tf.ms) for t in ts}
    import exchange_calendars as xcals

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = xcals.get_calendar(calendar)
        start = pd.Timestamp(min(ts), unit="ms", tz="UTC").normalize() - pd.Timedelta(days=1)
        end = pd.Timestamp(max(ts), unit="ms", tz="UTC").normalize() + pd.Timedelta(days=1)
        if tf.ms >= DAY:
            out = {}
            for t in ts:
                session = cal.minute_to_session(pd.Timestamp(t, unit="ms", tz="UTC"), direction="none")
                out[t] = int(pd.Timestamp(session.date(), tz="UTC").timestamp() * 1000)
            return out
        index = cal.trading_index(start.tz_localize(None).date(), end.tz_localize(None).date(),
                                  f"{tf.ms // MIN}min", force=True, intervals=True)
    lefts = [int(iv.left.timestamp() * 1000) for iv in index]
    rights = [int(iv.right.timestamp() * 1000) for iv in index]
    out = {}
    for t in ts:
        i = int(np.searchsorted(lefts, t, side="right")) - 1
        assert lefts[i] <= t < rights[i], f"{t} is in no interval of the trading index"
        out[t] = lefts[i]
    return out


def expected_bars(symbol: str, calendar: str | None, tf: Timeframe, base: list[Bar]) -> dict[int, Bar]:
    """Stamp -> the law over ``base`` (closed, oldest first) per oracle bucket."""
    stamps = oracle_buckets(calendar, tf, [b.t for b in base])
    groups: dict[int, list[Bar]] = {}
    for b in base:
        groups.setdefault(stamps[b.t], []).append(b)
    return {t: law(symbol, tf.name, t, parts) for t, parts in groups.items()}


# -- the tests ---------------------------------------------------------------------------

def test_grid_matches_exchange_calendars_trading_index() -> None:
    """US 1h 09:30 ... 15:30-16:00, an early close, HKEX's and Tokyo's lunch breaks, daily
    stamps, crypto from 00:00 UTC: the daemon's grid against the oracle, minute by minute."""
    for name, start, end in (("XNYS", "2024-11-27T00:00:00Z", "2024-12-03T00:00:00Z"),
                             ("XHKG", "2024-12-23T00:00:00Z", "2024-12-28T00:00:00Z"),
                             ("XTKS", "2024-11-01T00:00:00Z", "2024-11-07T00:00:00Z")):
        cal = get_calendar(name)
        ts = cal.open_slots(ms(start), ms(end), MIN)
        for tf in TFS[1:]:
            grid = Grid(tf, cal)
            want = oracle_buckets(name, tf, ts)
            got = {t: grid.bucket(t).t for t in ts}
            assert got == want, (name, tf.name)
    nyse = Grid(Timeframe.parse("1h"), get_calendar("XNYS"))
    early = [nyse.bucket(t) for t in get_calendar("XNYS").open_slots(ms("2024-11-29T09:30:00-05:00"),
                                                                     ms("2024-11-29T17:00:00-05:00"), MIN)]
    assert sorted({(b.t, b.end) for b in early}) == [
        (ms("2024-11-29T09:30:00-05:00"), ms("2024-11-29T10:30:00-05:00")),
        (ms("2024-11-29T10:30:00-05:00"), ms("2024-11-29T11:30:00-05:00")),
        (ms("2024-11-29T11:30:00-05:00"), ms("2024-11-29T12:30:00-05:00")),
        (ms("2024-11-29T12:30:00-05:00"), ms("2024-11-29T13:00:00-05:00"))]
    crypto = Grid(Timeframe.parse("1h"), get_calendar("24/7"))
    assert crypto.bucket(ms("2024-11-29T13:45:00Z")).t == ms("2024-11-29T13:00:00Z")
    daily = Grid(Timeframe.parse("1d"), get_calendar("24/7"))
    assert daily.bucket(ms("2024-11-29T23:59:00Z")).t == ms("2024-11-29T00:00:00Z")
    fx = Grid(Timeframe.parse("1d"), get_calendar("FX"))  # Sunday 17:00 New York opens Monday's session
    assert fx.bucket(ms("2024-12-01T17:05:00-05:00")).t == ms("2024-12-02T00:00:00Z")


async def test_higher_timeframes_follow_the_law_with_corrections_and_forming_bars(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """A Friday early close, a weekend and a Monday for AAPL (NYSE) and BTCUSD (24/7):
    every 5m/15m/1h/1d bar in Redis and SQLite equals the law over the stored 1m bars,
    after corrections of bars whose higher bars were closed or forming; the forming
    higher bars equal the law over the bucket's closed 1m bars plus the forming one;
    every timeframe's features equal TA-Lib batch on that timeframe's series."""
    nyse = get_calendar("XNYS")
    start, end = ms("2024-11-29T09:25:00-05:00"), ms("2024-12-02T16:05:00-05:00")
    aapl_ts = nyse.open_slots(start, end, MIN)
    btc_ts = list(range(start, end, MIN))
    feed = MinuteFeed({"AAPL": walk("AAPL", aapl_ts, 1), "BTCUSD": walk("BTCUSD", btc_ts, 2)})
    clock = Clock.from_ms(start)
    pipe = await driven_pipeline(lasting_store(redis_store, "tfs"), bar_store, feed, clock, TFS,
                                 symbols=("AAPL", "BTCUSD"))
    corrections = {
        # 10:02: 09:58 (its 5m and 15m closed, its 1h 09:30-10:30 forming) and 10:29 (1h closed at 10:30)
        ms("2024-11-29T10:02:00-05:00"): ("AAPL", ms("2024-11-29T09:58:00-05:00"), 0.37),
        ms("2024-11-29T10:33:00-05:00"): ("AAPL", ms("2024-11-29T10:29:00-05:00"), -0.41),
        ms("2024-12-02T09:36:00-05:00"): ("BTCUSD", ms("2024-12-02T09:29:00-05:00"), 0.5),
    }
    cycles = checked = 0
    now = start
    while now < end:
        for offset in (1_000, 31_000):
            clock.t_ms = now + offset
            if offset == 1_000 and now in corrections:
                sym, t, dc = corrections[now]
                feed.correct(sym, t, dc)
            await pipe.run_cycle(now + offset)
            cycles += 1
            if now in corrections and offset == 1_000:
                await pipe.drain(timeout_s=30)
                assert not pipe.background
            if cycles % 97 == 0 and nyse.is_open(now):
                await pipe.drain(timeout_s=30)
                await check_live(pipe, "AAPL")
                checked += await check_forming(pipe, "AAPL")
            if cycles % 89 == 0:
                await pipe.drain(timeout_s=30)
                await check_live(pipe, "BTCUSD")
                checked += await check_forming(pipe, "BTCUSD")
        # minute by minute near and during NYSE hours, in big steps while it is closed
        if nyse.is_open(now) or nyse.is_open(now - 3 * MIN) or nyse.is_open(now + 3 * MIN):
            now += MIN
        else:
            nxt = nyse.next_open(now)
            assert nxt is not None
            now = max(now + MIN, min(now + 3_600_000, nxt - 2 * MIN))
    assert checked > 40  # forming higher bars compared mid-run
    await pipe.drain(timeout_s=30)
    await pipe.run_cycle(now)  # the final write carries the re-aggregated bars
    await pipe.drain(timeout_s=30)
    await bar_store.flush()

    for sym, calendar in (("AAPL", "XNYS"), ("BTCUSD", None)):
        base = [b for b in await bar_store.bars_between(sym, "1m", 0, 2**62) if not b.forming]
        assert base, sym
        for fixed in corrections.values():
            if fixed[0] == sym:
                assert next(b for b in base if b.t == fixed[1]).c == feed.bars[sym][fixed[1]].c
        for tf in TFS[1:]:
            want = expected_bars(sym, calendar, tf, base)
            stored = {b.t: b for b in await bar_store.bars_between(sym, tf.name, 0, 2**62)}
            in_redis = {b.t: b for b in await pipe.redis.recent_bars(sym, tf.name, 100_000)}
            fmap = await features_of(pipe, sym, tf.name)
            if fmap["forming"]:  # the bucket still open at the end: in neither store
                assert fmap["t"] in want and fmap["t"] not in stored and fmap["t"] not in in_redis
                del want[fmap["t"]]  # type: ignore[arg-type]
            assert set(stored) == set(want) == set(in_redis), (sym, tf.name)
            for t, w in want.items():
                assert same(stored[t], w), (sym, tf.name, t, stored[t], w)
                assert same(in_redis[t], w), (sym, tf.name, t, in_redis[t], w)
            closed = [stored[t] for t in sorted(stored)]
            if not fmap["forming"]:
                assert_features(fmap, closed)
    # The early close: four 1h bars, the last one 12:30-13:00.
    hours = [b.t for b in await bar_store.bars_between("AAPL", "1h", ms("2024-11-29T00:00:00Z"),
                                                       ms("2024-11-30T00:00:00Z"))]
    assert hours == [ms(f"2024-11-29T{h}:30:00-05:00") for h in ("09", "10", "11", "12")]
    days = [b.t for b in await bar_store.bars_between("AAPL", "1d", 0, 2**62)]
    assert days == [ms("2024-11-29T00:00:00Z"), ms("2024-12-02T00:00:00Z")]


async def test_provider_fixtures_against_the_daemons_aggregation(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Yahoo's 1m AAPL session of 2024-10-02 through the daemon: its 1h bars sit on the
    session grid (09:30 ... 15:30-16:00, seven bars) and its 1d bar is stamped as the
    sources stamp providers' daily bars (00:00 UTC of the session date, like Yahoo's
    daily fixture after parsing); all equal the law over the 1m bars.

    Polygon's 1h fixture (AAPL, 2024-04-29) is on another grid: on the hour, extended
    hours included. The daemon keeps its own: for that day, its 1h buckets start at
    :30 and none of Polygon's stamps is a bucket start of it. (No fixture holds the same
    period at two timeframes on the same grid, so there is no pair to compare values.)
    """
    from sidecar.sources._parsing import ParseContext

    day = ms("2024-10-02T00:00:00Z")
    ctx = ParseContext("AAPL", Timeframe.parse("1m"), "yahoo", day + 2 * DAY, True)
    minutes = parse_chart(fixture("yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json"), 200, ctx,
                          end_ms=day + DAY)
    minutes = [dataclasses.replace(b, forming=False) for b in minutes if b.t < day + DAY]
    assert len(minutes) > 380
    feed = MinuteFeed({"AAPL": {b.t: b for b in minutes}})
    tfs = tuple(Timeframe.parse(x) for x in ("1m", "1h", "1d"))
    clock = Clock.from_ms(ms("2024-10-02T09:29:00-04:00"))
    pipe = await driven_pipeline(lasting_store(redis_store, "tfs"), bar_store, feed, clock, tfs,
                                 symbols=("AAPL",))
    for now in range(ms("2024-10-02T09:29:00-04:00"), ms("2024-10-02T16:10:00-04:00"), MIN):
        await cycle_at(pipe, clock, now + 1_000)
    await pipe.drain(timeout_s=30)
    await bar_store.flush()
    base = [b for b in await bar_store.bars_between("AAPL", "1m", 0, 2**62) if not b.forming]
    assert [b.t for b in base] == [b.t for b in minutes]
    hours = await bar_store.bars_between("AAPL", "1h", 0, 2**62)
    assert [b.t for b in hours] == [ms(f"2024-10-02T{h:02d}:30:00-04:00") for h in range(9, 16)]
    want = expected_bars("AAPL", "XNYS", tfs[1], base)
    assert all(same(b, want[b.t]) for b in hours)
    (daily,) = await bar_store.bars_between("AAPL", "1d", 0, 2**62)
    assert same(daily, law("AAPL", "1d", day, base))
    yahoo_daily = parse_chart(fixture("yahoo/chart_AAPL_1d_2020-01-01_2020-01-03.json"), 200,
                              ParseContext("AAPL", tfs[2], "yahoo", ms("2020-01-10T00:00:00Z"), True))
    assert all(b.t % DAY == 0 for b in yahoo_daily) and daily.t % DAY == 0

    await scanner_health_and_metrics(pipe)

    polygon, _ = parse_aggs(fixture("polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json"), 200,
                         ParseContext("AAPL", tfs[1], "polygon", ms("2024-05-01T00:00:00Z"), True))
    grid = Grid(tfs[1], get_calendar("XNYS"))
    own_starts = {grid.bucket(t).t for t in get_calendar("XNYS").open_slots(
        ms("2024-04-29T09:30:00-04:00"), ms("2024-04-29T16:00:00-04:00"), MIN)}
    assert len(own_starts) == 7 and all(datetime.fromtimestamp(t / 1000, UTC).minute == 30 for t in own_starts)
    assert polygon and all(b.t % 3_600_000 == 0 for b in polygon)
    assert not own_starts & {b.t for b in polygon}


async def scanner_health_and_metrics(pipe: Pipeline) -> None:
    """The scanner reads every timeframe in one ``MGET``; ``/health`` and ``/metrics``
    show each timeframe of each symbol."""
    from prometheus_client import CollectorRegistry, generate_latest

    from sidecar.app.health import health_report
    from sidecar.app.http import DaemonView, _PipelineCollector
    from sidecar.app.ticker import SecondTicker
    from sidecar.scanner import Scanner

    scanner = Scanner(pipe.redis.redis, "tfs", "1m", stale_after_ms=10**12)
    before = (await pipe.redis.redis.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
    rows = await scanner.read(["AAPL", "NOPE"], timeframes=["1m", "1h", "1d"])
    after = (await pipe.redis.redis.info("commandstats"))["cmdstat_mget"]["calls"]
    assert after - before == 1
    assert [(r["symbol"], r["tf"]) for r in rows] == [(s, tf) for s in ("AAPL", "NOPE") for tf in ("1m", "1h", "1d")]
    assert [r["t"] for r in rows[:3]] == [(await features_of(pipe, "AAPL", tf))["t"] for tf in ("1m", "1h", "1d")]
    assert all(r.get("missing") for r in rows[3:])

    ticker = SecondTicker()
    report = health_report(pipe, ticker, ready=True)
    assert report["timeframes"] == ["1m", "1h", "1d"]
    per_tf = report["symbols"]["AAPL"]["timeframes"]
    assert list(per_tf) == ["1m", "1h", "1d"]
    assert per_tf["1d"]["newest_bar_t"] == ms("2024-10-02T00:00:00Z")
    registry = CollectorRegistry()
    registry.register(_PipelineCollector(DaemonView(pipe, ticker, ready=True)))
    text = generate_latest(registry).decode()
    for tf in ("1m", "1h", "1d"):
        assert f'sidecar_series_forming{{symbol="AAPL",tf="{tf}"}}' in text


# -- warm-up in the background and rebuilds held open, on every timeframe ----------------

class HeldHistory(RedisStore):
    """The pipeline's view of Redis: while ``held``, history reads (a rebuild's) answer
    with what Redis holds when asked, but only once the test releases them."""

    def __init__(self, redis_store: RedisStore) -> None:
        super().__init__(redis_store.redis, "tfs", features_ttl_ms=3_600_000)
        self.held = False
        self.pending: list[asyncio.Future[None]] = []

    async def _gate(self) -> None:
        if self.held:
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.pending.append(gate)
            await gate

    async def recent_bars(self, symbol: str, tf: str, n: int) -> list[Bar]:
        bars = await super().recent_bars(symbol, tf, n)
        await self._gate()
        return bars

    async def bars_since(self, symbol: str, tf: str, t_ms: int) -> list[Bar]:
        bars = await super().bars_since(symbol, tf, t_ms)
        await self._gate()
        return bars

    def release(self) -> None:
        self.held = False
        for gate in self.pending:
            if not gate.done():
                gate.set_result(None)
        self.pending.clear()


async def check_stored_law(pipe: Pipeline, bar_store: BarStore, symbol: str) -> None:
    """Every closed higher bar in SQLite and Redis equals the law over the stored base
    bars; the forming one (in its features map) is in neither store."""
    await pipe.drain(timeout_s=30)
    await bar_store.flush()
    base = [b for b in await bar_store.bars_between(symbol, "1m", 0, 2**62) if not b.forming]
    for tf in pipe.timeframes[1:]:
        want = expected_bars(symbol, None, tf, base)
        fmap = await features_of(pipe, symbol, tf.name)
        if fmap["forming"]:
            want.pop(fmap["t"], None)  # type: ignore[call-overload]
        stored = {b.t: b for b in await bar_store.bars_between(symbol, tf.name, 0, 2**62)}
        in_redis = {b.t: b for b in await pipe.redis.recent_bars(symbol, tf.name, 100_000)}
        assert set(stored) == set(want) == set(in_redis), tf.name
        for t, w in want.items():
            assert same(stored[t], w) and same(in_redis[t], w), (tf.name, t, stored[t], w)


async def test_warm_up_in_the_background_folds_the_base_into_every_timeframe(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """A store with ten hours of 1m bars, the 5m bars of the first six hours and no 15m
    or 1h bars. The cycles run before the handles open: every timeframe is served
    from the first cycle, flagged ``warming``, and a correction comes meanwhile. Once
    warm, the higher bars the store lacked are folded from the base (stored, and equal
    to the law), and every timeframe's features equal TA-Lib batch."""
    from sidecar.app.warmup import warm_up

    start = ms("2024-12-02T00:00:00Z")
    ts = list(range(start, start + 14 * 3_600_000, MIN))
    feed = MinuteFeed({"BTCUSD": walk("BTCUSD", ts, 5)})
    now = start + 10 * 3_600_000 + 2 * MIN  # the stored history ends two minutes before
    history = [feed.bars["BTCUSD"][t] for t in ts if t < now - 2 * MIN]
    fives = [b for t, b in sorted(expected_bars("BTCUSD", None, TFS[1], history).items())
             if t < start + 6 * 3_600_000]
    await bar_store.write_history(history + fives)
    store = lasting_store(redis_store, "tfs")
    await store.write_history(history + fives)
    clock = Clock.from_ms(now + 1_000)
    tfs = TFS[:4]
    pipe = await driven_pipeline(store, bar_store, feed, clock, tfs, warm=False, symbols=("BTCUSD",))
    assert await pipe.begin_warmup(int(clock.t_ms)) == []
    for k in range(3):  # cycles before the handles open, a correction among them
        if k == 1:
            feed.correct("BTCUSD", now - 4 * MIN, 0.21)
        await cycle_at(pipe, clock, now + k * MIN + 1_000)
        for tf in tfs:
            if tf.name != "15m" and tf.name != "1h":  # nothing of theirs is stored yet
                assert (await features_of(pipe, "BTCUSD", tf.name))["warming"] is True, tf.name
    await warm_up(pipe, [feed], bar_store, store, [], clock=clock)
    assert not pipe.symbols["BTCUSD"].warming
    for k in range(3, 40):
        await cycle_at(pipe, clock, now + k * MIN + 1_000)
    await pipe.drain(timeout_s=30)
    await pipe.run_cycle(int(clock.t_ms))
    for tf in tfs:
        assert "warming" not in await features_of(pipe, "BTCUSD", tf.name)
    await check_live(pipe, "BTCUSD")
    assert await check_forming(pipe, "BTCUSD") == 3
    await check_stored_law(pipe, bar_store, "BTCUSD")
    assert pipe.validator.gaps == {} and pipe.validator.rejected == {}


async def test_a_higher_timeframe_rebuild_held_open_across_cycles_keeps_every_bar(
    redis_store: RedisStore, bar_store: BarStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """A correction while a rebuild is due (gap repair asked for one) re-aggregates
    closed 5m/15m bars in that rebuild; its reads are held while cycles close more 1m,
    5m and 15m bars. Once released, every timeframe's features equal TA-Lib batch on
    its stored series and every bar equals the law."""
    caplog.set_level(logging.INFO, logger="sidecar.pipeline")
    start = ms("2024-12-02T00:00:00Z")
    ts = list(range(start, start + 6 * 3_600_000, MIN))
    feed = MinuteFeed({"BTCUSD": walk("BTCUSD", ts, 9)})
    store = HeldHistory(redis_store)
    clock = Clock.from_ms(start)
    pipe = await driven_pipeline(store, bar_store, feed, clock, TFS[:4], symbols=("BTCUSD",))
    t = start
    for _ in range(200):
        t += MIN
        await cycle_at(pipe, clock, t + 1_000)
    await pipe.drain(timeout_s=30)
    store.held = True
    pipe.history_changed("BTCUSD")
    feed.correct("BTCUSD", t - 8 * MIN, -0.33)  # its 5m bar closed, maybe its 15m too
    t += MIN
    await cycle_at(pipe, clock, t + 1_000)
    for _ in range(100):  # the rebuild starts after the cycle
        if store.pending:
            break
        await asyncio.sleep(0)
    assert store.pending and pipe.symbols["BTCUSD"].rebuilding is not None  # the rebuild is reading
    assert {ser.tf.name for ser in pipe.symbols["BTCUSD"].series if ser.needs_rebuild or ser.dirty} == set()
    for _ in range(20):  # cycles go on, closing bars on every timeframe, while it reads
        t += MIN
        await cycle_at(pipe, clock, t + 1_000)
    store.release()
    await pipe.drain(timeout_s=30)
    assert pipe.symbols["BTCUSD"].rebuilding is None
    rebuilt = {r.__dict__.get("tf") for r in caplog.records if r.getMessage() == "features rebuilt"}
    assert {"1m", "5m"} <= rebuilt
    t += MIN
    await cycle_at(pipe, clock, t + 1_000)  # the final write carries the re-aggregated bars
    await pipe.drain(timeout_s=30)
    await check_live(pipe, "BTCUSD")
    await check_stored_law(pipe, bar_store, "BTCUSD")


class HistoryFeed(MinuteFeed):
    """A :class:`MinuteFeed` that serves its bars as history too (bootstrap)."""

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return [b for t, b in sorted(self.bars.get(symbol, {}).items()) if start_ms <= t < end_ms]


async def test_a_cold_start_folds_the_whole_bootstrap_into_every_timeframe(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Nothing stored: warm-up fetches the warm window (127 minutes) and folds it up, the
    rest of the bootstrap day follows in the background and is folded too, the bucket
    where the warm window began included (warm-up saw only part of its base bars)."""
    from sidecar.app.warmup import warm_up

    start = ms("2024-12-02T00:00:00Z")
    ts = list(range(start, start + 30 * 3_600_000, MIN))
    feed = HistoryFeed({"BTCUSD": walk("BTCUSD", ts, 13)})
    now = start + 26 * 3_600_000  # the day from 02:00; the warm window from 23:53, inside every bucket
    clock = Clock.from_ms(now + 1_000)
    store = lasting_store(redis_store, "tfs")
    pipe = await driven_pipeline(store, bar_store, feed, clock, TFS[:4], warm=False, symbols=("BTCUSD",),
                                 warm_bars=127, bootstrap_days=1)
    cold = await pipe.begin_warmup(int(clock.t_ms))
    assert cold == ["BTCUSD"]
    await warm_up(pipe, [feed], bar_store, store, cold, clock=clock)
    for k in range(1, 4):
        await cycle_at(pipe, clock, now + k * MIN + 1_000)
        await pipe.drain(timeout_s=30)
    await bar_store.flush()
    base = await bar_store.bars_between("BTCUSD", "1m", 0, 2**62)
    assert base[0].t == now - DAY
    await check_stored_law(pipe, bar_store, "BTCUSD")
    hours = await bar_store.bars_between("BTCUSD", "1h", 0, 2**62)
    assert [b.t for b in hours][:1] == [now - DAY] and len(hours) == 24  # the 25th is forming
