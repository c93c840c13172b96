"""Redis coming back after trouble, on real redis-servers and a real SQLite file: the
backlog's bound, a refill that fails and is retried, and a daemon started while its
Redis is down."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from sidecar.app import writer as writer_module
from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.redis_store import RedisStore, connect
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Daemon, RedisServer, ScriptedSource, free_port, series, settings

T0 = 1_700_000_000_000
SYMBOLS = ("AAA", "BBB")


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone (it gets killed), persisting every write (AOF)."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def store_on(own_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(connect(own_redis.url, timeout_s=5.0), "rec")
    yield store
    await store.close()


def one_bar_a_cycle(n: int) -> tuple[dict[str, list[Bar]], list[dict[str, list[Bar]]]]:
    """Each symbol's series of ``n`` closed bars, and the steps serving one bar a cycle."""
    hist = {sym: series(sym, n, T0, seed) for seed, sym in enumerate(SYMBOLS)}
    return hist, [{sym: [bars[i]] for sym, bars in hist.items()} for i in range(n)]


async def run_cycles(pipe: Pipeline, first: int, last: int) -> None:
    for k in range(first, last):
        await pipe.run_cycle(T0 + k * 1000)


async def assert_redis_holds(store: RedisStore, hist: dict[str, list[Bar]]) -> None:
    for sym, bars in hist.items():
        got = await store.recent_bars(sym, "1s", 10_000)
        assert [(b.t, b.c) for b in got] == [(b.t, b.c) for b in bars], sym


async def test_backlog_past_its_bound_drops_the_oldest_and_recovery_refills_them(
        own_redis: RedisServer, store_on: RedisStore, bar_store: BarStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis killed for 30 cycles, with room for 10 bars in the backlog: the backlog
    keeps the newest 10, SQLite keeps all, and when Redis comes back *with its data*
    (its meta key is there) the dropped bars are put back from SQLite."""
    monkeypatch.setattr(writer_module, "MAX_REDIS_BACKLOG", 10)
    hist, steps = one_bar_a_cycle(36)
    pipe = Pipeline(settings(), [ScriptedSource(steps)], store_on, bar_store,
                    clock=lambda: T0 / 1000)
    await pipe.write_meta()
    await pipe.warm(T0)
    await run_cycles(pipe, 0, 5)
    assert pipe.stats.redis_ok

    own_redis.kill()
    await run_cycles(pipe, 5, 35)
    assert not pipe.stats.redis_ok
    backlog = pipe.writer.backlog
    assert len(backlog) == 10
    assert sorted(backlog) == sorted((sym, "1s", T0 + k * 1000) for sym in SYMBOLS for k in range(30, 35))
    await bar_store.flush()
    for sym, bars in hist.items():  # SQLite lost nothing of the outage
        assert [b.t for b in await bar_store.last_bars(sym, "1s", 100)] == [b.t for b in bars[:35]]

    own_redis.start()  # the AOF brings back the five cycles before the outage, and the meta key
    assert await store_on.bar_count("AAA", "1s") == 5
    await run_cycles(pipe, 35, 36)
    assert pipe.stats.redis_ok and not backlog
    await pipe.drain(timeout_s=30)
    await assert_redis_holds(store_on, hist)


async def test_a_failed_refill_is_retried_until_it_succeeds(
        own_redis: RedisServer, store_on: RedisStore, bar_store: BarStore,
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis restarted empty: the refill is started, Redis refuses one of its reads
    (an ACL that denies ZRANGE), the refill fails; once Redis allows it again, a
    later cycle's refill puts every bar back."""
    caplog.set_level(logging.INFO, logger="sidecar.pipeline")
    hist, steps = one_bar_a_cycle(12)
    own_redis.args = ()  # no AOF: the restart comes back empty
    own_redis.kill()
    own_redis.start()
    pipe = Pipeline(settings(), [ScriptedSource(steps)], store_on, bar_store,
                    clock=lambda: T0 / 1000)
    await pipe.write_meta()
    await pipe.warm(T0)
    await run_cycles(pipe, 0, 6)
    await bar_store.flush()

    own_redis.kill()
    own_redis.start()
    admin = redis.Redis(unix_socket_path=str(own_redis.socket))
    admin.acl_setuser("default", enabled=True, reset=False, commands=["-zrange"])
    await run_cycles(pipe, 6, 7)
    await pipe.drain(timeout_s=30)
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.pipeline"]
    assert "redis refill failed; will retry" in messages
    assert "redis refilled from sqlite" not in messages
    assert await store_on.bar_count("AAA", "1s") == 1  # only the cycle's own bar

    admin.acl_setuser("default", enabled=True, reset=False, commands=["+zrange"])
    await run_cycles(pipe, 7, 12)
    await pipe.drain(timeout_s=30)
    assert "redis refilled from sqlite" in [r.getMessage() for r in caplog.records]
    await assert_redis_holds(store_on, hist)


def test_daemon_started_while_redis_is_down_refills_it_when_it_comes_up(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """An empty data directory (bootstrap needed) and no Redis listening: the daemon
    bootstraps SQLite, runs its cycles degraded, and once Redis is up it holds SQLite's
    newest bars, the ones of the outage included."""
    server = RedisServer(tmp_path / "late-redis")  # not started yet
    prefix = "late"
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,BTCUSD", SIDECAR_TIMEFRAME="1s",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=server.url, SIDECAR_REDIS_PREFIX=prefix,
               SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="600", SIDECAR_BARS_CAP="100",
               SIDECAR_FLUSH_INTERVAL_S="1")
    daemon = daemons(env)
    try:
        daemon.wait_ready()
        daemon.wait_log("redis write failed; buffering")
        outage_from = time.time() * 1000
        cycles = daemon.health()["cycle"]["count"]
        # A few cycles whose bars exist only in SQLite and the backlog.
        daemon.wait_for("three cycles during the outage", lambda: daemon.health()["cycle"]["count"] >= cycles + 3)
        server.start()
        daemon.wait_log("redis is back")
        daemon.wait_log("redis refilled from sqlite")
        daemon.wait_log("bootstrap finished", timeout=120)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        in_redis = {}
        if server.proc is not None:
            client = redis.Redis(unix_socket_path=str(server.socket))
            in_redis = {sym: [Bar.unpack(sym, "1s", raw)  # type: ignore[arg-type]
                              for raw in client.zrange(f"{prefix}:v1:bars:1s:{sym}", 0, -1)]
                        for sym in ("AAPL", "BTCUSD")}
            server.stop()
    db = sqlite3.connect(Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3")
    for sym, bars in in_redis.items():
        rows = db.execute("SELECT t, o, h, l, c, v FROM bars WHERE symbol=? AND tf='1s' ORDER BY t DESC "
                          "LIMIT 100", (sym,)).fetchall()[::-1]
        assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == rows, sym
        assert sum(outage_from <= b.t for b in bars) >= 3, f"{sym}: the outage's bars are not in Redis"


def test_redis_restarted_from_an_older_snapshot_under_a_running_daemon_is_refilled(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """Redis restarts from a snapshot taken some cycles ago: it still holds the meta key,
    so no write fails for lack of it, yet the bars since the snapshot are gone. The daemon
    notices the restart (a new run_id) and puts back what Redis lacks."""
    server = RedisServer(tmp_path / "snap-redis")
    server.start()
    prefix = "snap"
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,BTCUSD", SIDECAR_TIMEFRAME="1s",
               SIDECAR_REDIS_URL=server.url, SIDECAR_REDIS_PREFIX=prefix, SIDECAR_BOOTSTRAP_DAYS="0",
               SIDECAR_WARM_BARS="100", SIDECAR_BARS_CAP="100", SIDECAR_FLUSH_INTERVAL_S="0.5")
    daemon = daemons(env)
    client = redis.Redis(unix_socket_path=str(server.socket))
    try:
        daemon.wait_ready()
        cycles = daemon.health()["cycle"]["count"]
        daemon.wait_for("three cycles", lambda: daemon.health()["cycle"]["count"] >= cycles + 3)
        assert client.save()
        snapshot = {sym: client.zcard(f"{prefix}:v1:bars:1s:{sym}") for sym in ("AAPL", "BTCUSD")}
        cycles = daemon.health()["cycle"]["count"]
        daemon.wait_for("five cycles after the snapshot",
                        lambda: daemon.health()["cycle"]["count"] >= cycles + 5)
        client.close()
        server.kill()
        server.start()  # back from the snapshot
        client = redis.Redis(unix_socket_path=str(server.socket))
        assert client.exists(f"{prefix}:v1:meta")
        assert {sym: client.zcard(f"{prefix}:v1:bars:1s:{sym}") for sym in snapshot} == snapshot
        daemon.wait_log("redis restarted; checking what it lacks")
        daemon.wait_log("redis refilled from sqlite")
        assert daemon.stop() == 0
        in_redis = {sym: [Bar.unpack(sym, "1s", raw)  # type: ignore[arg-type]
                          for raw in client.zrange(f"{prefix}:v1:bars:1s:{sym}", 0, -1)]
                    for sym in ("AAPL", "BTCUSD")}
    finally:
        daemon.kill()
        client.close()
        server.stop()
    db = sqlite3.connect(Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3")
    for sym, bars in in_redis.items():
        rows = db.execute("SELECT t, o, h, l, c, v FROM bars WHERE symbol=? AND tf='1s' ORDER BY t DESC "
                          "LIMIT 100", (sym,)).fetchall()[::-1]
        assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars[-len(rows):]] == rows, sym
