"""The 1-second cycle: it only orchestrates its stages.

router -> validation -> series -> writer. Each answered request is taken as it arrives
(:meth:`Pipeline._take`, a slice of its symbols at a time) while the other requests
are in flight: the :class:`~sidecar.app.router.Router` yields it, the :class:`~sidecar.validation.Validator`
checks its bars, each symbol's :class:`~sidecar.app.symbol_state.SymbolState` applies
them to its series (forming-bar revision, close, correction, fold into the higher
timeframes), its features are packed and the :class:`~sidecar.app.writer.RedisWriter`
sends its write (not awaited), its bars buffered for SQLite. The symbols no answer
covered get their features last; the writer's final write adds the heartbeat and
announces the cycle once everything is stored. After the cycle, SQLite is flushed in
the background and the :class:`~sidecar.app.history.History` starts the rebuilds the
cycle asked for (it also runs the start-up warm-up).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from sidecar import foreground, gc_tuning
from sidecar.app.history import History, WarmupProgress
from sidecar.app.planner import Planner
from sidecar.app.router import Router, SourceState
from sidecar.app.symbol_state import SeriesStage, SymbolState
from sidecar.app.tasks import Background
from sidecar.app.writer import CycleWrites, RedisState, RedisWriter
from sidecar.bar import Bar
from sidecar.breaker import SourceCircuits
from sidecar.calendars import MarketCalendar, extended_calendar, get_calendar
from sidecar.clock import Clock, as_clock
from sidecar.completeness import Completeness
from sidecar.features import FeatureEngine
from sidecar.redis_store import RedisStore
from sidecar.series import Grid, Series, reach_of
from sidecar.settings import Settings
from sidecar.sources.base import Source, series_grid
from sidecar.sqlite_store import BarStore
from sidecar.symbols import SymbolMap, load_symbol_map
from sidecar.timeframe import Timeframe
from sidecar.validation import GAP_LOG_LINES, Validator, Verdict

log = logging.getLogger("sidecar.pipeline")

#: Cycle durations shown for the status page's sparkline.
SPARKLINE_CYCLES = 120
#: Upper bounds (ms) of the cycle-duration histogram buckets (``/metrics``).
CYCLE_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000)


@dataclass(slots=True)
class CycleStats:
    """What the cycles did: how many, how long, how many bars (``/health``, ``/metrics``)."""

    cycles: int = 0
    last_tick_ms: int = 0
    #: Wall-clock time (epoch ms) the last cycle started: on a replay clock, whether
    #: the daemon still collects is judged by it.
    last_wall_ms: int = 0
    last_duration_ms: float = 0.0
    durations_ms: deque[float] = field(default_factory=lambda: deque(maxlen=300))
    bars_accepted: int = 0
    first_cycle_done: bool = False
    #: Cumulative histogram of cycle durations: count per bucket of CYCLE_BUCKETS_MS (+Inf last).
    duration_buckets: list[int] = field(default_factory=lambda: [0] * (len(CYCLE_BUCKETS_MS) + 1))
    duration_sum_ms: float = 0.0
    #: The writer's view of Redis (:class:`~sidecar.app.writer.RedisState`), shared.
    redis: RedisState = field(default_factory=RedisState)

    @property
    def redis_ok(self) -> bool:
        """The last Redis write succeeded."""
        return self.redis.ok

    @property
    def redis_down_since(self) -> float | None:
        """When the Redis writes started failing (``time.monotonic``)."""
        return self.redis.down_since

    @property
    def redis_last_error(self) -> str | None:
        return self.redis.last_error

    @property
    def bars_stored(self) -> int:
        """Bars Redis acknowledged."""
        return self.redis.bars_stored

    def status(self) -> dict[str, Any]:
        """How many cycles ran, the last one's tick and duration, the recent durations'
        median and p99 (``/health``'s ``cycle``)."""
        durations = list(self.durations_ms)
        ordered = sorted(durations)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
        return {
            "count": self.cycles,
            "last_tick_ms": self.last_tick_ms,
            "last_ms": round(self.last_duration_ms, 3),
            "window_cycles": len(durations),
            "p50_ms": None if not durations else round(statistics.median(durations), 3),
            "p99_ms": None if p99 is None else round(p99, 3),
            "recent_ms": [round(d, 3) for d in durations[-SPARKLINE_CYCLES:]],
        }

    def record_duration(self, ms: float) -> None:
        self.last_duration_ms = ms
        self.durations_ms.append(ms)
        self.duration_sum_ms += ms
        i = 0
        while i < len(CYCLE_BUCKETS_MS) and ms > CYCLE_BUCKETS_MS[i]:
            i += 1
        self.duration_buckets[i] += 1


@dataclass(slots=True)
class _Cycle:
    """One cycle in progress: what its answers covered, and its writes."""

    #: Symbols with an answer this cycle (polled or streamed): the announcement's ``updated``.
    updated: list[str] = field(default_factory=list)
    features: int = 0  # feature maps computed by the answers' writes
    writes: CycleWrites = field(default_factory=CycleWrites)


class Pipeline:
    """Owns the per-symbol state and the stages, and runs one cycle per tick."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        redis_store: RedisStore,
        bar_store: BarStore,
        circuits: dict[str, SourceCircuits] | None = None,
        *,
        clock: Clock | Callable[[], float] = time.time,
        symbol_map: SymbolMap | None = None,
    ) -> None:
        """``clock``: the daemon's time (a callable returning epoch seconds is a wall
        clock; tests drive one); ``symbol_map`` names each symbol's calendar (the
        packaged mapping if not given)."""
        self.settings = settings
        self.clock = as_clock(clock)
        #: No answer for this long (on the daemon's clock) makes a symbol stale.
        self.stale_after_ms = int(settings.stale_after_ms * self.clock.speed)
        self.tf = settings.timeframe
        self.redis = redis_store
        self.store = bar_store
        #: Each symbol's bar grid (US stocks' 1h bars open at :30); sources are asked for it.
        self.grids = {sym: series_grid(sym, self.tf, sources) for sym in settings.symbols}
        #: Each symbol's trading calendar, for symbols a real source serves (simulated
        #: series trade around the clock) while ``settings.market_hours`` is on.
        self.calendars: dict[str, MarketCalendar] = {}
        #: The extended-hours calendar of each of those symbols that include them (symbols.toml).
        self.extended: dict[str, MarketCalendar] = {}
        #: The asset class of each symbol with a calendar (``/health`` sums the choices by it).
        self.asset_classes: dict[str, str] = {}
        if settings.market_hours:
            smap = symbol_map if symbol_map is not None else load_symbol_map()
            for sym in settings.symbols:
                if any(not src.synthetic and src.can_serve(sym) for src in sources):
                    self.calendars[sym] = get_calendar(smap.calendar(sym))
                    self.asset_classes[sym] = smap.entry(sym).asset_class
                    if smap.extended_hours(sym):
                        self.extended[sym] = extended_calendar(smap.calendar(sym))
        self.validator = Validator(
            self.tf,
            skew_ms=settings.clock_skew_ms,
            outlier_k=settings.outlier_k,
            outlier_window=settings.outlier_window,
            correction_window_bars=settings.correction_window_bars,
            fill_gaps=settings.fill_gaps,
            grids=self.grids,
            calendars=self.calendars,
            extended=self.extended,
        )
        #: Every timeframe kept, lowest (the base the sources are asked for) first.
        self.timeframes: tuple[Timeframe, ...] = settings.series_timeframes
        # Each symbol's base forming bar is re-buffered each cycle: not a reason to flush
        # early (a higher timeframe's forming bar is not stored).
        bar_store.series_rows = len(settings.symbols)
        #: Each symbol's grid per higher timeframe (its calendar's sessions, see :class:`Grid`).
        self.higher_grids: dict[str, list[Grid]] = {
            sym: [Grid(tf, self.calendars.get(sym), series_grid(sym, tf, sources),
                       regular_only=sym in self.extended)
                  for tf in self.timeframes[1:]]
            for sym in settings.symbols
        }
        self.symbols: dict[str, SymbolState] = {
            sym: SymbolState(self._series(sym)) for sym in settings.symbols
        }
        #: Expected bars received per symbol with a calendar and timeframe (:mod:`sidecar.completeness`).
        self.completeness = Completeness(self.calendars, self.timeframes, int(self.clock() * 1000),
                                         speed=self.clock.speed)
        self.series = SeriesStage(self.symbols, self.tf, self.calendars, self.extended, self.completeness,
                                  stale_after_ms=self.stale_after_ms,
                                  features_ttl_ms=redis_store.features_ttl_ms)
        self.background = Background()
        self._flush_task: asyncio.Task[Any] | None = None
        self._pid = os.getpid()
        #: A shard says which shard it is and which symbols it owns (docs/operations.md, "Shards").
        self._shard_info: dict[str, Any] = {} if settings.shard is None else {
            "shard": settings.shard, "shards": settings.shards, "owned": list(settings.symbols)}
        self.meta: dict[str, Any] = {"tf": self.tf.name, "tfs": [tf.name for tf in self.timeframes],
                                     "symbols": list(settings.symbols),
                                     "pid": self._pid, "http_port": settings.http_port,
                                     **self._shard_info,
                                     "started_at": int(time.time() * 1000)}
        # The stages.
        #: When each symbol is polled: its extended hours where included, else its regular ones.
        self.router = Router(sources, circuits or {}, self.symbols, self.grids,
                             {**self.calendars, **self.extended},
                             tf=self.tf, fetch_timeout_s=settings.fetch_timeout_s)
        self.writer = RedisWriter(redis_store, bar_store, self.meta, self.background.spawn,
                                  symbols=list(self.symbols), timeframes=[tf.name for tf in self.timeframes],
                                  bars_cap=settings.bars_cap)
        self.history = History(settings, self.clock, self.symbols, self.grids, self.timeframes,
                               self._engine, self.validator, redis_store, bar_store, self.writer,
                               self.background, self.completeness)
        self.stats = CycleStats(redis=self.writer.state)

    @property
    def sources(self) -> list[SourceState]:
        """Each source's state, in priority order (the router's)."""
        return self.router.sources

    @property
    def planner(self) -> Planner:
        """Which symbol is refreshed from which source (the router's)."""
        return self.router.planner

    @property
    def warmup(self) -> WarmupProgress:
        """How far start-up warm-up got (the history's)."""
        return self.history.progress

    @property
    def warm_pool(self) -> Executor | None:
        """Where warm-up compares the stores (a second process at many symbols, else a thread)."""
        return self.history.warm_pool

    @warm_pool.setter
    def warm_pool(self, pool: Executor | None) -> None:
        self.history.warm_pool = pool

    def _engine(self, symbol: str, tf: Timeframe | None = None) -> FeatureEngine:
        """A fresh feature engine (on the base timeframe unless ``tf``); VWAP anchored at
        SIDECAR_SESSION_ANCHOR if set, else at the symbol's own session open (its
        calendar), else at 00:00 UTC."""
        anchor = self.settings.session_anchor_min
        calendar = self.extended.get(symbol) or self.calendars.get(symbol)
        sessions = calendar.session_bounds if anchor is None and calendar is not None else None
        return FeatureEngine(symbol, (tf or self.tf).name, self.settings.periods, anchor or 0, sessions)

    def _series(self, symbol: str) -> list[Series]:
        """The symbol's series, base first, each higher one linked as the next one's ``up``."""
        window, base_ms = self.settings.correction_window_bars, self.tf.ms
        out = [Series(symbol, self.tf, self._engine(symbol), reach=reach_of(window, base_ms, base_ms))]
        for tf, grid in zip(self.timeframes[1:], self.higher_grids[symbol], strict=True):
            out.append(Series(symbol, tf, self._engine(symbol, tf), grid, base_ms,
                              reach=reach_of(window, base_ms, tf.ms)))
        for lower, upper in itertools.pairwise(out[1:]):
            lower.up = upper
        return out

    # -- start-up and background work (the history and the writer do it) ----------------
    async def write_meta(self) -> None:
        """Write the meta key; its absence later tells that Redis lost its data."""
        await self.writer.write_meta()

    async def warm(self, now_ms: int) -> None:
        """Open every symbol's feature handles on stored history, before the first cycle."""
        await self.history.warm(now_ms)

    async def begin_warmup(self, now_ms: int) -> list[str]:
        """Put every symbol in warm-up; returns those with nothing stored (cold)
        (:meth:`History.begin_warmup`)."""
        return await self.history.begin_warmup(now_ms)

    async def warm_symbol(self, symbol: str) -> int:
        """:meth:`warm_symbols` for one symbol."""
        return await self.history.warm_symbols([symbol])

    async def warm_symbols(self, symbols: list[str]) -> int:
        """Reconcile the stores of ``symbols`` and open their handles on the warm window
        (:meth:`History.warm_symbols`)."""
        return await self.history.warm_symbols(symbols)

    def open_fetched(self, symbol: str, bars: list[Bar]) -> int:
        """Open the handles of a cold symbol on the history just fetched for it
        (:meth:`History.open_fetched`)."""
        return self.history.open_fetched(symbol, bars)

    async def fold_history(self, symbol: str, start_ms: int, end_ms: int) -> int:
        """Fold base history older than warm-up saw into the higher timeframes
        (:meth:`History.fold_history`)."""
        return await self.history.fold_history(symbol, start_ms, end_ms)

    def warm_up_failed(self, symbol: str) -> None:
        """A symbol's warm-up failed: the cycles' rebuild opens its handles from the stores."""
        self.history.warm_up_failed(symbol)

    def history_changed(self, symbol: str, times: Iterable[int] = ()) -> None:
        """Older closed bars of ``symbol`` changed in the stores (gap repair, the base
        bars opening at ``times``): see :meth:`History.history_changed`."""
        self.history.history_changed(symbol, times)

    @property
    def warming(self) -> int:
        """Symbols whose handles are not yet open on the warm window."""
        return self.history.warming

    def redis_replaced(self) -> None:
        """Redis came back as another server (restarted, maybe from an older snapshot):
        the bars it lacks are put back from SQLite (only what differs, see
        :func:`~sidecar.app.reconcile.reconcile`)."""
        self.writer.replaced()

    def redis_lacks_history(self) -> None:
        """History went to SQLite but not to Redis: Redis is refilled from SQLite
        (only what differs) once it answers."""
        self.writer.replaced()

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for background work (flushes, rebuilds) to finish, then cancel the rest."""
        await self.background.drain(timeout_s)

    # -- the cycle ----------------------------------------------------------------
    async def run_cycle(self, tick_ms: int) -> None:
        """Fetch, validate, store and compute features for every symbol, then announce.

        Each answered request is taken as soon as it arrives (:meth:`_take`): its
        bars are validated and applied, its symbols' features computed and its Redis
        write sent, while the other requests are still in flight. The symbols no
        answer covered get their features last; once every write of the cycle has
        completed, the final write carries them with the heartbeat and publishes the
        cycle announcement, so everything it names is already readable. The cyclic GC
        waits for the cycle to end (:func:`~sidecar.gc_tuning.held`).
        """
        with foreground.cycle(), gc_tuning.held():
            await self._cycle(tick_ms)

    async def _cycle(self, tick_ms: int) -> None:
        """One cycle (:meth:`run_cycle`), background work held off meanwhile."""
        started = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        stats = self.stats
        stats.last_wall_ms = int(self.clock.wall() * 1000)
        cycle = _Cycle()
        self.router.market_hours(now_ms)
        await self.router.fetch(now_ms, lambda answers, more: self._take(cycle, answers, more, now_ms))
        closed = self.series.settle_closed(self.router.closed, now_ms)
        if closed:
            self._store(closed, now_ms)
        self._record_gaps()
        answered = set(cycle.updated)
        features, settled = self.series.features([s for s in self.symbols if s not in answered], now_ms)
        if settled:
            self._store(settled, now_ms)
        heartbeat = {"pid": self._pid, "t": now_ms, "tick": tick_ms, "cycle": stats.cycles,
                     "tf": self.tf.name, "tfs": self.meta["tfs"], "symbols": len(self.symbols),
                     "cycle_ms": round(stats.last_duration_ms, 3), **self._shard_info}
        announce = {"cycle": stats.cycles, "t": now_ms, "tick": tick_ms, "tf": self.tf.name,
                    "features": cycle.features + len(features),
                    "updated": cycle.updated}
        await self.writer.finish(cycle.writes, features, heartbeat, announce)
        if self.store.flush_due() and (self._flush_task is None or self._flush_task.done()):
            # One flush at a time: a locked or slow database must not pile up tasks.
            self._flush_task = self.background.spawn(self.store.flush())
        self.history.start_rebuilds()

        stats.cycles += 1
        stats.last_tick_ms = tick_ms
        stats.record_duration((time.perf_counter() - started) * 1000)
        stats.first_cycle_done = True

    def _take(self, cycle: _Cycle, answers: dict[str, list[Bar]], more: bool, now_ms: int) -> None:
        """One answer's symbols: validate and apply their bars, compute their features,
        buffer the bars for SQLite and send their Redis write (not awaited here).

        ``more``: other requests are still in flight. Otherwise nothing is left to
        overlap the write with: the final write carries them, a round trip less.
        """
        to_store: list[Bar] = []
        fixed: list[Bar] = []  # closed higher bars a correction re-aggregated
        check = self.validator.check
        for sym, bars in answers.items():
            st = self.symbols[sym]
            st.updated_ms = now_ms
            for bar in bars:
                outcome = check(bar, now_ms, symbol=sym)
                if outcome.verdict is Verdict.DUPLICATE or not outcome.bars:
                    continue
                for accepted in outcome.bars:
                    to_store.extend(st.apply(accepted, outcome.verdict, fixed))
        symbols = list(answers)
        cycle.updated += symbols
        features, _ = self.series.features(symbols, now_ms, to_store)
        self.completeness.observe(to_store, now_ms)
        cycle.features += len(features)
        self.stats.bars_accepted += len(to_store)
        if fixed:
            # Counted as a rebuild counts them: a bar already received is not counted
            # again, one a late base bar completes is received but not late.
            self.completeness.observe(fixed, now_ms, history=True)
            to_store += fixed
        self.store.add(to_store)
        self.writer.send(cycle.writes, to_store, features, more)

    def _store(self, bars: list[Bar], now_ms: int) -> None:
        """Bars the cycle made apart from any answer: counted, buffered for SQLite, and
        carried by the cycle's final write."""
        self.completeness.observe(bars, now_ms)
        self.store.add(bars)
        self.writer.defer(bars)

    def _record_gaps(self) -> None:
        if len(self.validator.new_gaps) > GAP_LOG_LINES:  # the validator logged the first ones
            log.info("gaps detected", extra={"gaps": len(self.validator.new_gaps),
                                             "logged": GAP_LOG_LINES})
        for gap in self.validator.new_gaps:
            self.store.add_gap(gap.symbol, self.tf.name, gap.start, gap.end, gap.missing, gap.filled)
        self.validator.new_gaps.clear()
