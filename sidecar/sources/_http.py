"""Plumbing shared by the provider sources (Yahoo, Alpha Vantage, Twelve Data, Polygon).

:class:`ProviderSource` owns what every provider does the same way: the symbol
mapping lookup, taking a request from the rate budget, reacting to a provider
rate limit (back off for ``Retry-After`` or the cooldown; a spent daily quota
waits for the reset), recording the last error without secrets, and ``/health``
facts. :class:`HttpSource` adds the one shared aiohttp session, the GET that
parses its answer and ``build``: a keyed HTTP provider is its URLs, its budget
(:meth:`HttpSource.make_budget`), its two fetches and its parser (the row loop
:func:`~sidecar.sources._parsing.rows_to_bars`, the error table
:class:`~sidecar.sources.errors.ErrorTable`). :class:`Providers` is what every
``build`` is given: the provider settings and the symbol map, read once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar

import aiohttp

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.http_session import HttpReply, create_session, http_get, redact
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources.base import LatestResult, Source
from sidecar.symbols import ProviderSymbol, SymbolMap, load_symbol_map
from sidecar.timeframe import Timeframe

if TYPE_CHECKING:
    from sidecar.settings import Settings

log = logging.getLogger("sidecar.sources")
T = TypeVar("T")
#: Bar grids remembered per (symbol, timeframe), as the symbol map's spellings are.
MAX_REMEMBERED_GRIDS = 100_000


def settle(out: LatestResult) -> LatestResult:
    """Raise when every symbol failed the same way a whole request fails.

    Per-symbol errors stay values, but if no symbol got bars and at least one
    failure came from the provider (not a local budget refusal) and counts as a
    failure, the first such error is raised so the circuit breaker sees it.
    """
    if any(not isinstance(v, ProviderError) for v in out.values()):
        return out
    for value in out.values():
        if (isinstance(value, ProviderError) and not isinstance(value, BudgetExhausted)
                and value.counts_as_failure):
            raise value
    return out


def closed_between(bars: list[Bar], start_ms: int, end_ms: int) -> list[Bar]:
    """The closed bars with ``start_ms <= t < end_ms`` (what ``fetch_history`` returns)."""
    return [b for b in bars if start_ms <= b.t < end_ms and not b.forming]


@dataclass(frozen=True, slots=True)
class Providers:
    """The provider settings and the symbol map, read once for all the sources.

    ``env`` is the environment they were read from: a source with settings per
    instance (``ccxt:<id>``'s ``SIDECAR_CCXT_*_<ID>``) reads those from it.
    """

    settings: ProviderSettings
    symbols: SymbolMap
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Providers:
        """Read the provider variables and the mapping file; ConfigError naming a bad one."""
        env = os.environ if env is None else env
        settings = ProviderSettings.from_env(env)
        return cls(settings, load_symbol_map(settings.symbols_file), env)


class ProviderSource(Source):
    """Base of the real providers; subclasses implement the two fetches."""

    budget: RateBudget
    #: True for providers that stamp intraday bars on the symbol's session grid (Yahoo,
    #: Twelve Data); the others stamp the clock's and fold into a session when asked.
    stamps_sessions: bool = False
    #: True for providers whose asset classes fail apart (other endpoints, other
    #: products): one circuit breaker per asset class instead of one per source.
    breaker_per_asset_class: bool = False

    def __init__(self, provider: ProviderSettings, symbols: SymbolMap, budget: RateBudget) -> None:
        self.provider = provider
        self.symbols = symbols
        self.budget = budget
        self._requests = 0
        self._last_error: str | None = None
        self._grids: dict[tuple[str, Timeframe], Timeframe] = {}

    def spelling(self, symbol: str) -> ProviderSymbol | None:
        """This provider's spelling of ``symbol``, or ``None`` if it cannot serve it."""
        return self.symbols.for_source(self.name, symbol)

    def require(self, symbol: str) -> ProviderSymbol:
        """This provider's spelling of ``symbol``; ``unknown_symbol`` if it cannot serve it."""
        spelling = self.spelling(symbol)
        if spelling is None:
            raise ProviderError("unknown_symbol", f"{symbol} is not served by {self.name}",
                                source=self.name)
        return spelling

    def can_serve(self, symbol: str) -> bool:
        return self.spelling(symbol) is not None

    def breaker_lane(self, symbol: str) -> str | None:
        spelling = self.spelling(symbol) if self.breaker_per_asset_class else None
        return None if spelling is None else spelling.asset_class

    def grid(self, symbol: str, tf: Timeframe) -> Timeframe:
        # Asked for every symbol of every request, every cycle: worked out once each.
        key = (symbol, tf)
        grid = self._grids.get(key)
        if grid is None:
            grid = self.series_grid(symbol, tf) if self.stamps_sessions else tf
            if len(self._grids) < MAX_REMEMBERED_GRIDS:
                self._grids[key] = grid
        return grid

    def series_grid(self, symbol: str, tf: Timeframe) -> Timeframe:
        return self.symbols.grid(symbol, tf, self.spelling(symbol))

    def take_budget(self, cost: int = 1) -> None:
        """Take ``cost`` from the budget or raise :class:`BudgetExhausted` (nothing is sent)."""
        if not self.budget.try_acquire(cost):
            raise self.budget.exhausted()

    def note_error(self, err: ProviderError, *, daily: bool = False,
                   retry_after: float | None = None) -> ProviderError:
        """Record ``err`` and back off on a provider rate limit.

        ``daily``: the provider said its daily quota is spent (refuse until the reset).
        ``retry_after``: the answer's ``Retry-After``, when the error does not carry one.
        The message is redacted in place: a provider that echoes the request (URL,
        headers) into its error body must not carry our key into logs or ``fetch`` output.
        """
        err.source = err.source or self.name
        if err.retry_after is None:
            err.retry_after = retry_after
        err.args = (redact(str(err), self.provider.secrets()),)
        self._last_error = str(err)[:300]
        if err.error_class == "rate_limited":
            if daily:
                self.budget.exhaust_day()
            self.budget.back_off(
                err.retry_after if err.retry_after is not None else self.provider.cooldown_429_s
            )
        return err

    async def latest_each(self, symbols: Sequence[str],
                          fetch: Callable[[str], Awaitable[list[Bar]]]) -> LatestResult:
        """``fetch_latest`` for one-symbol requests: the newest three bars or the error, each."""
        out: LatestResult = {}
        for symbol in symbols:
            try:
                out[symbol] = (await fetch(symbol))[-3:]
            except ProviderError as err:
                out[symbol] = err
        return settle(out)

    def status(self) -> dict[str, Any]:
        return {"budget": self.budget.status(), "requests": self._requests,
                "last_error": self._last_error}


class HttpSource(ProviderSource):
    """A provider reached through the shared aiohttp session; its key is ``{name}_api_key``
    (the variable ``{NAME}_API_KEY``)."""

    def __init__(
        self,
        provider: ProviderSettings,
        symbols: SymbolMap,
        budget: RateBudget,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(provider, symbols, budget)
        key = getattr(provider, f"{self.name}_api_key", None)
        assert key, f"{self.name} needs its API key"
        self._key: str = key
        self._session = session
        self._owns_session = session is None

    @classmethod
    def make_budget(cls, provider: ProviderSettings) -> RateBudget:
        """This provider's request budget, from its settings."""
        raise NotImplementedError

    @classmethod
    def build(cls, settings: Settings, providers: Providers) -> Self:
        """The source; :class:`SourceDisabled` when its API key is missing."""
        from sidecar.sources import SourceDisabled

        if not getattr(providers.settings, f"{cls.name}_api_key", None):
            raise SourceDisabled(f"{cls.name}: {cls.name.upper()}_API_KEY missing")
        return cls(providers.settings, providers.symbols, cls.make_budget(providers.settings))

    async def start(self) -> None:
        self._get_session()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = create_session(self.provider)
            self._owns_session = True
        return self._session

    async def _get(
        self, url: str, params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpReply:
        """One GET (the caller has already taken it from the budget)."""
        self._requests += 1
        reply = await http_get(
            self._get_session(), url, source=self.name, params=params, headers=headers,
            secrets=self.provider.secrets(),
        )
        log.debug("%s GET %s -> %d", self.name, reply.url, reply.status)
        return reply

    async def _get_parsed(
        self, url: str, parse: Callable[[HttpReply], T], *,
        params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
        daily: Callable[[ProviderError], bool] = lambda err: False,
    ) -> T:
        """One GET whose answer ``parse`` turns into a result; its errors are noted.

        ``daily(err)`` tells whether a rate limit means the day's quota is spent.
        """
        reply = await self._get(url, params=params, headers=headers)
        with self.noting(reply, daily=daily):
            return parse(reply)

    @contextmanager
    def noting(self, reply: HttpReply,
               daily: Callable[[ProviderError], bool] = lambda err: False) -> Iterator[None]:
        """Note a :class:`ProviderError` raised while turning ``reply`` into a result."""
        try:
            yield
        except ProviderError as err:
            raise self.note_error(err, daily=daily(err), retry_after=reply.retry_after) from None
