"""The 1-second cycle: fetch → validate → Redis + SQLite buffer → features.

Where a bar enters (``_fetch``), is checked (``Validator.check``), is applied to
the symbol's series (``_apply``: forming-bar revision, close, correction), and
where the cycle's writes go out (one Redis round trip, one buffer append).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from sidecar.app.planner import VIA_LAST, VIA_POLL, VIA_STREAM, Planner
from sidecar.app.reconcile import reconcile
from sidecar.bar import Bar
from sidecar.breaker import BreakerOpen, SourceBreaker, SourceCircuits
from sidecar.errors import ProviderError
from sidecar.features import FEATURE_FIELDS, FeatureEngine, Values, features_map, pack_features
from sidecar.rate_budget import BudgetExhausted
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources.base import Source, series_grid
from sidecar.sqlite_store import BarStore
from sidecar.timeframe import Timeframe
from sidecar.validation import Validator, Verdict

log = logging.getLogger("sidecar.pipeline")

#: At most this many bars wait in memory for Redis to come back.
MAX_REDIS_BACKLOG = 500_000
MACD_HIST = FEATURE_FIELDS.index("macd_hist")


@dataclass(slots=True)
class SourceState:
    """What ``/health`` says about one source."""

    source: Source
    #: Its circuit breakers (one, or one per asset class); ``None``: never guarded (``sim``).
    circuits: SourceCircuits | None = None
    last_success_ms: int | None = None
    last_error_class: str | None = None
    last_error_ms: int | None = None
    errors: int = 0
    requests: int = 0

    @property
    def name(self) -> str:
        return self.source.name

    def breaker(self, symbol: str) -> SourceBreaker | None:
        """The breaker that guards this source's requests for ``symbol``."""
        if self.circuits is None:
            return None
        return self.circuits.lane(self.source.breaker_lane(symbol))

    def admits(self, symbol: str) -> bool:
        """Whether ``symbol`` may be asked of this source now (its circuit admits a call)."""
        breaker = self.breaker(symbol)
        return breaker is None or breaker.allows()

    def one_probe_each(self, symbols: list[str]) -> list[str]:
        """``symbols`` minus all but the first of each breaker that is not closed.

        A circuit that is open past its timeout (or half-open) admits one probe:
        it is spent on one symbol, so probing a failing provider costs one request.
        The others are left for the next source this cycle and stay due here.
        """
        out: list[str] = []
        probing: set[str] = set()
        for sym in symbols:
            breaker = self.breaker(sym)
            if breaker is not None and breaker.state != "closed":
                if breaker.name in probing:
                    continue
                probing.add(breaker.name)
            out.append(sym)
        return out

    def status(self) -> dict[str, Any]:
        out = dict(self.source.status())
        if self.circuits is not None:
            out["circuit"] = self.circuits.state  # the worst of its breakers
            out["breakers"] = self.circuits.status()
        return out


@dataclass(slots=True)
class SymbolState:
    engine: FeatureEngine
    forming: Bar | None = None
    last: Bar | None = None  # newest closed bar
    updated_ms: int | None = None  # when a source last answered for this symbol
    needs_rebuild: bool = False
    via: str = VIA_LAST  # how its newest bar came this cycle: poll, stream or last
    expect_ms: int = 0  # the refresh interval planned for it (its source's budget pace)
    features: dict[str, Any] | None = None  # the map last written to Redis

    def stale(self, now_ms: int, stale_after_ms: int) -> bool:
        """No answer for longer than planned (its refresh interval) plus ``stale_after_ms``."""
        return self.updated_ms is None or now_ms - self.updated_ms > stale_after_ms + self.expect_ms


#: Upper bounds (ms) of the cycle-duration histogram buckets (``/metrics``).
CYCLE_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000)


@dataclass(slots=True)
class CycleStats:
    cycles: int = 0
    last_tick_ms: int = 0
    last_duration_ms: float = 0.0
    durations_ms: deque[float] = field(default_factory=lambda: deque(maxlen=300))
    bars_accepted: int = 0
    bars_stored: int = 0
    redis_ok: bool = True
    redis_down_since: float | None = None
    redis_last_error: str | None = None
    first_cycle_done: bool = False
    #: Cumulative histogram of cycle durations: count per bucket of CYCLE_BUCKETS_MS (+Inf last).
    duration_buckets: list[int] = field(default_factory=lambda: [0] * (len(CYCLE_BUCKETS_MS) + 1))
    duration_sum_ms: float = 0.0

    def record_duration(self, ms: float) -> None:
        self.last_duration_ms = ms
        self.durations_ms.append(ms)
        self.duration_sum_ms += ms
        i = 0
        while i < len(CYCLE_BUCKETS_MS) and ms > CYCLE_BUCKETS_MS[i]:
            i += 1
        self.duration_buckets[i] += 1


class Pipeline:
    """Owns the per-symbol state and runs one cycle per tick."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        redis_store: RedisStore,
        bar_store: BarStore,
        circuits: dict[str, SourceCircuits] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock  # epoch seconds; tests drive it
        self.tf = settings.timeframe
        circuits = circuits or {}
        self.sources = [SourceState(s, circuits.get(s.name)) for s in sources]
        self.redis = redis_store
        self.store = bar_store
        #: Each symbol's bar grid (US stocks' 1h bars open at :30); sources are asked for it.
        self.grids = {sym: series_grid(sym, self.tf, sources) for sym in settings.symbols}
        self.validator = Validator(
            self.tf,
            skew_ms=settings.clock_skew_ms,
            outlier_k=settings.outlier_k,
            outlier_window=settings.outlier_window,
            correction_window_bars=settings.correction_window_bars,
            fill_gaps=settings.fill_gaps,
            grids=self.grids,
        )
        self.symbols: dict[str, SymbolState] = {
            sym: SymbolState(FeatureEngine(sym, self.tf.name, settings.periods,
                                           settings.session_anchor_min))
            for sym in settings.symbols
        }
        self.stats = CycleStats()
        self.planner = Planner()
        self._redis_backlog: dict[tuple[str, int], Bar] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._flush_task: asyncio.Task[Any] | None = None
        self._refill_task: asyncio.Task[Any] | None = None
        self._refill_needed = False
        self._meta_written = False  # only then does a missing meta key mean lost data
        self._pid = os.getpid()
        self.meta: dict[str, Any] = {"tf": self.tf.name, "symbols": list(settings.symbols),
                                     "started_at": int(time.time() * 1000)}

    # -- start-up ---------------------------------------------------------------
    async def write_meta(self) -> None:
        """Write the meta key; its absence later tells that Redis lost its data."""
        await self.redis.write_meta(self.meta)
        self._meta_written = True

    async def warm(self, now_ms: int) -> None:
        """Open feature handles on stored history so the first cycle is already right.

        First the stores are reconciled (:mod:`sidecar.app.reconcile`): bars that
        reached Redis but not SQLite before a crash go to SQLite, and a Redis that
        lost its bars is refilled from SQLite. History then comes from SQLite.
        """
        redis_up = True
        for sym, st in self.symbols.items():
            current = self.grids[sym].floor(now_ms)
            if redis_up:
                try:
                    done = await reconcile(sym, self.tf.name, self.redis, self.store, self.settings.bars_cap)
                except (RedisError, OSError) as exc:
                    log.warning("redis unreachable at start: stores not reconciled",
                                extra={"error": str(exc)})
                    redis_up = False
                    self._refill_needed = True  # once Redis answers
                else:
                    if done.to_sqlite:
                        log.info("recovered bars from redis", extra={"symbol": sym, "bars": done.to_sqlite})
                    if done.to_redis:
                        log.info("warmed redis from sqlite", extra={"symbol": sym, "bars": done.to_redis})
            bars = await self.store.last_bars(sym, self.tf.name, self.settings.warm_bars)
            # The newest stored bar stays forming if it was stored while forming:
            # the source's final revision then closes it through the handles once.
            split = len(bars)
            while split and (bars[split - 1].t >= current or bars[split - 1].forming):
                split -= 1
            closed, forming = bars[:split], bars[split:]
            for b in closed:
                b.forming = False
            st.engine.load(closed)
            st.last = closed[-1] if closed else None
            st.forming = forming[-1] if forming else None
            self.validator.prime(sym, closed[-(self.settings.correction_window_bars + 2):] + forming)

    # -- the cycle ----------------------------------------------------------------
    async def run_cycle(self, tick_ms: int) -> None:
        started = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        results = await self._fetch(now_ms)

        to_store: list[Bar] = []
        for sym, bars in results.items():
            st = self.symbols[sym]
            st.updated_ms = now_ms
            for bar in bars:
                outcome = self.validator.check(bar, now_ms, symbol=sym)
                if outcome.verdict is Verdict.DUPLICATE or not outcome.bars:
                    continue
                for accepted in outcome.bars:
                    to_store.extend(self._apply(st, accepted, outcome.verdict))
        self._record_gaps()

        features = self._features(now_ms)
        self.stats.bars_accepted += len(to_store)
        self.store.add(to_store)
        await self._write_redis(to_store, features, tick_ms, now_ms, updated=list(results))
        if self.store.flush_due() and (self._flush_task is None or self._flush_task.done()):
            # One flush at a time: a locked or slow database must not pile up tasks.
            self._flush_task = self._spawn(self.store.flush())
        for sym, st in self.symbols.items():
            if st.needs_rebuild:
                st.needs_rebuild = False
                self._spawn(self._rebuild(sym))

        stats = self.stats
        stats.cycles += 1
        stats.last_tick_ms = tick_ms
        stats.record_duration((time.perf_counter() - started) * 1000)
        stats.first_cycle_done = True

    async def _fetch(self, now_ms: int) -> dict[str, list[Bar]]:
        """Newest bars per symbol, as planned within the budgets (see :mod:`.planner`).

        Each source in priority order is asked for the symbols due at it; the ones
        it holds but that are not due come from its stream or stay on their last
        bar. A symbol whose source fails this cycle is asked of the next source in
        priority order, within the same cycle; so is a symbol whose circuit at a
        source is open (each source has one breaker, or one per asset class).
        """
        pending = list(self.symbols)
        out: dict[str, list[Bar]] = {}
        for st in self.symbols.values():
            st.via = VIA_LAST  # unless a source serves it below
        for state in self.sources:
            if not pending:
                break
            source = state.source
            mine = [s for s in pending if source.can_serve(s) and state.admits(s)]
            if not mine:
                continue
            interval = self.planner.interval_ms(source, self._servable_counter(source), now_ms)
            plan = self.planner.plan(source, mine, now_ms)
            for sym, bars in source.peek_latest(plan.idle, self.tf, now_ms).items():
                out[sym] = bars
                self.symbols[sym].via = VIA_STREAM
            for sym in plan.idle:
                self.symbols[sym].expect_ms = interval
            ask = state.one_probe_each(plan.ask)
            answers = await self._ask(state, ask, now_ms) if ask else {}
            for sym in ask:
                result = answers.get(sym)
                if isinstance(result, BreakerOpen):
                    continue  # refused by its circuit: nothing was sent, it stays due
                ok = isinstance(result, list)
                wait = interval
                if isinstance(result, BudgetExhausted) and result.retry_after is not None:
                    wait = min(interval, int(result.retry_after * 1000))  # nothing was sent
                self.planner.asked(source, sym, ok, now_ms, wait)
                if isinstance(result, list):
                    out[sym] = result
                    st = self.symbols[sym]
                    st.via, st.expect_ms = VIA_POLL, interval
            served = set(out) | set(plan.idle)
            pending = [s for s in pending if s not in served]
        return out

    def _servable_counter(self, source: Source) -> Callable[[], int]:
        return lambda: sum(1 for s in self.symbols if source.can_serve(s))

    async def _ask(self, state: SourceState, symbols: list[str], now_ms: int) -> dict[str, Any]:
        source = state.source
        batch = source.max_batch
        # One request asks for one bar grid and goes through one breaker (asset class).
        groups: dict[tuple[Timeframe, str | None], list[str]] = {}
        for sym in symbols:
            groups.setdefault((self.grids[sym], source.breaker_lane(sym)), []).append(sym)
        chunks = [(grid, group[i:i + batch]) for (grid, _), group in groups.items()
                  for i in range(0, len(group), batch)]
        state.requests += len(chunks)

        def call(grid: Timeframe, chunk: list[str]) -> Any:
            breaker = state.breaker(chunk[0])
            if breaker is None:
                fetch = source.fetch_latest(chunk, grid, now_ms)
            else:
                fetch = breaker.call(lambda: source.fetch_latest(chunk, grid, now_ms))
            return asyncio.wait_for(fetch, self.settings.fetch_timeout_s)

        calls = [call(grid, chunk) for grid, chunk in chunks]
        merged: dict[str, Any] = {}
        for (_, chunk), result in zip(chunks, await asyncio.gather(*calls, return_exceptions=True),
                                      strict=True):
            if isinstance(result, BreakerOpen):
                state.requests -= 1  # refused before anything was sent
                merged.update(dict.fromkeys(chunk, result))
                continue
            if isinstance(result, BaseException):
                self._source_failed(state, result, now_ms)
                if isinstance(result, ProviderError):
                    merged.update(dict.fromkeys(chunk, result))
                continue
            merged.update(result)
            failures = [r for r in result.values() if isinstance(r, ProviderError)]
            if len(failures) < len(result):
                state.last_success_ms = now_ms
            for failure in failures[:1]:
                self._source_failed(state, failure, now_ms)
        return merged

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

    def _apply(self, st: SymbolState, bar: Bar, verdict: Verdict) -> list[Bar]:
        """Fold an accepted bar into the symbol's series; returns the bars to store."""
        forming = st.forming
        if verdict is Verdict.CORRECTION:
            st.needs_rebuild = True
            return [bar]
        if forming is not None and bar.t == forming.t:
            if bar.forming:
                st.forming = bar
            else:
                st.engine.update(bar)
                st.last, st.forming = bar, None
            return [bar]
        if st.last is not None and bar.t <= st.last.t:
            # A revision of the newest closed bar: values change, handles must be rebuilt.
            st.last = bar
            st.needs_rebuild = True
            return [bar]
        stored: list[Bar] = []
        if forming is not None:
            # A newer bar closes the forming one with its last revision.
            closed = Bar(forming.symbol, forming.tf, forming.t, forming.o, forming.h, forming.l,
                         forming.c, forming.v, forming.src, False, forming.synthetic)
            st.engine.update(closed)
            st.last, st.forming = closed, None
            stored.append(closed)
        if bar.forming:
            st.forming = bar
        else:
            st.engine.update(bar)
            st.last = bar
        stored.append(bar)
        return stored

    def _features(self, now_ms: int) -> list[tuple[str, str, bytes]]:
        out: list[tuple[str, str, bytes]] = []
        stale_after = self.settings.stale_after_ms
        tf = self.tf.name
        for sym, st in self.symbols.items():
            bar = st.forming or st.last
            if bar is None:
                continue
            engine = st.engine
            values: Values = engine.peek(bar) if bar.forming else engine.closed_values
            fmap = features_map(
                bar, values, now_ms, st.stale(now_ms, stale_after), updated_at=st.updated_ms, via=st.via,
                # The histogram one bar back, so a reader sees a zero crossing in one read.
                macd_hist_prev=engine.closed_values[MACD_HIST] if bar.forming else engine.prev_macd_hist,
            )
            st.features = fmap
            out.append((tf, sym, pack_features(fmap)))
        return out

    async def _write_redis(
        self, bars: list[Bar], features: list[tuple[str, str, bytes]], tick_ms: int, now_ms: int,
        updated: list[str] | None = None,
    ) -> None:
        stats = self.stats
        if self._redis_backlog:
            for b in bars:
                self._redis_backlog[(b.symbol, b.t)] = b
            bars = list(self._redis_backlog.values())
        heartbeat = {"pid": self._pid, "t": now_ms, "tick": tick_ms, "cycle": stats.cycles,
                     "tf": self.tf.name, "symbols": len(self.symbols)}
        announce = {"cycle": stats.cycles, "t": now_ms, "tick": tick_ms, "tf": self.tf.name,
                    "features": len(features), "updated": updated or []}
        try:
            has_meta = await self.redis.write_cycle(bars, features, heartbeat, announce)
        except (RedisError, OSError) as exc:
            for b in bars:
                self._redis_backlog[(b.symbol, b.t)] = b
            if len(self._redis_backlog) > MAX_REDIS_BACKLOG:
                # SQLite still has them; Redis is refilled from there on recovery.
                for key in sorted(self._redis_backlog, key=lambda k: k[1])[:-MAX_REDIS_BACKLOG]:
                    del self._redis_backlog[key]
            if stats.redis_ok:
                log.error("redis write failed; buffering", extra={"error": str(exc)})
                stats.redis_down_since = time.monotonic()
            stats.redis_ok = False
            stats.redis_last_error = str(exc)
            return
        if not stats.redis_ok:
            log.info("redis is back", extra={"rewritten_bars": len(bars)})
        self._redis_backlog.clear()
        stats.redis_ok = True
        stats.redis_down_since = None
        stats.bars_stored += len(bars)
        if not has_meta and self._meta_written:
            self._refill_needed = True
        if self._refill_needed and (self._refill_task is None or self._refill_task.done()):
            self._refill_task = self._spawn(self._refill_redis())

    async def _refill_redis(self) -> None:
        """Redis lost its data (restarted empty): put SQLite's recent bars back.

        The cycles meanwhile keep writing the newest bars and features; this only
        adds the bars Redis lacks (see :func:`reconcile`).
        """
        log.warning("redis lost its data; refilling it from sqlite")
        started = time.perf_counter()
        try:
            await self.write_meta()
            await self.store.flush()
            total = 0
            for sym in self.symbols:
                total += (await reconcile(sym, self.tf.name, self.redis, self.store,
                                          self.settings.bars_cap)).to_redis
        except (RedisError, OSError, sqlite3.Error) as exc:
            log.error("redis refill failed; will retry", extra={"error": str(exc)})
            return
        self._refill_needed = False
        log.info("redis refilled from sqlite", extra={
            "bars": total, "symbols": len(self.symbols),
            "seconds": round(time.perf_counter() - started, 3)})

    def _record_gaps(self) -> None:
        for gap in self.validator.new_gaps:
            self.store.add_gap(gap.symbol, self.tf.name, gap.start, gap.end, gap.missing, gap.filled)
        self.validator.new_gaps.clear()

    async def _rebuild(self, symbol: str) -> None:
        """Reopen a symbol's handles after a correction changed a closed bar."""
        st = self.symbols[symbol]
        try:
            bars = await self.redis.recent_bars(symbol, self.tf.name, self.settings.warm_bars)
        except RedisError:
            await self.store.flush()
            bars = await self.store.last_bars(symbol, self.tf.name, self.settings.warm_bars)
        closed = [b for b in bars if not b.forming and (st.forming is None or b.t < st.forming.t)]
        engine = FeatureEngine(symbol, self.tf.name, self.settings.periods,
                               self.settings.session_anchor_min)
        engine.load(closed)
        st.engine = engine
        log.info("features rebuilt after a correction", extra={"symbol": symbol, "bars": len(closed)})

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for background work (flushes, rebuilds) to finish, then cancel the rest."""
        if not self._background:
            return
        _, pending = await asyncio.wait(self._background, timeout=timeout_s)
        for task in pending:
            task.cancel()
