"""The 1-second cycle: fetch → validate → Redis + SQLite buffer → features.

Where a bar enters (``_fetch``), is checked (``Validator.check``), is applied to
the symbol's series (``_apply``: forming-bar revision, close, correction), where a
symbol's market hours hold it back (``_market_hours``: while its calendar says closed,
no request, no gap, its features kept readable), and where the cycle's writes go out:
each answered request is taken as it arrives (``_take``: validated, applied, its
features computed, its Redis write sent and its bars buffered for SQLite) while the
other requests are in flight; the final write (``_write_final``) adds the heartbeat
and announces the cycle once all are stored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar import foreground
from sidecar.app.planner import VIA_LAST, VIA_POLL, VIA_STREAM, Planner
from sidecar.app.reconcile import TAIL, Window, reconcile, reconcile_many
from sidecar.bar import Bar
from sidecar.breaker import BreakerOpen, SourceBreaker, SourceCircuits
from sidecar.calendars import MarketCalendar, extended_calendar, get_calendar, open_ms
from sidecar.clock import Clock, as_clock
from sidecar.completeness import Completeness
from sidecar.errors import ProviderError
from sidecar.features import FEATURE_FIELDS, FeatureEngine, pack_series_features, symbol_part
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.redis_store import FeatureRow, PartialWrite, RedisStore
from sidecar.series import Bucket, Grid, Series, aggregate, aggregate_all
from sidecar.settings import Settings
from sidecar.sources.base import Source, series_grid
from sidecar.sqlite_store import BarStore
from sidecar.symbols import SymbolMap, load_symbol_map
from sidecar.timeframe import Timeframe
from sidecar.validation import GAP_LOG_LINES, Validator, Verdict

log = logging.getLogger("sidecar.pipeline")

#: At most this many bars wait in memory for Redis to come back.
MAX_REDIS_BACKLOG = 500_000
MACD_HIST = FEATURE_FIELDS.index("macd_hist")
DAY_MS = 86_400_000
#: After its market closes, a symbol is still asked this long, for its last bar's final values.
CLOSE_GRACE_MS = 60_000


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

    def status(self) -> dict[str, Any]:
        out = dict(self.source.status())
        if self.circuits is not None:
            out["circuit"] = self.circuits.state  # the worst of its breakers
            out["breakers"] = self.circuits.status()
        return out


def pace_over_open_hours(budget: RateBudget | None, calendars: list[MarketCalendar | None]) -> None:
    """Pace a source's daily quota (its ``budget``) over the hours the markets of its
    symbols are open (``calendars``: theirs; one without a calendar trades around the clock)."""
    if budget is None or not calendars or any(cal is None for cal in calendars):
        return
    distinct = list({cal.name: cal for cal in calendars if cal is not None}.values())
    budget.open_hours = lambda a, b: open_ms(distinct, int(a * 1000), int(b * 1000)) / 1000


@dataclass(slots=True)
class SymbolState:
    """A symbol in the cycle: its series (the base timeframe first, then each higher
    one, see :mod:`sidecar.series`) and how its sources and market are doing."""

    #: Its series, lowest timeframe first; ``series[0]`` is the base the sources feed.
    series: list[Series]
    updated_ms: int | None = None  # when a source last answered for this symbol
    via: str = VIA_LAST  # how its newest bar came this cycle: poll, stream or last
    expect_ms: int = 0  # the refresh interval planned for it (its source's budget pace)
    #: Its calendar says its market is open (always, for a symbol without a calendar).
    market_open: bool = True
    #: While closed: when its market opens next (epoch ms; ``None`` while open).
    next_open: int | None = None
    #: Its handles are not yet open on the warm window (start-up): the features map says so.
    warming: bool = False

    @property
    def base(self) -> Series:
        return self.series[0]

    @property
    def higher(self) -> list[Series]:
        return self.series[1:]

    # The base series' state, as the cycle reads and writes it.
    @property
    def engine(self) -> FeatureEngine:
        return self.series[0].engine

    @engine.setter
    def engine(self, value: FeatureEngine) -> None:
        self.series[0].engine = value

    @property
    def forming(self) -> Bar | None:
        return self.series[0].forming

    @forming.setter
    def forming(self, value: Bar | None) -> None:
        self.series[0].forming = value

    @property
    def last(self) -> Bar | None:
        return self.series[0].last

    @last.setter
    def last(self, value: Bar | None) -> None:
        self.series[0].last = value

    @property
    def needs_rebuild(self) -> bool:
        """Some series' older closed bars changed (a correction, gap repair)."""
        return any(s.needs_rebuild for s in self.series)

    @property
    def rebuilding(self) -> dict[int, Bar] | None:
        """While a rebuild (or warm-up) reads history: the base bars applied meanwhile."""
        return self.series[0].rebuilding

    @rebuilding.setter
    def rebuilding(self, value: dict[int, Bar] | None) -> None:
        """``None`` ends every series' rebuild; a dict starts the base's, the others' empty."""
        for ser in self.series:
            ser.rebuilding = None if value is None else {}
        self.series[0].rebuilding = value

    @property
    def features(self) -> dict[str, Any] | None:
        """The base feature map last written to Redis."""
        return self.series[0].features

    def stale(self, now_ms: int, stale_after_ms: int) -> bool:
        """No answer for longer than planned (its refresh interval) plus ``stale_after_ms``;
        never while its market is closed (nothing new is expected then)."""
        if not self.market_open:
            return False
        return self.updated_ms is None or now_ms - self.updated_ms > stale_after_ms + self.expect_ms


@dataclass(slots=True)
class WarmupProgress:
    """How far start-up warm-up got: history fetched, symbols whose handles are open."""

    started_ms: int | None = None
    finished_ms: int | None = None
    #: Symbols with nothing stored at start: their warm window is fetched from the sources.
    cold: int = 0
    history_bars: int = 0
    history_requests: int = 0
    #: Symbols whose warm-up failed (their handles run on live bars only, flagged warming).
    failed: int = 0


@dataclass(slots=True)
class _HigherHistory:
    """What warm-up reads to fold the base into a symbol's higher timeframes."""

    #: Each higher timeframe's stored closed bars (the newest warm window).
    stored: dict[str, list[Bar]] = field(default_factory=dict)
    #: Each one's first bucket folded from the base (the newest stored bar's, else the window's).
    since: dict[str, int] = field(default_factory=dict)
    #: The stored closed base bars from the oldest of ``since`` on.
    base: list[Bar] = field(default_factory=list)


#: Upper bounds (ms) of the cycle-duration histogram buckets (``/metrics``).
CYCLE_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000)


@dataclass(slots=True)
class CycleStats:
    cycles: int = 0
    last_tick_ms: int = 0
    #: Wall-clock time (epoch ms) the last cycle started: on a replay clock, whether
    #: the daemon still collects is judged by it.
    last_wall_ms: int = 0
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


@dataclass(slots=True)
class _Cycle:
    """One cycle in progress: what its answers covered and which writes are out."""

    #: Symbols with an answer this cycle (polled or streamed): the announcement's ``updated``.
    updated: list[str] = field(default_factory=list)
    features: int = 0  # feature maps computed by the answers' writes
    writes: list[asyncio.Task[None]] = field(default_factory=list)
    #: Feature maps whose write failed (or was not tried): the final write carries them.
    unwritten: list[FeatureRow] = field(default_factory=list)
    has_meta: bool = True  # False once a write found the meta key gone
    #: A chunk write waited out SIDECAR_REDIS_TIMEOUT_S (Redis hangs): the final write is
    #: not tried this cycle, so a hung server costs a cycle one timeout, not two.
    redis_timed_out: bool = False


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
        clock: Clock | Callable[[], float] = time.time,
        symbol_map: SymbolMap | None = None,
    ) -> None:
        """``clock``: the daemon's time (a callable returning epoch seconds is a wall
        clock; tests drive one); ``symbol_map`` names each symbol's calendar (the
        packaged mapping if not given)."""
        self.settings = settings
        self.clock = as_clock(clock)
        self._clock = self.clock
        #: No answer for this long (on the daemon's clock) makes a symbol stale.
        self.stale_after_ms = int(settings.stale_after_ms * self.clock.speed)
        #: The clock's reading at the previous cycle (markets open since then are asked).
        self._prev_now_ms: int | None = None
        self.tf = settings.timeframe
        circuits = circuits or {}
        self.sources = [SourceState(s, circuits.get(s.name)) for s in sources]
        self.redis = redis_store
        self.store = bar_store
        #: Each symbol's bar grid (US stocks' 1h bars open at :30); sources are asked for it.
        self.grids = {sym: series_grid(sym, self.tf, sources) for sym in settings.symbols}
        for state in self.sources:
            state.learn(self.grids)
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
        #: When each symbol is polled: its extended hours where included, else its regular ones.
        self._hours = {**self.calendars, **self.extended}
        for state in self.sources:
            pace_over_open_hours(state.source.budget, [self._hours.get(sym) for sym in state.servable])
        #: Symbols not asked this cycle: their market is closed (past the close's grace).
        self._closed: frozenset[str] = frozenset()
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
        # Every series' forming bar is re-buffered each cycle: not a reason to flush early.
        bar_store.series_rows = len(settings.symbols) * len(self.timeframes)
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
        self.stats = CycleStats()
        #: Expected bars received per symbol with a calendar and timeframe (:mod:`sidecar.completeness`).
        self.completeness = Completeness(self.calendars, self.timeframes, int(self.clock() * 1000),
                                         speed=self.clock.speed)
        self.warmup = WarmupProgress()
        self.planner = Planner()
        #: Bars Redis did not get yet, by (symbol, timeframe, open time).
        self._redis_backlog: dict[tuple[str, str, int], Bar] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._flush_task: asyncio.Task[Any] | None = None
        self._refill_task: asyncio.Task[Any] | None = None
        self._refill_needed = False
        self._warm_redis_down = False  # warm-up found Redis unreachable: it reads SQLite
        #: Where warm-up compares the stores (a second process at many symbols, else a thread).
        self.warm_pool: Executor | None = None
        self._meta_written = False  # only then does a missing meta key mean lost data
        #: The cluster's masters as of the last complete write (empty on a single server).
        self._masters: frozenset[str] = frozenset()
        self._pid = os.getpid()
        #: A shard says which shard it is and which symbols it owns (docs/operations.md, "Shards").
        self._shard_info: dict[str, Any] = {} if settings.shard is None else {
            "shard": settings.shard, "shards": settings.shards, "owned": list(settings.symbols)}
        self.meta: dict[str, Any] = {"tf": self.tf.name, "tfs": [tf.name for tf in self.timeframes],
                                     "symbols": list(settings.symbols),
                                     "pid": self._pid, "http_port": settings.http_port,
                                     **self._shard_info,
                                     "started_at": int(time.time() * 1000)}

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
        out = [Series(symbol, self.tf, self._engine(symbol))]
        for tf, grid in zip(self.timeframes[1:], self.higher_grids[symbol], strict=True):
            out.append(Series(symbol, tf, self._engine(symbol, tf), grid, self.tf.ms))
        for lower, upper in itertools.pairwise(out[1:]):
            lower.up = upper
        return out

    # -- start-up ---------------------------------------------------------------
    async def write_meta(self) -> None:
        """Write the meta key; its absence later tells that Redis lost its data."""
        await self.redis.write_meta(self.meta)
        self._meta_written = True

    async def warm(self, now_ms: int) -> None:
        """Open every symbol's feature handles on stored history, before the first cycle.

        :meth:`begin_warmup` then :meth:`warm_symbol` for each symbol, in line (the
        daemon runs the second part in the background while the cycles go on).
        """
        await self.begin_warmup(now_ms)
        for sym in self.symbols:
            await self.warm_symbol(sym)
        self.warmup.finished_ms = int(self._clock() * 1000)

    async def begin_warmup(self, now_ms: int) -> list[str]:
        """Put every symbol in warm-up; returns those with nothing stored (cold).

        One read of each symbol's newest stored bars (a few, not the warm window)
        teaches the validator where the series stopped, so a gap while the daemon
        was down is recorded, and sets the newest closed and forming bar, so features
        are served from the first cycle (flagged ``warming``). From here every closed
        bar applied is also kept in :attr:`SymbolState.rebuilding` until
        :meth:`warm_symbol` opens the handles on history plus those bars.
        """
        self.warmup = WarmupProgress(started_ms=now_ms)
        keep = self.settings.correction_window_bars + 2
        tails = await self._stored_tails(keep + 1)
        cold: list[str] = []
        for sym, st in self.symbols.items():
            st.warming = True
            st.rebuilding = {}
            bars = tails.get(sym, [])
            if not bars:
                cold.append(sym)
                continue
            current = self.grids[sym].floor(now_ms)
            # The newest stored bar stays forming if it was stored while forming:
            # the source's final revision then closes it through the handles once.
            split = len(bars)
            while split and (bars[split - 1].t >= current or bars[split - 1].forming):
                split -= 1
            closed, forming = bars[:split], bars[split:]
            for b in closed:
                b.forming = False
            st.last = closed[-1] if closed else None
            st.forming = forming[-1] if forming else None
            self.validator.prime(sym, closed[-keep:] + forming)
        if self.timeframes[1:]:
            await self._begin_higher()
        self.warmup.cold = len(cold)
        return cold

    async def _begin_higher(self) -> None:
        """Each higher series' newest stored bars, served (flagged ``warming``) until warm-up
        folds the base into it (:meth:`_fold_up`); one read per timeframe."""
        names = list(self.symbols)
        for i, tf in enumerate(self.timeframes[1:], 1):
            tails = await self._stored_tails(2, tf.name)
            for sym in names:
                bars = tails.get(sym, [])
                ser = self.symbols[sym].series[i]
                closed = [b for b in bars if not b.forming]
                ser.last = closed[-1] if closed else None
                forming = [b for b in bars if b.forming and (ser.last is None or b.t > ser.last.t)]
                ser.forming = forming[-1] if forming else None

    async def _stored_tails(self, n: int, tf: str | None = None) -> dict[str, list[Bar]]:
        """Each symbol's newest ``n`` bars of ``tf`` (the base if not given) in either
        store, oldest first.

        Redis gets every cycle's bars at once, SQLite at the next flush: after a crash
        Redis holds bars SQLite lacks, and where both hold a bar Redis saw the later
        revision unless it holds it forming and SQLite closed (as :func:`reconcile`).
        """
        names = list(self.symbols)
        tf = tf or self.tf.name
        tails = await self.store.tails(names, tf, n)
        try:
            in_redis = await self.redis.tails(names, tf, n)
        except (RedisError, OSError):
            return tails  # reconciled once Redis answers
        for sym, bars in in_redis.items():
            if not bars:
                continue
            merged = {b.t: b for b in tails.get(sym, [])}
            for b in bars:
                old = merged.get(b.t)
                if old is None or not (b.forming and not old.forming):
                    merged[b.t] = b
            tails[sym] = [merged[t] for t in sorted(merged)][-n:]
        return tails

    async def warm_symbol(self, symbol: str) -> int:
        """:meth:`warm_symbols` for one symbol."""
        return await self.warm_symbols([symbol])

    async def warm_symbols(self, symbols: list[str]) -> int:
        """Reconcile the stores of ``symbols`` and open their handles on the warm window.

        The stores are reconciled first (:func:`reconcile_many`: bars that reached
        Redis but not SQLite before a crash go to SQLite, a Redis that lost its bars
        is refilled from SQLite; only what differs is copied, the comparison made in
        a worker thread). The handles open on each window as Redis holds it afterwards
        (which the reconcile returns: no second read), from SQLite when Redis fails or
        keeps fewer bars than the window, laid under the bars applied meanwhile
        (:meth:`_open_handles`), one symbol at a time between cycles; the higher
        timeframes' history is read and the base folded into them (:meth:`_fold_up`).
        Returns the closed base bars the handles were opened on, over all of them.
        """
        n, cap = self.settings.warm_bars, self.settings.bars_cap
        windows: dict[str, Window] = {}
        try:
            if self._warm_redis_down:
                raise OSError("unreachable")  # one failed reconcile is enough: not every symbol waits
            done = await reconcile_many(symbols, self.tf.name, self.redis, self.store, cap,
                                        window=n if n <= cap else 0,
                                        tail=max(TAIL, 2 * (self.settings.correction_window_bars + 2)),
                                        pool=self.warm_pool)
        except (RedisError, OSError) as exc:
            if not self._warm_redis_down:
                log.warning("redis unreachable at start: stores not reconciled",
                            extra={"error": str(exc)})
            self._warm_redis_down = True
            self._refill_needed = True  # once Redis answers
        else:
            for sym, (copied, got) in done.items():
                if copied.to_sqlite:
                    log.info("recovered bars from redis", extra={"symbol": sym, "bars": copied.to_sqlite})
                if copied.to_redis:
                    log.info("warmed redis from sqlite", extra={"symbol": sym, "bars": copied.to_redis})
                if n <= cap:
                    windows[sym] = got
        total = 0
        for sym in symbols:
            window = windows.get(sym) or await self.store.last_bars(sym, self.tf.name, n)
            higher = await self._higher_history(sym)
            await foreground.wait_idle()
            total += self._warm_open(sym, window, higher)
        return total

    def open_fetched(self, symbol: str, bars: list[Bar]) -> int:
        """Open the handles of a symbol that had nothing stored on the history just
        fetched for it (which is then all the stores hold of it but the bars the
        cycles applied meanwhile, which :meth:`_open_handles` lays over it): no
        reconcile, no read back; its higher timeframes are built from the same bars.
        Returns the closed base bars the handles were opened on."""
        st = self.symbols[symbol]
        higher: _HigherHistory | None = None
        if st.higher:
            warm = self.settings.warm_bars
            now_ms = int(self._clock() * 1000)
            floor = now_ms - self.settings.retention_for(self.tf.name) * DAY_MS
            higher = _HigherHistory(base=[b for b in bars if not b.forming])
            for ser in st.higher:
                higher.stored[ser.tf.name] = []
                higher.since[ser.tf.name] = max(floor, now_ms - warm * ser.tf.ms)
        return self._warm_open(symbol, bars, higher)

    async def _higher_history(self, symbol: str) -> _HigherHistory | None:
        """What folding the base into the higher timeframes at warm-up needs (:meth:`_fold_up`):
        each one's stored history (SQLite) and the stored base bars from the oldest
        bucket any of them lacks on; ``None`` without higher timeframes."""
        st = self.symbols[symbol]
        if not st.higher:
            return None
        warm = self.settings.warm_bars
        now_ms = int(self._clock() * 1000)
        floor = now_ms - self.settings.retention_for(self.tf.name) * DAY_MS
        out = _HigherHistory()
        await self.store.flush()  # bars applied before this warm-up began (a failed one) are read too
        for ser in st.higher:
            bars = [b for b in await self.store.last_bars(symbol, ser.tf.name, warm) if not b.forming]
            out.stored[ser.tf.name] = bars
            # From the newest stored bar's bucket on (a daily bucket opens up to a day before its stamp).
            if bars:
                out.since[ser.tf.name] = bars[-1].t - (DAY_MS if ser.tf.ms >= DAY_MS else 0)
            else:
                out.since[ser.tf.name] = max(floor, now_ms - warm * ser.tf.ms)
        lo = min(out.since.values())
        base = await self.store.bars_between(symbol, self.tf.name, lo, 2**62)
        out.base = [b for b in base if not b.forming]
        return out

    def _warm_open(self, symbol: str, bars: list[Bar] | Window, higher: _HigherHistory | None) -> int:
        """Open the base handles on ``bars`` (:meth:`_open_handles`), fold the base into
        the higher timeframes (:meth:`_fold_up`) and end the symbol's warm-up; no
        ``await``, so no bar applied meanwhile can slip between."""
        st = self.symbols[symbol]
        owed = self._owed(symbol)
        n = self._open_handles(symbol, st.base, bars, owed, warm=True)
        if higher is not None:
            self._fold_up(symbol, st, higher, owed)
        for ser in st.series:
            ser.rebuilding = None
        st.warming = False
        return n

    def _fold_up(self, symbol: str, st: SymbolState, history: _HigherHistory,
                 owed: dict[str, dict[int, Bar]]) -> None:
        """Open the higher timeframes' handles on their stored history after folding in
        the base bars they lack (back-filled history, a daemon that was down, the bars
        the cycles applied during warm-up), and set each one's current bucket from its
        closed base bars. The base's handles are open (its newest closed bar is known).

        Bars aggregated here are stored (SQLite, and Redis with the next cycle's write).
        """
        base = st.base
        warm = self.settings.warm_bars
        now_ms = int(self._clock() * 1000)
        known = {b.t: b for b in history.base}
        known.update(owed.get(base.tf.name, {}))
        known.update(base.rebuilding or {})
        newest_base = base.last.t if base.last is not None else -1
        base_bars = [known[t] for t in sorted(known) if t <= newest_base and not known[t].forming]
        base_forming = base.forming
        made: list[Bar] = []
        for ser in st.higher:
            grid = ser.grid
            assert grid is not None
            tf, lo = ser.tf.name, history.since[ser.tf.name]
            groups = [g for g in aggregate_all(grid, symbol, (b for b in base_bars if b.t >= lo))
                      if g[0].lo >= lo]
            current: tuple[Bucket, list[Bar]] | None = None
            if groups:
                bucket, parts = groups[-1]
                complete = (parts[-1].t + self.tf.ms >= bucket.end
                            or (base_forming is not None and base_forming.t >= bucket.hi)
                            or (base_forming is None and now_ms >= bucket.end + self.tf.ms))
                if not complete:
                    current = groups.pop()
            series = {b.t: b for b in history.stored[tf]}
            series.update((t, b) for t, b in owed.get(tf, {}).items() if not b.forming)
            series.update(ser.rebuilding or {})
            for bucket, parts in groups:
                bar = aggregate(symbol, tf, bucket.t, parts)
                old = series.get(bar.t)
                if old is None or not old.same_values(bar):
                    made.append(bar)
                series[bar.t] = bar
            closed = [series[t] for t in sorted(series)][-warm:] if warm else []
            engine = self._engine(symbol, ser.tf)
            engine.load(closed)
            ser.engine = engine
            ser.last = closed[-1] if closed else None
            ser.forming = None
            done_hi = groups[-1][0].hi if groups else -1
            if current is not None:
                ser.restart(current[0], current[1], done_hi)
            else:
                ser.restart(None, [], done_hi)
            if ser.view(base_forming) and ser.forming is not None:
                made.append(ser.forming)  # the cycles store it again only once it changes
        if made:
            self.store.add(made)
            self._backlog(made)

    def warm_up_failed(self, symbol: str) -> None:
        """A symbol's warm-up failed: the cycles' rebuild opens its handles from the
        stores after the next cycle (flagged ``warming`` until then)."""
        self.history_changed(symbol)
        self.symbols[symbol].rebuilding = None

    def redis_lacks_history(self) -> None:
        """History went to SQLite but not to Redis: Redis is refilled from SQLite
        (only what differs) once it answers."""
        self._refill_needed = True

    @property
    def warming(self) -> int:
        """Symbols whose handles are not yet open on the warm window."""
        return sum(st.warming for st in self.symbols.values())

    # -- the cycle ----------------------------------------------------------------
    async def run_cycle(self, tick_ms: int) -> None:
        """Fetch, validate, store and compute features for every symbol, then announce.

        Each answered request is taken as soon as it arrives (:meth:`_take`): its
        bars are validated and applied, its symbols' features computed and its Redis
        write sent, while the other requests are still in flight. The symbols no
        answer covered get their features last; once every write of the cycle has
        completed, the final write carries them with the heartbeat and publishes the
        cycle announcement, so everything it names is already readable.
        """
        with foreground.cycle():
            await self._cycle(tick_ms)

    async def _cycle(self, tick_ms: int) -> None:
        """One cycle (:meth:`run_cycle`), background work held off meanwhile."""
        started = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        self.stats.last_wall_ms = int(self.clock.wall() * 1000)
        cycle = _Cycle()
        self._market_hours(now_ms)
        await self._fetch(now_ms, lambda answers, more: self._take(cycle, answers, more, now_ms))
        self._settle_closed(now_ms)
        self._record_gaps()
        answered = set(cycle.updated)
        features = self._features([s for s in self.symbols if s not in answered], now_ms)
        if cycle.writes:
            # A pool of connections may reorder them: the announcement waits for all.
            await asyncio.wait(cycle.writes)
            for task in cycle.writes:
                task.result()  # an unexpected error (a bug) is not swallowed
        await self._write_final(cycle, features, tick_ms, now_ms)
        if self.store.flush_due() and (self._flush_task is None or self._flush_task.done()):
            # One flush at a time: a locked or slow database must not pile up tasks.
            self._flush_task = self._spawn(self.store.flush())
        for sym, st in self.symbols.items():
            if st.rebuilding is None and st.needs_rebuild:
                # One rebuild per symbol at a time; a change meanwhile starts the next one.
                todo = [ser for ser in st.series if ser.needs_rebuild]
                dirty: dict[str, list[Bucket]] = {}
                for ser in todo:
                    ser.needs_rebuild = False
                    if ser.dirty:
                        dirty[ser.tf.name] = list(ser.dirty.values())
                        ser.dirty = {}
                for ser in st.series:
                    ser.rebuilding = {}
                self._spawn(self._rebuild(sym, todo, dirty))

        stats = self.stats
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
        check = self.validator.check
        for sym, bars in answers.items():
            st = self.symbols[sym]
            st.updated_ms = now_ms
            for bar in bars:
                outcome = check(bar, now_ms, symbol=sym)
                if outcome.verdict is Verdict.DUPLICATE or not outcome.bars:
                    continue
                for accepted in outcome.bars:
                    to_store.extend(self._apply(st, accepted, outcome.verdict))
        symbols = list(answers)
        cycle.updated += symbols
        features = self._features(symbols, now_ms, to_store)
        self.completeness.observe(to_store, now_ms)
        cycle.features += len(features)
        self.stats.bars_accepted += len(to_store)
        self.store.add(to_store)
        if more and self.stats.redis_ok:
            cycle.writes.append(self._spawn(self._write_chunk(cycle, to_store, features)))
        else:
            # With the bars owed to Redis: while it fails, the final write is the only try.
            self._backlog(to_store)
            cycle.unwritten += features

    async def _fetch(
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
        closed = self._closed
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
        closed = self._closed
        return lambda: len(state.servable) - sum(1 for s in closed if s in state.servable)

    def _market_hours(self, now_ms: int) -> None:
        """Note which markets are open now (one calendar query per calendar, not per symbol).

        A symbol is asked while its market is open, for :data:`CLOSE_GRACE_MS` after it
        closes, and once more if its market was open at any time since the previous
        cycle (a clock that moves many minutes per cycle, as a fast replay's does).
        """
        if not self._hours:
            return
        prev = self._prev_now_ms
        self._prev_now_ms = now_ms
        since = now_ms - CLOSE_GRACE_MS if prev is None else min(prev, now_ms - CLOSE_GRACE_MS)
        by_calendar: dict[str, tuple[bool, bool, int | None]] = {}
        closed: list[str] = []
        states = self.symbols
        for sym, cal in self._hours.items():
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
        self._closed = frozenset(closed)

    def _settle_closed(self, now_ms: int) -> None:
        """Close the forming bar of a symbol whose market closed once its time has passed
        (no later bar will come to close it until the market reopens)."""
        stored: list[Bar] = []
        for sym in self._closed:
            st = self.symbols[sym]
            forming = st.forming
            if forming is None or forming.t + self.tf.ms > now_ms:
                continue
            closed = Bar(forming.symbol, forming.tf, forming.t, forming.o, forming.h, forming.l,
                         forming.c, forming.v, forming.src, False, forming.synthetic)
            stored.append(closed)
            stored += self._close(st, closed)
        if stored:
            self.completeness.observe(stored, now_ms)
            self.store.add(stored)
            self._backlog(stored)  # the cycle's final write carries them

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
                return chunk, await asyncio.wait_for(fetch, self.settings.fetch_timeout_s)
            except Exception as exc:  # every failure is the chunk's answer
                return chunk, exc

        tasks = [asyncio.ensure_future(call(grid, chunk)) for grid, chunk in chunks]
        try:
            for taken, next_done in enumerate(asyncio.as_completed(tasks), 1):
                chunk, result = await next_done
                deliver(self._answered(state, chunk, result, now_ms, interval), taken < len(tasks))
                # Answers that came in together are taken one by one: let the write just
                # spawned go out now, so Redis works on it while the next one is taken.
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

    def _apply(self, st: SymbolState, bar: Bar, verdict: Verdict) -> list[Bar]:
        """Fold an accepted bar into the symbol's series; returns the bars to store
        (higher timeframes' bars that closed with it included)."""
        base = st.base
        forming = base.forming
        if verdict is Verdict.CORRECTION or (
                not (forming is not None and bar.t == forming.t)
                and base.last is not None and bar.t <= base.last.t):
            # A correction, or a revision of the newest closed bar: values change, the
            # handles are rebuilt and every higher bar containing it re-aggregated.
            base.revise(bar)
            if st.higher:
                st.higher[0].mark_dirty(bar.t)
            return [bar]
        if forming is not None and bar.t == forming.t:
            if bar.forming:
                base.forming = bar
                return [bar]
            return [bar, *self._close(st, bar)]
        stored: list[Bar] = []
        if forming is not None:
            # A newer bar closes the forming one with its last revision.
            closed = Bar(forming.symbol, forming.tf, forming.t, forming.o, forming.h, forming.l,
                         forming.c, forming.v, forming.src, False, forming.synthetic)
            stored.append(closed)
            stored += self._close(st, closed)
        if bar.forming:
            base.forming = bar
            stored.append(bar)
        else:
            stored.append(bar)
            stored += self._close(st, bar)
        return stored

    @staticmethod
    def _close(st: SymbolState, bar: Bar) -> list[Bar]:
        """Commit a closed base bar to the symbol's handles (and to a rebuild in flight)
        and fold it upward; returns the higher bars that closed with it. While the
        symbol warms nothing is folded: warm-up folds the bars applied meanwhile
        (:meth:`_fold_up`), with the base bars of each bucket it started before."""
        st.base.close(bar)
        return st.higher[0].fold(bar) if st.higher and not st.warming else []

    @staticmethod
    def _advance(st: SymbolState, now_ms: int, out: list[Bar], changed: list[Bar] | None) -> None:
        """Bring the higher timeframes up to the base's forming bar: close complete
        buckets (added to ``out``), set each forming bar (added to ``changed`` where it
        changed, if given)."""
        base_forming = st.base.forming
        for ser in st.higher:
            if ser.acc is not None:
                out += ser.settle(now_ms, base_forming)
            if ser.view(base_forming) and changed is not None and ser.forming is not None:
                changed.append(ser.forming)

    def _features(self, symbols: list[str], now_ms: int, stored: list[Bar] | None = None) -> list[FeatureRow]:
        """The feature maps of ``symbols`` on every timeframe (those with a bar), packed
        for Redis; while a symbol's market is closed, its maps are kept until shortly
        after the market opens.

        The higher timeframes are brought up to the base first (:meth:`_advance`):
        the bars that closed go to ``stored``, and so do their forming bars that
        changed when ``stored`` is given (the symbols a source answered for). A forming
        bar that did not change is not stored again, nor peeked again; its map is
        rewritten (it says when it was computed) and so never expires.
        """
        out: list[FeatureRow] = []
        append = out.append
        ttl = self.redis.features_ttl_ms
        stale_after = self.stale_after_ms
        states = self.symbols
        extended, completeness = self.extended, self.completeness.views
        settled: list[Bar] = []
        for sym in symbols:
            st = states[sym]
            if st.higher and not st.warming:
                # While warming the higher series wait for warm-up to fold the base into them.
                self._advance(st, now_ms, settled, stored)
            hold = 0 if st.market_open or st.next_open is None else st.next_open - now_ms + ttl
            regular = self.calendars[sym] if sym in extended else None
            shares = completeness(sym, now_ms)
            part = symbol_part(now_ms, st.stale(now_ms, stale_after), updated_at=st.updated_ms, via=st.via,
                               market_open=st.market_open, next_open=st.next_open,
                               extended_hours=regular is not None, warming=st.warming)
            for i, ser in enumerate(st.series):
                bar = ser.forming or ser.last
                if bar is None:
                    continue
                engine = ser.engine
                # The histogram one bar back, so a reader sees a zero crossing in one read.
                prev = engine.closed_values[MACD_HIST] if bar.forming else engine.prev_macd_hist
                packed = ser.packed = pack_series_features(
                    bar, ser.values(bar), prev, part,
                    extended=regular is not None and i == 0 and not regular.is_open(bar.t),
                    completeness=None if shares is None else shares[i])
                append((ser.tf.name, sym, packed, hold))
        if settled:
            if stored is not None:
                stored += settled
            else:
                self.completeness.observe(settled, now_ms)
                self.store.add(settled)
                self._backlog(settled)  # the cycle's final write carries them
        return out

    async def _write_chunk(
        self, cycle: _Cycle, bars: list[Bar], features: list[FeatureRow],
    ) -> None:
        """One answer's bars and features, without heartbeat or announcement."""
        try:
            has_meta = await self.redis.write_cycle(bars, features)
        except PartialWrite as exc:
            # Cluster buckets whose master failed: those alone wait for the final write.
            self._backlog(exc.bars)
            cycle.unwritten += exc.features
            self.stats.bars_stored += len(bars) - len(exc.bars)
            self._redis_failed(exc)
            return
        except (RedisError, OSError) as exc:
            self._backlog(bars)
            cycle.unwritten += features  # the final write carries them: the announcement is true
            cycle.redis_timed_out = cycle.redis_timed_out or isinstance(exc, (RedisTimeout, TimeoutError))
            self._redis_failed(exc)
            return
        self.stats.bars_stored += len(bars)
        cycle.has_meta = cycle.has_meta and has_meta

    async def _write_final(
        self, cycle: _Cycle, features: list[FeatureRow], tick_ms: int, now_ms: int,
    ) -> None:
        """The cycle's last write: the backlog Redis still lacks, the features not yet
        written, the heartbeat and the announcement (published once all is stored)."""
        stats = self.stats
        if cycle.redis_timed_out:
            return  # the bars wait in the backlog; the next cycle recomputes every feature
        bars = list(self._redis_backlog.values())
        announced = cycle.features + len(features)
        features = features + cycle.unwritten
        heartbeat = {"pid": self._pid, "t": now_ms, "tick": tick_ms, "cycle": stats.cycles,
                     "tf": self.tf.name, "tfs": self.meta["tfs"], "symbols": len(self.symbols),
                     "cycle_ms": round(stats.last_duration_ms, 3), **self._shard_info}
        announce = {"cycle": stats.cycles, "t": now_ms, "tick": tick_ms, "tf": self.tf.name,
                    "features": announced,
                    "updated": cycle.updated}
        try:
            has_meta = await self.redis.write_cycle(bars, features, heartbeat, announce)
        except PartialWrite as exc:
            failed = {b.key for b in exc.bars}
            self._unbacklog(b for b in bars if b.key not in failed)
            stats.bars_stored += len(bars) - len(exc.bars)
            self._redis_failed(exc)  # the failed buckets' bars stay in the backlog
            return
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)  # the bars stay in the backlog for the next cycle
            return
        masters = self.redis.masters()
        if not stats.redis_ok:
            log.info("redis is back", extra={"rewritten_bars": len(bars)})
            # A master that failed may have acknowledged writes its replica never got
            # before it took over: what differs from SQLite is put back.
            self._refill_needed = self._refill_needed or self.redis.cluster
        if masters != self._masters:
            if self._masters:
                log.warning("redis cluster masters changed", extra={
                    "gone": sorted(self._masters - masters), "new": sorted(masters - self._masters)})
                self._refill_needed = True
            self._masters = masters
        self._unbacklog(bars)
        stats.redis_ok = True
        stats.redis_down_since = None
        stats.bars_stored += len(bars)
        lost = not (has_meta and cycle.has_meta) and self._meta_written
        self._refill_needed = self._refill_needed or lost
        if self._refill_needed and (self._refill_task is None or self._refill_task.done()):
            self._refill_task = self._spawn(self._refill_redis(lost))

    def _unbacklog(self, written: Iterable[Bar]) -> None:
        """Drop bars Redis now has from the backlog."""
        backlog = self._redis_backlog
        for b in written:
            # Written; a newer revision buffered meanwhile (none can be, today) would stay.
            if backlog.get(b.key) is b:
                del backlog[b.key]

    def _backlog(self, bars: list[Bar]) -> None:
        """Keep bars Redis did not get (a newer revision replaces an older one)."""
        backlog = self._redis_backlog
        for b in bars:
            backlog[b.key] = b
        if len(backlog) > MAX_REDIS_BACKLOG:
            # SQLite still has them; Redis is refilled from there on recovery, even
            # when it comes back with its data (its meta key does not tell of these).
            for key in sorted(backlog, key=lambda k: k[2])[:-MAX_REDIS_BACKLOG]:
                del backlog[key]
            if not self._refill_needed:
                log.warning("redis backlog full: the oldest bars wait in sqlite for a refill",
                            extra={"kept": MAX_REDIS_BACKLOG})
                self._refill_needed = True

    def _redis_failed(self, exc: BaseException) -> None:
        stats = self.stats
        if stats.redis_ok:
            log.error("redis write failed; buffering", extra={"error": str(exc)})
            stats.redis_down_since = time.monotonic()
        stats.redis_ok = False
        stats.redis_last_error = str(exc)

    async def _refill_redis(self, lost: bool = True) -> None:
        """Redis lacks bars SQLite has: put SQLite's recent bars back.

        Redis lost its data (restarted empty), was unreachable when the daemon
        started, or the backlog dropped bars past its bound. The cycles meanwhile
        keep writing the newest bars and features; this only adds the bars Redis
        lacks (see :func:`reconcile`). ``lost``: Redis was found without its meta key.
        """
        log.warning("redis lost its data; refilling it from sqlite" if lost
                    else "redis lacks bars; refilling it from sqlite")
        started = time.perf_counter()
        try:
            await self.write_meta()
            await self.store.flush()
            total = 0
            for sym in self.symbols:
                for tf in self.timeframes:
                    total += (await reconcile(sym, tf.name, self.redis, self.store,
                                              self.settings.bars_cap)).to_redis
        except (RedisError, OSError, sqlite3.Error) as exc:
            log.error("redis refill failed; will retry", extra={"error": str(exc)})
            return
        self._refill_needed = False
        log.info("redis refilled from sqlite", extra={
            "bars": total, "symbols": len(self.symbols),
            "seconds": round(time.perf_counter() - started, 3)})

    def _record_gaps(self) -> None:
        if len(self.validator.new_gaps) > GAP_LOG_LINES:  # the validator logged the first ones
            log.info("gaps detected", extra={"gaps": len(self.validator.new_gaps),
                                             "logged": GAP_LOG_LINES})
        for gap in self.validator.new_gaps:
            self.store.add_gap(gap.symbol, self.tf.name, gap.start, gap.end, gap.missing, gap.filled)
        self.validator.new_gaps.clear()

    def redis_replaced(self) -> None:
        """Redis came back as another server (restarted, maybe from an older snapshot):
        the bars it lacks are put back from SQLite (only what differs, see :func:`reconcile`)."""
        self._refill_needed = True

    def history_changed(self, symbol: str, times: Iterable[int] = ()) -> None:
        """Older closed bars of ``symbol`` changed in the stores (gap repair, the base
        bars opening at ``times``): after the next cycle every higher bar containing one
        is re-aggregated from the stored base bars and stored, and the feature handles
        are reopened on the stored history (:meth:`_rebuild`)."""
        st = self.symbols[symbol]
        st.base.needs_rebuild = True
        if st.higher:
            for t in times:
                st.higher[0].mark_dirty(t)

    async def fold_history(self, symbol: str, start_ms: int, end_ms: int) -> int:
        """Base history older than warm-up saw came in (the rest of the bootstrap days,
        up to ``end_ms``, where the warm window began): fold it into the higher
        timeframes. Every bucket opening in ``[start_ms, end_ms)`` is aggregated from
        the stored base bars (the one ``end_ms`` falls in, which warm-up folded from
        part of its bars, whole) and stored where it differs; the higher handles are
        then reopened on the longer history. Only buckets already complete are folded
        (the cycles fold the others). Returns how many bars were stored."""
        st = self.symbols[symbol]
        if not st.higher or end_ms <= start_ms:
            return 0
        grids = [ser.grid for ser in st.higher if ser.grid is not None]
        read_end = max(grid.bucket(end_ms).hi for grid in grids)
        await self.store.flush()
        base = [b for b in await self.store.bars_between(symbol, self.tf.name, start_ms, read_end)
                if not b.forming]
        made: list[Bar] = []
        for ser in st.higher:
            assert ser.grid is not None
            groups = [(bucket, parts) for bucket, parts in aggregate_all(ser.grid, symbol, base)
                      if start_ms <= bucket.lo < end_ms and bucket.hi <= ser.done_hi]
            if not groups:
                continue
            stored = {b.t: b for b in await self.store.bars_between(
                symbol, ser.tf.name, groups[0][0].t, groups[-1][0].t + 1)}
            for bucket, parts in groups:
                bar = aggregate(symbol, ser.tf.name, bucket.t, parts)
                old = stored.get(bar.t)
                if old is None or not old.same_values(bar):
                    made.append(bar)
            ser.needs_rebuild = True
        if made:
            self.store.add(made)
            self._backlog(made)  # the next cycle's final write carries them
        return len(made)

    async def _history(self, symbol: str, tf: str, n: int) -> list[Bar]:
        """The newest ``n`` stored bars of a series, from Redis (SQLite if Redis fails)."""
        try:
            return await self.redis.recent_bars(symbol, tf, n)
        except (RedisError, OSError):
            await self.store.flush()
            return await self.store.last_bars(symbol, tf, n)

    async def _history_since(self, symbol: str, tf: str, t_ms: int) -> list[Bar]:
        """The stored bars of a series from ``t_ms`` on, from Redis (SQLite if Redis fails)."""
        try:
            return await self.redis.bars_since(symbol, tf, t_ms)
        except (RedisError, OSError):
            await self.store.flush()
            return await self.store.bars_between(symbol, tf, t_ms, 2**62)

    async def _rebuild(self, symbol: str, todo: list[Series], dirty: dict[str, list[Bucket]]) -> None:
        """Reopen the handles of ``todo`` (a symbol's series whose older closed bars
        changed: a correction, gap repair) after re-aggregating the higher buckets in
        ``dirty`` (by timeframe) from the stored base bars.

        History is read from Redis (SQLite if Redis fails) while cycles go on, so the
        reads may miss what they apply meanwhile. Nothing is lost or counted twice: the
        buckets are re-aggregated and the new handles opened, without an ``await``
        between, on the read bars overlaid with the bars Redis still owes (the backlog)
        and every closed bar applied since the rebuild started (:attr:`Series.rebuilding`),
        up to each series' newest closed bar (:meth:`_open_handles`). A re-aggregated
        bar is stored like any other (SQLite, and Redis with the next cycle's write) and
        counted for completeness (a bucket that lay wholly in a repaired gap is new).

        A symbol still warming (its warm-up failed) is warmed instead, as
        :meth:`warm_symbol` does from the stores; its dirty buckets wait for the next
        rebuild.
        """
        st = self.symbols[symbol]
        warm = self.settings.warm_bars
        reads: dict[str, list[Bar]] = {}
        base_span: list[Bar] = []
        higher: _HigherHistory | None = None
        warming = st.warming
        try:
            if warming:
                reads[self.tf.name] = await self._history(symbol, self.tf.name, warm)
                higher = await self._higher_history(symbol)
            else:
                for ser in todo:
                    reads[ser.tf.name] = await self._history(symbol, ser.tf.name, warm)
                span_lo = min((b.lo for buckets in dirty.values() for b in buckets), default=None)
                if span_lo is not None:
                    base_span = await self._history_since(symbol, self.tf.name, span_lo)
        except BaseException:
            self._rebuild_later(st, todo, dirty)
            for ser in st.series:
                ser.rebuilding = None
            raise
        if warming:
            n = self._warm_open(symbol, reads[self.tf.name], higher)
            self._rebuild_later(st, [ser for ser in todo if ser.tf.name in dirty], dirty)
            log.info("features rebuilt", extra={"symbol": symbol, "tf": self.tf.name, "bars": n,
                                                "warm": True})
            return
        base = st.base
        owed = self._owed(symbol)
        fixed: list[Bar] = []
        if dirty:
            known = {b.t: b for b in base_span}
            known.update(owed.get(base.tf.name, {}))
            known.update(base.rebuilding or {})
            newest_base = base.last.t if base.last is not None else -1
            ordered = [known[t] for t in sorted(known) if t <= newest_base and not known[t].forming]
            for ser in st.higher:
                for bucket in sorted(dirty.get(ser.tf.name, ()), key=lambda b: b.lo):
                    holds = ser.grid.holds if ser.grid is not None else None
                    parts = [b for b in ordered if bucket.lo <= b.t < bucket.hi
                             and (holds is None or holds(b.t))]
                    if ser.bucket is not None and ser.bucket.lo == bucket.lo:
                        ser.restart(bucket, parts, 0)  # the current bucket: its aggregate so far
                        continue
                    if not parts:
                        continue
                    bar = aggregate(symbol, ser.tf.name, bucket.t, parts)
                    fixed.append(bar)
                    if ser.rebuilding is not None:
                        ser.rebuilding[bar.t] = bar
                    if ser.last is not None and ser.last.t == bar.t:
                        ser.last = bar
        for ser in todo:
            n = self._open_handles(symbol, ser, reads[ser.tf.name], owed)
            log.info("features rebuilt", extra={"symbol": symbol, "tf": ser.tf.name, "bars": n})
        for ser in st.series:
            ser.rebuilding = None
        if fixed:
            self.store.add(fixed)
            self._backlog(fixed)  # the next cycle's final write carries them
            self.completeness.observe(fixed, int(self._clock() * 1000), history=True)

    @staticmethod
    def _rebuild_later(st: SymbolState, todo: list[Series], dirty: dict[str, list[Bucket]]) -> None:
        """Ask again for the rebuild of ``todo`` (with their dirty buckets), after the next cycle."""
        for ser in todo:
            ser.needs_rebuild = True
            for b in dirty.get(ser.tf.name, ()):
                ser.dirty.setdefault(b.lo, b)

    def _owed(self, symbol: str) -> dict[str, dict[int, Bar]]:
        """The bars of ``symbol`` Redis still owes (the backlog), by timeframe and open time."""
        out: dict[str, dict[int, Bar]] = {}
        for (sym, tf, t), b in self._redis_backlog.items():
            if sym == symbol:
                out.setdefault(tf, {})[t] = b
        return out

    def _open_handles(self, symbol: str, ser: Series, bars: list[Bar] | Window,
                      owed: dict[str, dict[int, Bar]], *, warm: bool = False) -> int:
        """Open the handles of one of ``symbol``'s series on ``bars`` (read from a store)
        overlaid with the bars Redis still owes (``owed``: :meth:`_owed`, the backlog)
        and every closed bar applied to it since the read began (:attr:`Series.rebuilding`),
        up to its newest closed bar; no ``await`` here, so no bar can slip between.
        Returns how many bars they hold. The caller ends the rebuild (``rebuilding``).

        ``warm``: start-up, the base series. History may then reach past the newest
        closed bar applied so far (it was fetched after the cycles began, or no source
        answered yet): it extends the series up to the forming bar, and the validator
        learns its tail, so re-delivered bars are duplicates and the next one is checked
        for a gap against it.
        """
        window = bars if isinstance(bars, Window) else Window.of(bars)
        series = {b.t: b for b in window.newest}
        series.update(owed.get(ser.tf.name, {}))
        series.update(ser.rebuilding or {})
        last = ser.last.t if ser.last is not None else -1
        if warm:
            limit = ser.forming.t if ser.forming is not None else 2**62
            last = max([last, window.older.last_before(limit),
                        *(t for t, b in series.items() if t < limit and not b.forming)])
        closed = window.closed(series, last, self.settings.warm_bars)
        engine = self._engine(symbol, ser.tf)
        engine.load_arrays(*closed)
        ser.engine = engine
        if warm and closed.rows:
            newest_closed = series.get(int(closed.t[-1]))
            if newest_closed is not None and (ser.last is None or newest_closed.t > ser.last.t):
                ser.last = newest_closed
            known = [series[t] for t in sorted(series) if t <= last and not series[t].forming]
            self.validator.prime(symbol, known[-(self.settings.correction_window_bars + 2):])
        return closed.rows

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
