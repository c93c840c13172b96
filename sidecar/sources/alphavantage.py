"""``alphavantage``: Alpha Vantage's ``/query`` time series.

Free tier: 25 requests per day and about one per second, so this source is a
last-resort fallback and for small backfills. Every answer is HTTP 200; errors and
limits are told by one key (``Error Message``, ``Note``, ``Information``).
Numbers are strings, keys are numbered (``"1. open"``), timestamps are naive in
the meta block's ``Time Zone``, newest first. FX has no volume.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.sources._http import HttpSource, closed_between
from sidecar.sources._parsing import (
    ParseContext,
    RowFields,
    decode_json,
    local_text_to_ms,
    rebucket,
    rows_to_bars,
    zone,
)
from sidecar.sources.base import HistoryLimits, LatestResult
from sidecar.sources.errors import ErrorTable, Rule, http_status_error
from sidecar.symbols import ProviderSymbol
from sidecar.timeframe import DAY_MS, Timeframe

NAME = "alphavantage"
_INTRADAY = {"1m": "1min", "5m": "5min", "15m": "15min", "30m": "30min", "1h": "60min"}
_FIELD_RE = re.compile(r"^\d+[a-z]?\.\s*(.+)$")
_PRICE_RE = re.compile(r"^price \(([a-z]+)\)$")
_ROW_FIELDS = RowFields()
_STAMP = " stamp"  # no field name of Alpha Vantage's starts with a space


def _snippet(body: bytes | str) -> str:
    text = body if isinstance(body, str) else body[:200].decode("utf-8", "replace")
    return text[:120].strip()


#: Alpha Vantage's errors: an HTTP 200 body whose one key (the label) carries the message.
ERRORS = ErrorTable(
    NAME,
    rules=(
        Rule("rate_limited", when=("Note",)),
        Rule("rate_limited", phrases=("rate limit", "call frequency", "requests per day", "per minute",
                                      "calls per", "spreading out")),
        Rule("auth", phrases=("apikey", "api key")),
        Rule("not_entitled", phrases=("premium",)),
        # Our calls are generated; the one user-supplied part is the symbol.
        Rule("unknown_symbol", when=("Error Message",)),
    ),
    detail=lambda body: f"{body.label}: {body.text}",
    text_limit=200,
)
_ERROR_KEYS = ("Error Message", "Note", "Information")


def _fields(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        m = _FIELD_RE.match(key)
        out[(m.group(1) if m else key).strip().lower()] = value
    return out


def parse_time_series(body: bytes | str, status: int, ctx: ParseContext) -> list[Bar]:
    """Bars of any Alpha Vantage ``Time Series`` answer, oldest first.

    Raises :class:`ProviderError` classified from the body (``Error Message``,
    ``Note``, ``Information``) or the status.
    """
    if status != 200:
        raise http_status_error(status, _snippet(body), NAME)
    data = decode_json(body, NAME)
    if not isinstance(data, dict):
        raise ProviderError("bad_response", "answer is not an object", source=NAME)
    for key in _ERROR_KEYS:
        if key in data and not any(k.startswith("Time Series") for k in data):
            raise ERRORS.error(ERRORS.said(status, key, str(data[key])))
    meta = data.get("Meta Data")
    series_key = next((k for k in data if k.startswith("Time Series")), None)
    if not isinstance(meta, dict) or series_key is None or not isinstance(data[series_key], dict):
        raise ProviderError("bad_response", f"no time series in keys {sorted(data)[:5]}", source=NAME)
    meta_f = _fields(meta)
    tz = zone(meta_f.get("time zone"), "UTC")
    market = str(meta_f.get("market code")).lower()
    rows = (_row(stamp, row, market) for stamp, row in data[series_key].items() if isinstance(row, dict))
    return rows_to_bars(rows, ctx, _ROW_FIELDS,
                        lambda row: local_text_to_ms(row[_STAMP], tz, ctx.daily))


def _row(stamp: object, row: Mapping[str, Any], market: str) -> dict[str, Any]:
    """A series point with plain field names and its stamp; a legacy
    DIGITAL_CURRENCY_INTRADAY point (one price, in the market's currency) as four prices."""
    f = _fields(row)
    f[_STAMP] = str(stamp)
    if "open" not in f:
        prices = {m.group(1): v for k, v in f.items() if (m := _PRICE_RE.match(k))}
        price = prices.get(market) or next(iter(prices.values()), None)
        f["open"] = f["high"] = f["low"] = f["close"] = price
    return f


def query_params(spelling: ProviderSymbol, tf: Timeframe, full: bool) -> dict[str, str]:
    """The ``/query`` parameters (without the key) for a symbol and timeframe."""
    interval = _INTRADAY.get(tf.name)
    size = "full" if full else "compact"
    if tf.name not in _INTRADAY and tf.name != "1d":
        raise ProviderError("not_entitled", f"timeframe {tf.name} is not offered", source=NAME)
    if spelling.asset_class == "crypto":
        assert spelling.base and spelling.quote
        if interval:
            return {"function": "CRYPTO_INTRADAY", "symbol": spelling.base, "market": spelling.quote,
                    "interval": interval, "outputsize": size}
        return {"function": "DIGITAL_CURRENCY_DAILY", "symbol": spelling.base, "market": spelling.quote}
    if spelling.base and spelling.quote:
        if interval:
            return {"function": "FX_INTRADAY", "from_symbol": spelling.base,
                    "to_symbol": spelling.quote, "interval": interval, "outputsize": size}
        return {"function": "FX_DAILY", "from_symbol": spelling.base, "to_symbol": spelling.quote,
                "outputsize": size}
    if interval:
        return {"function": "TIME_SERIES_INTRADAY", "symbol": spelling.ticker, "interval": interval,
                "outputsize": size}
    return {"function": "TIME_SERIES_DAILY", "symbol": spelling.ticker, "outputsize": size}


class AlphaVantageSource(HttpSource):
    """One request per symbol; strictly within the daily and per-second budget."""

    name = NAME
    max_batch = 1
    # TIME_SERIES_INTRADAY, FX_INTRADAY and CRYPTO_INTRADAY are separate endpoints.
    breaker_per_asset_class = True

    @classmethod
    def make_budget(cls, provider: ProviderSettings) -> RateBudget:
        return RateBudget(NAME, per_second=provider.alphavantage_per_second,
                          per_day=provider.alphavantage_per_day)

    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        """Intraday ``outputsize=full``: the trailing 30 days in one request; daily: all."""
        if tf.ms >= DAY_MS:
            return HistoryLimits()
        return HistoryLimits(span_ms=30 * DAY_MS, lookback_ms=30 * DAY_MS)

    async def _series(self, symbol: str, tf: Timeframe, full: bool, now_ms: int) -> list[Bar]:
        spelling = self.require(symbol)
        grid = self.grid(symbol, tf)
        params = query_params(spelling, grid.clock, full)  # session grids are folded below
        self.take_budget()
        ctx = ParseContext(symbol, grid.clock, NAME, now_ms, has_volume=spelling.has_volume)
        bars = await self._get_parsed(
            f"{self.provider.alphavantage_base_url}/query",
            lambda reply: parse_time_series(reply.body, reply.status, ctx),
            params={**params, "apikey": self._key}, daily=_daily_quota_spent)
        if grid.session is not None:
            return rebucket(bars, ParseContext(symbol, grid, NAME, now_ms, spelling.has_volume))
        return bars

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        return await self.latest_each(symbols, lambda s: self._series(s, tf, False, now_ms))

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        bars = await self._series(symbol, tf, True, int(time.time() * 1000))
        return closed_between(bars, start_ms, end_ms)


def _daily_quota_spent(err: ProviderError) -> bool:
    low = str(err).lower()
    return "per day" in low and "per minute" not in low


build = AlphaVantageSource.build
