"""Which symbol is refreshed from which source this second, within the budgets.

Every source has a refresh interval per symbol (:meth:`Source.refresh_interval_s`):
the pace its rate budget sustains for the symbols it can serve, its daily quota
spread over the open hours left in the day (Alpha Vantage's 25/day for five US stocks: one
refresh per symbol every ~78 min over the 6.5 h session; Yahoo's self-imposed budget: every few seconds).
A symbol is *due* at a source when that interval has passed since the source was
last asked for it. In priority order, each source is asked for its due symbols;
a symbol it holds (answered last) but that is not due is served without a request:
from the source's stream when it has news (:meth:`Source.peek_latest`), else from
its last bar, whose age the features carry. A symbol a source failed for falls
through to the next source in the same cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.sources.base import Source

#: How the newest bar of a symbol was obtained this cycle.
VIA_POLL, VIA_STREAM, VIA_LAST = "poll", "stream", "last"


@dataclass(slots=True)
class SourcePlan:
    """What one source is to do this cycle."""

    ask: list[str] = field(default_factory=list)  # refresh with a request
    idle: list[str] = field(default_factory=list)  # held by it, not due: stream or last bar


class Planner:
    """Per source and symbol: when it is next due; per symbol: which source holds it."""

    __slots__ = ("_due", "_holder", "_interval_at", "_interval_ms")

    def __init__(self) -> None:
        #: Per source name, per symbol: when it is next due (epoch ms). Nested rather than
        #: keyed by (source, symbol): no tuple to build and hash per symbol per cycle.
        self._due: dict[str, dict[str, int]] = {}
        self._holder: dict[str, str] = {}
        self._interval_ms: dict[str, int] = {}
        self._interval_at: dict[str, int] = {}

    def interval_ms(self, source: Source, servable: Callable[[], int], now_ms: int) -> int:
        """The source's refresh interval per symbol (recomputed at most once a second).

        ``servable()`` counts the configured symbols the source can serve.
        """
        if self._interval_at.get(source.name) != now_ms // 1000:
            self._interval_at[source.name] = now_ms // 1000
            pace = source.refresh_interval_s(servable())
            self._interval_ms[source.name] = 2**62 if pace == float("inf") else int(pace * 1000)
        return self._interval_ms[source.name]

    def plan(self, source: Source, candidates: list[str], now_ms: int) -> SourcePlan:
        """Split the symbols ``source`` can serve into those to ask and those it holds."""
        out = SourcePlan()
        name = source.name
        interval = self._interval_ms.get(name, 0)
        due_of = self._due.get(name, {}).get
        holder_of = self._holder.get
        ask, idle = out.ask.append, out.idle.append
        # Due more than an interval ahead: the wall clock stepped back since the last
        # request; waiting for it to catch up would stall the symbol.
        latest = now_ms + interval
        for sym in candidates:
            due = due_of(sym, 0)
            if due <= now_ms or due > latest:
                ask(sym)
            elif holder_of(sym) == name:
                idle(sym)
        return out

    def asked(self, source: Source, symbol: str, ok: bool, now_ms: int, interval_ms: int) -> None:
        """Record a request's outcome: the symbol is next due one interval later."""
        due = self._due.get(source.name)
        if due is None:
            due = self._due[source.name] = {}
        due[symbol] = now_ms + interval_ms
        if ok:
            self._holder[symbol] = source.name
        elif self._holder.get(symbol) == source.name:
            del self._holder[symbol]

    def holder(self, symbol: str) -> str | None:
        """The source whose answer the symbol's newest bar came from."""
        return self._holder.get(symbol)

    def next_due_ms(self, source: Source, symbol: str) -> int | None:
        return self._due.get(source.name, {}).get(symbol)
