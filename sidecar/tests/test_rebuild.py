"""Corrections, gap repair and the feature rebuilds they start, on real Redis and SQLite.

A rebuild reads a symbol's history while cycles go on. Whatever the interleaving of
cycles, corrections, repairs and rebuild completions, no bar may be lost or counted
twice in the symbol's feature series: once no rebuild is in flight, every feature
equals TA-Lib's batch function on the stored series.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence

from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.app.daemon import repair_round
from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sources.base import LatestResult
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import (
    ScriptedSource,
    assert_row_equal,
    batch_values,
    fresh_stores,
    series,
    settings,
)
from sidecar.timeframe import Timeframe

T0 = 1_700_000_000_000
SYMBOLS = ("AAA", "BBB")


class HeldReads(RedisStore):
    """The test's Redis store as the pipeline sees it: history reads (what a rebuild
    does) are held open until the test releases them; features never expire."""

    def __init__(self, redis_store: RedisStore, held: bool = True) -> None:
        super().__init__(redis_store.redis, "test", features_ttl_ms=3_600_000)
        self.pending: list[asyncio.Future[None]] = []
        self.held = held

    async def recent_bars(self, symbol: str, tf: str, n: int) -> list[Bar]:
        # Redis answers from the data it holds now; the answer arrives when released.
        bars = await super().recent_bars(symbol, tf, n)
        if self.held:
            gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.pending.append(gate)
            await gate
        return bars

    def release_one(self) -> bool:
        """Let the oldest held read go; False if none is held."""
        while self.pending:
            gate = self.pending.pop(0)
            if not gate.done():
                gate.set_result(None)
                return True
        return False

    def release_all(self) -> None:
        self.held = False
        while self.release_one():
            pass


async def settle(pipe: Pipeline, held: HeldReads | None = None) -> None:
    """Wait until every rebuild whose read is not held (and every flush) has ended."""
    def busy() -> bool:
        reading = sum(1 for st in pipe.symbols.values() if st.rebuilding is not None)
        waiting = 0 if held is None else sum(1 for gate in held.pending if not gate.done())
        return reading > waiting

    for _ in range(5_000):  # a bound on the wait, not a judgement of speed
        if not busy():
            break
        await asyncio.sleep(0.001)
    assert not busy(), "a released rebuild did not finish"


def revised(bar: Bar, factor: float) -> Bar:
    """``bar`` with its close moved by ``factor`` (high and low widened to stay valid)."""
    c = bar.c * factor
    return dataclasses.replace(bar, c=c, h=max(bar.h, c), l=min(bar.l, c), forming=False)


async def assert_features_equal_batch(pipe: Pipeline, redis_store: RedisStore, symbol: str) -> None:
    """The symbol's features in Redis equal TA-Lib batch on the series Redis stores."""
    stored = await redis_store.recent_bars(symbol, "1s", 100_000)
    feats = (await redis_store.read_features([symbol], "1s"))[0]
    assert feats is not None
    series_ = [b for b in stored if b.t <= feats["t"]]
    assert series_[-1].t == feats["t"] and series_[-1].c == feats["close"]
    assert all(not b.forming for b in series_[:-1])
    expected = batch_values(series_)
    values = [feats[name] for name in ("rsi", "ema", "bb_upper", "bb_middle", "bb_lower", "atr",
                                       "vwap", "vol_ma", "macd", "macd_signal", "macd_hist", "mom")]
    assert_row_equal(values, expected, len(series_) - 1)


def cycle_step(hist: dict[str, list[Bar]], i: int) -> dict[str, list[Bar]]:
    """Cycle ``i``'s answer: bar ``i`` closed and a forming revision of bar ``i + 1``."""
    step: dict[str, list[Bar]] = {}
    for sym, bars in hist.items():
        nxt = bars[i + 1]
        step[sym] = [bars[i], dataclasses.replace(nxt, c=nxt.o, h=max(nxt.o, nxt.h),
                                                  l=min(nxt.o, nxt.l), forming=True)]
    return step


async def cycle(pipe: Pipeline, source: ScriptedSource, hist: dict[str, list[Bar]], i: int,
                step: dict[str, list[Bar]] | None = None) -> None:
    """Cycle ``i``, at ``T0`` plus ``i`` seconds: ``source`` answers ``step``, by default
    :func:`cycle_step`'s."""
    source.steps.append(cycle_step(hist, i) if step is None else step)
    await pipe.run_cycle(T0 + i * 1000)


async def test_a_rebuild_held_open_across_cycles_keeps_every_bar(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Bar 146 is revised in cycle 150 while a rebuild is due (gap repair asked for
    one: the correction goes with it); the rebuild's read is held through cycle 154."""
    hist = {s: series(s, 170, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = ScriptedSource([])
    held = HeldReads(redis_store)
    pipe = Pipeline(settings(), [source], held, bar_store)
    for i in range(150):
        await cycle(pipe, source, hist, i)
    pipe.history_changed("AAA")
    correction = revised(hist["AAA"][146], 1.01)
    step = cycle_step(hist, 150)
    step["AAA"].insert(0, correction)
    await cycle(pipe, source, hist, 150, step)
    assert pipe.symbols["AAA"].rebuilding is not None  # the rebuild is reading
    for i in range(151, 155):  # cycles go on while it reads
        await cycle(pipe, source, hist, i)
    held.release_all()
    await settle(pipe)
    assert pipe.symbols["AAA"].rebuilding is None
    await cycle(pipe, source, hist, 155)
    stored = await redis_store.recent_bars("AAA", "1s", 1_000)
    assert [b.t for b in stored] == [b.t for b in hist["AAA"][:157]]
    assert stored[146] == correction
    for sym in SYMBOLS:
        await assert_features_equal_batch(pipe, redis_store, sym)


async def test_a_correction_during_a_rebuild_starts_another_and_both_count(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    hist = {s: series(s, 80, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = ScriptedSource([])
    held = HeldReads(redis_store)
    pipe = Pipeline(settings(), [source], held, bar_store)
    for i in range(60):
        step = cycle_step(hist, i)
        if i == 50:
            pipe.history_changed("AAA")  # a rebuild is due: the first correction goes with it
        if i in (50, 52):  # the second correction comes while the first rebuild reads
            step["AAA"].insert(0, revised(hist["AAA"][i - 3], 0.98))
        await cycle(pipe, source, hist, i, step)
        if i == 52:
            assert len(held.pending) == 1  # one rebuild per symbol at a time
            held.release_all()
            await settle(pipe)
    await settle(pipe)
    await cycle(pipe, source, hist, 60)
    await settle(pipe)
    await cycle(pipe, source, hist, 61)
    assert all(st.rebuilding is None and not st.needs_rebuild for st in pipe.symbols.values())
    for sym in SYMBOLS:
        await assert_features_equal_batch(pipe, redis_store, sym)


class RefusedReads(HeldReads):
    """History reads refused (a Redis that fails reads) while ``refuse`` is set."""

    def __init__(self, redis_store: RedisStore) -> None:
        super().__init__(redis_store, held=False)
        self.refuse = False

    async def recent_bars(self, symbol: str, tf: str, n: int) -> list[Bar]:
        if self.refuse:
            raise RedisConnectionError("refused")
        return await super().recent_bars(symbol, tf, n)


async def test_a_rebuild_whose_redis_read_fails_uses_sqlite(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    hist = {s: series(s, 60, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = ScriptedSource([])
    store = RefusedReads(redis_store)
    pipe = Pipeline(settings(), [source], store, bar_store)
    for i in range(50):
        step = cycle_step(hist, i)
        if i == 45:
            step["BBB"].insert(0, revised(hist["BBB"][41], 1.02))
            store.refuse = True
        await cycle(pipe, source, hist, i, step)
    await settle(pipe)
    store.refuse = False
    await cycle(pipe, source, hist, 50)
    assert pipe.symbols["BBB"].rebuilding is None
    await assert_features_equal_batch(pipe, redis_store, "BBB")


class HistorySource(ScriptedSource):
    """A scripted live source that also serves history (for gap repair)."""

    name = "history"

    def __init__(self, history: dict[str, list[Bar]]) -> None:
        super().__init__([])
        self.history = history

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        return await super().fetch_latest(symbols, tf, now_ms)

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return [b for b in self.history.get(symbol, []) if start_ms <= b.t < end_ms]


async def test_gap_repair_rebuilds_features_on_the_repaired_series(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Bars 30..34 never arrive live; gap repair fetches them, and the features
    then equal batch on the whole stored series, the repaired bars included."""
    hist = {s: series(s, 70, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = HistorySource({"AAA": hist["AAA"]})
    pipe = Pipeline(settings(), [source], HeldReads(redis_store, held=False), bar_store)
    for i in range(60):
        step = cycle_step(hist, i)
        if 29 <= i <= 34:  # neither closed nor forming: a gap of bars 30..34
            step["AAA"] = [hist["AAA"][i]] if i == 29 else []
        if i == 35:
            step["AAA"] = [hist["AAA"][35], step["AAA"][1]]
        await cycle(pipe, source, hist, i, step)
    await bar_store.flush()
    assert await bar_store.gaps("AAA", "1s")
    added = await repair_round(pipe, [source], bar_store, redis_store, now_ms=T0 + 60 * 1000)
    assert added == 5
    assert pipe.symbols["AAA"].needs_rebuild
    await cycle(pipe, source, hist, 60)
    await settle(pipe)
    await cycle(pipe, source, hist, 61)
    stored = await redis_store.recent_bars("AAA", "1s", 1_000)
    assert [b.t for b in stored] == [b.t for b in hist["AAA"][:63]]
    await assert_features_equal_batch(pipe, redis_store, "AAA")


#: One step of an interleaving: a cycle (with an optional correction ``k`` bars back),
#: a gap-repair style trigger, or the completion of the oldest held rebuild read.
Action = tuple[str, int, float]

actions = st.lists(
    st.one_of(
        st.tuples(st.just("cycle"), st.integers(0, 8), st.sampled_from([0.97, 0.99, 1.01, 1.04])),
        st.tuples(st.just("repair"), st.integers(0, 1), st.just(1.0)),
        st.tuples(st.just("complete"), st.just(0), st.just(1.0)),
    ),
    min_size=5, max_size=60,
)


@given(plan=actions)
async def test_any_interleaving_of_cycles_corrections_and_rebuilds_keeps_features_equal_batch(
    redis_server, plan: list[Action],
) -> None:
    """After every cycle, each symbol with no rebuild in flight has features equal to
    batch on its stored series; at the end, with every read released, all do."""
    async with fresh_stores(redis_server) as (redis_store, bar_store):
        await _interleave(plan, 40, redis_store, bar_store)


async def _interleave(plan: list[Action], warm: int, redis_store: RedisStore, bar_store: BarStore) -> None:
    cycles = sum(1 for a in plan if a[0] == "cycle")
    n = warm + cycles + 4
    hist = {s: series(s, n, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = ScriptedSource([])
    held = HeldReads(redis_store)
    pipe = Pipeline(settings(), [source], held, bar_store)
    for i in range(warm):
        await cycle(pipe, source, hist, i)
    i = warm
    latest: dict[tuple[str, int], Bar] = {}
    for kind, back, factor in plan:
        if kind == "complete":
            held.release_one()
            await settle(pipe, held)
            continue
        if kind == "repair":
            pipe.history_changed(SYMBOLS[back])
            continue
        step = cycle_step(hist, i)
        if back:
            sym = SYMBOLS[back % 2]
            t = hist[sym][i - back].t
            base = latest.get((sym, t), hist[sym][i - back])
            fix = revised(base, factor)
            latest[(sym, t)] = fix
            step[sym].insert(0, fix)
        await cycle(pipe, source, hist, i, step)
        i += 1
        for sym, state in pipe.symbols.items():
            if state.rebuilding is None and not state.needs_rebuild:
                await assert_features_equal_batch(pipe, redis_store, sym)
    held.release_all()
    await settle(pipe, held)
    for _ in range(2):  # a rebuild asked for meanwhile runs after the next cycle
        await cycle(pipe, source, hist, i)
        i += 1
        await settle(pipe)
    await cycle(pipe, source, hist, i)
    assert pipe.validator.rejected == {}
    for sym in SYMBOLS:
        await assert_features_equal_batch(pipe, redis_store, sym)


class RefusedHistoryWrites(HeldReads):
    """While ``refuse`` is set, Redis refuses bulk history writes (what gap repair sends);
    the cycles' writes go through."""

    def __init__(self, redis_store: RedisStore) -> None:
        super().__init__(redis_store, held=False)
        self.refuse = True

    async def write_history(self, bars: Iterable[Bar], chunk: int = 2_000) -> int:
        if self.refuse:
            raise RedisConnectionError("refused")
        return await super().write_history(bars, chunk)


async def test_gap_repair_that_cannot_reach_redis_has_it_refilled(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """Repaired bars that reach SQLite but not Redis are put back in Redis afterwards."""
    hist = {s: series(s, 50, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = HistorySource({"AAA": hist["AAA"]})
    store = RefusedHistoryWrites(redis_store)
    pipe = Pipeline(settings(), [source], store, bar_store)
    await pipe.write_meta()
    for i in range(40):
        step = cycle_step(hist, i)
        if 20 <= i <= 24:
            step["AAA"] = [hist["AAA"][i]] if i == 20 else []
        if i == 25:
            step["AAA"] = [hist["AAA"][25], step["AAA"][1]]
        await cycle(pipe, source, hist, i, step)
    await bar_store.flush()
    assert await repair_round(pipe, [source], bar_store, store, now_ms=T0 + 40 * 1000) == 4
    stored = await redis_store.recent_bars("AAA", "1s", 1_000)
    assert len(stored) == 41 - 4  # the repaired bars are in SQLite only
    store.refuse = False
    await cycle(pipe, source, hist, 40)  # its final write starts the refill
    await pipe.drain(timeout_s=30)
    stored = await redis_store.recent_bars("AAA", "1s", 1_000)
    assert [b.t for b in stored] == [b.t for b in hist["AAA"][:42]]


async def test_a_correction_deeper_than_the_cycle_redoes_goes_through_the_rebuild(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """With a correction window of 100 bars, a correction 30 bars back is redone in its
    cycle; one 80 bars back (past the 64 kept) starts a rebuild, and once it is in the
    features equal batch again."""
    hist = {s: series(s, 200, T0, seed) for seed, s in enumerate(SYMBOLS)}
    source = ScriptedSource([])
    pipe = Pipeline(settings(correction_window_bars=100), [source], HeldReads(redis_store, held=False),
                    bar_store)
    for i in range(150):
        await cycle(pipe, source, hist, i)
    step = cycle_step(hist, 150)
    step["AAA"].insert(0, revised(hist["AAA"][120], 1.02))
    await cycle(pipe, source, hist, 150, step)
    assert pipe.symbols["AAA"].rebuilding is None and not pipe.symbols["AAA"].needs_rebuild
    await assert_features_equal_batch(pipe, redis_store, "AAA")
    step = cycle_step(hist, 151)
    step["AAA"].insert(0, revised(hist["AAA"][71], 0.98))
    await cycle(pipe, source, hist, 151, step)
    assert pipe.symbols["AAA"].rebuilding is not None  # the rebuild reads
    await settle(pipe)
    await cycle(pipe, source, hist, 152)
    assert pipe.validator.rejected == {}
    for sym in SYMBOLS:
        await assert_features_equal_batch(pipe, redis_store, sym)
