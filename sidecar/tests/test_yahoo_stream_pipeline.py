"""The Yahoo stream inside the cycle: ticks move the forming bar between budgeted polls.

A local websocket server (the fake providers' ``/stream``) sends Yahoo-format
pricing messages (protobuf, base64); the chart endpoint answers the real AAPL
minute fixture shifted to the test's clock. The forming bar in Redis and the
``peek`` features follow the ticks within a cycle, without a REST request; the
next poll reconciles the bars.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import talib

from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources.yahoo import YahooSource
from sidecar.sqlite_store import BarStore
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock

AAPL_1M = "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json"
T = 1_760_000_040_000  # a minute open; the test's "now" is a few seconds after it
LAST_REAL_MINUTE_S = 1727899140  # 19:59 UTC in the fixture


def chart_body(last_minute_ms: int, live_ms: int) -> bytes:
    """The real fixture, its minutes shifted so the last one opens at ``last_minute_ms``."""
    doc = json.loads(fixture(AAPL_1M))
    result = doc["chart"]["result"][0]
    shift = last_minute_ms // 1000 - LAST_REAL_MINUTE_S
    stamps = [t + shift for t in result["timestamp"][:-1]] + [live_ms // 1000]
    result["timestamp"] = stamps
    result["meta"]["regularMarketTime"] = live_ms // 1000
    return json.dumps(doc).encode()


def history(last_minute_ms: int) -> list[Bar]:
    result = json.loads(fixture(AAPL_1M))["chart"]["result"][0]
    q = result["indicators"]["quote"][0]
    shift = last_minute_ms // 1000 - LAST_REAL_MINUTE_S
    return [Bar("AAPL", "1m", (t + shift) * 1000, q["open"][i], q["high"][i], q["low"][i],
                q["close"][i], float(q["volume"][i]), "yahoo")
            for i, t in enumerate(result["timestamp"][:-1]) if q["close"][i] is not None]


async def wait_tick(src: YahooSource, price: float) -> None:
    for _ in range(500):
        stream = src._stream
        if stream is not None and (tick := stream.ticks.get("AAPL")) and tick.price == price:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"tick {price} never arrived")


@pytest.mark.asyncio
async def test_ticks_move_forming_bar_and_features_between_polls(
    fake: FakeProviders, redis_store: RedisStore, bar_store: BarStore, tmp_path: Path
) -> None:
    provider = ProviderSettings.from_env({
        "SIDECAR_YAHOO_BASE_URL": fake.base_url, "SIDECAR_YAHOO_STREAM_URL": fake.stream_url,
        "SIDECAR_HTTP_TIMEOUT_S": "3", "SIDECAR_YAHOO_POLL_S": "60"})
    src = YahooSource(provider, load_symbol_map(), RateBudget("yahoo", per_minute=60),
                      cache_dir=tmp_path / "yf", stream_tickers=["AAPL"])
    settings = Settings(symbols=("AAPL",), sources=("yahoo",), outlier_k=0.0, fetch_timeout_s=5.0,
                        market_hours=False)  # the recorded stream's hours are not the calendar's
    clock = Clock((T + 20_000) / 1000)
    pipe = Pipeline(settings, [src], redis_store, bar_store, clock=clock)
    stored = history(T - 60_000)
    await bar_store.write_history(stored)
    fake.push("yahoo", Reply(body=chart_body(T - 60_000, T + 10_000)))
    await src.start()
    try:
        await pipe.warm(T + 20_000)
        await fake.wait_subscribed()
        # Cycle 1: the poll. The live entry opens the forming bar of minute T.
        await pipe.run_cycle(T + 20_000)
        first = (await redis_store.recent_bars("AAPL", "1m", 1))[-1]
        assert first.t == T and first.forming
        assert len(fake.requests_to("yahoo")) == 1
        assert fake.stream_subscriptions[0] == {"subscribe": ["AAPL"]}

        # A tick inside minute T: the next cycle moves the bar without a request.
        await fake.send_stream({"id": "AAPL", "price": 230.5, "time": T + 25_000})
        await wait_tick(src, 230.5)
        clock.t = (T + 26_000) / 1000
        await pipe.run_cycle(T + 26_000)
        bar = (await redis_store.recent_bars("AAPL", "1m", 1))[-1]
        assert (bar.t, bar.c, bar.h, bar.forming) == (T, 230.5, 230.5, True)
        assert bar.l == first.l and bar.o == first.o
        feats = (await redis_store.read_features(["AAPL"], "1m"))[0]
        assert feats is not None and feats["close"] == 230.5 and feats["forming"]
        assert feats["via"] == "stream" and not feats["stale"]
        closes = np.array([b.c for b in stored] + [230.5])
        highs = np.array([b.h for b in stored] + [230.5])
        lows = np.array([b.l for b in stored] + [bar.l])
        assert feats["rsi"] == talib.RSI(closes, 14)[-1]  # peek == batch, bit for bit
        assert feats["ema"] == talib.EMA(closes, 20)[-1]
        assert feats["atr"] == talib.ATR(highs, lows, closes, 14)[-1]
        assert len(fake.requests_to("yahoo")) == 1

        # No news: the last bar is served (its age in the features), still no request.
        clock.t = (T + 27_000) / 1000
        await pipe.run_cycle(T + 27_000)
        feats = (await redis_store.read_features(["AAPL"], "1m"))[0]
        assert feats is not None and feats["via"] == "last" and feats["data_age_ms"] == 1_000

        # A tick in the next minute opens its forming bar; minute T closes at 230.5.
        await fake.send_stream({"id": "AAPL", "price": 231.0, "time": T + 65_000})
        await wait_tick(src, 231.0)
        clock.t = (T + 66_000) / 1000
        await pipe.run_cycle(T + 66_000)
        prev, new = await redis_store.recent_bars("AAPL", "1m", 2)
        assert (prev.t, prev.c, prev.forming) == (T, 230.5, False)
        assert (new.t, new.o, new.c, new.forming) == (T + 60_000, 231.0, 231.0, True)
        assert len(fake.requests_to("yahoo")) == 1

        # The poll is due 60 s after the first: REST reconciles minute T with real values.
        fake.push("yahoo", Reply(body=chart_body(T, T + 70_000)))
        clock.t = (T + 81_000) / 1000
        await pipe.run_cycle(T + 81_000)
        assert len(fake.requests_to("yahoo")) == 2
        reconciled = {b.t: b for b in await redis_store.recent_bars("AAPL", "1m", 3)}
        assert reconciled[T].c == stored[-1].c and reconciled[T].src == "yahoo"
        assert reconciled[T + 60_000].forming
        feats = (await redis_store.read_features(["AAPL"], "1m"))[0]
        assert feats is not None and feats["via"] == "poll"
    finally:
        await src.close()
        await pipe.drain()
