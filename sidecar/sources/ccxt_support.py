"""What the ccxt source needs besides the source itself: settings, URLs, errors, markets, rows.

Pure functions and small I/O helpers, each testable on its own. ccxt is imported
inside the functions that need it, so importing this module costs nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.bar import Bar
from sidecar.errors import ConfigError, ErrorClass, ProviderError
from sidecar.settings import INSTANCE, EnvReader
from sidecar.sources._parsing import ParseContext, RowFields, to_epoch_ms
from sidecar.sources._parsing import rows_to_bars as shared_rows_to_bars
from sidecar.sources.errors import exception_class

#: Markets fetched from an exchange are reused from the data directory this long.
MARKETS_MAX_AGE_S = 86_400.0
STREAM_MODES = ("auto", "ohlcv", "trades", "off")
#: ccxt's unified candle ``[ts_ms, open, high, low, close, volume]``.
_CANDLE = RowFields(1, 2, 3, 4, 5)


@dataclass(frozen=True, slots=True)
class CcxtSettings:
    """The settings of one ccxt exchange (docs/providers.md, "Crypto exchanges (ccxt)")."""

    exchange_id: str
    #: Scheme and host every REST URL is sent to instead (a path here prefixes theirs).
    base_url: str | None = None
    #: The same for websocket URLs.
    ws_url: str | None = None
    #: A JSON file with a list of ccxt market structures, used instead of loading markets.
    markets_file: Path | None = None
    #: ``auto``: candles if the exchange streams them, else trades; or forced; or ``off``.
    stream: str = "auto"
    #: Seconds between two polls of one symbol while its stream is up.
    poll_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], exchange_id: str) -> CcxtSettings:
        """Read ``SIDECAR_CCXT_*``; a bad value raises :class:`ConfigError` naming it."""
        r = EnvReader(env)
        markets_raw = r.raw(per_exchange(MARKETS_SETTING, exchange_id))
        return cls(
            exchange_id=exchange_id,
            base_url=_base(r, per_exchange(BASE_URL_SETTING, exchange_id), ("http", "https")),
            ws_url=_base(r, per_exchange(WS_URL_SETTING, exchange_id), ("ws", "wss")),
            markets_file=Path(markets_raw).expanduser() if markets_raw else None,
            stream=r.choice("SIDECAR_CCXT_STREAM", "auto", STREAM_MODES),
            poll_s=r.number("SIDECAR_CCXT_POLL_S", 5.0, low=0.0, high=86_400.0),
        )


#: The settings each exchange has its own of (``<ID>``: the exchange id in upper case).
BASE_URL_SETTING = "SIDECAR_CCXT_BASE_URL_<ID>"
WS_URL_SETTING = "SIDECAR_CCXT_WS_URL_<ID>"
MARKETS_SETTING = "SIDECAR_CCXT_MARKETS_<ID>"
PER_EXCHANGE = (BASE_URL_SETTING, WS_URL_SETTING, MARKETS_SETTING)


def per_exchange(setting: str, exchange_id: str) -> str:
    """The variable of exchange ``exchange_id``'s ``setting`` (one of :data:`PER_EXCHANGE`)."""
    return setting.replace(INSTANCE, exchange_id.upper())


def configured_exchanges(env: Mapping[str, str]) -> list[str]:
    """The exchange ids ``env`` configures: its ``ccxt:<id>`` sources, and those that
    per-exchange variables are set for."""
    ids = {part.strip().partition(":")[2] for part in env.get("SIDECAR_SOURCES", "").split(",")
           if part.strip().startswith("ccxt:")}
    for name in env:
        for setting in PER_EXCHANGE:
            head = setting.removesuffix(INSTANCE)
            if name.startswith(head) and len(name) > len(head):
                ids.add(name[len(head):].lower())
    return sorted(i for i in ids if i)


def _base(r: EnvReader, name: str, schemes: tuple[str, ...]) -> str | None:
    value = r.raw(name)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(name, f"expected a {' or '.join(schemes)} URL with a host, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(name, "a base URL must not carry a query string")
    return value.rstrip("/")


def rebase_url(url: str, base: str) -> str:
    """``url`` on ``base``: scheme and host replaced, path and query kept (``base``'s path prefixes)."""
    u, b = urlsplit(url), urlsplit(base)
    return urlunsplit((b.scheme, b.netloc, b.path.rstrip("/") + u.path, u.query, u.fragment))


def rebase_urls(api: Any, rest: str | None, ws: str | None) -> Any:
    """A copy of ccxt's ``urls['api']`` (nested dicts, lists, strings) with every
    ``http(s)://`` URL on ``rest`` and every ``ws(s)://`` URL on ``ws`` (``None``: kept)."""
    if isinstance(api, dict):
        return {k: rebase_urls(v, rest, ws) for k, v in api.items()}
    if isinstance(api, list):
        return [rebase_urls(v, rest, ws) for v in api]
    if isinstance(api, str):
        scheme = api.split("://", 1)[0].lower() if "://" in api else ""
        if rest is not None and scheme in ("http", "https"):
            return rebase_url(api, rest)
        if ws is not None and scheme in ("ws", "wss"):
            return rebase_url(api, ws)
    return api


@lru_cache(maxsize=1)
def _exception_table() -> tuple[tuple[type[BaseException], ErrorClass], ...]:
    import ccxt

    return (
        (ccxt.RateLimitExceeded, "rate_limited"),
        (ccxt.DDoSProtection, "rate_limited"),
        (ccxt.BadSymbol, "unknown_symbol"),
        (ccxt.AccountNotEnabled, "not_entitled"),
        (ccxt.RestrictedLocation, "not_entitled"),
        (ccxt.NotSupported, "not_entitled"),
        (ccxt.AuthenticationError, "auth"),  # PermissionDenied, AccountSuspended
        (ccxt.NetworkError, "unavailable"),  # ExchangeNotAvailable, OnMaintenance, RequestTimeout
        (ccxt.BadResponse, "bad_response"),  # NullResponse
        (ccxt.OperationFailed, "unavailable"),
        (ccxt.ExchangeError, "bad_response"),  # the exchange refused the request for another reason
    )


def classify(exc: BaseException, source: str) -> ProviderError:
    """The daemon's error class of a ccxt exception (subclasses before their bases).

    ``BadSymbol``, ``NotSupported``, ``AccountNotEnabled`` and ``RestrictedLocation``
    are about what was asked, not the exchange's health: their classes
    (``unknown_symbol``, ``not_entitled``) do not count against the circuit.
    """
    text = " ".join(str(exc).split())[:300]
    return ProviderError(exception_class(exc, _exception_table()), f"{type(exc).__name__}: {text}",
                         source=source)


def retry_after(headers: Any) -> float | None:
    """``Retry-After`` seconds from the last response's headers, when it says."""
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def read_markets_file(path: Path, setting: str) -> list[dict[str, Any]]:
    """A JSON list of ccxt market structures (each at least a ``symbol``); ``ConfigError`` if not."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(setting, f"{path} is not JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(setting, f"{path}: expected a non-empty list of ccxt market structures")
    for i, market in enumerate(data):
        if not (isinstance(market, dict) and isinstance(market.get("symbol"), str)
                and isinstance(market.get("id"), str)):
            raise ConfigError(setting, f"{path}: market {i} needs string 'id' and 'symbol'")
    return data


#: ccxt.pro classes (and their subclasses) that name a market's streams by its ``lowercaseId``.
LOWERCASE_ID_STREAMS = ("binance", "htx")


def streams_by_lowercase_id(exchange: Any) -> bool:
    """True when ``exchange`` subscribes to a market's streams by its ``lowercaseId``."""
    import ccxt.pro

    classes = [getattr(ccxt.pro, name, None) for name in LOWERCASE_ID_STREAMS]
    return isinstance(exchange, tuple(c for c in classes if isinstance(c, type)))


def check_markets(markets: list[dict[str, Any]], path: Path, setting: str, *,
                  lowercase_id: bool) -> None:
    """``ConfigError`` naming ``setting`` and the field when a market of a hand-built file
    lacks what ccxt reads without a default: ``linear`` and ``inverse`` on a contract
    market (its endpoints and streams follow them), ``lowercaseId`` when ``lowercase_id``
    (the exchange's streams are named by it)."""
    for i, market in enumerate(markets):
        needed = []
        if market.get("contract") or market.get("type") in ("swap", "future", "delivery", "option"):
            needed += [f for f in ("linear", "inverse") if not isinstance(market.get(f), bool)]
        if lowercase_id and not isinstance(market.get("lowercaseId"), str):
            needed.append("lowercaseId")
        if needed:
            why = ("a contract market's endpoints and streams follow 'linear'/'inverse'"
                   if "linear" in needed or "inverse" in needed else
                   "the exchange names its streams by 'lowercaseId'")
            raise ConfigError(setting, f"{path}: market {i} ({market['symbol']}) lacks "
                                       f"{', '.join(repr(f) for f in needed)} ({why})")


def cached_markets(path: Path, max_age_s: float = MARKETS_MAX_AGE_S) -> list[dict[str, Any]] | None:
    """The markets cached at ``path`` if younger than ``max_age_s`` and readable, else ``None``."""
    try:
        if time.time() - path.stat().st_mtime > max_age_s:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) and data else None


def write_markets_cache(path: Path, markets: list[dict[str, Any]]) -> None:
    """Write ``markets`` to ``path`` atomically (a failed write leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(markets, default=str))
    os.replace(tmp, path)


def rows_to_bars(rows: Any, ctx: ParseContext) -> list[Bar]:
    """ccxt OHLCV rows ``[ts_ms, o, h, l, c, v]`` as bars, oldest first, the open one forming.

    Numbers stay as ccxt gives them (volume is never rounded); a row that is not a
    candle is skipped; a missing volume is ``None``.
    """
    if not isinstance(rows, list):
        raise ProviderError("bad_response", f"OHLCV is a {type(rows).__name__}, not a list",
                            source=ctx.src)
    candles = (row for row in rows if isinstance(row, list | tuple))
    return shared_rows_to_bars(candles, ctx, _CANDLE, lambda row: to_epoch_ms(row[0]))


#: Keys whose lists are an exchange's errors or warnings, never candles.
NOT_CANDLE_KEYS = ("error", "warning", "message", "msg")


def holds_candles(answer: Any, depth: int = 4) -> bool:
    """True when a decoded ``fetch_ohlcv`` answer has a place for candles: a list, at most
    ``depth`` objects down and not under an error or warning key, that is empty or holds
    only candle rows (arrays of at least five values, or objects)."""
    if isinstance(answer, list):
        return all(isinstance(r, dict) or (isinstance(r, list) and len(r) >= 5) for r in answer)
    if isinstance(answer, dict) and depth > 0:
        return any(holds_candles(v, depth - 1) for k, v in answer.items()
                   if not any(word in str(k).lower() for word in NOT_CANDLE_KEYS))
    return False


def any_candle(rows: Any) -> bool:
    """True when ccxt's ``fetch_ohlcv`` result has a row with a time and four prices."""
    return isinstance(rows, list) and any(
        isinstance(r, list | tuple) and len(r) >= 5 and all(x is not None for x in r[:5]) for r in rows)


def request_limit(exchange: Any, market: Mapping[str, Any], default: int = 500) -> int:
    """Most candles one ``fetch_ohlcv`` returns on ``market`` (``features``), else ``default``."""
    try:
        features = exchange.features[market["type"]]
        if market["type"] != "spot":
            features = features["linear" if market.get("linear") else "inverse"]
        limit = features["fetchOHLCV"]["limit"]
        return int(limit) if limit else default
    except (AttributeError, KeyError, TypeError, ValueError):
        return default
