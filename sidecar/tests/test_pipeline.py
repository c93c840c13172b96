"""The cycle end to end on real Redis and SQLite, with a deterministic source."""

from __future__ import annotations

import dataclasses

from sidecar.app.pipeline import Pipeline
from sidecar.features import FEATURE_FIELDS
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import ScriptedSource, assert_row_equal, batch_values, series, settings
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
    final_step = steps[-1]
    source = ScriptedSource(steps)
    pipe = Pipeline(settings(), [source], redis_store, bar_store)
    await pipe.warm(t0)
    for k in range(399):
        await pipe.run_cycle(t0 + k * 1000)
    assert pipe.validator.rejected == {}
    await bar_store.flush()
    for s, bars in hist.items():
        # 399 closed bars as served, then the forming revision of the last: every field.
        expected = [*bars[:399], final_step[s][1]]
        assert await bar_store.last_bars(s, "1s", 10_000) == expected, s
        assert await redis_store.recent_bars(s, "1s", 10_000) == expected, s

    # Restart: a fresh pipeline warms from SQLite; its first cycle equals a cold batch.
    restart_source = ScriptedSource([{s: [bars[399]] for s, bars in hist.items()}])
    pipe2 = Pipeline(settings(), [restart_source], redis_store, bar_store)
    await pipe2.warm(hist["AAA"][399].t + 1000)
    await pipe2.run_cycle(hist["AAA"][399].t + 1000)
    await bar_store.flush()
    for s, bars in hist.items():
        assert await bar_store.last_bars(s, "1s", 10_000) == bars, s  # the forming bar closed as served
        assert await redis_store.recent_bars(s, "1s", 10_000) == bars, s
        feats = (await redis_store.read_features([s], "1s"))[0]
        assert feats is not None
        assert feats["t"] == bars[-1].t and feats["close"] == bars[-1].c
        assert feats["macd_signal"] is not None and feats["vwap"] is not None  # past the warm-up
        assert_row_equal([feats[name] for name in FEATURE_FIELDS], batch_values(bars), len(bars) - 1)


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
