"""The interface every data source implements.

A source answers two questions: "what are the newest bars of these symbols?"
(called every cycle, batched) and "what bars lie in this time range?" (history,
for bootstrap and gap repair). Sources never store anything; the cycle validates
what they return before it reaches Redis or SQLite.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.rate_budget import RateBudget
from sidecar.timeframe import Timeframe

if TYPE_CHECKING:
    from sidecar.parse_worker import ParseWorker

#: Per-symbol answer of a batched fetch: the bars (oldest first) or why it failed.
LatestResult = dict[str, "list[Bar] | ProviderError"]
#: Requests go out a while after a backfill is planned: stay this far inside a lookback.
LOOKBACK_MARGIN_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much history a source serves: per request, and how far back from now.

    ``None`` means no limit. Backfill asks one request per ``span_ms`` at most and
    never before ``now - lookback_ms`` (Yahoo refuses 1m bars older than 30 days).
    """

    span_ms: int | None = None
    lookback_ms: int | None = None

    def earliest(self, now_ms: int) -> int | None:
        """The oldest open time a request may ask for (an hour inside the limit), or ``None``."""
        if self.lookback_ms is None:
            return None
        return now_ms - self.lookback_ms + LOOKBACK_MARGIN_MS


class Source(abc.ABC):
    """A data source. Subclasses set ``name`` and implement the two fetches."""

    name: str = "?"
    #: True for sources that make data up (``sim``); their bars are marked synthetic.
    synthetic: bool = False
    #: Largest number of symbols one ``fetch_latest`` call should carry.
    max_batch: int = 10_000
    #: The provider's request budget (``None``: free to ask every cycle, e.g. ``sim``).
    budget: RateBudget | None = None
    #: Shortest time between two refreshes of one symbol, whatever the budget allows.
    min_refresh_s: float = 0.0
    #: The parse worker's job kind for this source's latest answers (``None``: parsed here).
    parse_kind: str | None = None
    #: The parse worker its latest answers go to, when the daemon runs one.
    parse_worker: ParseWorker | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open sessions/streams. Called once before the first fetch."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions/streams. Called once at shutdown."""

    def can_serve(self, symbol: str) -> bool:
        """Whether this source knows ``symbol`` (a canonical symbol)."""
        return True

    def breaker_lane(self, symbol: str) -> str | None:
        """Which of this source's circuit breakers guards the requests for ``symbol``.

        ``None`` (the default): one breaker for the whole source. A source whose
        asset classes go through different endpoints or products returns the
        symbol's asset class, so one class failing does not cut off the others.
        """
        return None

    def grid(self, symbol: str, tf: Timeframe) -> Timeframe:
        """The grid of the bars this source returns for ``symbol`` when asked for ``tf``.

        A ``tf`` with a session (:meth:`Timeframe.on_session`) asks for bars on that
        session's grid; a plain one for the source's own stamps (Yahoo's 1h stock bars
        open at :30, Polygon's on the hour).
        """
        return tf

    def series_grid(self, symbol: str, tf: Timeframe) -> Timeframe:
        """The grid the daemon keeps ``symbol``'s ``tf`` series on (the symbol's session)."""
        return tf

    def refresh_interval_s(self, symbols: int) -> float:
        """How often each of ``symbols`` symbols may be refreshed so the budget lasts.

        One refresh costs one budget unit per symbol (a request, or a batch credit).
        """
        pace = self.budget.pace_s(max(1, symbols)) if self.budget is not None else 0.0
        return max(self.min_refresh_s, pace)

    def history_limits(self, tf: Timeframe) -> HistoryLimits:
        """This source's range limits for ``tf`` history (none by default)."""
        return HistoryLimits()

    def peek_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> dict[str, list[Bar]]:
        """Bars that moved since the last refresh, without a request (a live stream).

        Called for the symbols the cycle does not refresh; only symbols with news appear.
        """
        return {}

    @abc.abstractmethod
    async def fetch_latest(
        self, symbols: Sequence[str], tf: Timeframe, now_ms: int
    ) -> LatestResult:
        """Newest bars per symbol, oldest first; the last one may be ``forming``.

        A failure of the whole request raises :class:`ProviderError`; a failure
        of one symbol inside a successful batch is returned as its value.
        """

    @abc.abstractmethod
    async def fetch_history(
        self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int
    ) -> list[Bar]:
        """Closed bars with ``start_ms <= t < end_ms``, oldest first."""

    def status(self) -> dict[str, Any]:
        """Facts for ``/health`` (budget left, stream state ...)."""
        return {}


def series_grid(symbol: str, tf: Timeframe, sources: Sequence[Source]) -> Timeframe:
    """``symbol``'s series grid, as the first real source that serves it maps it."""
    for source in sources:
        if not source.synthetic and source.can_serve(symbol):
            return source.series_grid(symbol, tf)
    return tf
