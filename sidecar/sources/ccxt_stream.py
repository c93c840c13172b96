"""Live candles or trades of a ccxt.pro exchange, kept for the polls to be moved by.

One task per market loops on ccxt's ``watch_ohlcv`` (or ``watch_trades``); ccxt
subscribes on the first call and answers each update with what changed. A dropped
connection rejects the pending call with ``NetworkError``; the task backs off
(1 s doubling to 60 s) and calls again, which reconnects and resubscribes. Every
update gets a sequence number, so the source can tell what arrived after its last
poll without comparing clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sidecar.sources.ccxt_stream")
#: Candles kept per market (the forming one and the few before it).
KEEP_CANDLES = 4
#: Trades kept per market between two polls (older ones are dropped first).
KEEP_TRADES = 20_000
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True, slots=True)
class Trade:
    """One streamed trade: the exchange's time, price and amount, its key (the trade id,
    else time, price and amount) and the stream's sequence number when it arrived."""

    ts: int
    price: float
    amount: float
    key: str
    seq: int


@dataclass(slots=True)
class MarketNews:
    """What the stream brought for one market. ``candles``: open time -> (row, seq);
    ``trades``: each trade once (by key), in arrival order; ``unbroken_since``: the time
    of the first trade since the stream last (re)connected, so every trade after it was
    seen. ``connected``: it answered since its last failure; ``failing``: it failed
    since its last answer."""

    candles: dict[int, tuple[list[float], int]] = field(default_factory=dict)
    trades: list[Trade] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    unbroken_since: int | None = None
    seq: int = 0
    connected: bool = False
    failing: bool = False


class ExchangeStream:
    """Watches ``markets`` on ``exchange`` (a ccxt.pro instance) in ``mode`` ``ohlcv`` or ``trades``."""

    def __init__(self, exchange: Any, mode: str, markets: Sequence[str], timeframe: str,
                 ready: Callable[[], Awaitable[None]], name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.exchange = exchange
        self.mode = mode
        self.timeframe = timeframe
        self.name = name
        self.news = {m: MarketNews() for m in dict.fromkeys(markets)}
        self.seq = 0
        self._ready = ready
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._errors = 0
        self._reconnects = 0
        self._last_msg_ms: int | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        """One watching task per market (idempotent); needs a running loop."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._watch(m), name=f"{self.name}-stream-{m}")
                           for m in self.news]

    async def close(self) -> None:
        """Stop the tasks (the exchange's connections are closed with the exchange)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def healthy(self) -> bool:
        """False from a market's failure until its stream answers again (the polls then
        go every second); before any failure the subscriptions are taken as up."""
        return bool(self._tasks) and not any(n.failing for n in self.news.values())

    async def _watch(self, market: str) -> None:
        news = self.news[market]
        delay = 1.0
        while True:
            try:
                await self._ready()
                if self.mode == "ohlcv":
                    self.on_candles(market, await self.exchange.watch_ohlcv(market, self.timeframe))
                else:
                    self.on_trades(market, await self.exchange.watch_trades(market))
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream is best-effort: the polls cover the gap
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                if not news.failing:  # once per drop, not per retry
                    log.warning("stream dropped", extra={"source": self.name, "market": market,
                                                         "error": self._last_error, "retry_s": delay})
                news.connected, news.failing = False, True
                news.unbroken_since = None  # trades may be missed until it is back
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                self._reconnects += 1

    def _touch(self, market: str) -> int:
        news = self.news[market]
        self.seq += 1
        news.seq = self.seq
        if news.failing:
            log.info("stream is back", extra={"source": self.name, "market": market})
        news.connected, news.failing = True, False
        self._last_msg_ms = int(self._clock() * 1000)
        return self.seq

    def on_candles(self, market: str, rows: Any) -> None:
        """Keep the candles of one ``watch_ohlcv`` answer (public for tests)."""
        news = self.news[market]
        seq = self._touch(market)
        for row in rows if isinstance(rows, list) else ():
            if isinstance(row, list) and len(row) >= 5 and isinstance(row[0], int | float):
                try:
                    t = int(row[0])
                except (ValueError, OverflowError):  # NaN, infinity: not a candle
                    continue
                news.candles[t] = (list(row), seq)
        for t in sorted(news.candles)[:-KEEP_CANDLES]:
            del news.candles[t]

    def on_trades(self, market: str, trades: Any) -> None:
        """Keep the trades of one ``watch_trades`` answer (public for tests)."""
        news = self.news[market]
        seq = self._touch(market)
        for trade in trades if isinstance(trades, list) else ():
            try:
                ts, price = int(trade["timestamp"]), float(trade["price"])
                amount = float(trade["amount"]) if trade.get("amount") is not None else 0.0
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
            if not (math.isfinite(price) and price > 0 and math.isfinite(amount) and amount >= 0):
                continue
            key = str(trade["id"]) if trade.get("id") is not None else f"{ts}:{price!r}:{amount!r}"
            if key in news.keys:
                continue  # delivered again (a resubscription): counted once
            news.keys.add(key)
            news.trades.append(Trade(ts, price, amount, key, seq))
            if news.unbroken_since is None:
                news.unbroken_since = ts
        if len(news.trades) > KEEP_TRADES:
            self._keep(news, news.trades[-KEEP_TRADES:])

    def forget(self, market: str, before_ms: int) -> None:
        """Drop the trades older than ``before_ms`` (the forming bar a poll answered)."""
        news = self.news.get(market)
        if news is not None and news.trades and news.trades[0].ts < before_ms:
            self._keep(news, [t for t in news.trades if t.ts >= before_ms])

    @staticmethod
    def _keep(news: MarketNews, trades: list[Trade]) -> None:
        news.trades = trades
        news.keys = {t.key for t in trades}

    def status(self) -> dict[str, Any]:
        """Facts for ``/health``."""
        return {"mode": self.mode, "connected": self.healthy(),
                "markets": {m: n.connected for m, n in self.news.items()},
                "errors": self._errors, "reconnects": self._reconnects,
                "last_message_ms": self._last_msg_ms, "last_error": self._last_error}
