"""Making Redis and SQLite agree again after a crash or a Redis that lost its data.

Redis gets every cycle's bars at once; SQLite gets them at the next flush. So after
a SIGKILL Redis holds the bars of the lost SQLite buffer, and after Redis restarts
empty (or from an old snapshot) SQLite holds bars Redis lacks. :func:`reconcile`
copies each symbol's recent bars both ways: a bar only one store has goes to the
other; where both have it and they differ, a closed bar beats a forming one and
otherwise Redis (written first) wins. Upserts keep both stores free of duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore


@dataclass(slots=True)
class Reconciled:
    """How many bars one :func:`reconcile` call copied each way."""

    to_sqlite: int = 0
    to_redis: int = 0


def _newer(a: Bar, b: Bar) -> bool:
    """Whether ``a`` (from Redis) should replace ``b`` (from SQLite) for the same open time."""
    if a.same_values(b):
        return False
    return not (a.forming and not b.forming)


async def reconcile(symbol: str, tf: str, redis: RedisStore, store: BarStore, keep: int) -> Reconciled:
    """Copy the newest ``keep`` bars of one symbol between the stores, each way.

    Raises ``RedisError`` when Redis is unreachable (the caller decides what that means).
    """
    out = Reconciled()
    in_redis = await redis.recent_bars(symbol, tf, keep)
    by_t: dict[int, Bar] = {}
    if in_redis:
        by_t = {b.t: b for b in in_redis}
        stored = {b.t: b for b in await store.bars_between(symbol, tf, in_redis[0].t, in_redis[-1].t + 1)}
        to_sqlite = [b for b in in_redis if b.t not in stored or _newer(b, stored[b.t])]
        if to_sqlite:
            out.to_sqlite = await store.write_history(to_sqlite)
    to_redis = [
        b for b in await store.last_bars(symbol, tf, keep)
        if b.t not in by_t or (by_t[b.t].forming and not b.forming)
    ]
    if to_redis:
        out.to_redis = await redis.write_history(to_redis)
    return out
