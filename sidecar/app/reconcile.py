"""Making Redis and SQLite agree again after a crash or a Redis that lost its data.

Redis gets every cycle's bars at once; SQLite gets them at the next flush. So after
a SIGKILL Redis holds the bars of the lost SQLite buffer, and after Redis restarts
empty (or from an old snapshot) SQLite holds bars Redis lacks. :func:`reconcile`
copies each symbol's recent bars both ways: a bar only one store has goes to the
other; where both have it and they differ, a closed bar beats a forming one and
otherwise the store that saw the later writes wins: Redis (written first), unless
SQLite holds bars newer than any in Redis (Redis came back from an older snapshot,
so SQLite has the revisions made since). Upserts keep both stores free of duplicates.

The comparison is on the packed form (Redis members as stored, SQLite rows packed
the same way), so stores that agree cost two reads per symbol and no decoding.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np

from sidecar import foreground
from sidecar.bar import Bar
from sidecar.features import Columns, join_columns
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore, StoreReader

log = logging.getLogger("sidecar.reconcile")
T = TypeVar("T")

_END = 2**62
#: Symbols whose count, oldest bar and tail are read from Redis at once (between cycles).
REDIS_READ_BATCH = 50
#: Symbols whose whole set is read from Redis in one round trip (between cycles).
FULL_READ_BATCH = 4
#: Newest bars of each symbol compared bar by bar (longer than any correction window).
TAIL = 256


@dataclass(slots=True)
class Reconciled:
    """How many bars one :func:`reconcile` call copied each way."""

    to_sqlite: int = 0
    to_redis: int = 0


async def reconcile(symbol: str, tf: str, redis: RedisStore, store: BarStore, keep: int) -> Reconciled:
    """Make the newest ``keep`` bars of one symbol the same in both stores.

    Raises ``RedisError`` when Redis is unreachable (the caller decides what that means).
    """
    return (await reconcile_many([symbol], tf, redis, store, keep, tail=keep))[symbol][0]


async def reconcile_many(symbols: list[str], tf: str, redis: RedisStore, store: BarStore, keep: int,
                         window: int = 0, tail: int = TAIL,
                         pool: Executor | None = None) -> dict[str, tuple[Reconciled, Window]]:
    """:func:`reconcile` for many symbols, copying only what differs, and each symbol's
    newest ``window`` closed bars as the stores hold them afterwards (the caller need
    not read them again).

    Each symbol's count and oldest bar in Redis and its newest ``tail`` bars are read
    (one atomic script call each, all at once), then compared with SQLite in a worker
    thread that steps aside while a cycle runs: where SQLite holds as many bars as
    Redis from Redis's oldest bar to the tail, with the same first one, only the tail
    is compared bar by bar (corrections and the bars one store missed before a crash
    lie there: ``tail`` is longer than the correction window); elsewhere Redis's whole
    set is read and compared. What differs is then written, one write per store.
    With ``pool`` (a process: :func:`compare_process`), the comparison and the window
    reads run there, on another core, instead of a thread of this process.

    Raises ``RedisError`` when Redis is unreachable.
    """
    tail = min(max(tail, 1), keep)
    edges: dict[str, tuple[int, int | None, list[tuple[int, bytes]]]] = {}
    for i in range(0, len(symbols), REDIS_READ_BATCH):  # each reply is decoded on the event loop
        await foreground.wait_idle()
        edges.update(await redis.edges_many(symbols[i:i + REDIS_READ_BATCH], tf, tail))

    path = str(store.path)
    plans = await _off_loop(pool, _compare, path, tf, edges, {}, keep, window, tail)
    differ = [sym for sym, p in plans.items() if p is None]
    if differ:
        everything: dict[str, list[tuple[int, bytes]]] = {}
        for i in range(0, len(differ), FULL_READ_BATCH):
            await foreground.wait_idle()
            everything.update(await redis.recent_packed_many(differ[i:i + FULL_READ_BATCH], tf, keep))
        plans.update(await _off_loop(pool, _compare, path, tf, {sym: edges[sym] for sym in differ},
                                     everything, keep, window, tail))
    done = {sym: p for sym, p in plans.items() if p is not None}
    to_sqlite = [b for p in done.values() for b in p.to_sqlite]
    to_redis = [b for p in done.values() for b in p.to_redis]
    if to_sqlite:
        await store.write_history(to_sqlite)
    if to_redis:
        await redis.write_history(to_redis)
    return {sym: (Reconciled(len(p.to_sqlite), len(p.to_redis)), p.window) for sym, p in done.items()}


def compare_process() -> ProcessPoolExecutor:
    """A second process for :func:`reconcile_many`'s comparisons (started fresh, not
    forked from this multi-threaded one); shut it down when done."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


async def _off_loop(pool: Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in ``pool``, or in a worker thread (also when the pool broke)."""
    if pool is not None:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenExecutor as exc:
            log.warning("reconcile process lost; comparing in a thread", extra={"error": str(exc)})
    return await asyncio.to_thread(fn, *args)


def _compare(path: str, tf: str, edges: dict[str, tuple[int, int | None, list[tuple[int, bytes]]]],
             full: dict[str, list[tuple[int, bytes]]], keep: int, window: int,
             tail: int) -> dict[str, _Plan | None]:
    """Each symbol's :class:`_Plan` from Redis's ``edges`` (and its whole set where
    ``full`` has it), ``None`` where its older bars differ and the whole set is wanted.
    In a thread it steps aside while a cycle runs (in a process nothing competes)."""
    reader = StoreReader.open(path)
    try:
        plans: dict[str, _Plan | None] = {}
        for sym, (count, first, newest) in edges.items():
            foreground.wait_idle_blocking()
            in_redis = dict(full.get(sym, newest))
            if sym not in full and count > len(newest):
                older, older_first = reader.span(sym, tf, first or 0, newest[0][0])
                if older != count - len(newest) or older_first != first:
                    plans[sym] = None  # the older bars differ too: compare all of them
                    continue
            plans[sym] = _plan(sym, tf, in_redis, count, first, reader, keep, window, tail)
        return plans
    finally:
        reader.close()


class Window(NamedTuple):
    """A symbol's newest closed bars as the stores hold them once reconciled: the
    older ones as columns (read from SQLite, no :class:`Bar` made), then the newest
    as bars (at least the compared tail's length of closed ones where stored, and
    SQLite's newer bars; forming ones included)."""

    older: Columns
    newest: list[Bar]

    @classmethod
    def of(cls, bars: list[Bar]) -> Window:
        """All of ``bars`` (oldest first) as the newest part."""
        return cls(Columns.empty(), bars)

    def closed(self, over: dict[int, Bar], last: int, n: int) -> Columns:
        """The newest ``n`` closed bars up to ``last`` (open time) once ``over`` (by
        open time: the newest part and the bars laid over it) replaces what the
        columns hold at the same times; a forming bar there removes it."""
        older = self.older
        hi = int(np.searchsorted(older.t, last, "right"))
        lo = min(hi, int(np.searchsorted(older.t, min(over), "left"))) if over else hi
        # The columns before the first bar laid over them stay as read; the rest is merged.
        part = older.cut(lo, hi)
        merged = dict(zip(part.t.tolist(), zip(part.h.tolist(), part.l.tolist(), part.c.tolist(),
                                               part.v.tolist(), strict=True), strict=True))
        nan = float("nan")
        for t, b in over.items():
            if b.forming:
                merged.pop(t, None)
            elif t <= last:
                merged[t] = (b.h, b.l, b.c, nan if b.v is None else b.v)
        ts = sorted(merged)
        rows = [merged[t] for t in ts]
        tail = Columns(np.array(ts, dtype=np.int64),
                       *(np.array([r[k] for r in rows], dtype=np.float64) for k in range(4)))
        out = join_columns([older.cut(0, lo), tail]) if lo else tail
        return out.cut(out.rows - n, out.rows) if out.rows > n else out


@dataclass(slots=True)
class _Plan:
    """What one symbol's stores lack, and its window once they have it."""

    to_sqlite: list[Bar]
    to_redis: list[Bar]
    window: Window


def _plan(symbol: str, tf: str, in_redis: dict[int, bytes], count: int, first: int | None,
          store: StoreReader, keep: int, window: int, recent: int) -> _Plan:
    """Compare one symbol's newest bars in Redis (``in_redis``, packed: its whole set,
    or its tail when the older ones agree; ``count`` bars from ``first`` on in all)
    with SQLite (see the module's rules). Its window's newest part holds at least
    ``recent`` closed bars where the stores have them."""
    to_sqlite: list[Bar] = []
    to_redis: list[Bar] = []
    lo = _END
    if in_redis:
        lo, last = min(in_redis), max(in_redis)
        stored = store.packed_between(symbol, tf, lo, last + 1)
        newer = store.bars_between(symbol, tf, last + 1, _END)
        sqlite_later = bool(newer)  # SQLite saw writes Redis did not: its revisions win
        for t, member in in_redis.items():
            theirs = stored.get(t)
            if theirs == member:
                continue
            mine = Bar.unpack(symbol, tf, member)
            old = None if theirs is None else Bar.unpack(symbol, tf, theirs)
            if old is not None and ((mine.forming and not old.forming)
                                    or (sqlite_later and mine.forming == old.forming)):
                to_redis.append(old)
            else:
                to_sqlite.append(mine)
        lacking = [Bar.unpack(symbol, tf, m) for t, m in stored.items() if t not in in_redis]
        to_redis.extend(lacking)
        to_redis.extend(newer[-keep:])
        room = keep - count - len(lacking) - len(newer)
        if room > 0 and first is not None:  # Redis holds fewer than it keeps: older stored bars fill it up
            to_redis.extend(store.last_bars(symbol, tf, room, before=first))
    else:
        to_redis.extend(store.last_bars(symbol, tf, keep))
    if window <= 0:
        return _Plan(to_sqlite, to_redis, Window.of([]))
    if not in_redis and to_redis:
        lo = to_redis[0].t
    replaced = {b.t: b for b in to_redis if b.t >= lo}
    newest = [replaced[t] if t in replaced else Bar.unpack(symbol, tf, in_redis[t])
              for t in sorted({*in_redis, *replaced})]
    closed = sum(not b.forming for b in newest)
    if closed < recent:  # the newest bars are wanted as bars (the validator learns them)
        more = store.last_bars(symbol, tf, recent - closed, before=lo)
        if more:
            newest[:0] = more
            closed, lo = closed + len(more), more[0].t
    need = window - closed
    older = store.closed_columns(symbol, tf, need, before=lo) if need > 0 else Columns.empty()
    return _Plan(to_sqlite, to_redis, Window(older, newest))
