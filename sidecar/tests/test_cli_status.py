"""``sidecar status``: the daemon's heartbeat and meta, read from its Redis, as the command line."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from sidecar.redis_store import RedisStore

REPO = Path(__file__).resolve().parents[2]


async def status(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "status", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


@pytest.mark.asyncio
async def test_status_alive_then_stopped(redis_store: RedisStore, redis_server, clean_env: dict[str, str]):
    env = {**clean_env, "SIDECAR_REDIS_URL": redis_server.url, "SIDECAR_REDIS_PREFIX": "test"}
    now = int(time.time() * 1000)
    await redis_store.write_meta({"tf": "1m", "symbols": ["AAPL", "MSFT"], "started_at": now - 65_000})
    await redis_store.write_cycle([], [], heartbeat={"pid": 4242, "t": now, "tick": now, "cycle": 64,
                                                     "tf": "1m", "symbols": 2})
    code, out = await status(env, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["alive"] is True and report["error"] is None
    assert report["heartbeat"]["pid"] == 4242 and report["heartbeat"]["cycle"] == 64
    assert report["meta"]["symbols"] == ["AAPL", "MSFT"] and 60 <= report["uptime_s"] <= 120
    assert 0 <= report["heartbeat_age_ms"] < 30_000

    code, out = await status(env)
    assert code == 0 and out.startswith("alive: pid 4242, cycle 64, timeframe 1m, 2 symbols"), out

    await redis_store.clear_heartbeat()  # what a clean stop does
    code, out = await status(env)
    assert code == 1 and out.startswith("not running: no heartbeat"), out


@pytest.mark.asyncio
async def test_status_without_redis(clean_env: dict[str, str]):
    """No embedded Redis answering on its socket: not running, said as such, exit 1."""
    code, out = await status(clean_env, "--json")
    report = json.loads(out)
    assert code == 1 and report["alive"] is False
    assert report["error"].startswith("cannot reach Redis at the embedded socket ")
