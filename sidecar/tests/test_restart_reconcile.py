"""A restart reconciles only what differs: each symbol's stores are compared by count,
first bar and newest bars, bar by bar only where those disagree; whatever the case,
both stores end equal and the handles open on the same window as a full comparison
gives, with features equal to TA-Lib batch on it."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.app import history as history_module
from sidecar.app import warmup as warmup_module
from sidecar.app.pipeline import Pipeline
from sidecar.app.reconcile import compare_process, reconcile_many
from sidecar.app.warmup import warm_up
from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS, FeatureEngine, bar_columns
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock, ScriptedSource, assert_row_equal, batch_values, series, settings

T0 = 1_700_000_000_000
STORED = 300  # bars SQLite holds of each symbol
KEEP = 200  # bars Redis keeps
TAIL = 16  # newest bars compared one by one


def revised(b: Bar, factor: float) -> Bar:
    return Bar(b.symbol, b.tf, b.t, b.o, b.h * factor, b.l, b.c * factor, b.v, b.src)


def cases() -> dict[str, tuple[list[Bar], list[Bar], list[Bar]]]:
    """Per symbol: (SQLite's bars, Redis's bars, the bars both hold once reconciled)."""
    out: dict[str, tuple[list[Bar], list[Bar], list[Bar]]] = {}
    for seed, name in enumerate(("SAME", "HOLE", "SHORT", "STALE", "EXTRA", "EMPTY", "DEEP")):
        bars = series(name, STORED + 10, T0, seed)
        stored, truth = bars[:STORED], bars[:STORED]
        in_redis = stored[-KEEP:]
        if name == "HOLE":  # Redis lost bars well before its tail: the whole set is compared
            in_redis = [b for i, b in enumerate(in_redis) if i not in (50, 51, 52)]
        elif name == "SHORT":  # Redis from an older snapshot: the newest bars are missing
            in_redis = stored[-KEEP:-6]
        elif name == "STALE":  # ...and it holds an older revision of a bar SQLite corrected since
            in_redis = stored[-KEEP:-6]
            in_redis[-3] = revised(in_redis[-3], 1.01)
        elif name == "EXTRA":  # SQLite lost its last flush: Redis holds newer bars and a correction
            truth = bars[:STORED + 10]
            truth[STORED - 2] = revised(truth[STORED - 2], 0.99)
            in_redis = truth[-KEEP:]
        elif name == "EMPTY":
            in_redis = []
        elif name == "DEEP":  # Redis has a bar SQLite lacks and lacks one SQLite has, before the tail
            truth = bars[:STORED]
            stored = [b for i, b in enumerate(truth) if i != STORED - 100]
            in_redis = [b for i, b in enumerate(truth[-KEEP:]) if i != 20]
        out[name] = (stored, in_redis, truth)
    return out


# The tail alone where it can, in a thread and in a second process; the whole set.
@pytest.mark.parametrize(("tail", "process"), [(TAIL, False), (TAIL, True), (KEEP, False)])
async def test_the_stores_end_equal_and_the_window_is_sqlite_truth(
        redis_store: RedisStore, bar_store: BarStore, tail: int, process: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # DEEP (two failures at once, each store missing another old bar) is seen only by
    # comparing the whole set: the counts agree.
    todo = {k: v for k, v in cases().items() if k != "DEEP" or tail == KEEP}
    for stored, in_redis, _ in todo.values():
        await bar_store.write_history(stored)
        if in_redis:
            await redis_store.write_history(in_redis)
    window = 120
    whole: list[str] = []
    read_whole = RedisStore.recent_packed_many

    async def spy(self: RedisStore, symbols: list[str], tf: str, n: int) -> dict[str, list[tuple[int, bytes]]]:
        whole.extend(symbols)
        return await read_whole(self, symbols, tf, n)

    monkeypatch.setattr(RedisStore, "recent_packed_many", spy)
    pool = compare_process() if process else None
    try:
        done = await reconcile_many(list(todo), "1s", redis_store, bar_store, KEEP, window=window, tail=tail,
                                    pool=pool)
    finally:
        if pool is not None:
            pool.shutdown()
    assert whole == (["HOLE"] if tail < KEEP else [])  # the only one whose older bars differ

    for name, (_, _, truth) in todo.items():
        assert await bar_store.last_bars(name, "1s", 10_000) == truth, name
        assert await redis_store.recent_bars(name, "1s", 10_000) == truth[-KEEP:], name
        copied, got = done[name]
        closed = got.closed({b.t: b for b in got.newest}, truth[-1].t, window)
        want = bar_columns(truth[-window:])
        for k in range(5):
            assert np.array_equal(closed[k], want[k], equal_nan=True), (name, k)
        assert len(got.newest) >= min(tail, window), name  # the newest as bars (the validator learns them)
        if name == "SAME":
            assert (copied.to_sqlite, copied.to_redis) == (0, 0)
    assert (done["EXTRA"][0].to_sqlite, done["EXTRA"][0].to_redis) == (11, 0)
    assert done["STALE"][0].to_redis == 6 + 1
    assert done["HOLE"][0].to_redis == 3


async def test_features_after_a_restart_on_stores_that_differ_equal_batch_on_the_window(
        redis_store: RedisStore, bar_store: BarStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon killed after Redis got bars SQLite did not (and a correction), with a
    Redis that lost bars of another symbol, restarts: each symbol's handles open on
    its warm window of the reconciled bars, and its features equal TA-Lib batch on
    that window followed by the live bars."""
    monkeypatch.setattr(history_module, "TAIL", 8)
    monkeypatch.setattr(warmup_module, "PROCESS_MIN_SYMBOLS", 1)  # compared in a second process
    todo = {k: v for k, v in cases().items() if k != "DEEP"}
    for stored, in_redis, _ in todo.values():
        await bar_store.write_history(stored)
        if in_redis:
            await redis_store.write_history(in_redis)
    warm = 150
    live = {name: series(name, STORED + 13, T0, seed)[STORED + 10:] for seed, name in enumerate(todo)}
    source = ScriptedSource([{name: [bars[i]] for name, bars in live.items()} for i in range(3)])
    clock = Clock.from_ms(T0 + (STORED + 10) * 1000 + 500)
    pipe = Pipeline(settings(symbols=tuple(todo), warm_bars=warm, bars_cap=KEEP, correction_window_bars=2),
                    [source], redis_store, bar_store, clock=clock)
    cold = await pipe.begin_warmup(int(clock.t_ms))
    assert cold == []
    await warm_up(pipe, [source], bar_store, redis_store, cold, clock=clock)
    for _ in range(3):
        clock.advance(1.0)
        await pipe.run_cycle(int(clock.t_ms))
    for name, (_, _, truth) in todo.items():
        assert not pipe.symbols[name].warming
        window = truth[-warm:] + live[name]
        fmap = (await redis_store.read_features([name], "1s"))[0]
        assert fmap is not None and "warming" not in fmap and fmap["t"] == window[-1].t, name
        assert_row_equal([fmap[f] for f in FEATURE_FIELDS], batch_values(window), len(window) - 1)


def test_handles_opened_on_columns_equal_batch() -> None:
    """Short and long histories, a bar without volume mid-series: the values and the
    previous MACD histogram are TA-Lib batch's."""
    bars = series("AAA", 400, T0, 9)
    bars[250] = Bar("AAA", "1s", bars[250].t, bars[250].o, bars[250].h, bars[250].l, bars[250].c, None, "x")
    for n in (1, 2, 30, 34, 35, 300, 400):
        engine = FeatureEngine("AAA", "1s", settings().periods)
        engine.load_arrays(*bar_columns(bars[:n]))
        expected = batch_values(bars[:n])
        assert_row_equal(engine.closed_values, expected, n - 1)
        prev = expected["macd_hist"][n - 2] if n >= 2 else float("nan")
        assert engine.prev_macd_hist == (None if np.isnan(prev) else prev), n
