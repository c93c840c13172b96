"""``twelvedata``: Twelve Data's ``/time_series``, batched.

Basic plan: 8 credits per minute, 800 per day (day resets 00:00 UTC); a batch
costs one credit per symbol and answers an object keyed by symbol, each with its
own ``status`` (one symbol can fail inside a successful answer). Errors are a JSON
body ``{"code", "message", "status": "error"}``, sometimes with HTTP 200, so they
are classified from the body first. Values are strings; ``datetime`` is naive in
``meta.exchange_timezone`` (absent for FX: UTC); newest first. The key travels in
the ``Authorization: apikey ...`` header, never in a URL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.http_session import HttpReply
from sidecar.parse_worker import ParseWorker, error_from_wire, error_to_wire
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.sources._http import HttpSource, closed_between, settle
from sidecar.sources._parsing import (
    ParseContext,
    Row,
    RowFields,
    decode_answer,
    local_text_to_ms,
    parse_row,
    zone,
)
from sidecar.sources.base import HistoryLimits, LatestResult
from sidecar.sources.errors import ErrorTable, Rule, http_status_error
from sidecar.symbols import SymbolMap
from sidecar.timeframe import DAY_MS, Timeframe

NAME = "twelvedata"
INTERVALS = {"1m": "1min", "5m": "5min", "15m": "15min", "30m": "30min", "45m": "45min",
             "1h": "1h", "2h": "2h", "4h": "4h", "1d": "1day"}
#: Largest ``outputsize`` Twelve Data accepts.
MAX_OUTPUT = 5000
#: Bars asked per symbol when nothing is known of it yet: the forming bar and two closed.
LATEST_BARS = 3
#: A closed bar is asked again for this long after it closed, so a provider that revises
#: a bar late (trades reported after the close) is heard; after that a cycle asks only
#: for the bars not yet seen closed (in steady state: the forming bar alone).
REVISION_WINDOW_MS = 10_000
#: At most this many bars per symbol in one cycle's request; a longer hole is left to
#: gap repair (:func:`sidecar.app.bootstrap.repair_gaps`), which asks for ranges.
MAX_LATEST_BARS = 30
_FIELDS = RowFields()


#: Twelve Data's errors: ``{"code", "message", "status": "error"}``, the code read as an
#: HTTP status where no phrase says better.
ERRORS = ErrorTable(
    NAME,
    rules=(
        Rule("rate_limited", when=(429,)),
        Rule("rate_limited", phrases=("run out of api credits",)),
        Rule("auth", when=(401,)),
        Rule("auth", phrases=(("apikey", "incorrect"), ("apikey", "not specified"))),
        Rule("not_entitled", when=(403,)),
        Rule("not_entitled", phrases=("upgrade", ("plan", "available"))),
        Rule("unknown_symbol", when=(404,), label="error"),
        # The other 404 shape ({message, code} only) is an unknown path: our bug, not the symbol.
        Rule("bad_response", when=(404,)),
        Rule("unknown_symbol", when=(400,), phrases=("symbol",)),
    ),
    detail=lambda body: f"{body.code} {body.text}",
    code_field="code", label_field="status", text_fields=("message",),
)


def classify_error(
    obj: Mapping[str, Any], http_status: int, retry_after: float | None = None
) -> ProviderError:
    """The class of a Twelve Data error object (``code``/``message``[/``status``])."""
    return ERRORS.classify(http_status, obj, retry_after)


#: One bar of a parsed series: a new row, or the id of a remembered closed row's bar.
Item = int | Row
#: Per requested symbol: its items (oldest first), or the error it got inside the batch.
SeriesItems = list[Item] | ProviderError
#: A closed row remembered by a parse: (index of its series in the request, its id, the row).
Born = tuple[int, int, Row]


class ClosedRows:
    """Closed rows already parsed, by series and row: a repeated row is not parsed again.

    Every cycle re-delivers the closed rows of the last cycle unchanged; a row equal
    to one seen before (all its fields) is answered by that row's id instead of a new
    parse. A revised row (a correction) differs, is parsed and replaces the entry. At
    most :attr:`PER_SERIES` rows are kept per series (the newest).

    The ids are what crosses to the process that builds the bars (:func:`bars_of`):
    each parse reports the rows it remembered (:attr:`born`, built into a bar once and
    kept in :attr:`bars` by id) and the ids it forgot (:attr:`dropped`), so a parse in
    a worker process sends only what changed. Closed bars are never changed after
    parsing, so sharing one between cycles is safe.
    """

    __slots__ = ("_next_id", "_series", "bars", "born", "dropped")
    PER_SERIES = LATEST_BARS

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, ZoneInfo, bool], dict[str, tuple[dict[str, Any], int, int]]] = {}
        self._next_id = 0
        #: Rows remembered and ids forgotten since :meth:`take` last collected them.
        self.born: list[Born] = []
        self.dropped: list[int] = []
        #: The bars of the remembered rows, by id, where the bars are built (see :func:`bars_of`).
        self.bars: dict[int, Bar] = {}

    def series(self, ctx: ParseContext, tz: ZoneInfo) -> dict[str, tuple[dict[str, Any], int, int]]:
        """The memo of one series (symbol, grid, zone, volume): stamp -> (row, open time, id)."""
        key = (ctx.symbol, ctx.tf.name, tz, ctx.has_volume)
        rows = self._series.get(key)
        if rows is None:
            rows = self._series[key] = {}
        return rows

    def remember(self, rows: dict[str, tuple[dict[str, Any], int, int]], stamp: str,
                 row: dict[str, Any], index: int, parsed: Row) -> int:
        """Keep ``row`` (parsed as ``parsed``) of the series at ``index``; returns its id."""
        ident = self._next_id
        self._next_id += 1
        replaced = rows.get(stamp)
        if replaced is not None:
            self.dropped.append(replaced[2])
        rows[stamp] = (row, parsed[0], ident)
        self.born.append((index, ident, parsed))
        if len(rows) > self.PER_SERIES:
            oldest = min(rows, key=lambda s: rows[s][1])
            self.dropped.append(rows.pop(oldest)[2])
        return ident

    def take(self) -> tuple[list[Born], list[int]]:
        """The rows remembered and ids forgotten since the last call (and forget them here)."""
        born, dropped = self.born, self.dropped
        self.born, self.dropped = [], []
        return born, dropped

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._series.values())


def _series_items(obj: Mapping[str, Any], ctx: ParseContext, memo: ClosedRows | None = None,
                  index: int = 0) -> list[Item]:
    """One series' rows, oldest first, one per open time (the later row wins)."""
    if obj.get("status") == "error" or ("code" in obj and "values" not in obj):
        raise classify_error(obj, 200)
    values = obj.get("values")
    meta = obj.get("meta") or {}
    if not isinstance(values, list):
        raise ProviderError("bad_response", "series without values", source=NAME)
    if not isinstance(meta, dict):  # its zone says what the datetimes mean: no guessing UTC
        raise ProviderError("bad_response", "series meta is not an object", source=NAME)
    tz = zone(meta.get("exchange_timezone"), "UTC")
    daily = ctx.daily
    has_volume = ctx.has_volume
    closed_before = ctx.now_ms - ctx.tf.ms  # a bar opened at or before this has closed
    rows = memo.series(ctx, tz) if memo is not None else None
    by_t: dict[int, Item] = {}

    def open_time(row: Mapping[str, Any]) -> int:
        return local_text_to_ms(str(row["datetime"]), tz, daily)

    for row in values:
        stamp = row.get("datetime") if type(row) is dict else None
        if rows is not None and type(stamp) is str:
            known = rows.get(stamp)
            if known is not None and known[0] == row:
                by_t[known[1]] = known[2]
                continue
        parsed = parse_row(row, _FIELDS, open_time, has_volume)
        if parsed is None:
            continue
        t = parsed[0]
        if memo is not None and rows is not None and type(stamp) is str and t <= closed_before:
            by_t[t] = memo.remember(rows, stamp, row, index, parsed)
        else:
            by_t[t] = parsed
    return [by_t[t] for t in sorted(by_t)]


def bars_of(items: Sequence[SeriesItems], contexts: Sequence[ParseContext], born: Sequence[Born],
            dropped: Sequence[int], bars: dict[int, Bar]) -> list[list[Bar] | ProviderError]:
    """Turn parsed series (see :func:`parse_batch_items`) into bars, as :func:`finish` would.

    ``bars`` holds the bars of the remembered rows by id: ``born`` rows are built into
    it first, the items refer to them, ``dropped`` ids leave it last. The bar still
    open at ``now_ms`` is marked forming.
    """
    for index, ident, (t, o, h, l, c, v) in born:
        ctx = contexts[index]
        bars[ident] = Bar(ctx.symbol, ctx.tf.name, t, o, h, l, c, v, ctx.src)
    out: list[list[Bar] | ProviderError] = []
    for ctx, series in zip(contexts, items, strict=True):
        if isinstance(series, ProviderError):
            out.append(series)
            continue
        symbol, tf_name, src, now_ms, ms = ctx.symbol, ctx.tf.name, ctx.src, ctx.now_ms, ctx.tf.ms
        made: list[Bar] = []
        for item in series:
            if isinstance(item, int):
                bar = bars[item]
            else:
                t, o, h, l, c, v = item
                bar = Bar(symbol, tf_name, t, o, h, l, c, v, src)
            bar.forming = bar.t <= now_ms < bar.t + ms
            made.append(bar)
        out.append(made)
    for ident in dropped:
        bars.pop(ident, None)
    return out


def _series_bars(obj: Mapping[str, Any], ctx: ParseContext) -> list[Bar]:
    result = bars_of([_series_items(obj, ctx)], [ctx], (), (), {})[0]
    assert not isinstance(result, ProviderError)
    return result


def _checked_json(body: bytes | str, status: int, retry_after: float | None) -> Any:
    data = decode_answer(body, status, NAME, retry_after)
    if isinstance(data, dict) and ("code" in data and "values" not in data
                                   and (data.get("status") == "error" or status != 200)):
        raise classify_error(data, status, retry_after)
    if status != 200:
        raise http_status_error(status, "", NAME, retry_after)
    if not isinstance(data, dict):
        raise ProviderError("bad_response", "answer is not an object", source=NAME)
    return data


def parse_time_series(body: bytes | str, status: int, ctx: ParseContext,
                      retry_after: float | None = None) -> list[Bar]:
    """Bars of a single-symbol ``/time_series`` answer, oldest first."""
    return _series_bars(_checked_json(body, status, retry_after), ctx)


def parse_batch_items(body: bytes | str, status: int, tickers: Sequence[str],
                      contexts: Sequence[ParseContext], retry_after: float | None = None,
                      memo: ClosedRows | None = None) -> list[SeriesItems]:
    """Per requested Twelve Data symbol (in ``tickers`` order): its rows, or its error.

    The parse half of :func:`parse_batch`, which a parse worker runs (its ``memo``
    lives there); :func:`bars_of` is the other half. An error for the whole request raises.
    """
    data = _checked_json(body, status, retry_after)
    if len(tickers) == 1 and ("values" in data or "meta" in data):
        return [_series_items(data, contexts[0], memo, 0)]
    out: list[SeriesItems] = []
    for index, (ticker, ctx) in enumerate(zip(tickers, contexts, strict=True)):
        item = data.get(ticker)
        if not isinstance(item, dict):
            out.append(ProviderError("bad_response", f"{ticker} missing from batch answer",
                                     source=NAME))
            continue
        try:
            out.append(_series_items(item, ctx, memo, index))
        except ProviderError as err:
            out.append(err)
    return out


def parse_batch(body: bytes | str, status: int, contexts: Mapping[str, ParseContext],
                retry_after: float | None = None,
                memo: ClosedRows | None = None) -> dict[str, list[Bar] | ProviderError]:
    """Per requested Twelve Data symbol: its bars, or the error it got inside the batch.

    ``contexts`` maps the requested spelling (``EUR/USD``) to its parse context. An
    error for the whole request raises. A one-symbol request answers the plain shape.
    ``memo``: closed rows parsed before (see :class:`ClosedRows`), reused when unchanged.
    """
    tickers, ctxs = list(contexts), list(contexts.values())
    items = parse_batch_items(body, status, tickers, ctxs, retry_after, memo)
    if memo is None:
        return dict(zip(tickers, bars_of(items, ctxs, (), (), {}), strict=True))
    born, dropped = memo.take()
    return dict(zip(tickers, bars_of(items, ctxs, born, dropped, memo.bars), strict=True))


def _daily(err: ProviderError) -> bool:
    """Whether a rate limit means the day's credits are spent."""
    return "day" in str(err).lower()


class WorkerParser:
    """Twelve Data's parse in the parse worker (:mod:`sidecar.parse_worker`): one memo
    of closed rows for the daemon's source, a batch answer in, rows out."""

    __slots__ = ("_grids", "memo")

    def __init__(self) -> None:
        self.memo = ClosedRows()
        self._grids: dict[tuple[str, int], Timeframe] = {}

    def __call__(self, request: tuple[Any, ...]) -> tuple[list[Any], list[Born], list[int]]:
        """``(body, status, retry_after, tickers, series, now_ms)`` -> ``(items, born, dropped)``.

        ``series``: ``(symbol, grid name, grid ms, has_volume)`` per ticker; errors
        inside the batch travel as :func:`error_to_wire` tuples.
        """
        body, status, retry_after, tickers, series, now_ms = request
        grids = self._grids
        contexts = []
        for symbol, tf_name, tf_ms, has_volume in series:
            grid = grids.get((tf_name, tf_ms))
            if grid is None:
                grid = grids[(tf_name, tf_ms)] = Timeframe(tf_name, tf_ms)
            contexts.append(ParseContext(symbol, grid, NAME, now_ms, has_volume))
        items = parse_batch_items(body, status, tickers, contexts, retry_after, self.memo)
        born, dropped = self.memo.take()
        return [error_to_wire(x) if isinstance(x, ProviderError) else x for x in items], born, dropped


class TwelveDataSource(HttpSource):
    """Batched ``/time_series`` within the credit budget (one credit per symbol)."""

    name = NAME
    stamps_sessions = True
    # Exchanges, forex and crypto are separate data feeds; a batch never mixes classes.
    breaker_per_asset_class = True
    parse_kind = NAME

    def __init__(self, provider: ProviderSettings, symbols: SymbolMap, budget: RateBudget,
                 **kwargs: Any) -> None:
        super().__init__(provider, symbols, budget, **kwargs)
        self._headers = {"Authorization": f"apikey {self._key}"}
        #: When each symbol last got bars from a cycle's request (epoch ms, as asked).
        self._answered_ms: dict[str, int] = {}
        self.max_batch = max(1, provider.twelvedata_credits_per_minute)
        #: The latest bars' closed rows come again every cycle: parsed once (ClosedRows).
        self._closed_rows = ClosedRows()

    @classmethod
    def make_budget(cls, provider: ProviderSettings) -> RateBudget:
        return RateBudget(NAME, per_minute=provider.twelvedata_credits_per_minute,
                          per_day=provider.twelvedata_credits_per_day)

    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        """At most 5,000 values per request (the dates asked are a day wider each side)."""
        return HistoryLimits(span_ms=max(tf.ms, MAX_OUTPUT * tf.ms - 2 * DAY_MS))

    def _interval(self, tf: Timeframe) -> str:
        interval = INTERVALS.get(tf.name)
        if interval is None:
            raise ProviderError("not_entitled", f"timeframe {tf.name} is not offered", source=NAME)
        return interval

    async def _request(self, contexts: Mapping[str, ParseContext], tf: Timeframe,
                       extra: Mapping[str, str], memo: ClosedRows | None = None,
                       ) -> dict[str, list[Bar] | ProviderError]:
        params = {"symbol": ",".join(contexts), "interval": self._interval(tf), **extra}
        url = f"{self.provider.twelvedata_base_url}/time_series"
        worker = self.parse_worker if memo is not None else None
        if worker is None:
            result = await self._get_parsed(
                url, lambda reply: parse_batch(reply.body, reply.status, contexts, reply.retry_after, memo),
                params=params, headers=self._headers, daily=_daily)
        else:
            reply = await self._get(url, params=params, headers=self._headers)
            with self.noting(reply, daily=_daily):
                result = await self._parse_in_worker(worker, reply, contexts, memo)
        for value in result.values():
            if isinstance(value, ProviderError):
                self.note_error(value)
        return result

    async def _parse_in_worker(self, worker: ParseWorker, reply: HttpReply,
                               contexts: Mapping[str, ParseContext], memo: ClosedRows | None,
                               ) -> dict[str, list[Bar] | ProviderError]:
        """:func:`parse_batch` in the parse worker; in-process when it cannot answer."""
        tickers, ctxs = list(contexts), list(contexts.values())
        series = [(c.symbol, c.tf.name, c.tf.ms, c.has_volume) for c in ctxs]
        request = (reply.body, reply.status, reply.retry_after, tickers, series,
                   ctxs[0].now_ms if ctxs else 0)

        def decode(answer: Any) -> list[list[Bar] | ProviderError]:
            wire, born, dropped = answer
            items = [error_from_wire(x) if type(x) is tuple else x for x in wire]
            return bars_of(items, ctxs, born, dropped, worker.book(NAME))

        bars = await worker.run(NAME, request, decode)
        if bars is None:
            return parse_batch(reply.body, reply.status, contexts, reply.retry_after, memo)
        return dict(zip(tickers, bars, strict=True))

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        out: LatestResult = {}
        try:
            self._interval(tf)
        except ProviderError as err:
            return dict.fromkeys(symbols, err)
        wanted: dict[str, tuple[str, ParseContext]] = {}
        for symbol in symbols:
            try:
                spelling = self.require(symbol)
            except ProviderError as err:
                out[symbol] = err
                continue
            wanted[symbol] = (spelling.ticker,
                              ParseContext(symbol, self.grid(symbol, tf), NAME,
                                           now_ms, spelling.has_volume))
        affordable = min(len(wanted), self.budget.remaining())
        chosen = list(wanted)[:affordable]
        for symbol in list(wanted)[affordable:]:
            out[symbol] = self.budget.exhausted()
        if chosen:
            self.take_budget(len(chosen))
            contexts = {wanted[s][0]: wanted[s][1] for s in chosen}
            rows = self.rows_wanted(chosen, wanted[chosen[0]][1].tf, now_ms)
            result = await self._request(contexts, tf, {"outputsize": str(rows)},
                                         self._closed_rows)
            answered = self._answered_ms
            for symbol in chosen:
                value = result[wanted[symbol][0]]
                if isinstance(value, ProviderError):
                    out[symbol] = value
                else:
                    out[symbol] = value[-rows:]
                    answered[symbol] = now_ms
        return settle({s: out[s] for s in symbols})

    def rows_wanted(self, symbols: Sequence[str], grid: Timeframe, now_ms: int) -> int:
        """Bars to ask per symbol (one ``outputsize`` for the request): from the bar that
        was forming when the least recently answered of ``symbols`` was last answered (its
        final values) or that closed within :data:`REVISION_WINDOW_MS`, to the forming one.

        Parsing is the largest part of a cycle, and in steady state (answered every
        second) this is the forming bar alone, plus the one that just closed for the
        first seconds after a close. A symbol never answered gets :data:`LATEST_BARS`.
        """
        oldest = now_ms - REVISION_WINDOW_MS
        answered = self._answered_ms
        for symbol in symbols:
            last = answered.get(symbol)
            if last is None:
                return LATEST_BARS
            if last < oldest:
                oldest = last
        bars = 1 + (grid.floor(now_ms) - grid.floor(oldest)) // grid.ms
        return max(1, min(MAX_LATEST_BARS, bars))

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        spelling = self.require(symbol)
        ctx = ParseContext(symbol, self.grid(symbol, tf), NAME,
                           int(time.time() * 1000), spelling.has_volume)
        self.take_budget()
        # Dates are read in the exchange's zone: ask a day wider and filter exactly below.
        extra = {
            "start_date": datetime.fromtimestamp(start_ms / 1000 - 86_400, UTC).strftime("%Y-%m-%d"),
            "end_date": datetime.fromtimestamp(end_ms / 1000 + 86_400, UTC).strftime("%Y-%m-%d"),
            "outputsize": str(MAX_OUTPUT),
        }
        result = await self._request({spelling.ticker: ctx}, tf, extra)
        value = result[spelling.ticker]
        if isinstance(value, ProviderError):
            raise value
        return closed_between(value, start_ms, end_ms)


build = TwelveDataSource.build
