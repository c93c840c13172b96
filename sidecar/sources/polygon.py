"""``polygon``: Polygon.io (Massive) aggregates, ``/v2/aggs/ticker/{T}/range/...``.

Free tier: 5 requests per minute, delayed or end-of-day data. The key travels in
``Authorization: Bearer``, never in a URL; ``next_url`` pages are followed with
their host rewritten to the configured base URL. Status values are never
whitelisted (``DELAYED`` and others exist): real HTTP statuses and the presence
of ``results`` decide. ``results: null`` is an empty answer. ``t`` is epoch ms UTC;
volume may be in exponent form and is fractional for crypto (kept as given); indices
have no ``v``; forex ``v`` is a tick count, so FX volume is reported as ``None``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.http_session import redact
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.sources._http import HttpSource, closed_between
from sidecar.sources._parsing import (
    ParseContext,
    RowFields,
    decode_json,
    epoch_to_daily_ms,
    finish,
    rebucket,
    rows_to_bars,
    to_epoch_ms,
    zone,
)
from sidecar.sources.base import HistoryLimits, LatestResult
from sidecar.sources.errors import ErrorTable, Rule
from sidecar.symbols import SymbolMap
from sidecar.timeframe import DAY_MS, Timeframe

NAME = "polygon"
MAX_PAGES = 20
#: ``limit`` counts the minute aggregates a request reads (max 50,000 ~ 34.7 days);
#: the free tier serves about two years of history.
MAX_BASE_AGGREGATES = 50_000
HISTORY_DAYS = 730
_SPANS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
_FIELDS = RowFields("o", "h", "l", "c", "v")
log = logging.getLogger("sidecar.sources.polygon")


_API_KEY = ("api key", "apikey")
#: Polygon's errors: the HTTP status, the body's ``status`` and ``message`` (or ``error``).
ERRORS = ErrorTable(
    NAME,
    rules=(
        Rule("rate_limited", when=(429,)),
        Rule("auth", when=(401, 403, "NOT_AUTHORIZED"), phrases=_API_KEY),
        Rule("auth", when=(401, 403, "NOT_AUTHORIZED"), phrases=("authoriz",), unless=("plan",)),
        Rule("auth", when=(401,)),
        Rule("not_entitled", when=(403, "NOT_AUTHORIZED")),
    ),
    detail=lambda body: f"{body.label} {body.text}".strip(),
    label_field="status", text_fields=("message", "error"), http=True,
)


def classify_error(status: int, obj: Mapping[str, Any] | None, retry_after: float | None) -> ProviderError:
    """The class of a Polygon error answer (HTTP status plus ``status``/``message``)."""
    return ERRORS.classify(status, obj, retry_after)


def timespan(tf: Timeframe) -> tuple[int, str]:
    """``(multiplier, timespan)`` of a timeframe (``5m`` -> ``(5, "minute")``)."""
    return int(tf.name[:-1]), _SPANS[tf.name[-1]]


def parse_aggs(body: bytes | str, status: int, ctx: ParseContext, *, asset_class: str = "stock",
               retry_after: float | None = None) -> tuple[list[Bar], str | None]:
    """Bars of one aggregates page, oldest first, and its ``next_url`` (or ``None``)."""
    try:
        data = decode_json(body, NAME)
    except ProviderError:
        if status != 200:
            raise classify_error(status, None, retry_after) from None
        raise
    if status != 200:
        raise classify_error(status, data if isinstance(data, dict) else None, retry_after)
    if not isinstance(data, dict):
        raise ProviderError("bad_response", "answer is not an object", source=NAME)
    if str(data.get("status", "")).upper() in ("ERROR", "NOT_AUTHORIZED") and not data.get("results"):
        raise classify_error(403 if data.get("status") == "NOT_AUTHORIZED" else 502, data, retry_after)
    results = data.get("results")
    if results is None:
        results = []
    if not isinstance(results, list):
        raise ProviderError("bad_response", "results is not a list", source=NAME)
    tz = zone("America/New_York" if asset_class in ("stock", "etf", "index") else "UTC")

    def open_time(row: Mapping[str, Any]) -> int:
        t = to_epoch_ms(row["t"])
        return epoch_to_daily_ms(t, tz) if ctx.daily else t

    next_url = data.get("next_url")
    return (rows_to_bars(results, ctx, _FIELDS, open_time),
            next_url if isinstance(next_url, str) and next_url else None)


def rebase_url(url: str, base: str) -> str:
    """``url`` with its scheme and host replaced by ``base``'s (path and query kept)."""
    u, b = urlsplit(url), urlsplit(base)
    prefix = b.path.rstrip("/")
    return urlunsplit((b.scheme, b.netloc, prefix + u.path, u.query, ""))


class PolygonSource(HttpSource):
    """One aggregates request per symbol within the per-minute budget."""

    name = NAME
    max_batch = 5
    # Stocks, forex, crypto and indices are separate products (and entitlements).
    breaker_per_asset_class = True

    def __init__(self, provider: ProviderSettings, symbols: SymbolMap, budget: RateBudget,
                 **kwargs: Any) -> None:
        super().__init__(provider, symbols, budget, **kwargs)
        self._headers = {"Authorization": f"Bearer {self._key}"}

    @classmethod
    def make_budget(cls, provider: ProviderSettings) -> RateBudget:
        return RateBudget(NAME, per_minute=provider.polygon_per_minute)

    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        base_ms = min(tf.clock.ms, 60_000) if tf.ms < DAY_MS else DAY_MS
        return HistoryLimits(span_ms=MAX_BASE_AGGREGATES * base_ms, lookback_ms=HISTORY_DAYS * DAY_MS)

    async def _aggs(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int, now_ms: int,
                    max_pages: int) -> list[Bar]:
        spelling = self.require(symbol)
        grid = self.grid(symbol, tf)
        mult, span = timespan(grid.clock)  # clock-aligned only: session grids are folded below
        has_volume = spelling.asset_class not in ("fx", "metal", "index")
        ctx = ParseContext(symbol, grid.clock, NAME, now_ms, has_volume)
        url: str | None = (
            f"{self.provider.polygon_base_url}/v2/aggs/ticker/{quote(spelling.ticker, safe=':')}"
            f"/range/{mult}/{span}/{start_ms}/{max(start_ms, end_ms - 1)}"
        )
        params: dict[str, str] | None = {"adjusted": "true", "sort": "asc", "limit": "50000"}
        bars: list[Bar] = []
        pages = 0
        while url is not None and pages < max_pages:
            if not self.budget.try_acquire(1):
                if not bars:
                    raise self.budget.exhausted()
                log.warning("polygon: budget spent after %d pages of %s; returning partial range",
                            pages, symbol)
                break
            pages += 1
            page, next_url = await self._get_parsed(
                url, lambda reply: parse_aggs(reply.body, reply.status, ctx,
                                              asset_class=spelling.asset_class,
                                              retry_after=reply.retry_after),
                params=params, headers=self._headers)
            bars.extend(page)
            if next_url:
                url = rebase_url(next_url, self.provider.polygon_base_url)
                log.debug("polygon: next page %s", redact(url, self.provider.secrets()))
                params = None  # the cursor URL carries its own query
            else:
                url = None
        if grid.session is not None:
            return rebucket(bars, ParseContext(symbol, grid, NAME, now_ms, has_volume))
        return finish(bars, ctx)

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        start = tf.floor(now_ms) - 5 * tf.ms
        return await self.latest_each(
            symbols, lambda symbol: self._aggs(symbol, tf, start, now_ms + 1, now_ms, max_pages=1))

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        now_ms = int(time.time() * 1000)
        bars = await self._aggs(symbol, tf, start_ms, end_ms, now_ms, MAX_PAGES)
        return closed_between(bars, start_ms, end_ms)


build = PolygonSource.build
