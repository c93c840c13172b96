"""``ccxt:<exchange id>``: any exchange ccxt supports (``ccxt:binance``, ``ccxt:kraken`` ...).

One ccxt exchange object per source for the daemon's life (ccxt.pro's class when
there is one: it polls and streams), closed at shutdown; ccxt is imported only
when such a source is configured. Markets come from ``SIDECAR_CCXT_MARKETS_<ID>``,
else from the data directory's cache (a day old at most), else from the exchange
(then cached), loaded once in the background. Polls are ``fetch_ohlcv`` within
the exchange's own ``rateLimit``: the budget plans them, ccxt's throttler spaces
them. History pages with ``since``/``limit``. Between polls the stream
(:mod:`.ccxt_stream`) moves the forming bar; while it is down the symbols are
polled every second (budget allowing), and a poll asks back to the newest bar it
has, so it fills what the stream missed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from sidecar.bar import Bar
from sidecar.errors import ConfigError, ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.settings import Settings
from sidecar.sources._http import Providers, ProviderSource, closed_between, settle
from sidecar.sources._parsing import ParseContext, finish
from sidecar.sources.base import HistoryLimits, LatestResult
from sidecar.sources.ccxt_stream import ExchangeStream, MarketNews, Trade
from sidecar.sources.ccxt_support import (
    MARKETS_SETTING,
    CcxtSettings,
    any_candle,
    cached_markets,
    check_markets,
    classify,
    holds_candles,
    per_exchange,
    read_markets_file,
    rebase_urls,
    request_limit,
    retry_after,
    rows_to_bars,
    streams_by_lowercase_id,
    write_markets_cache,
)
from sidecar.symbols import ProviderSymbol, SymbolMap
from sidecar.timeframe import Timeframe

#: Pages one ``fetch_history`` call reads (backfill saves its progress between calls).
MAX_PAGES = 5
#: A poll asks back at most this many bars for what the stream missed (longer: gap repair).
MAX_CATCHUP = 30
#: Exchanges that serve only the newest N candles, whatever ``since`` says.
LOOKBACK_CANDLES = {"kraken": 720}
log = logging.getLogger("sidecar.sources.ccxt")
T = TypeVar("T")
#: The decoded answers of the requests the current task's ccxt call made (set around the
#: call, appended by the exchange's response hook). A context variable, not ccxt's
#: ``last_json_response``: the polls of several symbols share one exchange at once.
_ANSWERS: ContextVar[list[Any] | None] = ContextVar("ccxt_answers", default=None)


class CcxtSource(ProviderSource):
    """An exchange through ccxt: ``fetch_ohlcv`` polls, ``watch_*`` in between."""

    max_batch = 20

    def __init__(self, provider: ProviderSettings, symbols: SymbolMap, budget: RateBudget, *,
                 exchange: Any, config: CcxtSettings, cache_dir: Path,
                 markets: list[dict[str, Any]] | None = None, stream_mode: str = "off",
                 stream_markets: Sequence[str] = (), stream_tf: str = "1m") -> None:
        self.name = f"ccxt:{config.exchange_id}"
        super().__init__(provider, symbols, budget)
        self.exchange = exchange
        self.config = config
        self._markets_given = markets
        self._markets_from: str | None = None
        self._markets_task: asyncio.Task[None] | None = None
        self._cache = cache_dir / f"{config.exchange_id}.markets.json"
        self._stream = (ExchangeStream(exchange, stream_mode, stream_markets, stream_tf,
                                       self.markets_ready, self.name)
                        if stream_mode != "off" and stream_markets else None)
        #: (symbol, tf) -> (stream seq when the poll answered, its newest bars).
        self._polled: dict[tuple[str, str], tuple[int, list[Bar]]] = {}
        #: (symbol, tf) -> (poll seq, stream seq) of the last peek that moved the bars.
        self._peeked: dict[tuple[str, str], tuple[int, int]] = {}
        self._newest: dict[tuple[str, str], int] = {}

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._markets_loading()
        if self._stream is not None:
            self._stream.start()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        if self._markets_task is not None:
            self._markets_task.cancel()
        await self.exchange.close()

    # -- markets ---------------------------------------------------------------
    def _markets_loading(self) -> asyncio.Task[None]:
        task = self._markets_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._markets_task = asyncio.get_running_loop().create_task(
                self._load_markets(), name=f"{self.name}-markets")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return task

    async def markets_ready(self) -> None:
        """Wait for the markets (loaded once, in a task a cycle's timeout cannot cancel)."""
        if self._markets_from is None:
            await asyncio.shield(self._markets_loading())

    async def _load_markets(self) -> None:
        if self._markets_given is not None:
            self.exchange.set_markets(self._markets_given)
            self._markets_from = "file"
            return
        cached = await asyncio.to_thread(cached_markets, self._cache)
        if cached is not None:
            try:
                self.exchange.set_markets(cached)
                self._markets_from = "cache"
                return
            except Exception as exc:  # a damaged cache: load them again
                log.warning("markets cache unusable", extra={"source": self.name, "error": str(exc)[:200]})
        await self._ccxt(self.exchange.load_markets())
        self._markets_from = "exchange"
        try:
            await asyncio.to_thread(write_markets_cache, self._cache, list(self.exchange.markets.values()))
        except (OSError, TypeError, ValueError) as exc:
            log.warning("markets not cached", extra={"source": self.name, "error": str(exc)[:200]})

    async def _market(self, symbol: str, tf: Timeframe) -> tuple[ProviderSymbol, dict[str, Any]]:
        """The spelling and ccxt market of ``symbol``; ``unknown_symbol`` when it has none."""
        spelling = self.require(symbol)
        timeframes = self.exchange.timeframes
        if timeframes and tf.name not in timeframes:
            raise ProviderError("not_entitled", f"{self.config.exchange_id} has no {tf.name} candles",
                                source=self.name)
        await self.markets_ready()
        import ccxt

        try:
            return spelling, self.exchange.market(spelling.ticker)
        except ccxt.BaseError as exc:
            raise self.note_error(classify(exc, self.name)) from None

    async def _ccxt(self, call: Awaitable[T], *, candles: bool = False) -> T:
        """Await one ccxt request; its exception becomes the daemon's class (noted).

        ``candles``: the call is ``fetch_ohlcv``. ccxt reads a well-formed answer of
        another shape (``{"foo": 1}``) as no candles (or as rows of ``None``), or chokes
        on it; when it gives no candle, the answer itself must hold a place for candles,
        else the error is ``bad_response``.
        """
        import ccxt

        self._requests += 1
        answers: list[Any] = []
        token = _ANSWERS.set(answers)
        try:
            result = await call
        except ccxt.BaseError as exc:
            err = classify(exc, self.name)
        except Exception as exc:  # ccxt choking on a body it did not expect
            err = (self._not_candles(answers) if candles else None) or ProviderError(
                "bad_response", f"{type(exc).__name__}: {str(exc)[:200]}", source=self.name)
        else:
            wrong = self._not_candles(answers) if candles and not any_candle(result) else None
            if wrong is None:
                return result
            err = wrong
        finally:
            _ANSWERS.reset(token)
        raise self.note_error(err, retry_after=retry_after(self.exchange.last_response_headers))

    def _not_candles(self, answers: list[Any]) -> ProviderError | None:
        """``bad_response`` when the last answer has no place for candles, else ``None``."""
        if not answers or holds_candles(answers[-1]):
            return None
        text = json.dumps(answers[-1], default=str)
        return ProviderError("bad_response", f"{self.config.exchange_id} answered no candles: "
                                             f"{text[:120]}", source=self.name)

    # -- polls -----------------------------------------------------------------
    def refresh_interval_s(self, symbols: int) -> float:
        """The budget's pace; at least ``SIDECAR_CCXT_POLL_S`` while the stream is up, else 1 s."""
        streaming = self._stream is not None and self._stream.healthy()
        floor = self.config.poll_s if streaming else 1.0
        return max(floor, self.budget.pace_s(max(1, symbols)))

    async def _poll(self, symbol: str, tf: Timeframe, now_ms: int) -> list[Bar]:
        spelling, _ = await self._market(symbol, tf)
        key = (symbol, tf.name)
        floor = tf.floor(now_ms)
        since = floor - 2 * tf.ms
        newest = self._newest.get(key)
        if newest is not None:  # back to the newest bar it has: fills what a dropped stream missed
            since = max(floor - MAX_CATCHUP * tf.ms, min(since, newest))
        self.take_budget()
        rows = await self._ccxt(self.exchange.fetch_ohlcv(spelling.ticker, tf.name, since,
                                                          (floor - since) // tf.ms + 1), candles=True)
        ctx = ParseContext(symbol, tf, self.name, now_ms, spelling.has_volume)
        bars = [b for b in rows_to_bars(rows, ctx) if b.t >= since]
        if bars:
            seq = self._stream.seq if self._stream is not None else 0
            self._newest[key] = bars[-1].t
            self._polled[key] = (seq, bars[-3:])
            if self._stream is not None:
                self._stream.forget(spelling.ticker, bars[-1].t)
        return bars

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        out: LatestResult = {}

        async def one(symbol: str) -> None:
            try:
                out[symbol] = await self._poll(symbol, tf, now_ms)
            except ProviderError as err:
                out[symbol] = err

        await asyncio.gather(*(one(s) for s in symbols))
        return settle({s: out[s] for s in symbols})

    # -- stream ----------------------------------------------------------------
    def peek_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> dict[str, list[Bar]]:
        """The polled bars moved by what the stream brought since the poll (no request)."""
        out: dict[str, list[Bar]] = {}
        stream = self._stream
        if stream is None or (stream.mode == "ohlcv" and tf.name != stream.timeframe):
            return out
        for symbol in symbols:
            key = (symbol, tf.name)
            polled, spelling = self._polled.get(key), self.spelling(symbol)
            news = stream.news.get(spelling.ticker) if spelling is not None else None
            if polled is None or spelling is None or news is None:
                continue
            if (stream.mode == "ohlcv" and news.seq <= polled[0]) or \
                    self._peeked.get(key) == (polled[0], news.seq):
                continue  # nothing new since the poll or the last peek
            self._peeked[key] = (polled[0], news.seq)
            ctx = ParseContext(symbol, tf, self.name, now_ms, spelling.has_volume)
            moved = (self._with_candles(polled, news, ctx) if stream.mode == "ohlcv"
                     else self._with_trades(polled, news, ctx))
            if moved:
                out[symbol] = moved
        return out

    @staticmethod
    def _with_candles(polled: tuple[int, list[Bar]], news: MarketNews, ctx: ParseContext) -> list[Bar]:
        """The polled bars, each replaced by a newer streamed candle of the same open time,
        plus streamed candles after them (the stream's candles are whole candles)."""
        seq, bars = polled
        by_t = {b.t: replace(b) for b in bars}
        fresh = [row for t, (row, s) in news.candles.items() if s > seq and t >= bars[0].t]
        for bar in rows_to_bars(fresh, ctx):
            by_t[bar.t] = bar
        return finish(list(by_t.values()), ctx)[-3:]

    @staticmethod
    def _with_trades(polled: tuple[int, list[Bar]], news: MarketNews, ctx: ParseContext) -> list[Bar]:
        """The polled bars with the streamed trades they do not hold folded in (oldest
        first): a trade moves its bar's high, low and close and adds its amount to the
        volume; a trade in a newer period opens that bar (open = its price). ``[]`` when
        there is nothing to fold. The next poll corrects them."""
        seq, polled_bars = polled
        tf, latest, last = ctx.tf, ctx.tf.floor(ctx.now_ms), polled_bars[-1]
        trades = sorted((t for t in news.trades if last.t <= tf.floor(t.ts) <= latest),
                        key=lambda t: (t.ts, t.key))
        fold = trades[in_poll(trades, last, tf, news, seq):]
        if not fold:
            return []
        bars = [replace(b) for b in polled_bars]
        for trade in fold:
            period, bar = tf.floor(trade.ts), bars[-1]
            if period == bar.t:
                bar.h, bar.l, bar.c = max(bar.h, trade.price), min(bar.l, trade.price), trade.price
                bar.v = None if bar.v is None else bar.v + trade.amount
            else:
                bars.append(Bar(ctx.symbol, tf.name, period, trade.price, trade.price, trade.price,
                                trade.price, trade.amount if ctx.has_volume else None, ctx.src))
        return finish(bars, ctx)[-3:]

    # -- history ---------------------------------------------------------------
    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        per_request = request_limit(self.exchange, {"type": "spot"})
        newest_only = LOOKBACK_CANDLES.get(self.config.exchange_id)
        return HistoryLimits(span_ms=MAX_PAGES * per_request * tf.ms,
                             lookback_ms=None if newest_only is None else newest_only * tf.ms)

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        """Pages of ``since``/``limit`` (the exchange's largest) from ``start_ms`` to ``end_ms``;
        a spent budget ends it early with what it has (backfill resumes from there)."""
        spelling, market = await self._market(symbol, tf)
        now_ms = int(time.time() * 1000)
        ctx = ParseContext(symbol, tf, self.name, now_ms, spelling.has_volume)
        per_request = request_limit(self.exchange, market)
        since = tf.floor(start_ms)
        bars: list[Bar] = []
        for _ in range(MAX_PAGES):
            if since >= end_ms or since > now_ms:
                break
            if not self.budget.try_acquire(1):
                if not bars:
                    raise self.budget.exhausted()
                break
            limit = min(per_request, -(-(end_ms - since) // tf.ms))
            rows = await self._ccxt(self.exchange.fetch_ohlcv(spelling.ticker, tf.name, since, limit),
                                    candles=True)
            page = [b for b in rows_to_bars(rows, ctx) if b.t >= since]
            if not page:
                break
            bars.extend(page)
            since = page[-1].t + tf.ms  # past the last candle: no duplicate at the seam
        return closed_between(finish(bars, ctx), start_ms, end_ms)

    def status(self) -> dict[str, Any]:
        out = {**super().status(), "exchange": self.config.exchange_id, "markets": self._markets_from,
               "rate_limit_ms": self.exchange.rateLimit}
        if self._stream is not None:
            out["stream"] = self._stream.status()
        return out


def in_poll(trades: Sequence[Trade], polled: Bar, tf: Timeframe, news: MarketNews, seq: int) -> int:
    """How many of ``trades`` (of ``polled``'s period and later, oldest first) the polled
    forming bar already holds: they lead the list, as the exchange counts them in order.

    When the stream has seen every trade since before the bar opened, the bar's volume
    says: the trades of its period whose running total stays within it (a trade at the
    poll's edge is counted by the poll or by the stream, never both nor neither, whichever
    side of the answer it arrived). Otherwise (a stream that joined mid-bar, no volume) the
    poll holds the trades that arrived before it answered (stream ``seq``) and any older.
    """
    own = [t for t in trades if t.ts < polled.t + tf.ms]
    if polled.v is not None and news.unbroken_since is not None and news.unbroken_since < polled.t:
        total, room, held = 0.0, polled.v * (1 + 1e-9) + 1e-12, 0
        for trade in own:
            total += trade.amount
            if total > room:
                break
            held += 1
        return held
    newest = max((t.ts for t in own if t.seq <= seq), default=None)
    return 0 if newest is None else sum(1 for t in own if t.ts <= newest)


def make_exchange(config: CcxtSettings, provider: ProviderSettings) -> Any:
    """The ccxt exchange object (ccxt.pro's class when it has one), its URLs rebased."""
    import ccxt
    import ccxt.async_support
    import ccxt.pro

    cls = getattr(ccxt.pro, config.exchange_id, None) or getattr(ccxt.async_support, config.exchange_id)
    exchange = cls({"enableRateLimit": True, "timeout": int(provider.http_timeout_s * 1000)})
    if config.base_url is not None or config.ws_url is not None:
        exchange.urls = {**exchange.urls,
                         "api": rebase_urls(exchange.urls.get("api"), config.base_url, config.ws_url)}
    handle_errors = exchange.handle_errors

    def on_response(code: int, reason: str, url: str, method: str, headers: Any, body: Any,
                    response: Any, *rest: Any) -> Any:
        # ccxt hands a body that is not JSON on as text, which parses to no candles at all.
        if response is None and body and int(code) < 400:
            raise ccxt.BadResponse(f"{config.exchange_id} {method} {url}: body is not JSON: "
                                   f"{str(body)[:80]!r}")
        answers = _ANSWERS.get()
        if answers is not None:  # what the call's shape check reads (CcxtSource._ccxt)
            answers.append(response)
        return handle_errors(code, reason, url, method, headers, body, response, *rest)

    exchange.handle_errors = on_response
    return exchange


def stream_mode(config: CcxtSettings, exchange: Any, tf: Timeframe) -> str:
    """``ohlcv``, ``trades`` or ``off``: what ``SIDECAR_CCXT_STREAM`` asks and the exchange has."""
    has = exchange.has or {}
    candles = bool(has.get("watchOHLCV")) and (not exchange.timeframes or tf.name in exchange.timeframes)
    trades = bool(has.get("watchTrades"))
    if config.stream == "auto":
        return "ohlcv" if candles else "trades" if trades else "off"
    if config.stream != "off" and not {"ohlcv": candles, "trades": trades}[config.stream]:
        raise ConfigError("SIDECAR_CCXT_STREAM", f"{config.exchange_id} cannot stream {config.stream}"
                                                 f"{' on ' + tf.name if config.stream == 'ohlcv' else ''}")
    return config.stream


def build(settings: Settings, providers: Providers, exchange_id: str) -> CcxtSource:
    """The ``ccxt:<exchange_id>`` source; :class:`SourceDisabled` without ccxt installed."""
    from sidecar.sources import SourceDisabled

    try:
        import ccxt
    except ModuleNotFoundError:
        raise SourceDisabled(f"ccxt:{exchange_id}: ccxt is not installed "
                             "(pip install 'sidecar[ccxt]')") from None
    if exchange_id not in ccxt.exchanges:
        raise ConfigError("SIDECAR_SOURCES", f"ccxt:{exchange_id}: ccxt has no exchange {exchange_id!r}")
    provider, symbols = providers.settings, providers.symbols
    config = CcxtSettings.from_env(providers.env, exchange_id)
    setting = per_exchange(MARKETS_SETTING, exchange_id)
    markets = None if config.markets_file is None else read_markets_file(config.markets_file, setting)
    exchange = make_exchange(config, provider)
    mode = stream_mode(config, exchange, settings.timeframe)
    if markets is not None and config.markets_file is not None:
        check_markets(markets, config.markets_file, setting,
                      lowercase_id=mode != "off" and streams_by_lowercase_id(exchange))
    name = f"ccxt:{exchange_id}"
    rate_ms = max(float(exchange.rateLimit or 1000.0), 1.0)
    budget = RateBudget(name, per_second=max(1, int(1000 / rate_ms)),
                        per_minute=max(1, int(60_000 / rate_ms)))
    tickers = [p.ticker for s in settings.symbols if (p := symbols.for_source(name, s)) is not None]
    return CcxtSource(provider, symbols, budget, exchange=exchange, config=config,
                      cache_dir=settings.data_dir / "ccxt", markets=markets,
                      stream_mode=mode,
                      stream_markets=tickers, stream_tf=settings.timeframe.name)
