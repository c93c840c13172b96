"""Gap repair re-aggregates the higher timeframes: the base bars it stores change every
higher bar containing them, which is re-aggregated, stored and its features rebuilt.
Driven clock, real Redis and SQLite."""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np

from sidecar.app.daemon import repair_round
from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS
from sidecar.redis_store import RedisStore
from sidecar.series import aggregate, aggregate_all
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import (
    Clock,
    bar_of_features,
    batch_values,
    drive,
    driven_pipeline,
    lasting_store,
    ny,
    recounted_completeness,
)
from sidecar.timeframe import Timeframe

MIN = 60_000
TFS = tuple(Timeframe.parse(x) for x in ("1m", "5m", "1h"))



class Feed(Source):
    """Prepared 1m bars: the two minutes before ``now`` closed, the current one forming;
    its history serves every closed bar asked for."""

    name = "feed"

    def __init__(self, bars: dict[int, Bar]) -> None:
        self.bars = bars

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        current = now_ms - now_ms % MIN
        rows = [self.bars[t] for t in (current - 2 * MIN, current - MIN) if t in self.bars]
        if current in self.bars:
            b = self.bars[current]
            rows.append(Bar(b.symbol, b.tf, b.t, b.o, b.h, b.l, b.c, b.v, b.src, True))
        return {sym: rows for sym in symbols}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return [b for t, b in sorted(self.bars.items()) if start_ms <= t < end_ms]


def walk(ts: list[int], seed: int = 5) -> dict[int, Bar]:
    rng = np.random.default_rng(seed)
    c = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, len(ts))))
    o = np.concatenate([[100.0], c[:-1]])
    v = rng.uniform(1, 5_000, len(ts))
    return {t: Bar("AAPL", "1m", t, float(o[i]), float(max(o[i], c[i]) * 1.0007),
                   float(min(o[i], c[i]) * 0.9993), float(c[i]), float(v[i]), "feed")
            for i, t in enumerate(ts)}


async def test_repaired_base_bars_reaggregate_the_higher_timeframes(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    day = list(range(ny("2024-12-02T09:30"), ny("2024-12-02T16:00"), MIN))
    feed = Feed(walk(day))
    clock = Clock.from_ms(ny("2024-12-02T09:30"))
    store = lasting_store(redis_store, "repair")
    pipe = await driven_pipeline(store, bar_store, feed, clock, TFS, symbols=("AAPL",), sources=("feed",))

    await drive(pipe, clock, ny("2024-12-02T10:09"))
    clock.t_ms = ny("2024-12-02T10:20")  # the daemon missed 10:10 .. 10:17
    await drive(pipe, clock, ny("2024-12-02T10:22"))
    await pipe.drain()
    await bar_store.flush()
    assert [(g[0], g[1]) for g in await bar_store.gaps("AAPL", "1m")] == [
        (ny("2024-12-02T10:10"), ny("2024-12-02T10:17"))]
    before = {b.t: b for b in await bar_store.bars_between("AAPL", "5m", 0, 2**62)}
    assert ny("2024-12-02T10:10") not in before  # a whole 5m bucket lay in the gap

    added = await repair_round(pipe, [feed], bar_store, store, now_ms=int(clock.t_ms))
    assert added == 8
    await drive(pipe, clock, ny("2024-12-02T10:45"))  # the rebuild runs after the next cycle; 09:30-10:30 closes
    await pipe.drain()
    await bar_store.flush()

    base = [b for b in await bar_store.bars_between("AAPL", "1m", 0, 2**62) if not b.forming]
    assert [b.t for b in base] == [t for t in day if t <= base[-1].t]  # no hole left
    for ser in pipe.symbols["AAPL"].higher:
        assert ser.grid is not None
        stored = {b.t: b for b in await bar_store.bars_between("AAPL", ser.tf.name, 0, 2**62)
                  if not b.forming}
        law = {bucket.t: aggregate("AAPL", ser.tf.name, bucket.t, parts)
               for bucket, parts in aggregate_all(ser.grid, "AAPL", base) if bucket.t in stored}
        assert stored == law, ser.tf.name
        assert ny("2024-12-02T10:10") in stored or ser.tf.name == "1h"
        # Redis holds the same bars, and the features equal TA-Lib batch over them.
        in_redis = await store.recent_bars("AAPL", ser.tf.name, 100_000)
        closed = [b for b in in_redis if not b.forming]
        assert {b.t: b for b in closed} == stored
        raw = await store.redis.get(store.keys.features(ser.tf.name, "AAPL"))
        assert raw is not None
        fmap = msgpack.unpackb(raw)
        series = [b for b in closed if b.t < fmap["t"]] + [bar_of_features(fmap)]
        expected = batch_values(series)
        for name in FEATURE_FIELDS:
            want = expected[name][-1]
            assert (fmap[name] is None) if np.isnan(want) else fmap[name] == want, (ser.tf.name, name)
    hourly = {b.t for b in await bar_store.bars_between("AAPL", "1h", 0, 2**62) if not b.forming}
    assert ny("2024-12-02T09:30") in hourly

    # Completeness counts the repaired base bars and the re-aggregated higher bars (the
    # 10:10 5m bucket is new) as a recount from SQLite does, without a restart.
    now = int(clock.t_ms)
    live = pipe.completeness.report("AAPL", now)
    recounted = await recounted_completeness(pipe, feed, "AAPL", now)
    assert live is not None and recounted is not None
    for tf in TFS:
        for session in ("current", "prev"):
            got = {k: live[tf.name][session][k] for k in ("expected", "received", "synthetic")}
            want = {k: recounted[tf.name][session][k] for k in ("expected", "received", "synthetic")}
            assert got == want, (tf.name, session)
    assert live["5m"]["current"]["received"] == live["5m"]["current"]["expected"] == 15  # 09:30 .. 10:40
    assert live["1m"]["session"] == 1.0 and live["1h"]["current"]["received"] == 1
