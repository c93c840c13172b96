"""On a real local Redis Cluster (3 masters, 3 replicas): the scanner's one round trip
per node, replica reads, shards' heartbeats, sharded daemons (3 shards; 2 -> 3; a shard
killed and back), and failovers: a master killed under a running daemon, a write with a
master down, a new master that lacks acknowledged writes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sidecar.app.pipeline import Pipeline
from sidecar.redis_store import PartialWrite, RedisStore, close_client, connect, connect_cluster
from sidecar.scanner import Scanner
from sidecar.shards import owned, shard_of
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import (
    REPO,
    Daemon,
    LocalCluster,
    ScriptedSource,
    bar,
    free_ports_below_ephemeral,
    series,
    settings,
)

SYMBOLS = [f"S{i:03d}" for i in range(500)]


def fmap(symbol: str, i: int) -> bytes:
    return msgpack.packb({"symbol": symbol, "i": i, "computed_at": int(time.time() * 1000),
                          "stale": False})


async def fill(store: RedisStore, symbols: list[str]) -> None:
    await store.write_cycle([], [("1m", s, fmap(s, i)) for i, s in enumerate(symbols)],
                            {"pid": 1, "t": 0})


async def test_scanner_finds_the_cluster_and_reads_one_round_trip_per_node(
        cluster_store: RedisStore, redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    await fill(cluster_store, SYMBOLS)
    scanner = Scanner(connect(redis_cluster.url), "test", "1m", 60_000, owns=True,
                      probe_url=redis_cluster.url)
    rounds: list[str] = []
    real_round = Scanner._node_round

    async def counted(part: Any) -> Any:
        rounds.append(part.node.name)
        return await real_round(part)

    monkeypatch.setattr(Scanner, "_node_round", staticmethod(counted))
    before = {p: _mgets(redis_cluster, p) for p in redis_cluster.master_ports()}
    try:
        rows = await scanner.read(SYMBOLS)
        assert isinstance(scanner.redis, RedisCluster)
        assert [r["i"] for r in rows] == list(range(500))
        assert not any(r["stale"] for r in rows)
        # One round trip per master, and on each one MGET per slot it serves.
        assert sorted(rounds) == sorted(f"127.0.0.1:{p}" for p in before)
        slots: dict[int, set[int]] = {p: set() for p in before}
        for key in [scanner.keys.features("1m", s) for s in SYMBOLS] + [scanner.keys.heartbeat]:
            slot = key_slot(key.encode())
            slots[redis_cluster.master_of_slot(slot)].add(slot)
        for port, count in before.items():
            assert _mgets(redis_cluster, port) - count == len(slots[port])
        # Another list (the features again: their TTL is 2 s): planned anew.
        await fill(cluster_store, SYMBOLS)
        rounds.clear()
        assert [r["i"] for r in await scanner.read(SYMBOLS[::-1])] == list(range(499, -1, -1))
        assert len(rounds) == 3
    finally:
        await scanner.close()


def _mgets(cluster: LocalCluster, port: int) -> int:
    for line in cluster.cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_mget:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_scanner_reads_from_replicas(cluster_store: RedisStore, redis_cluster: LocalCluster) -> None:
    await fill(cluster_store, SYMBOLS)
    client = connect_cluster(redis_cluster.url, read_from_replicas=True)
    await client.initialize()
    scanner = Scanner(client, "test", "1m", 60_000, owns=True, read_replicas=True)
    try:
        deadline = time.monotonic() + 30
        rows = await scanner.read(SYMBOLS)
        while any(r.get("missing") for r in rows):  # replication is asynchronous
            assert time.monotonic() < deadline, "replicas never caught up"
            await asyncio.sleep(0.05)
            rows = await scanner.read(SYMBOLS)
        assert [r["i"] for r in rows] == list(range(500))
        assert scanner._plan is not None
        assert {part.node.server_type for part in scanner._plan} == {"replica"}
    finally:
        await scanner.close()


async def test_the_read_api_on_a_cluster(cluster_store: RedisStore, redis_cluster: LocalCluster) -> None:
    """``/v1/features``, ``/v1/closes``, ``/v1/bars`` and ``/v1/stream`` through a scanner
    that finds the cluster from the URL: bars and closes are read on the cluster client."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app.api import API, ReadApi, add_api_routes
    from sidecar.signals import SignalRules
    from sidecar.tests.helpers import read_events

    symbols = SYMBOLS[:40]
    bars = [bar(i * 60_000, 100.0 + i, symbol=sym) for sym in symbols[:2] for i in range(30)]
    await cluster_store.write_cycle(bars, [("1m", s, fmap(s, i)) for i, s in enumerate(symbols)],
                                    {"pid": 1, "t": 0})
    api = ReadApi(Scanner(connect(redis_cluster.url), "test", "1m", 60_000, owns=True,
                          probe_url=redis_cluster.url), symbols, SignalRules())
    app = web.Application()
    add_api_routes(app, api)
    async with TestClient(TestServer(app)) as client:
        rows = (await (await client.get("/v1/features", params={"timeframes": "1m,5m"})).json())["rows"]
        # Per symbol its timeframes: 1m as written, 5m missing.
        assert [(r["symbol"], r.get("i"), r.get("missing", False)) for r in rows] == [
            (sym, i, False) if tf == "1m" else (sym, None, True)
            for i, sym in enumerate(symbols) for tf in ("1m", "5m")]
        assert isinstance(api.scanner.redis, RedisCluster)
        resp = await client.get("/v1/closes", params={"symbols": ",".join(symbols[:3]), "n": "5"})
        closes = (await resp.json())["closes"]
        assert closes[symbols[0]] == [[b.t, b.c] for b in bars[25:30]] and closes[symbols[2]] == []
        chart = await (await client.get("/v1/bars", params={"symbol": symbols[1], "limit": "10"})).json()
        assert [b["c"] for b in chart["bars"]] == [b.c for b in bars[50:60]]
        stream = await client.get("/v1/stream", params={"symbols": symbols[0]})
        await asyncio.wait_for(client.app[API].feed.subscribed.wait(), 10)
        await cluster_store.write_cycle([], [("1m", symbols[0], fmap(symbols[0], 7))], {"pid": 1, "t": 1},
                                        {"cycle": 1, "t": 1, "tick": 1, "tf": "1m", "updated": [symbols[0]]})
        (event,) = await read_events(stream, 1)
        assert event["cycle"] == 1 and [r["i"] for r in event["rows"]] == [7]
        stream.close()
    await api.close()


async def test_rows_of_a_shard_without_heartbeat_are_stale(cluster_store: RedisStore) -> None:
    symbols = SYMBOLS[:60]
    shard0 = RedisStore(cluster_store.redis, "test", shard=0)
    await shard0.write_cycle([], [("1m", s, fmap(s, i)) for i, s in enumerate(symbols)], {"pid": 1})
    scanner = Scanner(cluster_store.redis, "test", "1m", 60_000, shards=2)
    rows = await scanner.read(symbols)
    for sym, row in zip(symbols, rows, strict=True):
        assert row["stale"] == (shard_of(sym, 2) == 1), sym
    assert {shard_of(s, 2) for s in symbols} == {0, 1}


def test_shard_assignment_is_stable_disjoint_and_explicit() -> None:
    parts = [owned(SYMBOLS, i, 3) for i in range(3)]
    assert sorted(sum(parts, ())) == sorted(SYMBOLS)
    assert all(parts)
    assert shard_of("AAPL", 3) == 3_060_094_812 % 3 == 0  # zlib.crc32(b"AAPL"), documented
    assert shard_of("AAPL", 3, {"AAPL": 2}) == 2
    assert shard_of("AAPL", 2, {"AAPL": 2}) == shard_of("AAPL", 2)  # out of range: the hash


# -- sharded daemons -------------------------------------------------------------------

DAEMON_SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "EURUSD", "BTCUSD", "AMD",
                  "INTC", "ORCL"]


def shard_env(clean_env: dict[str, str], cluster: LocalCluster, prefix: str, shard: str,
              base_port: int, data: Path) -> dict[str, str]:
    return dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=",".join(DAEMON_SYMBOLS),
                SIDECAR_TIMEFRAME="1s", SIDECAR_REDIS_URL=cluster.url, SIDECAR_REDIS_PREFIX=prefix,
                SIDECAR_HTTP_PORT=str(base_port), SIDECAR_DATA_DIR=str(data), SIDECAR_SHARD=shard,
                SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="100", SIDECAR_FLUSH_INTERVAL_S="0.5",
                SIDECAR_HEARTBEAT_TTL_MS="3000")


def status(env: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in env.items() if k != "SIDECAR_SHARD"}
    out = subprocess.run([sys.executable, "-m", "sidecar", "status", "--json"], cwd=REPO, env=env,
                         capture_output=True, timeout=30)
    return dict(json.loads(out.stdout))


def reader_env(shard: Daemon, shards: int) -> dict[str, str]:
    """The environment of a reader (``status``, ``scan``) of ``shards`` shards, from a shard's."""
    env = dict(shard.env)
    env.pop("SIDECAR_SHARD")
    env["SIDECAR_SHARDS"] = str(shards)
    return env


def wait_status(env: dict[str, str], done: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """``status --json`` until ``done`` says yes."""
    deadline = time.monotonic() + timeout
    while not done(now := status(env)):
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    return now


def live_owners(env: dict[str, str]) -> dict[str, list[str]]:
    return {r["shard"]: r["owned"] for r in status(env)["shards"] if r["live"]}


def start_shards(daemons: Callable[..., Daemon], clean_env: dict[str, str], cluster: LocalCluster,
                 prefix: str, n: int, base_port: int, data: Path, tag: str,
                 ) -> tuple[list[Daemon], dict[str, str]]:
    """``n`` shards, ready, and the environment of a reader of them (:func:`reader_env`)."""
    started = [daemons(shard_env(clean_env, cluster, prefix, f"{i}/{n}", base_port, data),
                       name=f"{tag}-shard{i}") for i in range(n)]
    for d in started:
        d.wait_ready()
    return started, reader_env(started[0], n)


def _base_port() -> int:
    """A port with the next few free too, below the kernel's ephemeral range (where
    outgoing connections, the cluster clients' among them, would take them)."""
    return free_ports_below_ephemeral(4)


def test_three_shards_share_the_cluster_and_the_scanner_reads_all(
        clean_env: dict[str, str], redis_cluster: LocalCluster, daemons: Callable[..., Daemon],
        tmp_path: Path) -> None:
    prefix = f"three{os.getpid()}"
    base = _base_port()
    shards, env = start_shards(daemons, clean_env, redis_cluster, prefix, 3, base, tmp_path / "data", "three")
    assert [d.port for d in shards] == [base, base + 1, base + 2]  # base port + i
    wait_status(env, lambda st: sum(r["live"] for r in st["shards"]) == 3)
    owners = live_owners(env)
    assert sorted(chain.from_iterable(owners.values())) == sorted(DAEMON_SYMBOLS)  # disjoint, complete
    for i in range(3):
        assert owners[f"{i}/3"] == [s for s in DAEMON_SYMBOLS if shard_of(s, 3) == i]
        assert (tmp_path / "data" / f"shard-{i}" / "bars.sqlite3").exists()
    assert status(env)["unowned"] == []
    rows = _fresh_rows(env)
    assert [r["symbol"] for r in rows] == DAEMON_SYMBOLS
    assert all(r["src"] == "sim" for r in rows)
    # A shard stops: status names the symbols nobody owns now.
    shards[1].stop()
    assert wait_status(env, lambda st: bool(st["unowned"]))["unowned"] == owners["1/3"]


def _fresh_rows(env: dict[str, str]) -> list[dict[str, Any]]:
    """``scan --json`` until no row is stale (the shards have all written)."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run([sys.executable, "-m", "sidecar", "scan", "--json"], cwd=REPO, env=env,
                             capture_output=True, timeout=30, check=True)
        rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
        if rows and not any(r["stale"] for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.3)


def test_two_shards_become_three_and_moved_symbols_keep_their_history(
        clean_env: dict[str, str], redis_cluster: LocalCluster, daemons: Callable[..., Daemon],
        tmp_path: Path) -> None:
    prefix = f"grow{os.getpid()}"
    base = _base_port()
    data = tmp_path / "data"
    two, env = start_shards(daemons, clean_env, redis_cluster, prefix, 2, base, data, "two")
    _fresh_rows(env)
    for d in two:
        assert d.stop() == 0
    # Symbols whose owner changes from 2 to 3 shards: to shard 2 (a new, empty data dir).
    moved = [s for s in DAEMON_SYMBOLS if shard_of(s, 3) == 2]
    assert moved
    three, env = start_shards(daemons, clean_env, redis_cluster, prefix, 3, base, data, "three")
    rows = _fresh_rows(env)
    assert [r["symbol"] for r in rows] == DAEMON_SYMBOLS
    owners = live_owners(env)
    assert sorted(owners) == ["0/3", "1/3", "2/3"]  # the 2-shard entries are no longer live
    assert sorted(chain.from_iterable(owners.values())) == sorted(DAEMON_SYMBOLS)  # no key has two writers
    for sym in moved:
        three[2].wait_log(f'"symbol": "{sym}"')
    assert "moved symbol warmed from redis" in three[2].messages()
    for d in three:
        assert d.stop() == 0
    # The new owner's SQLite holds the history the old owners wrote before the move.
    async def oldest() -> dict[str, int]:
        store = BarStore(data / "shard-2" / "bars.sqlite3")
        await store.open()
        try:
            return {s: (await store.last_bars(s, "1s", 10_000))[0].t for s in moved}
        finally:
            await store.close()
    first = asyncio.run(oldest())
    started_three = _start_ms(three[2])
    assert all(t < started_three for t in first.values()), (first, started_three)


def _start_ms(daemon: Daemon) -> int:
    """When the daemon logged its start (epoch ms)."""
    for rec in daemon.logs():
        if rec.get("msg") == "daemon starting":
            return int(datetime.fromisoformat(rec["ts"]).replace(tzinfo=UTC).timestamp() * 1000)
    raise AssertionError("no start in the log")


def test_a_killed_shard_is_reported_unowned_until_it_is_back(
        clean_env: dict[str, str], redis_cluster: LocalCluster, daemons: Callable[..., Daemon],
        tmp_path: Path) -> None:
    prefix, base, data = f"killed{os.getpid()}", _base_port(), tmp_path / "data"
    shards, env = start_shards(daemons, clean_env, redis_cluster, prefix, 2, base, data, "kill")
    wait_status(env, lambda st: sum(r["live"] for r in st["shards"]) == 2)
    owners = live_owners(env)
    assert status(env)["unowned"] == []
    shards[1].kill()  # SIGKILL: no clean stop, nobody deletes its heartbeat: it expires
    assert wait_status(env, lambda st: bool(st["unowned"]))["unowned"] == owners["1/2"]
    assert sorted(live_owners(env)) == ["0/2"]
    back = daemons(shard_env(clean_env, redis_cluster, prefix, "1/2", base, data), name="kill-shard1-back")
    back.wait_ready()
    wait_status(env, lambda st: not st["unowned"])
    assert live_owners(env) == owners


# -- failover ---------------------------------------------------------------------------

async def test_a_master_killed_mid_run_fails_over_and_nothing_is_lost(
        clean_env: dict[str, str], own_cluster: LocalCluster, daemons: Callable[..., Daemon],
        tmp_path: Path) -> None:
    """SIGKILL of the master serving the daemon's heartbeat and some symbols' buckets: its
    replica takes over, the daemon's client follows, the writes that failed meanwhile are
    retried from the backlog, the refill puts back what the replica lacks, and every
    feature is fresh again within a few cycles of the failover."""
    prefix = f"failover{os.getpid()}"
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=",".join(DAEMON_SYMBOLS),
               SIDECAR_TIMEFRAME="1s", SIDECAR_REDIS_URL=own_cluster.url, SIDECAR_REDIS_PREFIX=prefix,
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="100", SIDECAR_FLUSH_INTERVAL_S="0.5")
    daemon = daemons(env, name="failover")
    daemon.wait_ready()
    client = connect_cluster(own_cluster.url)
    await client.initialize()
    scanner = Scanner(client, prefix, "1s", 2_000, owns=True)
    keys = scanner.keys
    slot = key_slot(keys.heartbeat.encode())
    victim = own_cluster.master_of_slot(slot)
    on_victim = [s for s in DAEMON_SYMBOLS
                 if own_cluster.master_of_slot(key_slot(keys.features("1s", s).encode())) == victim]
    assert on_victim  # the victim serves symbols' buckets too, not only the daemon's keys
    listener = Redis(host="127.0.0.1", port=next(p for p in own_cluster.ports if p != victim))
    pubsub = listener.pubsub()
    await pubsub.subscribe(keys.cycles_channel)
    try:
        await _all_fresh(scanner)
        await _announcement(pubsub, after=daemon.health()["cycle"]["count"])
        own_cluster.kill(victim)
        new_master = own_cluster.wait_failover(victim, slot)
        assert new_master != victim
        failed_over_at = daemon.health()["cycle"]["count"]
        # Every write the daemon announces is complete: the first announcement after the
        # failover comes within a few cycles, and then no row is stale.
        announced = await _announcement(pubsub, after=failed_over_at)
        assert announced["cycle"] <= failed_over_at + 5, (announced, failed_over_at)
        rows = await scanner.read(DAEMON_SYMBOLS)
        assert [r["symbol"] for r in rows if r["stale"]] == [], rows
        daemon.wait_log("redis refilled from sqlite")
        messages = daemon.messages()
        assert "redis write failed; buffering" in messages
        assert "redis cluster masters changed" in messages
        refilled = next(r for r in daemon.logs() if r.get("msg") == "redis refilled from sqlite")
        await _announcement(pubsub, after=daemon.health()["cycle"]["count"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()
    assert daemon.stop() == 0
    # Redis holds every bar SQLite holds, the same bytes, and SQLite lost no second.
    store = RedisStore(client, prefix)
    bars = BarStore(tmp_path / "data" / "bars.sqlite3")
    await bars.open()
    total = 0
    try:
        for sym in DAEMON_SYMBOLS:
            stored = await bars.packed_between(sym, "1s", 0, 2**62)
            in_redis = dict(await store.recent_packed(sym, "1s", 10_000))
            assert stored and in_redis == stored, sym
            times = sorted(stored)
            assert times == list(range(times[0], times[-1] + 1_000, 1_000)), sym
            total += len(stored)
    finally:
        await bars.close()
        await scanner.close()
    assert 0 <= refilled["bars"] < total  # only what differed was copied


async def _all_fresh(scanner: Scanner) -> None:
    deadline = time.monotonic() + 60
    while True:
        rows = await scanner.read(DAEMON_SYMBOLS)
        if not any(r["stale"] for r in rows):
            return
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)


async def _announcement(pubsub: Any, after: int) -> dict[str, Any]:
    """The first cycle announcement of a cycle numbered ``after`` or later."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "no cycle announced"
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None and message["type"] == "message":
            announced = dict(msgpack.unpackb(message["data"]))
            if announced["cycle"] >= after:
                return announced


async def test_a_write_with_a_master_down_hands_back_only_that_masters_buckets(
        own_cluster: LocalCluster) -> None:
    client = connect_cluster(own_cluster.url)
    await client.initialize()
    store = RedisStore(client, "partial", features_ttl_ms=600_000)  # outlives a slow write
    keys = store.keys
    home = own_cluster.master_of_slot(key_slot(keys.heartbeat.encode()))
    victim = next(p for p in own_cluster.master_ports() if p != home)
    lost = {s for s in SYMBOLS if own_cluster.master_of_slot(key_slot(keys.bars("1m", s).encode())) == victim}
    bars = [bar(60_000, symbol=s) for s in SYMBOLS]
    feats = [("1m", s, fmap(s, i)) for i, s in enumerate(SYMBOLS)]
    # The victim's slots stay down until the test promotes its replica; the others serve.
    replica = own_cluster.replica_of(victim)
    own_cluster.cli(replica, "CONFIG", "SET", "cluster-replica-no-failover", "yes")
    for port in own_cluster.ports:
        own_cluster.cli(port, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    try:
        own_cluster.kill(victim)
        with pytest.raises(PartialWrite) as caught:
            await store.write_cycle(bars, feats, {"pid": 1, "t": 0}, {"cycle": 1})
        assert {b.symbol for b in caught.value.bars} == lost
        assert {row[1] for row in caught.value.features} == lost
        assert await store.read_heartbeat() == {"pid": 1, "t": 0}  # the other slots are fresh
        kept = [s for s in SYMBOLS if s not in lost]
        assert all(await store.read_features(kept, "1m"))
        assert [await store.bar_count(s, "1m") for s in kept[:20]] == [1] * 20
        # Once the replica took over, what came back is written.
        own_cluster.cli(replica, "CLUSTER", "FAILOVER", "TAKEOVER")
        own_cluster.wait_failover(victim, key_slot(keys.bars("1m", next(iter(lost))).encode()))
        assert await store.write_cycle(caught.value.bars, caught.value.features)
        assert [await store.bar_count(s, "1m") for s in sorted(lost)] == [1] * len(lost)
    finally:
        await store.close()


async def test_a_failover_that_lost_writes_is_refilled_with_only_what_differs(
        own_cluster: LocalCluster, bar_store: BarStore, caplog: pytest.LogCaptureFixture) -> None:
    """A master may acknowledge writes its replica never gets before it takes over: once the
    pipeline's client finds the new master, Redis is compared with SQLite and gets back
    exactly the bars it lacks."""
    client = connect_cluster(own_cluster.url)
    await client.initialize()
    store = RedisStore(client, "lost")
    t0 = 1_700_000_000_000
    hist = {s: series(s, 40, t0, seed) for seed, s in enumerate(("AAA", "BBB"))}
    source = ScriptedSource([{s: [bars[i]] for s, bars in hist.items()} for i in range(40)])
    pipe = Pipeline(settings(), [source], store, bar_store)
    try:
        await pipe.write_meta()
        await pipe.warm(t0)
        for k in range(30):
            await pipe.run_cycle(t0 + k * 1000)
        key = store.keys.bars("1s", "AAA")
        slot = key_slot(key.encode())
        old = own_cluster.master_of_slot(slot)
        own_cluster.cli(own_cluster.replica_of(old), "CLUSTER", "FAILOVER")
        own_cluster.wait_failover(old, slot)
        # The new master lacks AAA's five newest bars (the writes its replica never got).
        other = connect_cluster(own_cluster.url)
        await other.initialize()
        assert await other.zremrangebyrank(key, -5, -1) == 5
        await close_client(other)
        with caplog.at_level(logging.INFO, logger="sidecar.pipeline"):
            await pipe.run_cycle(t0 + 30_000)
            await pipe.drain()
        messages = [r.getMessage() for r in caplog.records]
        assert "redis cluster masters changed" in messages
        refilled = next(r for r in caplog.records if r.getMessage() == "redis refilled from sqlite")
        assert refilled.__dict__["bars"] == 5
        await bar_store.flush()
        for sym, bars in hist.items():
            assert await store.recent_bars(sym, "1s", 100) == bars[:31], sym
    finally:
        await store.close()
