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

from dataclasses import dataclass

from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore

_END = 2**62


@dataclass(slots=True)
class Reconciled:
    """How many bars one :func:`reconcile` call copied each way."""

    to_sqlite: int = 0
    to_redis: int = 0


async def reconcile(symbol: str, tf: str, redis: RedisStore, store: BarStore, keep: int) -> Reconciled:
    """Make the newest ``keep`` bars of one symbol the same in both stores.

    Raises ``RedisError`` when Redis is unreachable (the caller decides what that means).
    """
    in_redis = dict(await redis.recent_packed(symbol, tf, keep))
    to_sqlite: list[Bar] = []
    to_redis: list[Bar] = []
    if in_redis:
        first, last = min(in_redis), max(in_redis)
        stored = await store.packed_between(symbol, tf, first, last + 1)
        newer = await store.bars_between(symbol, tf, last + 1, _END)
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
            to_redis.extend(await store.last_bars(symbol, tf, room, before=first))
    else:
        to_redis.extend(await store.last_bars(symbol, tf, keep))
    out = Reconciled()
    if to_sqlite:
        out.to_sqlite = await store.write_history(to_sqlite)
    if to_redis:
        out.to_redis = await redis.write_history(to_redis)
    return out
