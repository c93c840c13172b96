"""The ccxt stream inside the cycle: klines or trades move the forming bar between polls.

A local websocket server (``fake_exchange.py``) speaks Binance's stream protocol to
the real ccxt.pro; the REST klines endpoint answers from a fixed minute series. The
forming bar in Redis and the ``peek`` features follow the stream within a cycle,
without a request, bit for bit; a dropped stream turns the polls back to every
second, the poll asks back to the newest bar it has, and the stream reconnects.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import talib

from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources import build_source
from sidecar.sources.ccxt_exchange import CcxtSource
from sidecar.sqlite_store import BarStore
from sidecar.tests.fake_exchange import FakeExchange, exchange, markets_file  # noqa: F401
from sidecar.tests.fake_providers import Reply, Seen
from sidecar.tests.helpers import Clock, cycle_at
from sidecar.timeframe import Timeframe

pytest.importorskip("ccxt")

T = 1_760_000_040_000  # a minute open; the test's "now" is a few seconds after it
M = 60_000
SRC = "ccxt:binance"


def series(end: int, n: int = 120) -> list[Bar]:
    """``n`` closed minutes before ``end``, fractional volumes as an exchange gives them."""
    out = []
    for i in range(n):
        c = 100.0 + 5.0 * np.sin(i / 7.0) + i * 0.01
        out.append(Bar("BTCUSD", "1m", end - (n - i) * M, round(c - 0.3, 2), round(c + 0.7, 2),
                       round(c - 0.9, 2), round(c, 2), float(f"{0.5 + (i % 13) * 0.01234567:.8f}"), SRC))
    return out


def kline_rows(bars: list[Bar], forming: tuple[float, ...]) -> list[list[Any]]:
    rows = [[b.t, f"{b.o:.8f}", f"{b.h:.8f}", f"{b.l:.8f}", f"{b.c:.8f}", f"{b.v:.8f}", b.t + M - 1,
             "0", 1, "0", "0", "0"] for b in bars]
    o, h, l, c, v = forming
    rows.append([bars[-1].t + M, str(o), str(h), str(l), str(c), str(v), bars[-1].t + 2 * M - 1,
                 "0", 1, "0", "0", "0"])
    return rows


def responder(bars: list[Bar], forming: tuple[float, ...]) -> Any:
    rows = kline_rows(bars, forming)

    def answer(seen: Seen) -> Reply:
        since, limit = int(seen.query["startTime"]), int(seen.query["limit"])
        return Reply(body=json.dumps([r for r in rows if r[0] >= since][:limit]).encode())
    return answer


def kline(t: int, o: str, h: str, l: str, c: str, v: str, closed: bool = False) -> dict[str, Any]:
    return {"e": "kline", "E": t + 1, "s": "BTCUSDT",
            "k": {"t": t, "T": t + M - 1, "s": "BTCUSDT", "i": "1m", "o": o, "c": c, "h": h, "l": l,
                  "v": v, "x": closed}}


def make_source(fake: FakeExchange, tmp_path: Path, mode: str) -> CcxtSource:
    markets = json.loads(markets_file("binance").read_text())
    for market in markets:  # the hand-built spot market lacks what ccxt's trade parser reads
        market.setdefault("linear", None)
        market.setdefault("inverse", None)
    path = tmp_path / "markets.json"
    path.write_text(json.dumps(markets))
    env = {"SIDECAR_CCXT_BASE_URL_BINANCE": fake.base_url,
           # Binance tells spot streams from futures ones by "/stream" in the URL.
           "SIDECAR_CCXT_WS_URL_BINANCE": fake.ws_url + "/stream",
           "SIDECAR_CCXT_MARKETS_BINANCE": str(path), "SIDECAR_CCXT_STREAM": mode,
           "SIDECAR_CCXT_POLL_S": "60", "SIDECAR_HTTP_TIMEOUT_S": "3"}
    settings = Settings(symbols=("BTCUSD",), sources=(SRC,), data_dir=tmp_path)
    source = build_source(SRC, settings, env)
    assert isinstance(source, CcxtSource)
    source.exchange.enableRateLimit = False
    return source


async def until(check: Any, what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never happened")


def batch_equal(feats: dict[str, Any], bars: list[Bar]) -> None:
    """The features of the newest bar equal TA-Lib's batch functions over the series."""
    c = np.array([b.c for b in bars])
    h = np.array([b.h for b in bars])
    l = np.array([b.l for b in bars])
    v = np.array([b.v for b in bars], dtype=float)
    assert feats["close"] == c[-1] and feats["v"] == v[-1]
    assert feats["rsi"] == talib.RSI(c, 14)[-1]
    assert feats["ema"] == talib.EMA(c, 20)[-1]
    assert feats["atr"] == talib.ATR(h, l, c, 14)[-1]
    assert feats["bb_upper"] == talib.BBANDS(c, 20, 2.0, 2.0)[0][-1]
    assert feats["vol_ma"] == talib.SMA(v, 20)[-1]


async def setup(fake: FakeExchange, redis_store: RedisStore, bar_store: BarStore, tmp_path: Path,
                mode: str) -> tuple[CcxtSource, Pipeline, list[Bar], Clock]:
    source = make_source(fake, tmp_path, mode)
    settings = Settings(symbols=("BTCUSD",), sources=(SRC,), outlier_k=0.0, fetch_timeout_s=5.0)
    clock = Clock.from_ms(T + 20_000)
    pipe = Pipeline(settings, [source], redis_store, bar_store, clock=clock)
    stored = series(T)
    await bar_store.write_history(stored)
    fake.responders_by_path["/api/v3/klines"] = responder(stored, (110.0, 110.5, 109.5, 110.25, 2.5))
    await source.start()
    await pipe.warm(T + 20_000)
    await fake.wait_subscribed()
    await pipe.run_cycle(T + 20_000)  # the poll: the forming bar of minute T
    first = (await redis_store.recent_bars("BTCUSD", "1m", 1))[-1]
    assert (first.t, first.c, first.v, first.forming, first.src) == (T, 110.25, 2.5, True, SRC)
    assert len(fake.requests_to("/api/v3/klines")) == 1
    return source, pipe, stored, clock


@pytest.mark.asyncio
async def test_klines_move_the_forming_bar_and_peek_between_polls_and_a_drop_is_covered(
        exchange: FakeExchange, redis_store: RedisStore, bar_store: BarStore, tmp_path: Path) -> None:
    source, pipe, stored, clock = await setup(exchange, redis_store, bar_store, tmp_path, "ohlcv")
    try:
        assert exchange.subscriptions[0]["params"] == ["btcusdt@kline_1m"]
        news = source._stream.news["BTC/USDT"]  # type: ignore[union-attr]

        # A kline update inside minute T: the next cycle takes it whole, without a request.
        await exchange.send(kline(T, "110.0", "111.75", "109.5", "111.5", "3.14159265"))
        await until(lambda: T in news.candles, "the kline")
        await cycle_at(pipe, clock, T + 26_000)
        bar = (await redis_store.recent_bars("BTCUSD", "1m", 1))[-1]
        assert (bar.t, bar.o, bar.h, bar.l, bar.c, bar.v, bar.forming) == (
            T, 110.0, 111.75, 109.5, 111.5, 3.14159265, True)
        feats = (await redis_store.read_features(["BTCUSD"], "1m"))[0]
        assert feats is not None and feats["via"] == "stream" and feats["forming"]
        batch_equal(feats, [*stored, bar])  # peek == batch, bit for bit
        assert len(exchange.requests_to("/api/v3/klines")) == 1

        # Minute T closes on the stream and T+1 opens: both bars as the exchange sent them.
        await exchange.send(kline(T, "110.0", "112.0", "109.5", "111.0", "4.00000001", closed=True),
                            kline(T + M, "111.0", "111.0", "110.5", "110.75", "0.00012345"))
        await until(lambda: T + M in news.candles, "the next minute's kline")
        await cycle_at(pipe, clock, T + M + 6_000)
        prev, new = await redis_store.recent_bars("BTCUSD", "1m", 2)
        assert (prev.t, prev.c, prev.v, prev.forming) == (T, 111.0, 4.00000001, False)
        assert (new.t, new.o, new.c, new.v, new.forming) == (T + M, 111.0, 110.75, 0.00012345, True)
        feats = (await redis_store.read_features(["BTCUSD"], "1m"))[0]
        assert feats is not None
        batch_equal(feats, [*stored, prev, new])
        assert len(exchange.requests_to("/api/v3/klines")) == 1
        assert source.refresh_interval_s(1) == 60.0

        # The exchange drops the stream: it is reported, and the polls go every second,
        # each asking back to the newest bar the source has (the gap is filled).
        await exchange.drop()
        await until(lambda: not source._stream.healthy(), "the drop")  # type: ignore[union-attr]
        stream = pipe.sources[0].status()["stream"]  # what /health shows for the source
        assert stream["connected"] is False and stream["errors"] >= 1 and "NetworkError" in stream["last_error"]
        assert source.refresh_interval_s(1) == 1.0
        await cycle_at(pipe, clock, T + M + 7_000)
        polls = exchange.requests_to("/api/v3/klines")
        assert len(polls) == 2 and int(polls[-1].query["startTime"]) <= T
        feats = (await redis_store.read_features(["BTCUSD"], "1m"))[0]
        assert feats is not None and feats["via"] == "poll"

        # It reconnects with back-off and resubscribes; news flows again.
        await exchange.wait_subscribed(count=2, timeout_s=10.0)
        await exchange.send(kline(T + M, "111.0", "113.0", "110.5", "112.5", "0.5"))
        await until(lambda: source._stream.healthy() and news.candles[T + M][0][4] == 112.5,  # type: ignore[union-attr]
                    "the stream back")
        assert source.status()["stream"]["reconnects"] >= 1
    finally:
        await source.close()
        await pipe.drain()


@pytest.mark.asyncio
async def test_trades_fold_into_the_forming_bar_between_polls(
        exchange: FakeExchange, redis_store: RedisStore, bar_store: BarStore, tmp_path: Path) -> None:
    source, pipe, stored, clock = await setup(exchange, redis_store, bar_store, tmp_path, "trades")
    try:
        assert exchange.subscriptions[0]["params"] == ["btcusdt@trade"]
        news = source._stream.news["BTC/USDT"]  # type: ignore[union-attr]
        trades = [(T + 21_000, "111.5", "0.25"), (T + 22_000, "109.0", "0.125"), (T + 23_000, "110.5", "0.001")]
        await exchange.send(*({"e": "trade", "E": ts, "s": "BTCUSDT", "t": i, "p": p, "q": q, "T": ts,
                               "m": True} for i, (ts, p, q) in enumerate(trades)))
        await until(lambda: len(news.trades) == 3, "the trades")
        await cycle_at(pipe, clock, T + 26_000)
        bar = (await redis_store.recent_bars("BTCUSD", "1m", 1))[-1]
        assert (bar.t, bar.o, bar.h, bar.l, bar.c, bar.forming) == (T, 110.0, 111.5, 109.0, 110.5, True)
        assert bar.v == 2.5 + 0.25 + 0.125 + 0.001
        feats = (await redis_store.read_features(["BTCUSD"], "1m"))[0]
        assert feats is not None and feats["via"] == "stream"
        batch_equal(feats, [*stored, bar])
        assert len(exchange.requests_to("/api/v3/klines")) == 1

        # A trade in the next minute opens its bar; minute T closes with what it had.
        await exchange.send({"e": "trade", "E": T + M + 1_000, "s": "BTCUSDT", "t": 9, "p": "112.0",
                             "q": "0.5", "T": T + M + 1_000, "m": False})
        await until(lambda: len(news.trades) == 4, "the next minute's trade")
        await cycle_at(pipe, clock, T + M + 2_000)
        prev, new = await redis_store.recent_bars("BTCUSD", "1m", 2)
        assert (prev.t, prev.c, prev.forming) == (T, 110.5, False)
        assert (new.t, new.o, new.h, new.l, new.c, new.v, new.forming) == (
            T + M, 112.0, 112.0, 112.0, 112.0, 0.5, True)
    finally:
        await source.close()
        await pipe.drain()


def trade(i: int, ts: int, price: str, amount: str) -> dict[str, Any]:
    return {"e": "trade", "E": ts, "s": "BTCUSDT", "t": i, "p": price, "q": amount, "T": ts, "m": True}


@pytest.mark.asyncio
async def test_a_trade_at_a_poll_boundary_is_counted_once(exchange: FakeExchange, tmp_path: Path) -> None:
    """The polled forming bar's volume tells which streamed trades it holds: a trade the
    poll counted but the stream delivers after the answer is not added again, and one the
    stream delivered before an answer made without it is not dropped."""
    source = make_source(exchange, tmp_path, "trades")
    tf = Timeframe.parse("1m")
    stored = series(T)
    klines = "/api/v3/klines"
    try:
        await source.start()
        await source.markets_ready()
        await exchange.wait_subscribed()
        news = source._stream.news["BTC/USDT"]  # type: ignore[union-attr]

        async def delivered(*trades: dict[str, Any]) -> None:
            await exchange.send(*trades)
            await until(lambda: {t["t"] for t in trades} <= {int(x.key) for x in news.trades},
                        f"trades {[t['t'] for t in trades]}")

        # The stream is up before minute T opens: it sees every trade of T.
        await delivered(trade(0, T - 2_000, "109.0", "0.5"), trade(1, T + 1_000, "110.0", "1.0"),
                        trade(2, T + 5_000, "110.5", "1.0"))
        # The exchange answers the poll after trade 3 (T+19.5 s), before it reaches the stream.
        exchange.responders_by_path[klines] = responder(stored, (110.0, 110.5, 110.0, 110.25, 2.5))
        bars = (await source.fetch_latest(["BTCUSD"], tf, T + 20_000))["BTCUSD"]
        assert isinstance(bars, list) and (bars[-1].t, bars[-1].v) == (T, 2.5)
        await delivered(trade(3, T + 19_500, "110.25", "0.5"))
        assert source.peek_latest(["BTCUSD"], tf, T + 20_500) == {}  # the poll has it: nothing to add
        await delivered(trade(4, T + 20_500, "111.0", "0.25"), trade(3, T + 19_500, "110.25", "0.5"))
        bar = source.peek_latest(["BTCUSD"], tf, T + 21_000)["BTCUSD"][-1]
        assert (bar.t, bar.h, bar.l, bar.c, bar.v) == (T, 111.0, 110.0, 111.0, 2.75)  # trade 4 once

        # Trade 5 reaches the stream before the next answer, which the exchange made without it.
        await delivered(trade(5, T + 30_000, "109.0", "0.125"))
        exchange.responders_by_path[klines] = responder(stored, (110.0, 111.0, 110.0, 111.0, 2.75))
        bars = (await source.fetch_latest(["BTCUSD"], tf, T + 31_000))["BTCUSD"]
        assert isinstance(bars, list) and (bars[-1].c, bars[-1].v) == (111.0, 2.75)
        bar = source.peek_latest(["BTCUSD"], tf, T + 31_500)["BTCUSD"][-1]
        assert (bar.t, bar.h, bar.l, bar.c, bar.v) == (T, 111.0, 109.0, 109.0, 2.875)  # not missed
        assert [t.key for t in news.trades] == ["1", "2", "3", "4", "5"]  # older ones forgotten

        # A stream that joined mid-bar cannot vouch for the whole bar: the trades that
        # arrived before the answer, and any older, are the poll's.
        await exchange.drop()
        await until(lambda: news.unbroken_since is None, "the drop")
        await exchange.wait_subscribed(count=len(exchange.subscriptions) + 1, timeout_s=10.0)
        await delivered(trade(6, T + 40_000, "112.0", "0.5"))
        exchange.responders_by_path[klines] = responder(stored, (110.0, 112.0, 109.0, 112.0, 3.375))
        await source.fetch_latest(["BTCUSD"], tf, T + 41_000)
        await delivered(trade(7, T + 39_000, "111.5", "0.5"), trade(8, T + 41_500, "108.5", "0.25"))
        bar = source.peek_latest(["BTCUSD"], tf, T + 42_000)["BTCUSD"][-1]
        assert (bar.h, bar.l, bar.c, bar.v) == (112.0, 108.5, 108.5, 3.625)  # trade 8 only
    finally:
        await source.close()
