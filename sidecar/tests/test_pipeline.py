"""The cycle end to end on real Redis and SQLite, with a deterministic source."""

from __future__ import annotations

import dataclasses

import numpy as np
import talib

from sidecar.app.pipeline import Pipeline
from sidecar.features import FEATURE_FIELDS
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import ScriptedSource, series, settings
from sidecar.timeframe import Timeframe

TF = Timeframe.parse("1s")


async def test_cycles_store_bars_and_features_equal_batch_after_restart(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    t0 = 1_700_000_000_000
    hist = {s: series(s, 400, t0, seed) for seed, s in enumerate(("AAA", "BBB"))}
    # Each step: the closed bar i and a forming revision of bar i+1.
    steps = []
    for i in range(399):
        step = {}
        for s, bars in hist.items():
            nxt = dataclasses.replace(bars[i + 1], c=bars[i + 1].o, h=max(bars[i + 1].o, bars[i + 1].h),
                                      l=min(bars[i + 1].o, bars[i + 1].l), forming=True)
            step[s] = [bars[i], nxt]
        steps.append(step)
    source = ScriptedSource(steps)
    pipe = Pipeline(settings(), [source], redis_store, bar_store)
    await pipe.warm(t0)
    for k in range(399):
        await pipe.run_cycle(t0 + k * 1000)
    assert pipe.validator.rejected == {}
    await bar_store.flush()
    stored = await bar_store.last_bars("AAA", "1s", 10_000)
    assert len(stored) == 400  # 399 closed + the forming one, no duplicates
    assert [b.t for b in stored] == [b.t for b in hist["AAA"]]
    assert await redis_store.bar_count("AAA", "1s") == 400

    # Restart: a fresh pipeline warms from SQLite; its first cycle equals a cold batch.
    closed = hist["AAA"][:399]
    last = hist["AAA"][399]
    restart_source = ScriptedSource([{"AAA": [last], "BBB": [hist["BBB"][399]]}])
    pipe2 = Pipeline(settings(), [restart_source], redis_store, bar_store)
    await pipe2.warm(last.t + 1000)
    await pipe2.run_cycle(last.t + 1000)
    feats = (await redis_store.read_features(["AAA"], "1s"))[0]
    assert feats is not None
    series_all = [*closed, last]
    c = np.array([b.c for b in series_all])
    h = np.array([b.h for b in series_all])
    lo = np.array([b.l for b in series_all])
    assert feats["t"] == last.t and feats["close"] == last.c
    assert feats["rsi"] == talib.RSI(c, 14)[-1]
    assert feats["ema"] == talib.EMA(c, 20)[-1]
    assert feats["atr"] == talib.ATR(h, lo, c, 14)[-1]
    macd, signal, hist_ = talib.MACD(c, 12, 26, 9)
    assert (feats["macd"], feats["macd_signal"], feats["macd_hist"]) == (macd[-1], signal[-1], hist_[-1])
    assert feats["mom"] == talib.MOM(c, 10)[-1]
    assert set(FEATURE_FIELDS) <= set(feats)


async def test_fallback_to_next_source_in_the_same_cycle(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    t0 = 1_700_000_000_000
    bars = series("AAA", 2, t0, 1)
    down = ScriptedSource([], fail=True)
    down.name = "down"
    backup = ScriptedSource([{"AAA": bars, "BBB": []}])
    pipe = Pipeline(settings(), [down, backup], redis_store, bar_store)
    await pipe.run_cycle(t0)
    assert down.calls == 1 and backup.calls == 1
    assert pipe.sources[0].last_error_class == "unavailable"
    assert await redis_store.bar_count("AAA", "1s") == 2


async def test_bad_bars_are_rejected_counted_and_never_stored(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    t0 = 1_700_000_000_000
    good = series("AAA", 1, t0, 1)[0]
    bad = dataclasses.replace(good, t=t0 + 1000, h=good.l - 1)  # high below low
    pipe = Pipeline(settings(), [ScriptedSource([{"AAA": [good, bad]}])], redis_store, bar_store)
    await pipe.run_cycle(t0)
    assert pipe.validator.rejected["high_below_open_close"] == 1
    await bar_store.flush()
    assert [b.t for b in await bar_store.last_bars("AAA", "1s", 10)] == [t0]
    assert [b.t for b in await redis_store.recent_bars("AAA", "1s", 10)] == [t0]
