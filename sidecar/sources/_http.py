"""Plumbing shared by the HTTP sources (Alpha Vantage, Twelve Data, Polygon).

Owns the session lifecycle, the symbol mapping lookup, the rate budget and the
reaction to provider rate limits (back off for ``Retry-After`` or the cooldown).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from sidecar.errors import ProviderError
from sidecar.http_session import HttpReply, create_session, http_get, redact
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources.base import LatestResult, Source
from sidecar.symbols import ProviderSymbol, SymbolMap

log = logging.getLogger("sidecar.sources")


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


class HttpSource(Source):
    """Base of the HTTP sources; subclasses implement the two fetches."""

    def __init__(
        self,
        provider: ProviderSettings,
        symbols: SymbolMap,
        budget: RateBudget,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.provider = provider
        self.symbols = symbols
        self.budget = budget
        self._session = session
        self._owns_session = session is None
        self._requests = 0
        self._last_error: str | None = None

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

    def spelling(self, symbol: str) -> ProviderSymbol | None:
        """This provider's spelling of ``symbol``, or ``None`` if it cannot serve it."""
        return self.symbols.for_source(self.name, symbol)

    def can_serve(self, symbol: str) -> bool:
        return self.spelling(symbol) is not None

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

    def _note_error(self, err: ProviderError) -> ProviderError:
        """Record ``err`` and back off the budget on a provider rate limit.

        The message is redacted in place: a provider that echoes the request (URL,
        headers) into its error body must not carry our key into logs or ``fetch`` output.
        """
        err.source = err.source or self.name
        err.args = (redact(str(err), self.provider.secrets()),)
        self._last_error = str(err)[:300]
        if err.error_class == "rate_limited":
            self.budget.back_off(
                err.retry_after if err.retry_after is not None else self.provider.cooldown_429_s
            )
        return err

    def status(self) -> dict[str, Any]:
        return {"budget": self.budget.status(), "requests": self._requests,
                "last_error": self._last_error}
