"""The embedded Redis is supervised, and a Redis still loading its dataset is waited for.

Real daemon processes, the real embedded ``redis-server``, real SQLite files.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.redis_server import find_redis_server
from sidecar.redis_store import RedisStore, connect, wait_loaded
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Daemon, RedisServer, free_port, http_get, scan

SYMBOLS = "AAPL,MSFT,EURUSD,BTCUSD"


def fresh_rows(env: dict[str, str], after_ms: int) -> bool:
    try:
        rows = scan(env)
    except subprocess.CalledProcessError:
        return False  # Redis not up yet
    return len(rows) == 4 and all(not r["stale"] and r["computed_at"] > after_ms for r in rows)


#: Redis answers LOADING only between chunks of 2 MB of RDB it reads.
PAD_KEYS = 2_000


async def pad(client: Redis, keys: int = PAD_KEYS, size: int = 4_096) -> None:
    """Add incompressible keys (outside the daemon's prefix) that make the RDB slow to load."""
    await client.mset({f"pad:{i}": os.urandom(size) for i in range(keys)})


def redis_pid(data: Path) -> int | None:
    try:
        return int((data / "redis" / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


async def newest_bars_in_both(data: Path, symbol: str, n: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The newest ``n`` closed bars of ``symbol`` in SQLite, and the same times in Redis."""
    store = BarStore(data / "bars.sqlite3")
    await store.open()
    try:
        stored = [b for b in await store.last_bars(symbol, "1m", n + 1) if not b.forming][-n:]
    finally:
        await store.close()
    redis = RedisStore(connect(f"unix://{data / 'redis' / 'redis.sock'}"), "sidecar")
    try:
        cached = {b.t: b.c for b in await redis.recent_bars(symbol, "1m", 10_000)}
    finally:
        await redis.close()
    return [(b.t, b.c) for b in stored], [(b.t, cached[b.t]) for b in stored if b.t in cached]


async def pad_embedded(data: Path) -> None:
    client = connect(f"unix://{data / 'redis' / 'redis.sock'}")
    try:
        await pad(client)
    finally:
        await client.aclose()


def test_embedded_redis_killed_is_restarted_and_refilled(
    clean_env: dict[str, str], daemons: Callable[..., Daemon],
) -> None:
    port = free_port()
    data = Path(clean_env["SIDECAR_DATA_DIR"])
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=SYMBOLS, SIDECAR_HTTP_PORT=str(port),
               SIDECAR_BOOTSTRAP_DAYS="1")
    d = daemons(env)
    d.wait_ready()
    d.wait_for("fresh features", lambda: fresh_rows(env, 0))
    first = redis_pid(data)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # no save: it restarts from its last RDB
    killed_ms = int(time.time() * 1000)
    d.wait_for("a new embedded redis", lambda: redis_pid(data) not in (None, first))
    d.wait_for("fresh features after the restart", lambda: fresh_rows(env, killed_ms))
    d.wait_log("redis refilled from sqlite")
    d.wait_for("/health ok", lambda: http_get(port, "/health")[1]["status"] == "ok")
    for sym in SYMBOLS.split(","):
        stored, cached = asyncio.run(newest_bars_in_both(data, sym, 200))
        assert len(stored) == 200 and cached == stored, sym
    assert d.stop() == 0
    assert "embedded redis died; restarting it" in d.log_text()
    assert redis_pid(data) is None or not Path(f"/proc/{redis_pid(data)}").exists()


def test_a_restart_waits_for_a_loading_redis_and_rewrites_nothing(
    clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=SYMBOLS, SIDECAR_HTTP_PORT=str(port),
               SIDECAR_BOOTSTRAP_DAYS="1")
    first = daemons(env, name="first")
    first.wait_for("fresh features", lambda: fresh_rows(env, 0))
    asyncio.run(pad_embedded(Path(clean_env["SIDECAR_DATA_DIR"])))
    assert first.stop() == 0  # the embedded server saves its RDB on the way out

    # The same binary, slowed down while it loads the RDB: about 12 s, during which it
    # may not answer at all (longer than any client timeout or start-up wait).
    slow = tmp_path / "slow-redis-server"
    slow.write_text(f'#!/bin/sh\nexec "{find_redis_server()}" "$@" --key-load-delay 6000\n')
    slow.chmod(0o755)
    second = daemons(dict(env, SIDECAR_REDIS_SERVER=str(slow)), name="second")
    second.wait_ready()
    restarted_ms = int(time.time() * 1000)
    second.wait_for("fresh features", lambda: fresh_rows(env, restarted_ms))
    log = second.log_text()
    assert "warmed redis from sqlite" not in log and "redis lost its data" not in log
    assert second.stop() == 0


async def test_wait_loaded_waits_for_loading_and_stops_on_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A server loading a dataset answers LOADING until done; the wait ends with it.

    12.8 MB read at 10 ms a key: about 2 s of loading, with a LOADING answer to
    whatever waits every 2 MB (0.3 s)."""
    server = RedisServer(tmp_path / "r", "--dbfilename", "dump.rdb")
    server.start()
    client = connect(server.url)
    try:
        await pad(client, keys=200, size=65_536)
        await client.save()
    finally:
        await client.aclose()
    server.stop()
    slow = RedisServer(tmp_path / "r", "--dbfilename", "dump.rdb", "--key-load-delay", "10000")
    slow.start()
    client = connect(slow.url, timeout_s=10)
    try:
        stop = asyncio.Event()
        stop.set()
        assert await wait_loaded(client, stop) is False  # asked to stop: gives up at once
        with caplog.at_level("INFO", logger="sidecar.redis"):
            assert await wait_loaded(client, asyncio.Event(), poll_s=0.05) is True
        assert "redis is loading its dataset; waiting for it" in caplog.text
        assert "redis finished loading its dataset" in caplog.text
        assert await client.dbsize() == 200  # loaded, not empty
    finally:
        await client.aclose()
        slow.stop()
