"""reconcile() on a real Redis and a real SQLite file: each store gets what it lacks."""

from __future__ import annotations

from pathlib import Path

from sidecar.app.reconcile import reconcile
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore, connect
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import RedisServer, bar


def snap_bar(t: int, c: float = 10.0, forming: bool = False) -> Bar:
    """A 1s bar at second ``t`` opening at 10.0."""
    return bar(t * 1000, c, tf="1s", o=10.0, h=max(c, 10.0), l=min(c, 10.0), v=5.0, src="sim",
               forming=forming)


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


async def test_redis_restored_from_an_older_snapshot_loses_nothing(tmp_path: Path, bar_store: BarStore) -> None:
    """Redis comes back from an RDB snapshot taken before the newest writes: it holds an
    older subset (a forming bar since closed, a bar since corrected, none of the newer
    bars), plus bars SQLite lost. Each store gets what the other has, and the newest
    revision of every bar survives in both."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisStore(connect(server.url), "snap")
        # Before the snapshot: bars 0..59 and a forming bar 60 reach both stores, except
        # 50..54, which only Redis has (SQLite dropped them: a buffer past its bound).
        both = [snap_bar(t) for t in (*range(50), *range(55, 60))] + [snap_bar(60, 10.5, forming=True)]
        only_redis = [snap_bar(t, 12.0) for t in range(50, 55)]
        await store.write_history(both + only_redis)
        await bar_store.write_history(both)
        assert await store.redis.save()
        # After it: bar 60 closes, bar 58 is corrected, bars 61..89 arrive, in both stores.
        after = [snap_bar(60, 10.7), snap_bar(58, 9.5), *(snap_bar(t) for t in range(61, 90))]
        await store.write_history(after)
        await bar_store.write_history(after)
        await store.close()

        server.kill()
        server.start()  # loads the snapshot
        store = RedisStore(connect(server.url), "snap")
        restored = await store.recent_bars("AAPL", "1s", 1000)
        assert len(restored) == 61 and restored[-1].forming and restored[58].c == 10.0

        done = await reconcile("AAPL", "1s", store, bar_store, keep=1000)
        assert done.to_sqlite == 5  # 50..54
        expected = {b.t: b for b in (*both, *only_redis, *after)}
        want = [(t, expected[t].c, expected[t].forming) for t in sorted(expected)]
        assert [(b.t, b.c, b.forming) for b in await store.recent_bars("AAPL", "1s", 1000)] == want
        assert [(b.t, b.c, b.forming) for b in await bar_store.last_bars("AAPL", "1s", 1000)] == want
        again = await reconcile("AAPL", "1s", store, bar_store, keep=1000)
        assert (again.to_sqlite, again.to_redis) == (0, 0)
        await store.close()
    finally:
        server.kill()
