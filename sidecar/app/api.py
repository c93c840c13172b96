"""The read-only HTTP API (``/v1/...``): the scanner's rows for clients in any language.

* ``GET /v1/features?symbols=A,B&timeframes=1m,1h`` — ``{"rows": [...]}``: the rows
  ``scan --json`` prints (:meth:`Scanner.read`: one ``MGET`` for every timeframe), per
  symbol in the order asked, its timeframes in the order asked.
* ``GET /v1/signals?symbols=...&timeframes=...`` — ``{"signals": [...]}``: the rows
  ``scan --signals --json`` prints (:func:`sidecar.signals.signal_rows`).
* ``GET /v1/stream?symbols=...&timeframes=...`` — Server-Sent Events: one ``cycle``
  event per announcement the daemon publishes on ``{prefix}:v1:cycles``, carrying the
  rows that changed (see :class:`CycleFeed`).
* ``GET /v1/bars?symbol=A&timeframe=1m&limit=120`` — a symbol's newest stored bars with
  the EMA, Bollinger Bands and RSI over them, and its current row: the status page's chart.
* ``GET /v1/closes?symbols=...&timeframe=1m&n=60`` — each symbol's newest closes: the
  status page's sparklines.

Every answer comes from Redis, through the same reads as the scanner; nothing here
writes. ``symbols`` defaults to the configured symbols, ``timeframes``/``timeframe`` to
the configured timeframe. A bad or unknown query parameter is a 400 whose body names it:
``{"error": "...", "parameter": "symbols"}``; Redis unreachable is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import orjson
import talib
from aiohttp import web
from redis.exceptions import RedisError

from sidecar.errors import ConfigError
from sidecar.logs import redact
from sidecar.scanner import Scanner
from sidecar.settings import SYMBOL_PATTERN, SYMBOL_RE, EnvReader, IndicatorPeriods, Settings
from sidecar.signals import SignalRules, signal_rows
from sidecar.timeframe import Timeframe

log = logging.getLogger("sidecar.api")

#: At most this many symbols per request.
MAX_SYMBOLS = 5_000
#: At most this many timeframes per request.
MAX_TIMEFRAMES = 8
#: Bars a chart may ask for, and closes per sparkline.
MAX_BARS = 1_000
MAX_CLOSES = 500
#: Bars read before the first one shown, so the indicators are warm where the chart starts.
CHART_WARM_BARS = 1_000
#: A comment line on an idle stream this often keeps proxies from closing it.
KEEPALIVE_S = 15.0
#: A stream client this many events behind is dropped (the stream ends; it may reconnect).
MAX_PENDING_EVENTS = 64


#: Canonical symbols separated by commas, nothing else.
_SYMBOL_LIST_RE = re.compile(rf"(?:{SYMBOL_PATTERN},)*{SYMBOL_PATTERN}\Z")


class BadParameter(Exception):
    """A query parameter the API cannot use: answered 400, naming it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON (orjson: rows of 5,000 symbols in a few milliseconds)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- query parameters -----------------------------------------------------------------
def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter (this endpoint takes {', '.join(allowed)})")
        if name in query:
            raise BadParameter(name, "given more than once")
        query[name] = value
    return query


def _parse_list(text: str, name: str, what: str, limit: int, one: Callable[[str], str]) -> list[str]:
    """The comma-separated items of ``text``, each through ``one``, without repeats."""
    return _bounded(list(dict.fromkeys(one(part) for part in (p.strip() for p in text.split(",")) if part)),
                    name, what, limit)


def _bounded(items: list[str], name: str, what: str, limit: int) -> list[str]:
    if not items:
        raise BadParameter(name, f"no {what} given")
    if len(items) > limit:
        raise BadParameter(name, f"{len(items)} {what}s; at most {limit} per request")
    return items


def parse_symbols(text: str | None, default: Sequence[str], name: str = "symbols",
                  limit: int = MAX_SYMBOLS) -> list[str]:
    """``A,B`` (upper-cased, canonical, without repeats) or ``default``."""
    def one(part: str) -> str:
        if not SYMBOL_RE.match(part.upper()):
            raise BadParameter(name, f"{part[:40]!r} is not a canonical symbol ({SYMBOL_RE.pattern})")
        return part.upper()

    if text is None:
        return list(default)
    upper = text.upper()
    if _SYMBOL_LIST_RE.match(upper):  # the usual list checked in one call; else item by item
        return _bounded(list(dict.fromkeys(upper.split(","))), name, "symbol", limit)
    return _parse_list(text, name, "symbol", limit, one)


def parse_timeframes(text: str | None, default: str, name: str = "timeframes",
                     limit: int = MAX_TIMEFRAMES) -> list[str]:
    """``1m,5m`` (each a valid timeframe, without repeats) or ``default``."""
    def one(part: str) -> str:
        try:
            return Timeframe.parse(part).name
        except ValueError as exc:
            raise BadParameter(name, str(exc)) from None

    return [default] if text is None else _parse_list(text, name, "timeframe", limit, one)


def parse_int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    """An integer in ``[low, high]``, or ``default`` (read as a setting is)."""
    try:
        return EnvReader({} if text is None else {name: text}).integer(name, default, low=low, high=high)
    except ConfigError as exc:
        raise BadParameter(name, exc.problem) from None


def _finite(values: np.ndarray[Any, Any]) -> list[float | None]:
    return [None if v != v else float(v) for v in values.tolist()]


# -- the reads ------------------------------------------------------------------------
class ReadApi:
    """What the ``/v1`` handlers read with: one scanner (and its pool) for every timeframe."""

    def __init__(self, scanner: Scanner, symbols: Sequence[str], rules: SignalRules,
                 periods: IndicatorPeriods | None = None) -> None:
        self.scanner = scanner
        self.symbols = tuple(symbols)
        self.tf = scanner.tf
        self.rules = rules
        self.periods = periods or IndicatorPeriods()
        self.feed = CycleFeed(self)

    @classmethod
    def from_settings(cls, settings: Settings, rules: SignalRules, *, pool_size: int = 8,
                      env: Mapping[str, str] | None = None) -> ReadApi:
        """The daemon's API: its symbols, timeframe, Redis and broker spellings (a pool of its own)."""
        return cls(Scanner.from_settings(settings, pool_size=pool_size, env=env), settings.symbols, rules,
                   settings.periods)

    async def rows(self, symbols: Sequence[str], tfs: Sequence[str]) -> list[dict[str, Any]]:
        """The scanner rows of ``symbols`` on each of ``tfs`` (one read): per symbol, its
        timeframes in the order given."""
        return await self.scanner.read(symbols, tfs)

    async def chart(self, symbol: str, tf: str, limit: int) -> dict[str, Any]:
        """The newest ``limit`` bars of ``symbol`` with EMA, Bollinger Bands and RSI.

        The indicators are TA-Lib's batch functions (the daemon's periods) over the
        bars read, which reach up to :data:`CHART_WARM_BARS` before the first one shown.
        """
        scanner = self.scanner
        redis = await scanner.client()
        raw = await redis.zrange(scanner.keys.bars(tf, symbol), -(limit + CHART_WARM_BARS), -1)
        rows = [msgpack.unpackb(item) for item in raw]
        (row,) = await scanner.read([symbol], [tf])
        forming = _forming_member(row) if tf != self.tf else None
        if forming is not None and (not rows or rows[-1][0] < forming[0]):
            rows.append(forming)  # a higher timeframe's forming bar: in its features map only
        close = np.array([r[4] for r in rows], dtype=np.float64)
        p = self.periods
        if len(close):
            ema = talib.EMA(close, p.ema)
            upper, middle, lower = talib.BBANDS(close, p.bb, p.bb_nbdev, p.bb_nbdev)  # SMA, as the daemon
            rsi = talib.RSI(close, p.rsi)
        else:
            ema = upper = middle = lower = rsi = close
        shown = slice(max(0, len(rows) - limit), None)
        bars = [{"t": r[0], "o": r[1], "h": r[2], "l": r[3], "c": r[4], "v": r[5], "src": r[6],
                 "forming": bool(r[7] & 1), "synthetic": bool(r[7] & 2)} for r in rows[shown]]
        return {"symbol": symbol, "broker": row["broker"], "tf": tf, "bars": bars,
                "ema": _finite(ema[shown]), "bb_upper": _finite(upper[shown]),
                "bb_middle": _finite(middle[shown]), "bb_lower": _finite(lower[shown]),
                "rsi": _finite(rsi[shown]),
                "periods": {"ema": p.ema, "bb": p.bb, "bb_nbdev": p.bb_nbdev, "rsi": p.rsi},
                "features": row}

    async def closes(self, symbols: Sequence[str], tf: str, n: int) -> dict[str, list[list[float]]]:
        """``[t, close]`` of each symbol's newest ``n`` bars, oldest first (one pipeline,
        and one ``MGET`` of the features maps for higher timeframes' forming bars)."""
        scanner = self.scanner
        redis = await scanner.client()
        async with redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.zrange(scanner.keys.bars(tf, sym), -n, -1)
            answers = await pipe.execute()
        unpack = msgpack.unpackb
        out: dict[str, list[list[float]]] = {}
        for sym, raw in zip(symbols, answers, strict=True):
            bars = [unpack(item) for item in raw]
            out[sym] = [[b[0], b[4]] for b in bars]
        if tf != self.tf:
            for row in await scanner.read(symbols, [tf]):
                forming = _forming_member(row)
                closes = out[row["symbol"]]
                if forming is not None and (not closes or closes[-1][0] < forming[0]):
                    closes.append([forming[0], forming[4]])
                    del closes[:-n]
        return out

    async def close(self) -> None:
        """End the streams and close the scanners' connection pool."""
        await self.feed.stop()
        await self.scanner.close()


def _forming_member(row: Mapping[str, Any]) -> list[Any] | None:
    """The forming bar a scanner row describes, as a sorted-set member decodes
    (``[t, o, h, l, c, v, src, flags]``); ``None`` for a closed or missing one."""
    if row.get("missing") or not row.get("forming") or "open" not in row:
        return None
    return [row["t"], row["open"], row["high"], row["low"], row["close"], row["v"], row["src"],
            1 | (2 if row.get("synthetic") else 0)]


# -- the stream -----------------------------------------------------------------------
@dataclass(eq=False)
class Subscriber:
    """One ``/v1/stream`` client: what it asked for and the events waiting for it."""

    symbols: tuple[str, ...]
    tfs: frozenset[str]
    pending: deque[bytes] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: str | None = None
    #: The ``stale`` flag last sent per symbol (a flip is a change).
    stale: dict[tuple[str, str], bool] = field(default_factory=dict)

    def push(self, event: bytes) -> None:
        """Queue ``event``; a client :data:`MAX_PENDING_EVENTS` behind is closed instead."""
        if self.closed is not None:
            return
        if len(self.pending) >= MAX_PENDING_EVENTS:
            self.close("too slow: events not read")
            return
        self.pending.append(event)
        self.wake.set()

    def close(self, why: str) -> None:
        """End this client's stream once what is queued is sent."""
        self.closed = why
        self.wake.set()


class CycleFeed:
    """Fans the daemon's cycle announcements out to the ``/v1/stream`` clients.

    One subscription to ``{prefix}:v1:cycles`` (:meth:`Scanner.cycles`) while any
    client is connected. For each announcement, the rows of every client's symbols are
    read once (one ``MGET`` per timeframe, after the announcement: the cycle's writes
    are readable by then) and each client gets one event: the announcement's ``cycle``,
    ``t``, ``tick``, ``tf``, the ``updated`` symbols it asked for, and ``rows``: its
    first event every row it asked for, later ones the rows of the symbols a source
    answered for in that cycle plus those whose ``stale`` flag flipped.
    """

    def __init__(self, api: ReadApi) -> None:
        self.api = api
        self.clients: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # the Redis subscription is in place
        self.announcements = 0

    def subscribe(self, symbols: Sequence[str], tfs: Sequence[str]) -> Subscriber:
        """A new client; the Redis subscription starts with the first."""
        sub = Subscriber(tuple(symbols), frozenset(tfs))
        self.clients.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sidecar-cycle-feed")
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a client (the subscription ends after the next announcement without any)."""
        self.clients.discard(sub)

    async def stop(self) -> None:
        """End every stream and the subscription (the daemon is stopping)."""
        for sub in list(self.clients):
            sub.close("the daemon is stopping")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failed = False
        while self.clients:
            try:
                async for announcement in self.api.scanner.cycles(self.subscribed):
                    failed = False
                    try:
                        await self._dispatch(announcement)
                    except Exception:  # one announcement that does not fit: the next may
                        log.exception("cycle stream: announcement not sent")
                    if not self.clients:
                        break
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                if not failed:
                    log.warning("cycle stream: subscription lost; retrying",
                                extra={"error": redact(f"{type(exc).__name__}: {exc}")})
                failed = True
                await asyncio.sleep(1.0)
        self.subscribed.clear()

    async def _dispatch(self, announcement: dict[str, Any]) -> None:
        self.announcements += 1
        tf = str(announcement.get("tf") or self.api.tf)
        clients = [sub for sub in self.clients if tf in sub.tfs and sub.closed is None]
        if not clients:
            return
        wanted: dict[str, None] = {}
        for sub in clients:
            wanted.update(dict.fromkeys(sub.symbols))
        error: str | None = None
        by_symbol: dict[str, dict[str, Any]] = {}
        try:
            by_symbol = {row["symbol"]: row for row in await self.api.scanner.read(list(wanted), [tf])}
        except (RedisError, OSError) as exc:
            error = redact(f"redis: {exc}")
        updated = set(announcement.get("updated") or ())
        head = {"cycle": announcement.get("cycle"), "t": announcement.get("t"),
                "tick": announcement.get("tick"), "tf": tf}
        event_id = f"id: {announcement.get('cycle')}\nevent: cycle\ndata: ".encode()
        for sub in clients:
            rows: list[dict[str, Any]] = []
            for sym in sub.symbols:
                row = by_symbol.get(sym)
                if row is None:
                    continue
                key = (tf, sym)
                was = sub.stale.get(key)
                if was is None or sym in updated or was != row["stale"]:
                    rows.append(row)
                    sub.stale[key] = row["stale"]
            body: dict[str, Any] = {**head, "updated": [s for s in sub.symbols if s in updated],
                                    "rows": rows}
            if error is not None:
                body["error"] = error
            sub.push(event_id + orjson.dumps(body) + b"\n\n")


# -- handlers -------------------------------------------------------------------------
API = web.AppKey("api", ReadApi)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """400 for a bad parameter, 503 when Redis cannot answer."""
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadParameter as exc:
            return json_response({"error": str(exc), "parameter": exc.parameter}, status=400)
        except (RedisError, OSError) as exc:
            return json_response({"error": redact(f"redis unreachable: {exc}")}, status=503)

    run.__doc__ = handler.__doc__
    return run


async def _features(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    q = _query(request, ("symbols", "timeframes"))
    symbols = parse_symbols(q.get("symbols"), api.symbols)
    tfs = parse_timeframes(q.get("timeframes"), api.tf)
    return json_response({"rows": await api.rows(symbols, tfs)})


async def _signals(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    q = _query(request, ("symbols", "timeframes"))
    symbols = parse_symbols(q.get("symbols"), api.symbols)
    tfs = parse_timeframes(q.get("timeframes"), api.tf)
    return json_response({"signals": signal_rows(await api.rows(symbols, tfs), api.rules)})


async def _bars(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    q = _query(request, ("symbol", "timeframe", "limit"))
    if q.get("symbol") is None:
        raise BadParameter("symbol", "required")
    (symbol,) = parse_symbols(q["symbol"], (), name="symbol", limit=1)
    (tf,) = parse_timeframes(q.get("timeframe"), api.tf, name="timeframe", limit=1)
    limit = parse_int(q.get("limit"), "limit", 120, 1, MAX_BARS)
    return json_response(await api.chart(symbol, tf, limit))


async def _closes(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    q = _query(request, ("symbols", "timeframe", "n"))
    symbols = parse_symbols(q.get("symbols"), api.symbols)
    (tf,) = parse_timeframes(q.get("timeframe"), api.tf, name="timeframe", limit=1)
    n = parse_int(q.get("n"), "n", 60, 2, MAX_CLOSES)
    return json_response({"tf": tf, "closes": await api.closes(symbols, tf, n)})


async def _stream(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    q = _query(request, ("symbols", "timeframes"))
    symbols = parse_symbols(q.get("symbols"), api.symbols)
    tfs = parse_timeframes(q.get("timeframes"), api.tf)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    if request.method == "HEAD":  # the headers only: no body may follow
        return resp
    sub = api.feed.subscribe(symbols, tfs)
    try:
        await resp.write(b"retry: 1000\n: subscribed\n\n")
        while sub.closed is None or sub.pending:
            if not sub.pending:
                sub.wake.clear()
                try:
                    await asyncio.wait_for(sub.wake.wait(), KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                continue
            await resp.write(sub.pending.popleft())
        await resp.write(f": closed: {sub.closed}\n\n".encode())
    except ConnectionResetError:  # the client went away
        pass
    finally:
        api.feed.unsubscribe(sub)
    return resp


async def _stop_streams(app: web.Application) -> None:
    await app[API].feed.stop()


def add_api_routes(app: web.Application, api: ReadApi) -> None:
    """Serve ``/v1/...`` from ``api`` on ``app``."""
    app[API] = api
    app.router.add_get("/v1/features", _guarded(_features))
    app.router.add_get("/v1/signals", _guarded(_signals))
    app.router.add_get("/v1/stream", _guarded(_stream))
    app.router.add_get("/v1/bars", _guarded(_bars))
    app.router.add_get("/v1/closes", _guarded(_closes))
    app.on_shutdown.append(_stop_streams)
