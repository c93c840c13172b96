"""RedisStore against a real Redis server."""

from __future__ import annotations

import asyncio
import time

import msgpack

from sidecar.bar import Bar
from sidecar.redis_store import RedisStore
from sidecar.tests.helpers import bar

M = 60_000  # one minute, the bars' timeframe




async def test_bars_are_capped_on_every_write(redis_store: RedisStore) -> None:
    redis_store.bars_cap = 5_000
    await redis_store.write_history(bar(i * M) for i in range(5_200))
    assert await redis_store.bar_count("AAPL", "1m") == 5_000
    await redis_store.write_cycle([bar(5_200 * M)], [])
    recent = await redis_store.recent_bars("AAPL", "1m", 10_000)
    assert len(recent) == 5_000
    assert recent[0].t == 201 * 60_000 and recent[-1].t == 5_200 * 60_000  # oldest dropped


async def test_forming_bar_is_replaced_in_place_never_duplicated(redis_store: RedisStore) -> None:
    await redis_store.write_cycle([bar(1 * M), bar(2 * M, 100.0, forming=True)], [])
    await redis_store.write_cycle([bar(2 * M, 101.0, forming=True)], [])
    await redis_store.write_cycle([bar(2 * M, 102.0, forming=False)], [])
    recent = await redis_store.recent_bars("AAPL", "1m", 10)
    assert [(b.t, b.c, b.forming) for b in recent] == [(60_000, 100.0, False), (120_000, 102.0, False)]


async def test_features_expire_after_two_seconds(redis_store: RedisStore) -> None:
    payload = msgpack.packb({"symbol": "AAPL", "rsi": 55.0, "computed_at": 1})
    await redis_store.write_cycle([], [("1m", "AAPL", payload)], {"pid": 1})
    key = redis_store.keys.features("1m", "AAPL")
    ttl = await redis_store.redis.pttl(key)
    assert 0 < ttl <= 2_000
    assert (await redis_store.read_features(["AAPL"], "1m"))[0]["rsi"] == 55.0
    # The real server expires the key: this is what the scanner sees.
    deadline = time.monotonic() + 30
    while await redis_store.redis.exists(key):
        assert time.monotonic() < deadline, "the key never expired"
        await asyncio.sleep(0.1)
    assert await redis_store.read_features(["AAPL"], "1m") == [None]


async def test_heartbeat_has_a_ttl(redis_store: RedisStore) -> None:
    await redis_store.write_cycle([], [], {"pid": 42, "cycle": 7})
    assert (await redis_store.read_heartbeat()) == {"pid": 42, "cycle": 7}
    assert 0 < await redis_store.redis.pttl(redis_store.keys.heartbeat) <= 3_000


async def _calls(store: RedisStore) -> dict[str, int]:
    stats = await store.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_one_cycle_is_one_round_trip(redis_store: RedisStore) -> None:
    bars = [Bar(f"S{i}", "1m", 60_000, 1.0, 1.0, 1.0, 1.0, None, "t") for i in range(500)]
    feats = [("1m", f"S{i}", msgpack.packb({"i": i})) for i in range(500)]
    await redis_store.write_cycle(bars[:1], feats[:1], {"pid": 1})  # script loaded
    before = await _calls(redis_store)
    await redis_store.write_cycle(bars, feats, {"pid": 1})
    after = await _calls(redis_store)
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 1
    assert after.get("eval", 0) == before.get("eval", 0)
    # Inner calls ran server-side: 500 bars x 3 + 500 features + heartbeat.
    assert after["set"] - before["set"] == 501
    values = await redis_store.read_features([f"S{i}" for i in range(500)], "1m")
    assert [v["i"] for v in values if v] == list(range(500))
