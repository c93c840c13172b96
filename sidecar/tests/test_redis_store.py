"""RedisStore against a real Redis server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgpack
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot as _key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.bar import Bar
from sidecar.redis_store import RedisStore, close_client, open_client
from sidecar.scanner import Scanner
from sidecar.tests.helpers import LocalCluster, RedisServer, bar

M = 60_000  # one minute, the bars' timeframe


def key_slot(key: str) -> int:
    """The cluster slot of a key."""
    return _key_slot(key.encode())




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


# -- on a Redis Cluster ----------------------------------------------------------------


async def test_open_client_finds_the_cluster_from_any_node(redis_cluster: LocalCluster,
                                                           redis_server: RedisServer) -> None:
    for port in redis_cluster.ports:
        client = await open_client(f"redis://127.0.0.1:{port}")
        assert isinstance(client, RedisCluster)
        await close_client(client)
    single = await open_client(redis_server.url)
    assert not isinstance(single, RedisCluster)
    await close_client(single)


async def test_cluster_keys_of_a_symbol_share_one_slot(cluster_store: RedisStore) -> None:
    keys = cluster_store.keys
    assert keys.cluster
    for sym in ("AAPL", "MSFT", "BTC-USD", "X"):
        assert key_slot(keys.bars("1m", sym)) == key_slot(keys.features("1m", sym))
    assert key_slot(keys.heartbeat) == key_slot(keys.meta) == key_slot(keys.shards)


async def test_cluster_write_is_one_script_call_per_bucket_on_its_own_slot(
        cluster_store: RedisStore, redis_cluster: LocalCluster) -> None:
    symbols = [f"S{i}" for i in range(500)]
    bars = [Bar(s, "1m", 60_000, 1.0, 1.0, 1.0, float(i), None, "t") for i, s in enumerate(symbols)]
    feats = [("1m", s, msgpack.packb({"i": i})) for i, s in enumerate(symbols)]
    await cluster_store.write_meta({"tf": "1m"})
    assert await cluster_store.write_cycle(bars, feats, {"pid": 1}, {"cycle": 1})
    values = await cluster_store.read_features(symbols, "1m")
    assert [v["i"] for v in values if v] == list(range(500))
    for i in (0, 250, 499):
        assert [b.c for b in await cluster_store.recent_bars(f"S{i}", "1m", 5)] == [float(i)]
    assert await cluster_store.read_heartbeat() == {"pid": 1}
    # Every bucket's keys sit on the master serving the bucket's slot.
    masters = set(redis_cluster.master_ports())
    used = {redis_cluster.master_of_slot(key_slot(cluster_store.keys.bars("1m", s))) for s in symbols}
    assert used == masters  # 500 symbols spread over all three masters
    # The meta key gone: the final write says so, as on one server.
    await cluster_store.redis.delete(cluster_store.keys.meta)
    assert not await cluster_store.write_cycle([], [], {"pid": 1})


async def test_cluster_bars_are_capped_and_revised_in_place(cluster_store: RedisStore) -> None:
    cluster_store.bars_cap = 100
    await cluster_store.write_history(bar(i * M) for i in range(150))
    assert await cluster_store.bar_count("AAPL", "1m") == 100
    await cluster_store.write_cycle([bar(150 * M, 1.0, forming=True)], [])
    await cluster_store.write_cycle([bar(150 * M, 2.0)], [])
    recent = await cluster_store.recent_bars("AAPL", "1m", 2)
    assert [(b.t, b.c, b.forming) for b in recent] == [(149 * M, 100.0, False), (150 * M, 2.0, False)]


async def test_a_transport_closed_under_the_client_is_a_connection_error(
        redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node killed mid-call: under uvloop redis-py raises ``RuntimeError`` from the
    closed transport; the writer and every reader must see a Redis error (buffer and
    retry), not crash."""
    message = "something else"

    async def closed(*_: object, **__: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False "
                           "0x5>; the handler is closed")

    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError(message)

    monkeypatch.setattr(redis_store, "_script", closed)
    with pytest.raises(RedisConnectionError):
        await redis_store.write_cycle([bar(60_000)], [])
    monkeypatch.setattr(redis_store, "_script", broken)
    with pytest.raises(RuntimeError, match=message):
        await redis_store.write_cycle([bar(60_000)], [])

    # Reads: single commands, pipelines and the edges script all send through the connection.
    reads: list[Callable[[], Awaitable[object]]] = [
        lambda: redis_store.recent_bars("AAPL", "1m", 5),
        lambda: redis_store.recent_packed("AAPL", "1m", 5),
        lambda: redis_store.recent_packed_many(["AAPL", "MSFT"], "1m", 5),
        lambda: redis_store.edges_many(["AAPL", "MSFT"], "1m", 5),
        lambda: redis_store.tails(["AAPL"], "1m", 5),
        lambda: redis_store.bars_since("AAPL", "1m", 0),
        lambda: redis_store.bar_count("AAPL", "1m"),
        lambda: redis_store.read_features(["AAPL"], "1m"),
        redis_store.read_meta, redis_store.read_heartbeat, redis_store.read_shards,
        lambda: redis_store.read_heartbeats([None, 0]),
        redis_store.ping,
    ]
    connection = type(redis_store.redis.connection_pool.make_connection())
    monkeypatch.setattr(connection, "send_packed_command", closed)
    for read in reads:
        with pytest.raises(RedisConnectionError, match="handler is closed"):
            await read()
    monkeypatch.setattr(connection, "send_packed_command", broken)
    for read in reads:
        with pytest.raises(RuntimeError, match=message):
            await read()
    monkeypatch.setattr(redis_store, "_script", broken)
    with pytest.raises(RuntimeError, match="something else"):
        await redis_store.write_cycle([bar(60_000)], [])

    # The scanner's MGET (its own send path): on a connection that was open.
    monkeypatch.undo()
    scanner = Scanner(redis_store.redis, "sidecar", "1m")
    assert [row["missing"] for row in await scanner.read(["AAPL"], ["1m", "5m"])] == [True, True]
    monkeypatch.setattr(connection, "send_packed_command", broken)
    with pytest.raises(RuntimeError, match=message):
        await scanner.read(["AAPL"], ["1m", "5m"])
    monkeypatch.setattr(connection, "send_packed_command", closed)
    with pytest.raises(RedisConnectionError, match="handler is closed"):
        await scanner.read(["AAPL"], ["1m", "5m"])
