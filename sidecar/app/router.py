"""Where the cycle's bars come from: each symbol asked of its sources in priority order.

The :class:`Router` yields each request's answer as it arrives. It plans which symbol
is due at which source within the budgets (:mod:`.planner`), skips a symbol whose
market is closed (:meth:`Router.market_hours`: no request, past a short grace after
the close), asks each source in priority order through its circuit breakers (one per
source, or one per asset class: a *lane*), batched by bar grid and lane, and falls
through to the next source within the same cycle for a symbol a source failed or
whose circuit is open. It books each source's health (:class:`SourceState`) and each
symbol's path (``via``, ``expect_ms``, ``market_open``, ``next_open`` on its
:class:`~sidecar.app.symbol_state.SymbolState`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.app.planner import VIA_LAST, VIA_POLL, VIA_STREAM, Planner
from sidecar.app.symbol_state import SymbolState
from sidecar.bar import Bar
from sidecar.breaker import BreakerOpen, SourceBreaker, SourceCircuits
from sidecar.calendars import MarketCalendar, open_ms
from sidecar.errors import ProviderError
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources.base import Source
from sidecar.timeframe import Timeframe

log = logging.getLogger("sidecar.pipeline")

#: After its market closes, a symbol is still asked this long, for its last bar's final values.
CLOSE_GRACE_MS = 60_000
#: An answer is handed to the cycle in slices of at most this many symbols (see ``_ask``).
DELIVER_SYMBOLS = 128

#: Receives one request's bars by symbol, and whether other requests are still in flight.
OnAnswer = Callable[[dict[str, list[Bar]], bool], None]


def pace_over_open_hours(budget: RateBudget | None, calendars: list[MarketCalendar | None]) -> None:
    """Pace a source's daily quota (its ``budget``) over the hours the markets of its
    symbols are open (``calendars``: theirs; one without a calendar trades around the clock)."""
    if budget is None or not calendars or any(cal is None for cal in calendars):
        return
    distinct = list({cal.name: cal for cal in calendars if cal is not None}.values())
    budget.open_hours = lambda a, b: open_ms(distinct, int(a * 1000), int(b * 1000)) / 1000


@dataclass(slots=True)
class SourceState:
    """What ``/health`` says about one source, and what the cycle needs to know of it.

    Which configured symbols the source serves and which breaker guards each of
    them only change with the symbol set, so they are learnt once (:meth:`learn`);
    what a breaker admits is asked once per breaker per cycle, not once per symbol.
    """

    source: Source
    #: Its circuit breakers (one, or one per asset class); ``None``: never guarded (``sim``).
    circuits: SourceCircuits | None = None
    last_success_ms: int | None = None
    last_error_class: str | None = None
    last_error_ms: int | None = None
    errors: int = 0
    requests: int = 0
    #: The configured symbols it can serve.
    servable: frozenset[str] = frozenset()
    #: Each servable symbol's breaker lane (:meth:`Source.breaker_lane`), and all of them.
    lane_of: dict[str, str | None] = field(default_factory=dict)
    lanes: frozenset[str | None] = frozenset()
    #: Each servable symbol's request group (one bar grid, one breaker), and each group's grid.
    group_of: dict[str, int] = field(default_factory=dict)
    group_grid: list[Timeframe] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.name

    def learn(self, grids: dict[str, Timeframe]) -> None:
        """Note which of the symbols (keys of ``grids``: each one's bar grid) the source
        serves, through which breaker, and which can share a request."""
        source = self.source
        self.servable = frozenset(s for s in grids if source.can_serve(s))
        self.lane_of = {s: source.breaker_lane(s) for s in grids if s in self.servable}
        self.lanes = frozenset(self.lane_of.values())
        index: dict[tuple[Timeframe, str | None], int] = {}
        for sym, lane in self.lane_of.items():
            self.group_of[sym] = index.setdefault((grids[sym], lane), len(index))
        self.group_grid = [grid for grid, _ in index]

    def breaker(self, symbol: str) -> SourceBreaker | None:
        """The breaker that guards this source's requests for ``symbol``."""
        if self.circuits is None:
            return None
        lane = self.lane_of[symbol] if symbol in self.lane_of else self.source.breaker_lane(symbol)
        return self.circuits.lane(lane)

    def lane_states(self) -> dict[str | None, str] | None:
        """The state of the breaker of each lane its symbols use; ``None``: all closed (or none)."""
        if self.circuits is None:
            return None
        states = {lane: self.circuits.lane(lane).state for lane in self.lanes}
        return None if all(st == "closed" for st in states.values()) else states

    def candidates(self, pending: list[str]) -> list[str]:
        """Those of ``pending`` it serves and whose circuit admits a call now."""
        servable = self.servable
        if self.lane_states() is None:
            return [s for s in pending if s in servable]
        assert self.circuits is not None
        lanes = self.circuits.lane
        admits = {lane: lanes(lane).allows() for lane in self.lanes}
        lane_of = self.lane_of
        return [s for s in pending if s in servable and admits[lane_of[s]]]

    def one_probe_each(self, symbols: list[str]) -> list[str]:
        """``symbols`` minus all but the first of each breaker that is not closed.

        A circuit that is open past its timeout (or half-open) admits one probe:
        it is spent on one symbol, so probing a failing provider costs one request.
        The others are left for the next source this cycle and stay due here.
        """
        states = self.lane_states()
        if states is None:
            return symbols
        out: list[str] = []
        probing: set[str | None] = set()
        lane_of = self.lane_of
        for sym in symbols:
            lane = lane_of[sym]
            if states[lane] != "closed":
                if lane in probing:
                    continue
                probing.add(lane)
            out.append(sym)
        return out

    @property
    def failing(self) -> bool:
        """Its last call failed (no success since its last error)."""
        return self.last_error_ms is not None and (
            self.last_success_ms is None or self.last_error_ms > self.last_success_ms)

    def reasons(self) -> list[str]:
        """Why it is unhealthy: each breaker that is not closed, else a failed last call."""
        out = [f"source {b.name}: circuit {b.state}, last error {b.status()['last_error_class']}"
               for b in (self.circuits or ()) if b.state != "closed"]
        if not out and self.failing:
            out.append(f"source {self.name}: circuit closed, last error {self.last_error_class}")
        return out

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows of it: its calls, its breakers, and its source's own
        facts (budget left, stream state ...)."""
        info: dict[str, Any] = {
            "circuit": "closed",
            "last_success_ms": self.last_success_ms,
            "last_error_class": self.last_error_class,
            "last_error_ms": self.last_error_ms,
            "errors": self.errors,
            "requests": self.requests,
            "synthetic": self.source.synthetic,
        }
        info.update(self.source.status())
        if self.circuits is not None:
            info["circuit"] = self.circuits.state  # the worst of its breakers
            info["breakers"] = self.circuits.status()
        budget = info.get("budget")
        if isinstance(budget, dict):
            info["budget_left"] = budget.get("remaining_now")
            if "day_limit" in budget:
                info["budget_left_today"] = budget["day_limit"] - budget.get("day_used", 0)
        info["failing"] = self.failing
        return info


class Router:
    """Yields the newest bars of the symbols due this cycle from their sources."""

    def __init__(
        self,
        sources: list[Source],
        circuits: dict[str, SourceCircuits],
        symbols: dict[str, SymbolState],
        grids: dict[str, Timeframe],
        hours: dict[str, MarketCalendar],
        *,
        tf: Timeframe,
        fetch_timeout_s: float,
    ) -> None:
        """``symbols``: the cycle's symbol states (the router books each one's path);
        ``grids``: each symbol's bar grid, which its sources are asked for; ``hours``:
        the calendar of the hours each symbol is asked in (its extended hours where
        included, else its regular ones; none: always); daily budgets are paced over them."""
        self.sources = [SourceState(s, circuits.get(s.name)) for s in sources]
        for state in self.sources:
            state.learn(grids)
            pace_over_open_hours(state.source.budget, [hours.get(sym) for sym in state.servable])
        self.symbols = symbols
        self.hours = hours
        self.tf = tf
        self.fetch_timeout_s = fetch_timeout_s
        self.planner = Planner()
        #: Symbols not asked this cycle: their market is closed (past the close's grace).
        self.closed: frozenset[str] = frozenset()
        #: The clock's reading at the previous cycle (markets open since then are asked).
        self._prev_now_ms: int | None = None

    def status(self) -> dict[str, dict[str, Any]]:
        """Each source's status (:meth:`SourceState.status`), by name."""
        return {state.name: state.status() for state in self.sources}

    def reasons(self) -> list[str]:
        """Why the sources are unhealthy, if they are (:meth:`SourceState.reasons`)."""
        return [reason for state in self.sources for reason in state.reasons()]

    async def fetch(
        self, now_ms: int, on_answer: Callable[[dict[str, list[Bar]], bool], None] | None = None,
    ) -> dict[str, list[Bar]]:
        """Newest bars per symbol, as planned within the budgets (see :mod:`.planner`).

        Each source in priority order is asked for the symbols due at it; the ones
        it holds but that are not due come from its stream or stay on their last
        bar. A symbol whose source fails this cycle is asked of the next source in
        priority order, within the same cycle; so is a symbol whose circuit at a
        source is open (each source has one breaker, or one per asset class).

        ``on_answer`` gets each request's bars (and the stream's) as soon as they
        are in, and whether other requests of this source are still in flight; all
        are returned too.
        """
        closed = self.closed
        pending = [s for s in self.symbols if s not in closed] if closed else list(self.symbols)
        out: dict[str, list[Bar]] = {}

        def deliver(answers: dict[str, list[Bar]], more: bool) -> None:
            if answers:
                out.update(answers)
                if on_answer is not None:
                    on_answer(answers, more)

        for st in self.symbols.values():
            st.via = VIA_LAST  # unless a source serves it below
        for state in self.sources:
            if not pending:
                break
            source = state.source
            mine = state.candidates(pending)
            if not mine:
                continue
            interval = self.planner.interval_ms(source, self._servable_counter(state), now_ms)
            plan = self.planner.plan(source, mine, now_ms)
            streamed = source.peek_latest(plan.idle, self.tf, now_ms)
            for sym in plan.idle:
                st = self.symbols[sym]
                st.expect_ms = interval
                if sym in streamed:
                    st.via = VIA_STREAM
            ask = state.one_probe_each(plan.ask)
            deliver(streamed, bool(ask))
            if ask:
                await self._ask(state, ask, now_ms, interval, deliver)
            served = set(out)
            served.update(plan.idle)
            pending = [s for s in pending if s not in served]
        return out

    def _servable_counter(self, state: SourceState) -> Callable[[], int]:
        """Counts the symbols ``state`` serves whose market is open: the budget is theirs."""
        closed = self.closed
        return lambda: len(state.servable) - sum(1 for s in closed if s in state.servable)

    def market_hours(self, now_ms: int) -> None:
        """Note which markets are open now (one calendar query per calendar, not per symbol).

        A symbol is asked while its market is open, for :data:`CLOSE_GRACE_MS` after it
        closes, and once more if its market was open at any time since the previous
        cycle (a clock that moves many minutes per cycle, as a fast replay's does).
        """
        if not self.hours:
            return
        prev = self._prev_now_ms
        self._prev_now_ms = now_ms
        since = now_ms - CLOSE_GRACE_MS if prev is None else min(prev, now_ms - CLOSE_GRACE_MS)
        by_calendar: dict[str, tuple[bool, bool, int | None]] = {}
        closed: list[str] = []
        states = self.symbols
        for sym, cal in self.hours.items():
            known = by_calendar.get(cal.name)
            if known is None:
                is_open = cal.is_open(now_ms)
                opened = cal.next_open(since)
                asked = is_open or cal.is_open(since) or (opened is not None and opened < now_ms)
                known = by_calendar[cal.name] = (is_open, asked, None if is_open else cal.next_open(now_ms))
            st = states[sym]
            st.market_open, st.next_open = known[0], known[2]
            if not known[1]:
                closed.append(sym)
        self.closed = frozenset(closed)

    async def _ask(
        self, state: SourceState, symbols: list[str], now_ms: int, interval: int,
        deliver: Callable[[dict[str, list[Bar]], bool], None],
    ) -> None:
        """Ask ``state``'s source for ``symbols`` (batched by grid and breaker, all
        requests at once) and hand each request's bars to ``deliver`` as it completes."""
        source = state.source
        batch = source.max_batch
        # One request asks for one bar grid and goes through one breaker (asset class).
        groups: dict[int, list[str]] = {}
        group_of = state.group_of
        for sym in symbols:
            groups.setdefault(group_of[sym], []).append(sym)
        chunks = [(state.group_grid[g], group[i:i + batch]) for g, group in groups.items()
                  for i in range(0, len(group), batch)]
        state.requests += len(chunks)

        async def call(grid: Timeframe, chunk: list[str]) -> tuple[list[str], Any]:
            breaker = state.breaker(chunk[0])
            try:
                if breaker is None:
                    fetch = source.fetch_latest(chunk, grid, now_ms)
                else:
                    fetch = breaker.call(lambda: source.fetch_latest(chunk, grid, now_ms))
                return chunk, await asyncio.wait_for(fetch, self.fetch_timeout_s)
            except Exception as exc:  # every failure is the chunk's answer
                return chunk, exc

        tasks = [asyncio.ensure_future(call(grid, chunk)) for grid, chunk in chunks]
        try:
            for taken, next_done in enumerate(asyncio.as_completed(tasks), 1):
                chunk, result = await next_done
                answers = list(self._answered(state, chunk, result, now_ms, interval).items())
                # Handed on in slices, each followed by a turn of the event loop: the write
                # just spawned goes out, and Redis works on it while the next slice (or the
                # next answer, when answers came in together) is taken.
                for lo in range(0, max(1, len(answers)), DELIVER_SYMBOLS):
                    hi = lo + DELIVER_SYMBOLS
                    deliver(dict(answers[lo:hi]), taken < len(tasks) or hi < len(answers))
                    await asyncio.sleep(0)
        finally:
            for task in tasks:
                task.cancel()  # only if this cycle is cancelled: no request outlives it

    def _answered(
        self, state: SourceState, chunk: list[str], result: Any, now_ms: int, interval: int,
    ) -> dict[str, list[Bar]]:
        """Book one request's outcome (source health, planner, each symbol's path);
        returns the bars of the symbols it served."""
        source = state.source
        if isinstance(result, BreakerOpen):
            state.requests -= 1  # refused before anything was sent; the symbols stay due
            return {}
        answers: dict[str, Any]
        if isinstance(result, BaseException):
            self._source_failed(state, result, now_ms)
            answers = dict.fromkeys(chunk, result) if isinstance(result, ProviderError) else {}
        else:
            answers = result
            failures = [r for r in answers.values() if isinstance(r, ProviderError)]
            if len(failures) < len(answers):
                state.last_success_ms = now_ms
            for failure in failures[:1]:
                self._source_failed(state, failure, now_ms)
        served: dict[str, list[Bar]] = {}
        asked, states = self.planner.asked, self.symbols
        for sym in chunk:
            answer = answers.get(sym)
            if isinstance(answer, list):
                asked(source, sym, True, now_ms, interval)
                served[sym] = answer
                st = states[sym]
                st.via, st.expect_ms = VIA_POLL, interval
                continue
            if isinstance(answer, BreakerOpen):
                continue  # refused by its circuit: nothing was sent, it stays due
            wait = interval
            if isinstance(answer, BudgetExhausted) and answer.retry_after is not None:
                wait = min(interval, int(answer.retry_after * 1000))  # nothing was sent
            asked(source, sym, False, now_ms, wait)
        return served

    def _source_failed(self, state: SourceState, exc: BaseException, now_ms: int) -> None:
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        if isinstance(exc, ProviderError):
            error_class: str = exc.error_class
        elif isinstance(exc, TimeoutError):
            error_class = "unavailable"
        else:
            error_class = "bad_response"
            log.exception("source raised an unexpected error", exc_info=exc,
                          extra={"source": state.name})
        if state.last_error_class != error_class:
            log.warning("source error", extra={"source": state.name, "error_class": error_class,
                                               "error": str(exc)[:200]})
        state.errors += 1
        state.last_error_class = error_class
        state.last_error_ms = now_ms
