"""Start-up warm-up in the background: the cycles run from the first tick, each symbol
is served as soon as it has a bar (flagged ``warming``) and equals TA-Lib batch once
its history is in; history that comes late records no gap."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest

from sidecar.app.health import health_report
from sidecar.app.http import REGISTRY, DaemonView, make_app
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.app.warmup import warm_up
from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock, ScriptedSource, assert_row_equal, batch_values, series, settings
from sidecar.timeframe import Timeframe

T0 = 1_700_000_000_000
HISTORY = 300  # bars before the daemon starts
LIVE = 40  # bars served live


class SlowHistorySource(ScriptedSource):
    """Serves ``bars`` as history; the symbols in ``slow`` answer only once ``release`` is set."""

    def __init__(self, steps: list[dict[str, list[Bar]]], bars: dict[str, list[Bar]],
                 slow: set[str]) -> None:
        super().__init__(steps)
        self.bars = bars
        self.slow = slow
        self.release = asyncio.Event()
        self.asked: list[str] = []

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        self.asked.append(symbol)
        if symbol in self.slow:
            await self.release.wait()
        return [b for b in self.bars[symbol] if start_ms <= b.t < end_ms]


class Loop:
    """The daemon's main loop driven by a fake clock: each tick's sleep moves the clock
    and lets the background (the warm-up) run."""

    def __init__(self, pipe: Pipeline, clock: Clock) -> None:
        self.pipe = pipe
        self.clock = clock

        async def sleep(seconds: float) -> None:
            clock.advance(seconds)
            # A real pause too: the warm-up's SQLite and history work runs in threads,
            # whose results land only once they are done.
            for _ in range(5):
                await asyncio.sleep(0.005)

        self.ticker = SecondTicker(clock=clock, sleep=sleep)
        self.running = False  # a cycle is running

    async def cycles(self, n: int) -> None:
        for _ in range(n):
            tick = await self.ticker.next()
            assert tick is not None
            self.running = True
            try:
                await self.pipe.run_cycle(tick)
            finally:
                self.running = False


async def _until(what: str, check: object, loop: Loop) -> None:
    """Run cycles until ``check()`` holds (at most LIVE of them)."""
    for _ in range(LIVE):
        if check():  # type: ignore[operator]
            return
        await loop.cycles(1)
    raise AssertionError(f"never: {what}")


def _scripted(names: Sequence[str]) -> tuple[dict[str, list[Bar]], list[dict[str, list[Bar]]]]:
    """HISTORY + LIVE bars of each symbol, and the cycles' answers: cycle k serves the
    closed bar HISTORY + k (the first live bar follows the history at once)."""
    bars = {s: series(s, HISTORY + LIVE, T0, seed) for seed, s in enumerate(names)}
    return bars, [{s: [b[HISTORY + k]] for s, b in bars.items()} for k in range(LIVE)]


def _cold(source: SlowHistorySource, bars: dict[str, list[Bar]], redis_store: RedisStore,
          bar_store: BarStore) -> tuple[Pipeline, Loop, Clock]:
    """A pipeline on ``source`` with nothing stored, at the first live bar."""
    clock = Clock.from_ms(next(iter(bars.values()))[HISTORY].t + 500)
    pipe = Pipeline(settings(symbols=tuple(bars), bootstrap_days=1), [source], redis_store, bar_store,
                    clock=clock)
    return pipe, Loop(pipe, clock), clock


async def test_slow_history_leaves_the_others_live_and_ends_equal_to_batch(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    bars, steps = _scripted(("AAA", "BBB"))
    source = SlowHistorySource(steps, bars, slow={"BBB"})
    pipe, loop, clock = _cold(source, bars, redis_store, bar_store)

    cold = await pipe.begin_warmup(int(clock.t_ms))
    assert cold == ["AAA", "BBB"]
    warming = asyncio.ensure_future(warm_up(pipe, [source], bar_store, redis_store, cold, clock=clock))
    try:
        await _until("AAA warm", lambda: not pipe.symbols["AAA"].warming, loop)
        await loop.cycles(3)
        assert sorted(source.asked) == ["AAA", "BBB"]  # both asked at once, not one after the other
        assert pipe.symbols["BBB"].warming and not warming.done()
        feats = dict(zip(("AAA", "BBB"), await redis_store.read_features(["AAA", "BBB"], "1s"), strict=True))
        assert feats["AAA"] is not None and "warming" not in feats["AAA"]
        assert feats["BBB"] is not None and feats["BBB"]["warming"] is True
        assert feats["BBB"]["t"] == feats["AAA"]["t"]  # BBB is served live all the same
        assert loop.ticker.missed == 0 and pipe.stats.cycles >= 4
        # Warm-up is visible in /health and /metrics.
        report = health_report(pipe, loop.ticker, ready=True)
        assert report["ready"] and report["symbols"]["BBB"]["warming"] and not report["symbols"]["AAA"]["warming"]
        w = report["warmup"]
        assert (w["live"], w["warming"], w["waiting"], w["done"], w["cold"]) == (1, 1, 0, False, 2)
        assert w["history_bars"] >= HISTORY
        metrics = generate_latest(make_app(DaemonView(pipe, loop.ticker, ready=True))[REGISTRY]).decode()
        assert 'sidecar_warmup_symbols{state="warming"} 1.0' in metrics
        assert "sidecar_warmup_done 0.0" in metrics

        source.release.set()
        await _until("BBB warm", lambda: warming.done(), loop)
        await warming
        await loop.cycles(1)
    finally:
        warming.cancel()
    assert loop.ticker.missed == 0
    assert health_report(pipe, loop.ticker, ready=True)["warmup"]["live"] == 2
    assert pipe.warmup.finished_ms is not None and pipe.warmup.history_bars >= 2 * HISTORY
    assert pipe.validator.gaps == {} and pipe.validator.rejected == {}  # late history: no gap
    await bar_store.flush()
    assert await bar_store.gaps("BBB", "1s") == []
    for s in ("AAA", "BBB"):
        st = pipe.symbols[s]
        assert st.base.last is not None
        served = [b for b in bars[s] if b.t <= st.base.last.t]
        assert await bar_store.last_bars(s, "1s", 10_000) == served, s  # history then live, in order
        fmap = (await redis_store.read_features([s], "1s"))[0]
        assert fmap is not None and "warming" not in fmap and fmap["t"] == served[-1].t
        assert_row_equal([fmap[name] for name in FEATURE_FIELDS], batch_values(served), len(served) - 1)


async def test_restart_gap_is_recorded_and_handles_open_on_the_stored_window(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    """A full store: the validator knows where the series stopped before the first
    cycle (the downtime is a gap), the handles open on the stored window plus the
    live bars, and nothing is fetched."""
    bars = series("AAA", HISTORY + 20, T0, 3)
    await bar_store.write_history(bars[:HISTORY])
    await redis_store.write_history(bars[:HISTORY])
    down = 5  # bars missed while the daemon was down
    steps: list[dict[str, list[Bar]]] = [{"AAA": [b]} for b in bars[HISTORY + down:]]
    source = SlowHistorySource(steps, {"AAA": bars}, slow=set())
    clock = Clock.from_ms(bars[HISTORY + down].t + 500)
    pipe = Pipeline(settings(symbols=("AAA",)), [source], redis_store, bar_store, clock=clock)
    loop = Loop(pipe, clock)
    cold = await pipe.begin_warmup(int(clock.t_ms))
    assert cold == [] and pipe.symbols["AAA"].base.last == bars[HISTORY - 1]
    await loop.cycles(2)  # before the handles open
    await warm_up(pipe, [source], bar_store, redis_store, cold, clock=clock)
    await loop.cycles(1)
    assert source.asked == []
    gaps = list(pipe.validator.gaps["AAA"])
    assert [(g.start, g.end, g.missing) for g in gaps] == [(bars[HISTORY].t, bars[HISTORY + down - 1].t, down)]
    served: Sequence[Bar] = bars[:HISTORY] + bars[HISTORY + down:HISTORY + down + 3]
    fmap = (await redis_store.read_features(["AAA"], "1s"))[0]
    assert fmap is not None and "warming" not in fmap and fmap["t"] == served[-1].t
    assert_row_equal([fmap[name] for name in FEATURE_FIELDS], batch_values(list(served)), len(served) - 1)


async def test_backfill_runs_between_cycles_and_misses_no_tick(
    redis_store: RedisStore, bar_store: BarStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many cold symbols warm up while the cycles run: every handle opening and every
    Redis history write happens while no cycle runs, no tick is missed, and each symbol
    ends equal to TA-Lib batch over history plus live bars."""
    names = tuple(f"S{i:02d}" for i in range(24))
    bars, steps = _scripted(names)
    source = SlowHistorySource(steps, bars, slow=set())
    pipe, loop, clock = _cold(source, bars, redis_store, bar_store)
    during_cycle: list[str] = []
    open_handles, write_history = pipe.history.open_handles, RedisStore.write_history

    def opening(symbol: str, *args: Any, **kwargs: Any) -> int:
        if loop.running:
            during_cycle.append(f"open {symbol}")
        return open_handles(symbol, *args, **kwargs)

    async def writing(store: RedisStore, history: list[Bar], chunk: int = 2_000) -> int:
        if loop.running and history[0].t < bars[history[0].symbol][HISTORY].t:
            during_cycle.append(f"redis {len(history)}")
        return await write_history(store, history, chunk)

    monkeypatch.setattr(pipe.history, "open_handles", opening)
    monkeypatch.setattr(RedisStore, "write_history", writing)

    cold = await pipe.begin_warmup(int(clock.t_ms))
    warming = asyncio.ensure_future(warm_up(pipe, [source], bar_store, redis_store, cold, clock=clock))
    overlapped = 0
    try:
        for _ in range(LIVE - 5):
            if warming.done():
                break
            overlapped += pipe.warming > 0
            await loop.cycles(1)
            await asyncio.sleep(0.01)  # the time between two cycles, for the background
        assert warming.done(), "warm-up did not finish"
        await warming
        await loop.cycles(1)
    finally:
        warming.cancel()
    assert overlapped >= 1  # cycles ran while symbols were still warming
    assert during_cycle == []
    assert loop.ticker.missed == 0 and pipe.warmup.failed == 0 and pipe.warming == 0
    for s in names:
        st = pipe.symbols[s]
        assert st.base.last is not None
        served = [b for b in bars[s] if b.t <= st.base.last.t]
        fmap = (await redis_store.read_features([s], "1s"))[0]
        assert fmap is not None and "warming" not in fmap and fmap["t"] == served[-1].t
        assert_row_equal([fmap[name] for name in FEATURE_FIELDS], batch_values(served), len(served) - 1)
        assert await redis_store.bar_count(s, "1s") == len(served), s  # history and live bars in Redis


class FailingHistorySource(SlowHistorySource):
    """As :class:`SlowHistorySource`, but the history of the symbols in ``broken`` fails."""

    def __init__(self, steps: list[dict[str, list[Bar]]], bars: dict[str, list[Bar]],
                 broken: set[str]) -> None:
        super().__init__(steps, bars, slow=set())
        self.broken = broken

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        if symbol in self.broken:
            raise RuntimeError("history broke")
        return await super().fetch_history(symbol, tf, start_ms, end_ms)


async def test_a_failed_warm_up_falls_back_to_the_cycles_rebuild(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    """A symbol whose warm-up fails is counted, and the cycles' rebuild opens its handles
    from the stores (its live bars): it stops being flagged and equals batch on them."""
    bars, steps = _scripted(("AAA", "BBB"))
    source = FailingHistorySource(steps, bars, broken={"BBB"})
    pipe, loop, clock = _cold(source, bars, redis_store, bar_store)
    cold = await pipe.begin_warmup(int(clock.t_ms))
    await loop.cycles(2)
    await warm_up(pipe, [source], bar_store, redis_store, cold, clock=clock)
    assert pipe.warmup.failed == 1 and pipe.warmup.finished_ms is not None
    assert not pipe.symbols["AAA"].warming
    await _until("BBB rebuilt", lambda: not pipe.symbols["BBB"].warming, loop)
    await loop.cycles(1)
    assert loop.ticker.missed == 0
    st = pipe.symbols["BBB"]
    assert st.base.last is not None
    live = [b for b in bars["BBB"][HISTORY:] if b.t <= st.base.last.t]
    fmap = (await redis_store.read_features(["BBB"], "1s"))[0]
    assert fmap is not None and "warming" not in fmap and fmap["t"] == live[-1].t
    assert_row_equal([fmap[name] for name in FEATURE_FIELDS], batch_values(live), len(live) - 1)
