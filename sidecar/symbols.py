"""The symbol mapping: canonical symbol -> each provider's spelling and asset class.

One user-editable TOML file (``sidecar/symbols.toml``, or ``SIDECAR_SYMBOLS_FILE``).
A symbol that is not listed is a US stock spelled the same way everywhere; a text
that is not a canonical symbol at all (``C:EURUSD``, ``EURUSD=X``, ``EUR/USD``) is
a provider spelling passed through unchanged, its asset class guessed from its
shape. A source that cannot serve a symbol gets ``None`` (skipped, not an error).

The ``ccxt`` key spells a symbol for the ccxt exchanges (sources ``ccxt:<id>``): one
unified market symbol for all of them, or a table with a ``default`` and per-exchange
overrides (``{ default = "BTC/USDT", kraken = "BTC/USD" }``); left out, no exchange
serves the symbol.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from sidecar import calendars
from sidecar.errors import ConfigError
from sidecar.settings import SYMBOL_RE
from sidecar.timeframe import US_EQUITY_SESSION, Session, Timeframe

AssetClass = Literal["stock", "etf", "fx", "crypto", "index", "metal"]
ASSET_CLASSES: tuple[AssetClass, ...] = ("stock", "etf", "fx", "crypto", "index", "metal")
PROVIDERS = ("yahoo", "alphavantage", "twelvedata", "polygon")
#: The mapping key of the ccxt exchanges; ``spellings`` holds ``ccxt`` (the default) and
#: ``ccxt:<exchange id>`` (an override, ``None`` = that exchange cannot serve it).
CCXT = "ccxt"
_EXCHANGE_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
DEFAULT_FILE = Path(__file__).with_name("symbols.toml")
_SETTING = "SIDECAR_SYMBOLS_FILE"
_EQUITY: tuple[AssetClass, ...] = ("stock", "etf")
#: Asset classes whose intraday bars follow the US regular session unless the entry says otherwise.
_SESSION_CLASSES: tuple[AssetClass, ...] = ("stock", "etf", "index")
#: The trading calendar of each asset class unless the entry names one (``calendars``).
DEFAULT_CALENDARS: dict[AssetClass, str] = {
    "stock": "XNYS", "etf": "XNYS", "index": "XNYS",
    "fx": calendars.FX, "metal": calendars.FX, "crypto": calendars.ALWAYS_OPEN,
}


@dataclass(frozen=True, slots=True)
class ProviderSymbol:
    """How one provider spells one symbol.

    ``ticker`` is the provider's spelling; for Alpha Vantage currency pairs
    ``base``/``quote`` hold the ``from``/``to`` codes and ``ticker`` is ``base/quote``.
    """

    canonical: str
    provider: str
    ticker: str
    asset_class: AssetClass
    base: str | None = None
    quote: str | None = None

    @property
    def has_volume(self) -> bool:
        """False where the provider's volume is meaningless (FX, metals, indices)."""
        return self.asset_class not in ("fx", "metal", "index")


@dataclass(frozen=True, slots=True)
class SymbolEntry:
    """One mapping entry; ``spellings[provider]`` is ``None`` when it cannot serve."""

    canonical: str
    asset_class: AssetClass
    broker: str
    spellings: Mapping[str, ProviderSymbol | None]
    #: The regular session its intraday bars are anchored at (``None``: the clock's grid).
    session: Session | None = None
    #: An explicit shard index (``shard = i`` in the file); ``None``: by hash (sidecar.shards).
    shard: int | None = None
    #: Its trading calendar (:mod:`sidecar.calendars`): when its market is open.
    calendar: str = "XNYS"
    #: Bars outside the regular session: included (``True``), excluded (``False``) or as
    #: its asset class says (``None``, see :meth:`SymbolMap.extended_hours`).
    extended_hours: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """The entry as ``python -m sidecar symbols --json`` prints it.

        Each provider's spelling is its ticker, Alpha Vantage's currency pairs
        ``{"from", "to"}`` as in the file, ``None`` where the provider cannot serve it.
        """
        out: dict[str, Any] = {"symbol": self.canonical, "asset_class": self.asset_class,
                               "broker": self.broker,
                               "session": None if self.session is None else str(self.session),
                               "calendar": self.calendar,
                               "extended_hours": _CHOICE[self.extended_hours]}
        for provider in PROVIDERS:
            spelling = self.spellings.get(provider)
            if spelling is None:
                out[provider] = None
            elif spelling.base is not None and spelling.quote is not None:
                out[provider] = {"from": spelling.base, "to": spelling.quote}
            else:
                out[provider] = spelling.ticker
        ccxt = {key.partition(":")[2] or "default": None if spelling is None else spelling.ticker
                for key, spelling in self.spellings.items() if key.split(":")[0] == CCXT}
        out[CCXT] = ccxt or None
        return out

    def ccxt_spelling(self, exchange_id: str) -> ProviderSymbol | None:
        """How ccxt exchange ``exchange_id`` spells this symbol (``None``: cannot serve)."""
        key = f"{CCXT}:{exchange_id}"
        return self.spellings[key] if key in self.spellings else self.spellings.get(CCXT)


def _default_entry(symbol: str) -> SymbolEntry:
    return SymbolEntry(
        canonical=symbol,
        asset_class="stock",
        broker=symbol,
        spellings={p: ProviderSymbol(symbol, p, symbol, "stock") for p in PROVIDERS},
        session=US_EQUITY_SESSION,
    )


#: How an entry's ``extended_hours`` choice is spelled (``None``: its asset class's).
_CHOICE = {True: "include", False: "exclude", None: None}
#: The mapping's table of per-asset-class settings (not a symbol: lower case).
CLASSES_TABLE = "asset_classes"


def _parse_extended(raw: Any, where: str, calendar: str | None) -> bool | None:
    """``extended_hours = "include" | "exclude"``; ``include`` needs a calendar whose
    extended hours are known (:data:`sidecar.calendars.EXTENDED_HOURS`)."""
    if raw is None:
        return None
    if raw not in ("include", "exclude"):
        raise ConfigError(_SETTING, f"{where}: expected \"include\" or \"exclude\", got {raw!r}")
    if raw == "include" and calendar is not None and not calendars.has_extended(calendar):
        raise ConfigError(_SETTING, f"{where}: no extended hours known for calendar {calendar} "
                                    f"(known: {', '.join(sorted(calendars.EXTENDED_HOURS))})")
    return bool(raw == "include")


def _parse_classes(raw: Any, where: str) -> dict[AssetClass, bool]:
    """``[asset_classes.<class>]`` tables: each class's ``extended_hours`` choice."""
    if not isinstance(raw, dict):
        raise ConfigError(_SETTING, f"{where}: expected a table of asset classes")
    out: dict[AssetClass, bool] = {}
    for name, body in raw.items():
        if name not in ASSET_CLASSES:
            raise ConfigError(_SETTING, f"{where}.{name}: not an asset class "
                                        f"({', '.join(ASSET_CLASSES)})")
        if not isinstance(body, dict) or set(body) - {"extended_hours"}:
            raise ConfigError(_SETTING, f"{where}.{name}: expected a table with extended_hours only")
        choice = _parse_extended(body.get("extended_hours"), f"{where}.{name}.extended_hours", None)
        if choice is not None:
            out[cast(AssetClass, name)] = choice
    return out


#: The exchange whose calendar a session in this zone follows, unless the entry names one.
_ZONE_CALENDARS = {
    "America/New_York": "XNYS", "Europe/London": "XLON", "Europe/Berlin": "XETR",
    "Asia/Tokyo": "XTKS", "Asia/Hong_Kong": "XHKG",
}


def _parse_calendar(raw: Any, asset_class: AssetClass, where: str, zone: str | None = None) -> str:
    if raw is None:
        if asset_class in _SESSION_CLASSES and zone in _ZONE_CALENDARS:
            return _ZONE_CALENDARS[zone]
        return DEFAULT_CALENDARS[asset_class]
    if not isinstance(raw, str):
        raise ConfigError(_SETTING, f"{where}: expected a calendar name, got {raw!r}")
    try:
        return calendars.resolve(raw)
    except ValueError as exc:
        raise ConfigError(_SETTING, f"{where}: {exc}") from None


def _parse_session(raw: Any, asset_class: AssetClass, where: str, calendar: str = "XNYS") -> Session | None:
    if raw is None:
        if asset_class not in _SESSION_CLASSES:
            return None
        if calendar == "XNYS":
            return US_EQUITY_SESSION
        zone, open_min = calendars.regular_open(calendar)
        return Session(zone, open_min)
    if raw is False:
        return None
    if isinstance(raw, str):
        try:
            return Session.parse(raw)
        except ValueError as exc:
            raise ConfigError(_SETTING, f"{where}: {exc}") from None
    raise ConfigError(_SETTING, f"{where}: expected 'HH:MM Zone/Name' or false, got {raw!r}")


def _parse_ccxt(canonical: str, asset_class: AssetClass, raw: Any,
                where: str) -> dict[str, ProviderSymbol | None]:
    """The ``ccxt`` key: one market symbol, or ``{ default = ..., <exchange id> = ... }``."""
    if raw is None or raw is False:
        return {}
    table = raw if isinstance(raw, dict) else {"default": raw}
    out: dict[str, ProviderSymbol | None] = {}
    for exchange, value in table.items():
        if exchange != "default" and not _EXCHANGE_ID_RE.match(exchange):
            raise ConfigError(_SETTING, f"{where}: {exchange!r} is not a ccxt exchange id")
        key = CCXT if exchange == "default" else f"{CCXT}:{exchange}"
        if value is False:
            out[key] = None
        elif isinstance(value, str) and value.strip():
            out[key] = ProviderSymbol(canonical, CCXT, value.strip(), asset_class)
        else:
            raise ConfigError(_SETTING, f"{where}.{exchange}: expected a market symbol "
                                        f"('BTC/USDT') or false, got {value!r}")
    return out


def _parse_spelling(
    canonical: str, provider: str, asset_class: AssetClass, raw: Any, where: str
) -> ProviderSymbol | None:
    if raw is None:  # key left out
        if asset_class in _EQUITY:
            return ProviderSymbol(canonical, provider, canonical, asset_class)
        return None
    if raw is False:
        return None
    if isinstance(raw, str) and raw.strip():
        text = raw.strip()
        if provider == "alphavantage" and asset_class not in _EQUITY:
            raise ConfigError(_SETTING, f"{where}: alphavantage for {asset_class} needs "
                                        "{ from = ..., to = ... }")
        return ProviderSymbol(canonical, provider, text, asset_class)
    if isinstance(raw, dict) and provider == "alphavantage":
        base, quote = raw.get("from"), raw.get("to")
        if not (isinstance(base, str) and isinstance(quote, str) and base and quote):
            raise ConfigError(_SETTING, f"{where}: alphavantage needs string 'from' and 'to'")
        unknown = set(raw) - {"from", "to"}
        if unknown:
            raise ConfigError(_SETTING, f"{where}: unknown alphavantage keys {sorted(unknown)}")
        if asset_class in _EQUITY:
            raise ConfigError(_SETTING, f"{where}: from/to is for fx, metal and crypto only")
        return ProviderSymbol(canonical, provider, f"{base}/{quote}", asset_class, base, quote)
    raise ConfigError(_SETTING, f"{where}: expected a ticker string or false, got {raw!r}")


class SymbolMap:
    """The loaded mapping. Build with :func:`load_symbol_map`."""

    __slots__ = ("_entries", "_spellings", "classes", "path", "rejected")

    def __init__(self, entries: Mapping[str, SymbolEntry], path: Path | None = None,
                 rejected: Mapping[str, str] | None = None,
                 classes: Mapping[AssetClass, bool] | None = None) -> None:
        """``classes``: each asset class's ``extended_hours`` choice where the file makes one."""
        self._entries = dict(entries)
        self.classes = dict(classes or {})
        self.path = path
        #: ``for_source`` answers, asked for every symbol every cycle (the map never changes).
        self._spellings: dict[tuple[str, str], ProviderSymbol | None] = {}
        #: Entries left out for a bad value: symbol -> problem. No source serves them.
        self.rejected = dict(rejected or {})

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, symbol: str) -> SymbolEntry:
        """The entry of a canonical symbol (a US-stock default when not listed)."""
        return self._entries.get(symbol) or _default_entry(symbol)

    def grid(self, symbol: str, tf: Timeframe, spelling: ProviderSymbol | None = None) -> Timeframe:
        """``tf`` on the bar grid of ``symbol``'s session (US stocks' 1h bars open at :30).

        A provider spelling passed through (``C:EURUSD``, given as ``spelling``) gets
        the session of its asset class.
        """
        if symbol in self._entries or spelling is None:
            return tf.on_session(self.entry(symbol).session)
        default = spelling.asset_class in _SESSION_CLASSES
        return tf.on_session(US_EQUITY_SESSION if default else None)

    def calendar(self, symbol: str, spelling: ProviderSymbol | None = None) -> str:
        """The name of ``symbol``'s trading calendar (a passed-through provider spelling,
        given as ``spelling``, gets its asset class's)."""
        if symbol in self._entries or spelling is None:
            return self.entry(symbol).calendar
        return DEFAULT_CALENDARS[spelling.asset_class]

    def extended_hours(self, symbol: str, spelling: ProviderSymbol | None = None) -> bool:
        """Whether ``symbol``'s bars outside its regular session are included: its entry's
        choice, else its asset class's where its calendar's extended hours are known,
        else excluded."""
        if symbol in self._entries or spelling is None:
            entry = self.entry(symbol)
            asset, calendar, choice = entry.asset_class, entry.calendar, entry.extended_hours
        else:
            asset, calendar, choice = spelling.asset_class, DEFAULT_CALENDARS[spelling.asset_class], None
        if choice is not None:
            return choice
        return self.classes.get(asset, False) and calendars.has_extended(calendar)

    def for_source(self, provider: str, symbol: str) -> ProviderSymbol | None:
        """How ``provider`` spells ``symbol``, or ``None`` if it cannot serve it.

        ``symbol`` is canonical; a text that cannot be canonical (``C:EURUSD``,
        ``EURUSD=X``, ``EUR/USD``, ``^NDX``) is taken as the provider's own spelling.
        """
        key = (provider, symbol)
        try:
            return self._spellings[key]
        except KeyError:
            pass
        spelling: ProviderSymbol | None
        exchange = provider.partition(":")[2] if provider.startswith(f"{CCXT}:") else None
        if symbol in self._entries:
            entry = self._entries[symbol]
            spelling = (entry.spellings.get(provider) if exchange is None
                        else entry.ccxt_spelling(exchange))
        elif symbol in self.rejected:
            spelling = None  # a guess could fetch another instrument's prices
        elif SYMBOL_RE.match(symbol) and not _looks_foreign(provider, symbol):
            # An unlisted symbol is a US stock, which no crypto exchange serves.
            spelling = None if exchange is not None else _default_entry(symbol).spellings[provider]
        else:
            spelling = passthrough(provider, symbol)
        if len(self._spellings) < 100_000:
            self._spellings[key] = spelling
        return spelling


def _looks_foreign(provider: str, symbol: str) -> bool:
    """Canonical-looking texts that are in fact provider spellings (``BTC-USD``)."""
    return provider == "yahoo" and symbol.endswith(("-USD", "-EUR", "-USDT"))


def passthrough(provider: str, text: str) -> ProviderSymbol:
    """A provider's own spelling, used unchanged; the asset class is guessed."""
    asset: AssetClass = "stock"
    base: str | None = None
    quote: str | None = None
    if provider == "polygon":
        asset = {"C:": "fx", "X:": "crypto", "I:": "index"}.get(text[:2], "stock")  # type: ignore[assignment]
    elif provider == "yahoo":
        if text.endswith("=X"):
            asset = "fx"
        elif text.startswith("^"):
            asset = "index"
        elif "-" in text and text.rsplit("-", 1)[1] in ("USD", "EUR", "USDT", "BTC"):
            asset = "crypto"
    elif provider.startswith(f"{CCXT}:"):
        asset = "crypto"  # a unified market symbol (``BTC/USDT``, ``BTC/USDT:USDT``)
    elif provider in ("twelvedata", "alphavantage") and "/" in text:
        base, quote = text.split("/", 1)
        asset = "crypto" if base in ("BTC", "ETH", "SOL", "XRP", "LTC", "DOGE") else "fx"
        if base == "XAU" or base == "XAG":
            asset = "metal"
        if provider == "twelvedata":
            base = quote = None
    return ProviderSymbol(text, provider, text, asset, base, quote)


def parse_symbol_map(data: Mapping[str, Any], path: Path | None = None) -> SymbolMap:
    """Validate a decoded mapping. A bad entry does not stop the others: it is left out
    and recorded in :attr:`SymbolMap.rejected` (symbol -> the problem, naming the entry)."""
    entries: dict[str, SymbolEntry] = {}
    rejected: dict[str, str] = {}
    classes = _parse_classes(data.get(CLASSES_TABLE, {}), f"{path or 'mapping'}: [{CLASSES_TABLE}]")
    for canonical, body in data.items():
        if canonical == CLASSES_TABLE:
            continue
        try:
            entries[canonical] = _parse_entry(canonical, body, f"{path or 'mapping'}: [{canonical}]")
        except ConfigError as exc:
            rejected[canonical] = exc.problem
    return SymbolMap(entries, path, rejected, classes)


def _parse_entry(canonical: str, body: Any, where: str) -> SymbolEntry:
    if not SYMBOL_RE.match(canonical):
        raise ConfigError(
            _SETTING, f"{where}: {canonical!r} is not a canonical symbol ({SYMBOL_RE.pattern})"
        )
    if not isinstance(body, dict):
        raise ConfigError(_SETTING, f"{where}: expected a table")
    unknown = set(body) - {"asset_class", "broker", "session", "calendar", "shard", "extended_hours",
                           CCXT, *PROVIDERS}
    if unknown:
        raise ConfigError(_SETTING, f"{where}: unknown keys {sorted(unknown)} (known: asset_class, "
                                    f"broker, session, calendar, shard, extended_hours, "
                                    f"{', '.join(PROVIDERS)}, {CCXT})")
    shard = body.get("shard")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or shard < 0):
        raise ConfigError(_SETTING, f"{where}: shard must be a shard index (an integer >= 0)")
    asset_raw = body.get("asset_class", "stock")
    if asset_raw not in ASSET_CLASSES:
        raise ConfigError(
            _SETTING, f"{where}: asset_class {asset_raw!r} is not one of {', '.join(ASSET_CLASSES)}"
        )
    asset = cast(AssetClass, asset_raw)
    broker = body.get("broker", canonical)
    if not isinstance(broker, str) or not broker.strip():
        raise ConfigError(_SETTING, f"{where}: broker must be a non-empty string")
    spellings = {
        p: _parse_spelling(canonical, p, asset, body.get(p), f"{where}.{p}") for p in PROVIDERS
    }
    spellings.update(_parse_ccxt(canonical, asset, body.get(CCXT), f"{where}.{CCXT}"))
    raw_session = body.get("session")
    given = _parse_session(raw_session, asset, f"{where}.session") if raw_session is not None else None
    calendar = _parse_calendar(body.get("calendar"), asset, f"{where}.calendar",
                               given.zone if given is not None else None)
    session = given if raw_session is not None else _parse_session(
        None, asset, f"{where}.session", calendar)
    extended = _parse_extended(body.get("extended_hours"), f"{where}.extended_hours", calendar)
    return SymbolEntry(canonical, asset, broker.strip(), spellings, session, shard, calendar, extended)


def mapping_report(symbol_map: SymbolMap, symbols: Iterable[str]) -> list[tuple[str, str]]:
    """What to tell the operator at start: ``(symbol, problem)`` for each rejected entry
    and each configured symbol the mapping does not list (it runs as a US stock)."""
    report = [(sym, f"mapping entry ignored: {problem}; no provider will serve {sym}")
              for sym, problem in symbol_map.rejected.items()]
    where = symbol_map.path or DEFAULT_FILE
    report.extend(
        (sym, f"not in the mapping ({where}): fetched as a US stock spelled {sym} everywhere")
        for sym in symbols if sym not in symbol_map and sym not in symbol_map.rejected
    )
    return report


def load_symbol_map(path: Path | None = None) -> SymbolMap:
    """Read the mapping file (the packaged default when ``path`` is ``None``)."""
    file = path or DEFAULT_FILE
    try:
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(_SETTING, f"cannot read {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_SETTING, f"{file} is not valid TOML: {exc}") from None
    return parse_symbol_map(data, file)
