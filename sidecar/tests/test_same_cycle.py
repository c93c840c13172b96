"""A correction of a base bar reaches every timeframe in the cycle that brings it.

Right after that cycle (no rebuild started, nothing awaited but the cycle): every
higher bar holding the corrected base bar equals the law over the stored base bars
(a forming one in its features map, a closed one in Redis and, once flushed, SQLite),
every timeframe's features equal TA-Lib batch on that timeframe's series, and the
completeness counts are what they were. Driven clock, real Redis and SQLite.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import (
    MINUTE_MS,
    Clock,
    MinuteFeed,
    RedisServer,
    check_forming,
    check_live,
    cycle_at,
    driven_pipeline,
    features_of,
    fresh_stores,
    lasting_store,
    law,
    same,
    walk,
)
from sidecar.timeframe import Timeframe

MIN = MINUTE_MS
HOUR = 60 * MIN
START = 1_733_097_600_000  # 2024-12-02T00:00:00Z
TFS = tuple(Timeframe.parse(x) for x in ("1m", "5m", "15m", "1h", "1d"))
SYMBOL = "BTCUSD"


def no_rebuild(pipe: Pipeline) -> None:
    """No symbol has a rebuild in flight or asked for."""
    for sym, state in pipe.symbols.items():
        assert state.rebuilding is None and not state.needs_rebuild, sym
        assert not any(ser.dirty for ser in state.series), sym


async def check_higher_law(pipe: Pipeline, symbol: str, bar_store: BarStore | None = None) -> None:
    """Every closed higher bar in Redis (and SQLite, flushed, when given) equals the law
    over the closed base bars Redis holds in its bucket."""
    base = [b for b in await pipe.redis.recent_bars(symbol, TFS[0].name, 100_000) if not b.forming]
    if bar_store is not None:
        await bar_store.flush()
    for ser in pipe.symbols[symbol].higher:
        assert ser.grid is not None
        groups: dict[int, list[Bar]] = {}
        for b in base:
            groups.setdefault(ser.grid.bucket(b.t).t, []).append(b)
        stores = [{b.t: b for b in await pipe.redis.recent_bars(symbol, ser.tf.name, 100_000)}]
        if bar_store is not None:
            stores.append({b.t: b for b in await bar_store.bars_between(symbol, ser.tf.name, 0, 2**62)})
        for stored in stores:
            for t, b in stored.items():
                assert not b.forming, (ser.tf.name, t)
                assert same(b, law(symbol, ser.tf.name, t, groups[t])), (ser.tf.name, t, b)


async def check_cycle(pipe: Pipeline, symbol: str, bar_store: BarStore | None = None) -> None:
    """What a cycle leaves: every timeframe's features equal batch, every higher bar the law."""
    await check_live(pipe, symbol)
    await check_forming(pipe, symbol)
    await check_higher_law(pipe, symbol, bar_store)


def completeness(pipe: Pipeline, now_ms: int) -> dict[str, Any]:
    report = pipe.completeness.report(SYMBOL, now_ms)
    assert report is not None
    return report


async def test_a_correction_reaches_every_timeframe_in_its_cycle(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """From 22:00 UTC, corrections of: the newest closed 1m bar, the last of its 5m bucket
    (that 5m bar closed with it); a bar six deep (its 5m and 15m bars closed, its 1h
    forming); one eight deep; one whose 1h and daily bars closed (23:58, corrected at
    00:02); the newest closed bar in a forming 5m bucket."""
    begin = START - 2 * HOUR
    ts = list(range(begin, begin + 3 * HOUR, MIN))
    feed = MinuteFeed({SYMBOL: walk(SYMBOL, ts, 17)})
    clock = Clock.from_ms(begin)
    pipe = await driven_pipeline(lasting_store(redis_store, "same"), bar_store, feed, clock, TFS,
                                 symbols=(SYMBOL,))
    corrections = {  # the minute of the cycle -> the 1m bar corrected in its second cycle
        begin + 65 * MIN: begin + 64 * MIN,
        begin + 80 * MIN: begin + 74 * MIN,
        begin + 93 * MIN: begin + 85 * MIN,
        begin + 122 * MIN: begin + 118 * MIN,
        begin + 128 * MIN: begin + 127 * MIN,
    }
    fixed_seen: set[str] = set()
    for now in range(begin, begin + 130 * MIN, MIN):
        await cycle_at(pipe, clock, now + 1_000)
        if now not in corrections:
            continue
        t = corrections[now]
        await bar_store.flush()
        before = completeness(pipe, now + 31_000)
        closed_before = {ser.tf.name: ser.last for ser in pipe.symbols[SYMBOL].higher}
        feed.correct(SYMBOL, t, 0.37)
        await cycle_at(pipe, clock, now + 31_000)
        no_rebuild(pipe)
        stored = {b.t: b for b in await pipe.redis.recent_bars(SYMBOL, "1m", 100)}
        assert stored[t] == feed.bars[SYMBOL][t]
        await check_cycle(pipe, SYMBOL, bar_store)
        for ser in pipe.symbols[SYMBOL].higher:
            assert ser.grid is not None
            bucket = ser.grid.bucket(t)
            fmap = await features_of(pipe, SYMBOL, ser.tf.name)
            if fmap["forming"] and fmap["t"] == bucket.t:
                continue  # the forming bar: check_forming compared it with the law
            old = closed_before[ser.tf.name]
            assert old is not None and bucket.t <= old.t, (ser.tf.name, t)
            fixed_seen.add(ser.tf.name)
        assert completeness(pipe, now + 31_000) == before
    assert fixed_seen == {"5m", "15m", "1h", "1d"}


Plan = list[tuple[bool, int, bool, int]]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Steps: whether the clock moves to the next minute, how deep a correction goes
    (0: none; up to the correction window), whether gap repair asks for a rebuild, and
    for how many steps the source holds the current minute's bar back (0: it does not)."""
    n = draw(st.integers(5, 40))
    return [(draw(st.booleans()), draw(st.integers(0, 10)), draw(st.integers(0, 14)) == 0,
             max(0, draw(st.integers(-8, 3)))) for _ in range(n)]


@given(plan=plans(), seed=st.integers(0, 3), offset=st.integers(0, 59))
async def test_any_interleaving_of_cycles_and_corrections_keeps_every_timeframe_exact(
    redis_server: RedisServer, plan: Plan, seed: int, offset: int,
) -> None:
    """Stored history warmed at start, then cycles with corrections at any depth in the
    window and bars the source sends late, across bucket boundaries: after each cycle no
    rebuild was started (but one gap repair asked for, then run), every timeframe's
    features equal batch and every higher bar the law over the stored base bars."""
    async with fresh_stores(redis_server) as (redis_store, bar_store):
        await _interleave(plan, seed, offset, redis_store, bar_store)


async def _interleave(plan: Plan, seed: int, offset: int, redis_store: RedisStore,
                      bar_store: BarStore) -> None:
    first = START + 2 * HOUR + offset * MIN  # the first live minute
    ts = list(range(START, first + (len(plan) + 3) * MIN, MIN))
    feed = MinuteFeed({SYMBOL: walk(SYMBOL, ts, seed)})
    history = [feed.bars[SYMBOL][t] for t in ts if t < first - MIN]
    await bar_store.write_history(history)
    await redis_store.write_history(history)
    clock = Clock.from_ms(first + 1_000)
    pipe = await driven_pipeline(redis_store, bar_store, feed, clock, TFS[:4], symbols=(SYMBOL,))
    now = first
    await cycle_at(pipe, clock, now + 1_000)
    await check_cycle(pipe, SYMBOL)
    second = False
    held: dict[int, tuple[Bar, int]] = {}  # a bar held back -> the step it is sent at
    own = feed.bars[SYMBOL]
    for step, (advance, depth, repair, lag) in enumerate(plan):
        if advance or second:
            now += MIN
            second = False
        else:
            second = True
        for t, (bar, at) in list(held.items()):
            if at <= step:
                own[t] = bar
                del held[t]
                if t < now:  # closed by now: sent once as a late bar
                    feed.extra.setdefault(SYMBOL, []).append(bar)
        if lag and now in own:
            held[now] = (own.pop(now), step + lag)
        if repair:
            pipe.history_changed(SYMBOL)
        if depth and now - depth * MIN in own:
            feed.correct(SYMBOL, now - depth * MIN, 0.11 * depth - 0.5)
        await cycle_at(pipe, clock, now + (31_000 if second else 1_000))
        if repair:  # the rebuild runs after the cycle; the next one writes what it made
            await pipe.drain(timeout_s=30)
            continue
        no_rebuild(pipe)
        await check_cycle(pipe, SYMBOL)
    assert pipe.validator.rejected == {}



async def test_a_late_base_bar_reaches_the_higher_bars_that_closed_without_it(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Closed 1m bars that come late, after their 5m bucket (and maybe more) closed
    without them: each higher bar holding one is re-aggregated with it, stored and its
    features redone in that cycle. The late bar lands between the base's newest closed
    bar and its forming one; behind newer closed bars; and after a lagging source left
    the bucket to be closed by the clock (nothing forming for a minute past its end)."""
    begin = START - 2 * HOUR
    ts = list(range(begin, begin + 2 * HOUR, MIN))
    feed = MinuteFeed({SYMBOL: walk(SYMBOL, ts, 5)})
    clock = Clock.from_ms(begin)
    pipe = await driven_pipeline(lasting_store(redis_store, "late"), bar_store, feed, clock, TFS[:4],
                                 symbols=(SYMBOL,))
    cases = [  # (the bars held back, the minute of the cycle they come in (at :31), the closed buckets)
        ([begin + 44 * MIN], begin + 45 * MIN, ("5m", "15m")),  # 00:45 forming meanwhile
        ([begin + 59 * MIN], begin + 62 * MIN, ("5m", "15m", "1h")),  # 01:00 and 01:01 closed meanwhile
        ([begin + m * MIN for m in (84, 85, 86, 87)], begin + 87 * MIN, ("5m",)),  # the source lags 3 min
    ]
    held = {t: feed.bars[SYMBOL].pop(t) for bars, _, _ in cases for t in bars}
    for now in range(begin, begin + 100 * MIN, MIN):
        await cycle_at(pipe, clock, now + 1_000)
        case = next((c for c in cases if c[1] == now), None)
        if case is None:
            continue
        bars, _, closed = case
        t = bars[0]
        closed_before = {ser.tf.name: ser.last for ser in pipe.symbols[SYMBOL].higher}
        for b in bars:
            feed.bars[SYMBOL][b] = held[b]
            if b < now:  # the current minute's comes forming, as it would
                feed.extra.setdefault(SYMBOL, []).append(held[b])
        await cycle_at(pipe, clock, now + 31_000)
        no_rebuild(pipe)
        stored = {b.t: b for b in await pipe.redis.recent_bars(SYMBOL, "1m", 100)}
        assert stored[t] == held[t]
        await check_cycle(pipe, SYMBOL, bar_store)
        for ser in pipe.symbols[SYMBOL].higher:
            assert ser.grid is not None
            bucket = ser.grid.bucket(t)
            old = closed_before[ser.tf.name]
            # Closed without the late bar before this cycle, or still forming.
            assert (old is not None and bucket.t <= old.t) == (ser.tf.name in closed), ser.tf.name
            if ser.tf.name in closed:
                higher = {b.t: b for b in await pipe.redis.recent_bars(SYMBOL, ser.tf.name, 100)}
                assert higher[bucket.t].h >= held[t].h and higher[bucket.t].l <= held[t].l, ser.tf.name
    assert pipe.validator.rejected == {}
