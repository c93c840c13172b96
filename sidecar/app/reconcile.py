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
from dataclasses import dataclass

from sidecar import foreground
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore, StoreReader

_END = 2**62
#: Symbols whose Redis bars are read in one round trip (between cycles).
REDIS_READ_BATCH = 4


@dataclass(slots=True)
class Reconciled:
    """How many bars one :func:`reconcile` call copied each way."""

    to_sqlite: int = 0
    to_redis: int = 0


async def reconcile(symbol: str, tf: str, redis: RedisStore, store: BarStore, keep: int) -> Reconciled:
    """Make the newest ``keep`` bars of one symbol the same in both stores.

    Raises ``RedisError`` when Redis is unreachable (the caller decides what that means).
    """
    return (await reconcile_many([symbol], tf, redis, store, keep))[symbol][0]


async def reconcile_many(symbols: list[str], tf: str, redis: RedisStore, store: BarStore, keep: int,
                         window: int = 0) -> dict[str, tuple[Reconciled, list[Bar]]]:
    """:func:`reconcile` for many symbols: one Redis round trip for their bars, the
    comparison in a worker thread (stepping aside while a cycle runs), one write per
    store for what differs. With ``window``, each symbol's newest ``window``
    (``<= keep``) bars as Redis holds them afterwards come back too (the caller
    need not read them again).

    Raises ``RedisError`` when Redis is unreachable.
    """
    in_redis: dict[str, list[tuple[int, bytes]]] = {}
    for i in range(0, len(symbols), REDIS_READ_BATCH):  # each reply is decoded on the event loop
        await foreground.wait_idle()
        in_redis.update(await redis.recent_packed_many(symbols[i:i + REDIS_READ_BATCH], tf, keep))

    def compare() -> dict[str, _Plan]:
        reader = store.reader()
        try:
            plans: dict[str, _Plan] = {}
            for sym in symbols:
                foreground.wait_idle_blocking()
                plans[sym] = _plan(sym, tf, dict(in_redis[sym]), reader, keep, window)
            return plans
        finally:
            reader.close()

    plans = await asyncio.to_thread(compare)
    to_sqlite = [b for p in plans.values() for b in p.to_sqlite]
    to_redis = [b for p in plans.values() for b in p.to_redis]
    if to_sqlite:
        await store.write_history(to_sqlite)
    if to_redis:
        await redis.write_history(to_redis)
    return {sym: (Reconciled(len(p.to_sqlite), len(p.to_redis)), p.window) for sym, p in plans.items()}


@dataclass(slots=True)
class _Plan:
    """What one symbol's stores lack, and its window once they have it."""

    to_sqlite: list[Bar]
    to_redis: list[Bar]
    window: list[Bar]


def _plan(symbol: str, tf: str, in_redis: dict[int, bytes], store: StoreReader, keep: int,
          window: int) -> _Plan:
    """Compare one symbol's newest ``keep`` bars in Redis (``in_redis``, packed) with
    SQLite (see the module's rules)."""
    to_sqlite: list[Bar] = []
    to_redis: list[Bar] = []
    if in_redis:
        first, last = min(in_redis), max(in_redis)
        stored = store.packed_between(symbol, tf, first, last + 1)
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
        to_redis.extend(Bar.unpack(symbol, tf, m) for t, m in stored.items() if t not in in_redis)
        to_redis.extend(newer[-keep:])
        room = keep - len(in_redis) - len(newer)
        if room > 0:  # Redis holds fewer than it keeps: older stored bars fill it up
            to_redis.extend(store.last_bars(symbol, tf, room, before=first))
    else:
        to_redis.extend(store.last_bars(symbol, tf, keep))
    bars: list[Bar] = []
    if window > 0:
        ts = sorted({*in_redis, *(b.t for b in to_redis)})[-min(window, keep):]
        replaced = {b.t: b for b in to_redis}
        bars = [replaced[t] if t in replaced else Bar.unpack(symbol, tf, in_redis[t]) for t in ts]
    return _Plan(to_sqlite, to_redis, bars)
