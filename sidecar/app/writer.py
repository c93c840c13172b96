"""Where the cycle's writes go out to Redis, and what Redis still lacks.

The :class:`RedisWriter` sends each answered slice's bars and features as soon as
they are ready (:meth:`RedisWriter.send`: script calls of at most
:data:`WRITE_PIECE_FEATURES` maps, not awaited by the cycle), then one final write per
cycle (:meth:`RedisWriter.finish`) that carries the bars Redis still lacks (the
backlog), the features not yet written, the heartbeat and the cycle announcement,
published once everything it names is stored.

While Redis fails, bars wait in the backlog (bounded by :data:`MAX_REDIS_BACKLOG`; the
oldest are left to SQLite). Redis is refilled from SQLite, only what differs (see
:func:`~sidecar.app.reconcile.reconcile`), when it comes back without its data (its
meta key gone), as another server, after a cluster failover, or when the backlog
dropped bars.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.app.reconcile import reconcile
from sidecar.bar import Bar
from sidecar.redis_store import FeatureRow, PartialWrite, RedisStore
from sidecar.sqlite_store import BarStore

log = logging.getLogger("sidecar.pipeline")

#: At most this many bars wait in memory for Redis to come back.
MAX_REDIS_BACKLOG = 500_000
#: Feature maps per script call of an answer's write (~150 KiB): each call fits a
#: socket's send buffer at once, on a connection of its own, so Redis gets all of it
#: while the event loop works on the next answer, instead of as fast as the loop comes
#: round to push the rest of one large call.
WRITE_PIECE_FEATURES = 256

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(slots=True)
class RedisState:
    """How the writes to Redis are going."""

    ok: bool = True
    #: When the writes started failing (``time.monotonic``); ``None`` while they succeed.
    down_since: float | None = None
    last_error: str | None = None
    #: Bars Redis acknowledged.
    bars_stored: int = 0


@dataclass(slots=True)
class CycleWrites:
    """One cycle's writes: those in flight, and what the final write must carry."""

    writes: list[asyncio.Task[None]] = field(default_factory=list)
    #: Feature maps whose write failed (or was not tried): the final write carries them.
    unwritten: list[FeatureRow] = field(default_factory=list)
    has_meta: bool = True  # False once a write found the meta key gone
    #: A chunk write waited out SIDECAR_REDIS_TIMEOUT_S (Redis hangs): the final write is
    #: not tried this cycle, so a hung server costs a cycle one timeout, not two.
    timed_out: bool = False


class RedisWriter:
    """Owns the writes to Redis: per-answer and final writes, backlog, refill."""

    def __init__(self, redis: RedisStore, store: BarStore, meta: dict[str, Any], spawn: Spawn, *,
                 symbols: Sequence[str], timeframes: Sequence[str], bars_cap: int) -> None:
        """``meta``: the meta key's map; ``spawn`` runs background work (the refill);
        ``symbols`` and ``timeframes``: the series a refill puts back, ``bars_cap`` bars each."""
        self.redis = redis
        self.store = store
        self.meta = meta
        self._spawn = spawn
        self._symbols = symbols
        self._timeframes = timeframes
        self._bars_cap = bars_cap
        self.state = RedisState()
        #: Bars Redis did not get yet, by (symbol, timeframe, open time).
        self.backlog: dict[tuple[str, str, int], Bar] = {}
        #: Redis lacks bars SQLite has: a refill runs after the next successful write.
        self.refill_needed = False
        self._refill_task: asyncio.Task[Any] | None = None
        self._meta_written = False  # only then does a missing meta key mean lost data
        #: The cluster's masters as of the last complete write (empty on a single server).
        self._masters: frozenset[str] = frozenset()

    def status(self) -> dict[str, Any]:
        """``ok``: the last write succeeded; the bars waiting for Redis; a refill pending."""
        st = self.state
        return {"ok": st.ok, "last_error": st.last_error, "backlog": len(self.backlog),
                "refill_pending": self.refill_needed}

    async def write_meta(self) -> None:
        """Write the meta key; its absence later tells that Redis lost its data."""
        await self.redis.write_meta(self.meta)
        self._meta_written = True

    def replaced(self) -> None:
        """Redis came back as another server, or lacks history SQLite got: the bars it
        lacks are put back from SQLite (only what differs) once it answers."""
        self.refill_needed = True

    # -- the cycle's writes ---------------------------------------------------------
    def send(self, cycle: CycleWrites, bars: list[Bar], features: list[FeatureRow], more: bool) -> None:
        """One answer's bars and features: written at once (not awaited, in pieces of
        :data:`WRITE_PIECE_FEATURES` maps) while Redis answers and either ``more``
        requests are in flight or they are more than a piece; else carried by the final
        write (a round trip less)."""
        if self.state.ok and (more or len(features) > WRITE_PIECE_FEATURES):
            piece = WRITE_PIECE_FEATURES
            cycle.writes.append(self._spawn(self._write_chunk(cycle, bars, features[:piece])))
            for lo in range(piece, len(features), piece):
                cycle.writes.append(self._spawn(self._write_chunk(cycle, [], features[lo:lo + piece])))
        else:
            # With the bars owed to Redis: while it fails, the final write is the only try.
            self.defer(bars)
            cycle.unwritten += features

    async def _write_chunk(self, cycle: CycleWrites, bars: list[Bar], features: list[FeatureRow]) -> None:
        """One answer's bars and features, without heartbeat or announcement."""
        try:
            has_meta = await self.redis.write_cycle(bars, features)
        except PartialWrite as exc:
            # Cluster buckets whose master failed: those alone wait for the final write.
            self.defer(exc.bars)
            cycle.unwritten += exc.features
            self.state.bars_stored += len(bars) - len(exc.bars)
            self._failed(exc)
            return
        except (RedisError, OSError) as exc:
            self.defer(bars)
            cycle.unwritten += features  # the final write carries them: the announcement is true
            cycle.timed_out = cycle.timed_out or isinstance(exc, (RedisTimeout, TimeoutError))
            self._failed(exc)
            return
        self.state.bars_stored += len(bars)
        cycle.has_meta = cycle.has_meta and has_meta

    async def finish(self, cycle: CycleWrites, features: list[FeatureRow],
                     heartbeat: dict[str, Any], announce: dict[str, Any]) -> None:
        """The cycle's last write, once its other writes completed: the backlog Redis
        still lacks, the features not yet written, the heartbeat and the announcement
        (published once all is stored)."""
        if cycle.writes:
            # A pool of connections may reorder them: the announcement waits for all.
            await asyncio.wait(cycle.writes)
            for task in cycle.writes:
                task.result()  # an unexpected error (a bug) is not swallowed
        if cycle.timed_out:
            return  # the bars wait in the backlog; the next cycle recomputes every feature
        state = self.state
        bars = list(self.backlog.values())
        try:
            has_meta = await self.redis.write_cycle(bars, features + cycle.unwritten, heartbeat, announce)
        except PartialWrite as exc:
            failed = {b.key for b in exc.bars}
            self._release(b for b in bars if b.key not in failed)
            state.bars_stored += len(bars) - len(exc.bars)
            self._failed(exc)  # the failed buckets' bars stay in the backlog
            return
        except (RedisError, OSError) as exc:
            self._failed(exc)  # the bars stay in the backlog for the next cycle
            return
        masters = self.redis.masters()
        if not state.ok:
            log.info("redis is back", extra={"rewritten_bars": len(bars)})
            # A master that failed may have acknowledged writes its replica never got
            # before it took over: what differs from SQLite is put back.
            self.refill_needed = self.refill_needed or self.redis.cluster
        if masters != self._masters:
            if self._masters:
                log.warning("redis cluster masters changed", extra={
                    "gone": sorted(self._masters - masters), "new": sorted(masters - self._masters)})
                self.refill_needed = True
            self._masters = masters
        self._release(bars)
        state.ok = True
        state.down_since = None
        state.bars_stored += len(bars)
        lost = not (has_meta and cycle.has_meta) and self._meta_written
        self.refill_needed = self.refill_needed or lost
        if self.refill_needed and (self._refill_task is None or self._refill_task.done()):
            self._refill_task = self._spawn(self._refill(lost))

    # -- the backlog ----------------------------------------------------------------
    def defer(self, bars: list[Bar]) -> None:
        """Keep bars Redis did not get for the next write (a newer revision replaces an older one)."""
        backlog = self.backlog
        for b in bars:
            backlog[b.key] = b
        if len(backlog) > MAX_REDIS_BACKLOG:
            # SQLite still has them; Redis is refilled from there on recovery, even
            # when it comes back with its data (its meta key does not tell of these).
            for key in sorted(backlog, key=lambda k: k[2])[:-MAX_REDIS_BACKLOG]:
                del backlog[key]
            if not self.refill_needed:
                log.warning("redis backlog full: the oldest bars wait in sqlite for a refill",
                            extra={"kept": MAX_REDIS_BACKLOG})
                self.refill_needed = True

    def _release(self, written: Iterable[Bar]) -> None:
        """Drop bars Redis now has from the backlog."""
        backlog = self.backlog
        for b in written:
            # Written; a newer revision buffered meanwhile (none can be, today) would stay.
            if backlog.get(b.key) is b:
                del backlog[b.key]

    def owed(self, symbol: str) -> dict[str, dict[int, Bar]]:
        """The bars of ``symbol`` Redis still owes (the backlog), by timeframe and open time."""
        out: dict[str, dict[int, Bar]] = {}
        for (sym, tf, t), b in self.backlog.items():
            if sym == symbol:
                out.setdefault(tf, {})[t] = b
        return out

    def _failed(self, exc: BaseException) -> None:
        state = self.state
        if state.ok:
            log.error("redis write failed; buffering", extra={"error": str(exc)})
            state.down_since = time.monotonic()
        state.ok = False
        state.last_error = str(exc)

    async def _refill(self, lost: bool = True) -> None:
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
            for sym in self._symbols:
                for tf in self._timeframes:
                    total += (await reconcile(sym, tf, self.redis, self.store, self._bars_cap)).to_redis
        except (RedisError, OSError, sqlite3.Error) as exc:
            log.error("redis refill failed; will retry", extra={"error": str(exc)})
            return
        self.refill_needed = False
        log.info("redis refilled from sqlite", extra={
            "bars": total, "symbols": len(self._symbols),
            "seconds": round(time.perf_counter() - started, 3)})
