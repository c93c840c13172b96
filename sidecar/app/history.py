"""Opening a symbol's series on stored history: start-up warm-up and rebuilds.

At start every symbol is put in warm-up (:meth:`History.begin_warmup`: the newest
stored bars teach the validator where each series stopped and are served, flagged
``warming``, from the first cycle); its handles are then opened on the warm window,
one symbol at a time between cycles (:meth:`History.warm_symbols`), and the base is
folded into the higher timeframes (:meth:`History.fold_up`); each series' newest
closed bars are kept apart from the handles on the rest, so that the cycle redoes a
correction in memory (:meth:`~sidecar.series.Series.reopen`). When older closed bars
of a series change beyond that (gap repair, a correction the cycle could not redo),
its handles are reopened on the stored history after the cycle
(:meth:`History.start_rebuilds`, :meth:`History.rebuild`).
History is read while cycles go on: every closed bar applied meanwhile is kept in
:attr:`~sidecar.series.Series.rebuilding` and laid over what was read, so nothing is
lost or counted twice (:meth:`History.open_handles`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from sidecar import foreground
from sidecar.app.reconcile import TAIL, Window, reconcile_many
from sidecar.app.symbol_state import SymbolState
from sidecar.app.tasks import Background
from sidecar.app.writer import RedisWriter
from sidecar.bar import Bar
from sidecar.clock import Clock
from sidecar.completeness import Completeness
from sidecar.features import FeatureEngine
from sidecar.redis_store import RedisStore
from sidecar.series import Bucket, Series, aggregate, aggregate_all
from sidecar.settings import Settings
from sidecar.sqlite_store import BarStore
from sidecar.timeframe import Timeframe
from sidecar.validation import Validator

log = logging.getLogger("sidecar.pipeline")

DAY_MS = 86_400_000


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
    #: The stored closed base bars from ``base_from`` on (the oldest of ``since``, or the
    #: bucket the base's recent bars begin in, if older).
    base: list[Bar] = field(default_factory=list)
    base_from: int = 0


class History:
    """Opens the symbols' feature handles on stored history, at start and after changes."""

    def __init__(self, settings: Settings, clock: Clock, symbols: dict[str, SymbolState],
                 grids: dict[str, Timeframe], timeframes: tuple[Timeframe, ...],
                 engine: Callable[[str, Timeframe], FeatureEngine], validator: Validator,
                 redis: RedisStore, store: BarStore, writer: RedisWriter, background: Background,
                 completeness: Completeness) -> None:
        """``engine``: a fresh feature engine for a symbol's timeframe; ``writer``: the
        bars Redis still owes are laid over what is read, and bars aggregated here
        are handed to it; ``background``: where rebuilds run; ``completeness`` counts
        the bars a rebuild re-aggregates."""
        self.settings = settings
        self.clock = clock
        self.symbols = symbols
        self.grids = grids
        self.tf = timeframes[0]
        self.timeframes = timeframes
        self.engine = engine
        self.validator = validator
        self.redis = redis
        self.store = store
        self.writer = writer
        self.background = background
        self.completeness = completeness
        self.progress = WarmupProgress()
        self._warm_redis_down = False  # warm-up found Redis unreachable: it reads SQLite
        #: Where warm-up compares the stores (a second process at many symbols, else a thread).
        self.warm_pool: Executor | None = None

    def status(self) -> dict[str, Any]:
        """Start-up warm-up: symbols ``live`` (handles open on the warm window), ``warming``
        (served from live bars, flagged ``warming``), ``waiting`` (no bar yet); history fetched."""
        warming = waiting = 0
        for st in self.symbols.values():
            if st.warming:
                if st.base.last is None and st.base.forming is None:
                    waiting += 1
                else:
                    warming += 1
        w = self.progress
        return {
            "done": w.finished_ms is not None,
            "live": len(self.symbols) - warming - waiting,
            "warming": warming,
            "waiting": waiting,
            "cold": w.cold,
            "history_bars": w.history_bars,
            "history_requests": w.history_requests,
            "failed": w.failed,
            "started_ms": w.started_ms,
            "finished_ms": w.finished_ms,
        }

    @property
    def warming(self) -> int:
        """Symbols whose handles are not yet open on the warm window."""
        return sum(st.warming for st in self.symbols.values())

    async def warm(self, now_ms: int) -> None:
        """Open every symbol's feature handles on stored history, in line: :meth:`begin_warmup`
        then :meth:`warm_symbol` for each symbol (the daemon runs the second part in the
        background while the cycles go on)."""
        await self.begin_warmup(now_ms)
        for sym in self.symbols:
            await self.warm_symbol(sym)
        self.progress.finished_ms = int(self.clock() * 1000)

    def start_rebuilds(self) -> None:
        """Start a rebuild for each symbol some of whose series changed (one per symbol at
        a time; a change meanwhile starts the next one after a later cycle)."""
        for sym, st in self.symbols.items():
            if st.rebuilding is None and st.needs_rebuild:
                todo = [ser for ser in st.series if ser.needs_rebuild]
                dirty: dict[str, list[Bucket]] = {}
                for ser in todo:
                    ser.needs_rebuild = False
                    if ser.dirty:
                        dirty[ser.tf.name] = list(ser.dirty.values())
                        ser.dirty = {}
                for ser in st.series:
                    ser.rebuilding = {}
                self.background.spawn(self.rebuild(sym, todo, dirty))

    async def begin_warmup(self, now_ms: int) -> list[str]:
        """Put every symbol in warm-up; returns those with nothing stored (cold).

        One read of each symbol's newest stored bars (a few, not the warm window)
        teaches the validator where the series stopped, so a gap while the daemon
        was down is recorded, and sets the newest closed and forming bar, so features
        are served from the first cycle (flagged ``warming``). From here every closed
        bar applied is also kept in :attr:`SymbolState.rebuilding` until
        :meth:`warm_symbol` opens the handles on history plus those bars.
        """
        self.progress = WarmupProgress(started_ms=now_ms)
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
            st.base.last = closed[-1] if closed else None
            st.base.forming = forming[-1] if forming else None
            self.validator.prime(sym, closed[-keep:] + forming)
        if self.timeframes[1:]:
            await self._begin_higher()
        self.progress.cold = len(cold)
        return cold

    async def _begin_higher(self) -> None:
        """Each higher series' newest stored bars, served (flagged ``warming``) until warm-up
        folds the base into it (:meth:`fold_up`); one read per timeframe."""
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
        (:meth:`open_handles`), one symbol at a time between cycles; the higher
        timeframes' history is read and the base folded into them (:meth:`fold_up`).
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
            self.writer.replaced()  # once Redis answers
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
        cycles applied meanwhile, which :meth:`open_handles` lays over it): no
        reconcile, no read back; its higher timeframes are built from the same bars.
        Returns the closed base bars the handles were opened on."""
        st = self.symbols[symbol]
        higher: _HigherHistory | None = None
        if st.higher:
            warm = self.settings.warm_bars
            now_ms = int(self.clock() * 1000)
            floor = now_ms - self.settings.retention_for(self.tf.name) * DAY_MS
            higher = _HigherHistory(base=[b for b in bars if not b.forming])
            for ser in st.higher:
                higher.stored[ser.tf.name] = []
                higher.since[ser.tf.name] = max(floor, now_ms - warm * ser.tf.ms)
        return self._warm_open(symbol, bars, higher)

    async def _higher_history(self, symbol: str) -> _HigherHistory | None:
        """What folding the base into the higher timeframes at warm-up needs (:meth:`fold_up`):
        each one's stored history (SQLite) and the stored base bars from the oldest
        bucket any of them lacks on; ``None`` without higher timeframes."""
        st = self.symbols[symbol]
        if not st.higher:
            return None
        warm = self.settings.warm_bars
        now_ms = int(self.clock() * 1000)
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
        if st.base.last is not None:
            # Every bucket the base's recent bars may begin in: their tails (Series.set_tail).
            begin = st.base.last.t - st.base.reach * self.tf.ms
            lo = min(lo, *(ser.grid.bucket(begin).lo for ser in st.higher if ser.grid is not None))
        base = await self.store.bars_between(symbol, self.tf.name, lo, 2**62)
        out.base = [b for b in base if not b.forming]
        out.base_from = lo
        return out

    def _warm_open(self, symbol: str, bars: list[Bar] | Window, higher: _HigherHistory | None) -> int:
        """Open the base handles on ``bars`` (:meth:`open_handles`), fold the base into
        the higher timeframes (:meth:`fold_up`) and end the symbol's warm-up; no
        ``await``, so no bar applied meanwhile can slip between."""
        st = self.symbols[symbol]
        owed = self.writer.owed(symbol)
        n = self.open_handles(symbol, st.base, bars, owed, warm=True)
        if higher is not None:
            self.fold_up(symbol, st, higher, owed)
        for ser in st.series:
            ser.rebuilding = None
        st.warming = False
        return n

    def fold_up(self, symbol: str, st: SymbolState, history: _HigherHistory,
                 owed: dict[str, dict[int, Bar]]) -> None:
        """Open the higher timeframes' handles on their stored history after folding in
        the base bars they lack (back-filled history, a daemon that was down, the bars
        the cycles applied during warm-up), and set each one's current bucket from its
        closed base bars. The base's handles are open (its newest closed bar is known).

        Bars aggregated here are stored (SQLite, and Redis with the next cycle's write).
        """
        base = st.base
        warm = self.settings.warm_bars
        now_ms = int(self.clock() * 1000)
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
            behind = self.engine(symbol, ser.tf)
            cut = max(0, len(closed) - ser.reach)
            behind.load(closed[:cut])
            ser.reopen(behind, closed[cut:])
            ser.set_tail(base_bars, base.behind.last_closed_t, history.base_from)
            ser.last = closed[-1] if closed else None
            ser.forming = None
            done_hi = groups[-1][0].hi if groups else -1
            if current is not None:
                ser.restart(current[0], current[1], done_hi)
            else:
                ser.restart(None, [], done_hi)
            ser.view(base_forming)
        if made:
            self.store.add(made)
            self.writer.defer(made)

    def warm_up_failed(self, symbol: str) -> None:
        """A symbol's warm-up failed: the cycles' rebuild opens its handles from the
        stores after the next cycle (flagged ``warming`` until then)."""
        self.history_changed(symbol)
        self.symbols[symbol].rebuilding = None


    def history_changed(self, symbol: str, times: Iterable[int] = ()) -> None:
        """Older closed bars of ``symbol`` changed in the stores (gap repair, the base
        bars opening at ``times``): after the next cycle every higher bar containing one
        is re-aggregated from the stored base bars and stored, and the feature handles
        are reopened on the stored history (:meth:`rebuild`)."""
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
            self.writer.defer(made)  # the next cycle's final write carries them
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

    async def rebuild(self, symbol: str, todo: list[Series], dirty: dict[str, list[Bucket]]) -> None:
        """Reopen the handles of ``todo`` (a symbol's series whose older closed bars
        changed: a correction, gap repair) after re-aggregating the higher buckets in
        ``dirty`` (by timeframe) from the stored base bars.

        History is read from Redis (SQLite if Redis fails) while cycles go on, so the
        reads may miss what they apply meanwhile. Nothing is lost or counted twice: the
        buckets are re-aggregated and the new handles opened, without an ``await``
        between, on the read bars overlaid with the bars Redis still owes (the backlog)
        and every closed bar applied since the rebuild started (:attr:`Series.rebuilding`),
        up to each series' newest closed bar (:meth:`open_handles`). A re-aggregated
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
        span_lo: int | None = None
        warming = st.warming
        try:
            if warming:
                reads[self.tf.name] = await self._history(symbol, self.tf.name, warm)
                higher = await self._higher_history(symbol)
            else:
                for ser in todo:
                    reads[ser.tf.name] = await self._history(symbol, ser.tf.name, warm)
                span_lo = min((b.lo for buckets in dirty.values() for b in buckets), default=None)
                tail_lo = self._tails_from(st) if st.base in todo else None
                if tail_lo is not None:
                    span_lo = tail_lo if span_lo is None else min(span_lo, tail_lo)
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
        owed = self.writer.owed(symbol)
        fixed: list[Bar] = []
        ordered: list[Bar] = []
        if span_lo is not None:
            known = {b.t: b for b in base_span}
            known.update(owed.get(base.tf.name, {}))
            known.update(base.rebuilding or {})
            newest_base = base.last.t if base.last is not None else -1
            ordered = [known[t] for t in sorted(known) if t <= newest_base and not known[t].forming]
        if dirty:
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
            n = self.open_handles(symbol, ser, reads[ser.tf.name], owed)
            log.info("features rebuilt", extra={"symbol": symbol, "tf": ser.tf.name, "bars": n})
        if base in todo:
            for ser in st.higher:
                ser.set_tail(ordered, base.behind.last_closed_t, 2**62 if span_lo is None else span_lo)
        for ser in st.series:
            ser.rebuilding = None
        if fixed:
            self.store.add(fixed)
            self.writer.defer(fixed)  # the next cycle's final write carries them
            self.completeness.observe(fixed, int(self.clock() * 1000), history=True)

    def _tails_from(self, st: SymbolState) -> int | None:
        """Where the stored base bars a rebuild reopening the base reads begin, so that
        each higher series' tail can be set anew (:meth:`Series.set_tail`): the oldest
        bucket the base's recent bars begin in (they only move on while it reads)."""
        base = st.base
        first = base.recent[0] if base.recent else base.last
        if first is None or not st.higher:
            return None
        return min(ser.grid.bucket(first.t).lo for ser in st.higher if ser.grid is not None)

    @staticmethod
    def _rebuild_later(st: SymbolState, todo: list[Series], dirty: dict[str, list[Bucket]]) -> None:
        """Ask again for the rebuild of ``todo`` (with their dirty buckets), after the next cycle."""
        for ser in todo:
            ser.needs_rebuild = True
            for b in dirty.get(ser.tf.name, ()):
                ser.dirty.setdefault(b.lo, b)

    def open_handles(self, symbol: str, ser: Series, bars: list[Bar] | Window,
                     owed: dict[str, dict[int, Bar]], *, warm: bool = False) -> int:
        """Open the handles of one of ``symbol``'s series on ``bars`` (read from a store)
        overlaid with the bars Redis still owes (``owed``: :meth:`RedisWriter.owed`, the backlog)
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
        # The newest closed bars held as bars (up to its reach) are kept apart in
        # ``recent``, the handles on the rest are ``behind`` (Series.reopen).
        rows, times = closed.rows, closed.t
        recent: list[Bar] = []
        while len(recent) < min(ser.reach, rows):
            b = series.get(int(times[rows - 1 - len(recent)]))
            if b is None or b.forming:
                break
            recent.append(b)
        recent.reverse()
        behind = self.engine(symbol, ser.tf)
        behind.load_arrays(*closed.cut(0, rows - len(recent)))
        ser.reopen(behind, recent)
        if warm and closed.rows:
            newest_closed = series.get(int(closed.t[-1]))
            if newest_closed is not None and (ser.last is None or newest_closed.t > ser.last.t):
                ser.last = newest_closed
            known = [series[t] for t in sorted(series) if t <= last and not series[t].forming]
            self.validator.prime(symbol, known[-(self.settings.correction_window_bars + 2):])
        return closed.rows
