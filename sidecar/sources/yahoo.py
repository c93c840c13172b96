"""``yahoo``: Yahoo Finance's chart endpoint through yfinance's HTTP machinery.

Requests go through yfinance's process-wide ``YfData`` (curl_cffi impersonating
Chrome, cookie + crumb, consent page, ``YFRateLimitError`` on 429) with one shared
:class:`RebasingSession`, which rewrites the scheme and host of every request to
``SIDECAR_YAHOO_BASE_URL`` when set (gateways, tests). The raw chart JSON is
parsed here (:func:`parse_chart`) rather than through ``Ticker.history``: that
keeps the error body for classification, costs one request per poll (not an
extra timezone lookup, nor ~11 requests for an unknown symbol), and leaves the
trailing "live" entry, null minutes and daily stamps to rules we control.
yfinance is blocking: calls run in a bounded thread pool under an asyncio timeout.
REST polls are budgeted; between polls the stream (:mod:`.yahoo_stream`) moves the
forming bar.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import curl_cffi.requests as curl_requests
from curl_cffi.requests.exceptions import ChunkedEncodingError, IncompleteRead

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.http_session import parse_retry_after
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.settings import Settings
from sidecar.sources._http import Providers, ProviderSource, closed_between, settle
from sidecar.sources._parsing import (
    ParseContext,
    RowFields,
    decode_answer,
    epoch_to_daily_ms,
    finish,
    row_bars,
    to_epoch_ms,
    zone,
)
from sidecar.sources.base import HistoryLimits, LatestResult
from sidecar.sources.errors import SERVER_ERRORS, ErrorTable, Rule, http_status_error
from sidecar.sources.yahoo_stream import YahooStream
from sidecar.symbols import ProviderSymbol, SymbolMap
from sidecar.timeframe import DAY_MS, Timeframe

NAME = "yahoo"
CHART_URL = "https://query2.finance.yahoo.com/v8/finance/chart/"
INTERVALS = {"1m": "1m", "2m": "2m", "5m": "5m", "15m": "15m", "30m": "30m", "1h": "60m",
             "90m": "90m", "1d": "1d"}
_NO_VOLUME_TYPES = ("CURRENCY", "INDEX")
#: Yahoo's intraday range limits (yfinance and Yahoo's own errors): 1m at most 8 days
#: per request and only the last 30 days; 2m-90m the last 60 days; 1h the last 730.
_LIMITS_1M = HistoryLimits(span_ms=8 * DAY_MS, lookback_ms=30 * DAY_MS)
_LIMITS_UP_TO_90M = HistoryLimits(span_ms=60 * DAY_MS, lookback_ms=60 * DAY_MS)
_LIMITS_1H = HistoryLimits(span_ms=730 * DAY_MS, lookback_ms=730 * DAY_MS)
_BAD_SYMBOL_TTL_S = 6 * 3600.0
log = logging.getLogger("sidecar.sources.yahoo")


# -- parsing ------------------------------------------------------------------
#: Yahoo's edge answers a rate limit in plain text, before any JSON ("Edge: Too Many Requests").
_EDGE_ERRORS = ErrorTable(
    NAME,
    rules=(Rule("rate_limited", when=(429,)), Rule("rate_limited", phrases=("too many requests",))),
    detail=lambda body: body.text.strip()[:80], text_limit=100, http=True,
)
#: The chart's own errors: ``chart.error`` ``{code, description}``; a chart error on
#: HTTP 200 is read as a 400.
ERRORS = ErrorTable(
    NAME,
    rules=(
        Rule("unknown_symbol", when=("Not Found", 404), http=False),
        Rule("unknown_symbol", phrases=("delisted", "no data found"), http=False),
        Rule("unavailable", when=SERVER_ERRORS),
        Rule("not_entitled", phrases=("not available", "must be within"), http=False),
    ),
    detail=lambda body: f"{body.label}: {body.text}",
    label_field="code", text_fields=("description",), text_limit=200, http=True,
)
#: A chart's columns as the one row loop reads them: ``(timestamp, open, high, low, close, volume)``.
_COLUMNS = ("open", "high", "low", "close", "volume")
_FIELDS = RowFields(1, 2, 3, 4, 5)


def parse_chart(body: bytes | str, status: int, ctx: ParseContext, *,
                end_ms: int | None = None, retry_after: float | None = None) -> list[Bar]:
    """Bars of a ``/v8/finance/chart`` answer, oldest first.

    Null minutes are dropped; FX and index volume (always 0) becomes ``None``;
    daily bars are stamped 00:00 UTC of their date in the exchange's zone. The
    trailing "live" entry of intraday answers (at or after ``end_ms``, off the bar
    grid, or at ``meta.regularMarketTime``) becomes/updates the forming bar when it
    lies in the current period (``ctx.now_ms``), and is dropped otherwise.
    """
    text = body if isinstance(body, str) else body[:300].decode("utf-8", "replace")
    edge = _EDGE_ERRORS.decided(_EDGE_ERRORS.said(status, "", text), retry_after)
    if edge is not None:
        raise edge
    data = decode_answer(body, status, NAME, retry_after)
    chart = data.get("chart") if isinstance(data, dict) else None
    if not isinstance(chart, dict):
        if status != 200:
            raise http_status_error(status, "", NAME, retry_after)
        raise ProviderError("bad_response", "no 'chart' object", source=NAME)
    error = chart.get("error")
    if error or status != 200:
        raise ERRORS.classify(status if status != 200 else 400,
                              error if isinstance(error, dict) else None, retry_after)
    results = chart.get("result")
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise ProviderError("bad_response", "chart.result is empty", source=NAME)
    result = results[0]
    meta = _object(result.get("meta"))
    stamps = result.get("timestamp") or []
    quote = _object(result.get("indicators")).get("quote")
    quotes = _object(quote[0]) if isinstance(quote, list) and quote else {}
    has_volume = ctx.has_volume and meta.get("instrumentType") not in _NO_VOLUME_TYPES
    tz = zone(meta.get("exchangeTimezoneName"), "UTC")

    def col(name: str) -> list[Any]:
        values = quotes.get(name)
        return values if isinstance(values, list) else []

    def open_time(row: Sequence[Any]) -> int:
        t = to_epoch_ms(row[0], 1000)
        return epoch_to_daily_ms(t, tz) if ctx.daily else t

    columns = zip_longest(stamps if isinstance(stamps, list) else [], *map(col, _COLUMNS))
    rows = row_bars(columns, replace(ctx, has_volume=has_volume), _FIELDS, open_time)
    if ctx.daily:
        return finish(rows, ctx)
    if rows and _is_live_entry(rows, ctx.tf, meta, end_ms):
        live = rows.pop()
        period = ctx.tf.floor(live.t)
        in_current = period == ctx.tf.floor(ctx.now_ms)
        if rows and rows[-1].t == period:
            if in_current:
                last = rows[-1]
                last.h, last.l, last.c = max(last.h, live.c), min(last.l, live.c), live.c
        elif in_current:
            rows.append(replace(live, t=period, o=live.c, h=live.c, l=live.c))
    return finish(rows, ctx)


def _object(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (a part of the answer missing
    or of the wrong shape reads as absent)."""
    return value if isinstance(value, dict) else {}


def _is_live_entry(rows: list[Bar], tf: Timeframe, meta: Mapping[str, Any], end_ms: int | None) -> bool:
    last = rows[-1]
    if not tf.is_aligned(last.t):
        return True
    if end_ms is not None and last.t >= end_ms:
        return True
    market_time = meta.get("regularMarketTime")
    return isinstance(market_time, int) and abs(market_time * 1000 - last.t) <= 1000


# -- transport ----------------------------------------------------------------
class RebasingSession(curl_requests.Session[curl_requests.Response]):
    """A curl_cffi session that sends every request to ``base_url``'s scheme and host.

    It also keeps, per thread, the ``Retry-After`` of the last answer: yfinance turns a
    429 into ``YFRateLimitError`` and drops the answer with its headers.
    """

    def __init__(self, base_url: str | None, **kwargs: Any) -> None:
        kwargs.setdefault("impersonate", "chrome")
        super().__init__(**kwargs)
        self.base_url = base_url
        self._last = threading.local()

    def request(self, method: Any, url: str, *args: Any, **kwargs: Any) -> Any:
        if self.base_url:
            u, b = urlsplit(url), urlsplit(self.base_url)
            url = urlunsplit((b.scheme, b.netloc, b.path.rstrip("/") + u.path, u.query, u.fragment))
        self._last.retry_after = None
        resp = super().request(method, url, *args, **kwargs)
        self._last.retry_after = resp.headers.get("Retry-After") if resp.headers is not None else None
        return resp

    def last_retry_after(self) -> float | None:
        """Seconds from the ``Retry-After`` of this thread's last answer (seconds or a date)."""
        return parse_retry_after(getattr(self._last, "retry_after", None))


_SESSION_LOCK = threading.Lock()
_SESSION: RebasingSession | None = None
_TZ_DIR: Path | None = None


def shared_session(base_url: str | None, cache_dir: Path) -> RebasingSession:
    """The process-wide Yahoo session (yfinance keeps one singleton: pass it everywhere).

    Also points yfinance's caches at ``cache_dir`` before its first use.
    """
    global _SESSION, _TZ_DIR
    import yfinance as yf

    with _SESSION_LOCK:
        if _TZ_DIR is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            yf.set_tz_cache_location(str(cache_dir))
            _TZ_DIR = cache_dir
        if _SESSION is None:
            _SESSION = RebasingSession(base_url)
        elif _SESSION.base_url != base_url:
            _SESSION.base_url = base_url
        return _SESSION


def _blocking_chart(session: RebasingSession, ticker: str, params: dict[str, str],
                    timeout_s: float) -> tuple[int, bytes, float | None]:
    """One chart request via yfinance's ``YfData`` (runs in a worker thread)."""
    from yfinance.data import YfData
    from yfinance.exceptions import YFRateLimitError

    try:
        resp = YfData(session=session).get(CHART_URL + quote(ticker, safe="=^-."), params=params,
                                           timeout=timeout_s)
    except YFRateLimitError:
        return 429, b"Edge: Too Many Requests", session.last_retry_after()
    except (IncompleteRead, ChunkedEncodingError) as exc:  # the body was cut mid-transfer
        raise ProviderError("bad_response", f"incomplete body: {str(exc)[:160]}",
                            source=NAME) from None
    except Exception as exc:  # curl errors, timeouts, DNS: the provider is unreachable
        raise ProviderError("unavailable", f"{type(exc).__name__}: {str(exc)[:160]}",
                            source=NAME) from None
    return int(resp.status_code), bytes(resp.content), session.last_retry_after()


class YahooSource(ProviderSource):
    """Chart polls within a self-imposed budget, the stream in between."""

    name = NAME
    max_batch = 50
    stamps_sessions = True
    # One breaker: one chart endpoint, one session and one rate limit serve every class.

    def __init__(self, provider: ProviderSettings, symbols: SymbolMap, budget: RateBudget, *,
                 cache_dir: Path, stream_tickers: Sequence[str] = ()) -> None:
        super().__init__(provider, symbols, budget)
        self._cache_dir = cache_dir
        self._session: RebasingSession | None = None
        self._pool = ThreadPoolExecutor(max_workers=provider.yahoo_workers,
                                        thread_name_prefix="yahoo")
        self._bad: dict[str, float] = {}
        self._latest: dict[tuple[str, str], tuple[float, list[Bar]]] = {}
        self._peeked: dict[str, int] = {}  # ticker -> newest tick time handed to peek_latest
        self.min_refresh_s = provider.yahoo_poll_s
        self._stream = (YahooStream(provider.yahoo_stream_url, stream_tickers)
                        if provider.yahoo_stream and stream_tickers else None)

    async def start(self) -> None:
        self._session = shared_session(self.provider.yahoo_base_url, self._cache_dir)
        if self._stream is not None:
            self._stream.start()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def spelling(self, symbol: str) -> ProviderSymbol | None:
        """Yahoo's ticker for ``symbol``; ``None`` also while it is cached as unknown."""
        spelling = self.symbols.for_source(NAME, symbol)
        return None if spelling is None or self._known_bad(spelling.ticker) else spelling

    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        if tf.ms >= DAY_MS:
            return HistoryLimits()
        if tf.ms <= 60_000:
            return _LIMITS_1M
        return _LIMITS_UP_TO_90M if tf.ms <= 90 * 60_000 else _LIMITS_1H

    def _known_bad(self, ticker: str) -> bool:
        until = self._bad.get(ticker)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._bad[ticker]
            return False
        return True

    async def _chart(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int,
                     now_ms: int) -> list[Bar]:
        spelling = self.require(symbol)
        interval = INTERVALS.get(tf.name)
        if interval is None:
            raise ProviderError("not_entitled", f"timeframe {tf.name} is not offered", source=NAME)
        self.take_budget()
        if self._session is None:
            self._session = shared_session(self.provider.yahoo_base_url, self._cache_dir)
        params = {"period1": str(start_ms // 1000), "period2": str(-(-end_ms // 1000)),
                  "interval": interval, "includePrePost": "false", "events": ""}
        loop = asyncio.get_running_loop()
        self._requests += 1
        try:
            status, body, retry_after = await asyncio.wait_for(
                loop.run_in_executor(self._pool, _blocking_chart, self._session, spelling.ticker,
                                     params, self.provider.http_timeout_s),
                timeout=self.provider.http_timeout_s + 1.0,
            )
            grid = self.grid(symbol, tf)  # Yahoo's 1h stock bars open at :30
            ctx = ParseContext(symbol, grid, NAME, now_ms, spelling.has_volume)
            return parse_chart(body, status, ctx, end_ms=end_ms, retry_after=retry_after)
        except TimeoutError:
            err = ProviderError("unavailable", f"timeout fetching {spelling.ticker}", source=NAME)
        except ProviderError as exc:
            err = exc
        if err.error_class == "unknown_symbol":
            self._bad[spelling.ticker] = time.monotonic() + _BAD_SYMBOL_TTL_S
        raise self.note_error(err)

    def _with_ticks(self, symbol: str, bars: list[Bar], polled_ms: float, tf: Timeframe,
                    now_ms: int) -> list[Bar]:
        """The polled bars with the forming one moved by newer stream ticks.

        A tick in the current period moves the forming bar's close/high/low. Once the
        polled series is established, a tick in a newer period opens that period's
        forming bar (open = high = low = close = the tick; volume 0 until the next
        poll reconciles it); the previous bar then closes with its last known values.
        Ticks never make bars for a symbol no poll has answered.
        """
        spelling = self.symbols.for_source(NAME, symbol)
        if self._stream is None or spelling is None or not bars:
            return bars
        tick = self._stream.ticks.get(spelling.ticker)
        if tick is None or tick.t_ms <= polled_ms:
            return bars
        grid = self.grid(symbol, tf)
        period = grid.floor(tick.t_ms)
        last = bars[-1]
        if period != grid.floor(now_ms) or period < last.t:
            return bars  # a late tick, or one from a period that is already over
        if period == last.t:
            if not last.forming:
                return bars
            moved = replace(last, h=max(last.h, tick.price), l=min(last.l, tick.price), c=tick.price)
            return [*bars[:-1], moved]
        opened = Bar(symbol, grid.name, period, tick.price, tick.price, tick.price, tick.price,
                     0.0 if spelling.has_volume else None, NAME, forming=True)
        return [*bars[:-1], replace(last, forming=False), opened]

    def peek_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> dict[str, list[Bar]]:
        """Forming bars moved by ticks that arrived since the last poll or peek (no request)."""
        out: dict[str, list[Bar]] = {}
        if self._stream is None:
            return out
        for symbol in symbols:
            cached = self._latest.get((symbol, tf.name))
            spelling = self.symbols.for_source(NAME, symbol)
            if cached is None or spelling is None:
                continue
            tick = self._stream.ticks.get(spelling.ticker)
            if tick is None or tick.t_ms <= self._peeked.get(spelling.ticker, 0):
                continue
            self._peeked[spelling.ticker] = tick.t_ms
            moved = self._with_ticks(symbol, cached[1], cached[0], tf, now_ms)
            if moved is not cached[1]:
                # Keep what the ticks made: a bar a later tick closes keeps its last close.
                self._latest[(symbol, tf.name)] = (cached[0], moved)
                out[symbol] = moved
        return out

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        out: LatestResult = {}

        async def one(symbol: str) -> None:
            cached = self._latest.get((symbol, tf.name))
            due = cached is None or now_ms - cached[0] >= self.provider.yahoo_poll_s * 1000
            if cached is not None and not due:
                out[symbol] = self._with_ticks(symbol, cached[1], cached[0], tf, now_ms)
            elif self.budget.remaining() > 0:
                try:
                    bars = await self._chart(symbol, tf, tf.floor(now_ms) - 10 * tf.ms, now_ms + 1,
                                             now_ms)
                except ProviderError as err:
                    out[symbol] = err
                    return
                self._latest[(symbol, tf.name)] = (float(now_ms), bars[-3:])
                out[symbol] = bars[-3:]
            elif cached is not None and self._stream is not None:
                out[symbol] = self._with_ticks(symbol, cached[1], cached[0], tf, now_ms)
            else:
                out[symbol] = self.budget.exhausted()

        await asyncio.gather(*(one(s) for s in symbols))
        return settle({s: out[s] for s in symbols})

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        now_ms = int(time.time() * 1000)
        bars = await self._chart(symbol, tf, start_ms, end_ms, now_ms)
        return closed_between(bars, start_ms, end_ms)

    def status(self) -> dict[str, Any]:
        out = {**super().status(), "known_bad": sorted(self._bad)}
        if self._stream is not None:
            out["stream"] = self._stream.status()
        return out


def build(settings: Settings, providers: Providers) -> YahooSource:
    """The Yahoo source (needs no key)."""
    provider, symbols = providers.settings, providers.symbols
    budget = RateBudget(NAME, per_minute=provider.yahoo_per_minute, per_day=provider.yahoo_per_day)
    tickers = [p.ticker for s in settings.symbols if (p := symbols.for_source(NAME, s)) is not None]
    return YahooSource(provider, symbols, budget, cache_dir=settings.data_dir / "yfinance",
                       stream_tickers=tickers)
