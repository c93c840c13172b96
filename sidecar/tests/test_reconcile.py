"""reconcile() on a real Redis and a real SQLite file: each store gets what it lacks."""

from __future__ import annotations

from sidecar.app.reconcile import reconcile
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import bar


async def test_both_directions_closed_beats_forming_and_redis_wins_otherwise(
        redis_store: RedisStore, bar_store: BarStore) -> None:
    # SQLite: bars 0..9 (5 with another close, 8 closed); Redis: 5..12 (8 still forming there).
    await bar_store.write_history([bar(t * 1000, 11.0 if t == 5 else 10.0, tf="1s") for t in range(10)])
    await redis_store.write_history([bar(t * 1000, 10.0, tf="1s", forming=t in (8, 12)) for t in range(5, 13)])

    done = await reconcile("AAPL", "1s", redis_store, bar_store, keep=100)
    assert (done.to_sqlite, done.to_redis) == (4, 6)  # 5, 10, 11, 12 | 0..4, 8

    stored = await bar_store.last_bars("AAPL", "1s", 100)
    in_redis = await redis_store.recent_bars("AAPL", "1s", 100)
    assert [b.t for b in stored] == [b.t for b in in_redis] == [t * 1000 for t in range(13)]
    assert [(b.c, b.forming) for b in stored] == [(b.c, b.forming) for b in in_redis]
    assert stored[5].c == 10.0  # Redis' value won
    assert not stored[8].forming and not in_redis[8].forming  # the closed bar won
    assert stored[12].forming  # still forming: the next cycle closes it
    again = await reconcile("AAPL", "1s", redis_store, bar_store, keep=100)
    assert (again.to_sqlite, again.to_redis) == (0, 0)


async def test_empty_redis_gets_the_newest_keep_bars(redis_store: RedisStore, bar_store: BarStore) -> None:
    await bar_store.write_history([bar(t * 1000, tf="1s") for t in range(300)])
    done = await reconcile("AAPL", "1s", redis_store, bar_store, keep=120)
    assert done.to_redis == 120
    assert [b.t for b in await redis_store.recent_bars("AAPL", "1s", 1000)] == [
        t * 1000 for t in range(180, 300)]


async def test_redis_short_of_its_cap_is_filled_with_older_stored_bars(
        redis_store: RedisStore, bar_store: BarStore) -> None:
    await bar_store.write_history([bar(t * 1000, tf="1s") for t in range(300)])
    await redis_store.write_history([bar(t * 1000, tf="1s") for t in range(290, 300)])
    done = await reconcile("AAPL", "1s", redis_store, bar_store, keep=120)
    assert (done.to_sqlite, done.to_redis) == (0, 110)
    assert len(await redis_store.recent_bars("AAPL", "1s", 1000)) == 120
