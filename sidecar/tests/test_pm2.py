"""The daemon under PM2 (installed into node_modules/ by scripts/setup), as a user runs it:
start through ecosystem.config.js, SIGKILL the daemon, PM2 restarts it and features come
back; ``pm2 stop`` flushes SQLite (every bar in Redis is in SQLite) and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.bar import Bar
from sidecar.scanner import Scanner
from sidecar.settings import Settings
from sidecar.tests.helpers import REPO, Daemon, RedisServer, free_port, free_ports_below_ephemeral, http_get

PM2 = REPO / "node_modules" / ".bin" / "pm2"
SYMBOLS = ["AAPL", "EURUSD", "BTCUSD"]
APP = "sidecar-test"


class Pm2:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.env = dict(env, PM2_HOME=str(home))

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([str(PM2), *args], cwd=REPO, env=self.env, capture_output=True,
                             timeout=60, text=True)
        if check and out.returncode != 0:
            raise AssertionError(f"pm2 {' '.join(args)} failed: {out.stdout}\n{out.stderr}")
        return out.stdout

    def app(self) -> dict[str, Any]:
        apps = [a for a in json.loads(self.run("jlist")) if a["name"] == APP]
        assert len(apps) == 1, apps
        return dict(apps[0])


@pytest.fixture
def pm2_home() -> Iterator[Path]:
    # Short path: PM2's unix sockets live here.
    home = Path(tempfile.mkdtemp(prefix="pm2-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def fresh_features(env: dict[str, str]) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        scanner = Scanner.from_settings(Settings.from_env(env), env=env)
        try:
            return await scanner.read(SYMBOLS)
        finally:
            await scanner.close()

    rows = asyncio.run(read())
    return rows if all(not r["stale"] for r in rows) else []


def test_pm2_restarts_a_killed_daemon_and_stops_it_cleanly(
        clean_env: dict[str, str], redis_server: RedisServer, pm2_home: Path, tmp_path: Path) -> None:
    if not PM2.exists():
        pytest.skip("PM2 not installed in node_modules/ (run scripts/setup; needs npm)")
    port = free_port()
    prefix = f"pm2{os.getpid()}"
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=",".join(SYMBOLS),
               SIDECAR_TIMEFRAME="1s", SIDECAR_HTTP_PORT=str(port),
               SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX=prefix,
               SIDECAR_FLUSH_INTERVAL_S="3600",  # only the stop's flush writes the newest bars
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="200",
               SIDECAR_PM2_NAME=APP, SIDECAR_PM2_LOG_DIR=str(tmp_path / "logs"))
    pm2 = Pm2(pm2_home, env)
    try:
        pm2.run("start", "ecosystem.config.js")
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 30, "/ready")
        rows = wait_for(lambda: fresh_features(env), 15, "fresh features")
        assert [r["symbol"] for r in rows] == SYMBOLS and all(r["src"] == "sim" for r in rows)
        first = pm2.app()
        pid = first["pid"]
        assert first["pm2_env"]["status"] == "online" and first["pm2_env"]["restart_time"] == 0
        r = redis.Redis(unix_socket_path=str(redis_server.socket))

        def fewest_bars() -> int:
            return min(int(r.zcard(f"{prefix}:v1:bars:1s:{sym}")) for sym in SYMBOLS)

        wait_for(lambda: fewest_bars() >= 2, 30, "a few bars only in Redis and the SQLite buffer")

        os.kill(pid, signal.SIGKILL)
        restarted = wait_for(lambda: (a := pm2.app())["pid"] not in (0, pid) and a, 30, "a restart")
        assert restarted["pm2_env"]["restart_time"] == 1
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 30, "/ready after the restart")
        wait_for(lambda: fresh_features(env), 15, "fresh features after the restart")
        restarted_with = fewest_bars()
        wait_for(lambda: fewest_bars() >= restarted_with + 2, 30, "new bars after the restart")

        pm2.run("stop", APP)
        stopped = pm2.app()
        assert stopped["pm2_env"]["status"] == "stopped"
        assert stopped["pm2_env"]["exit_code"] == 0
        assert stopped["pm2_env"]["restart_time"] == 1  # the stop did not cause a restart
        logs = (tmp_path / "logs" / f"{APP}.err.log").read_text()
        pm2_log = (pm2_home / "pm2.log").read_text()
    finally:
        pm2.run("delete", "all", check=False)
        pm2.run("kill", check=False)

    events = [json.loads(line.split(": ", 1)[1]) for line in logs.splitlines() if ": {" in line]
    messages = [e["msg"] for e in events]
    assert messages.count("daemon starting") == 2 and messages.count("stopped") == 1, messages
    # PM2 reports even a SIGKILL as code 0: the daemon's own last words say how it ended.
    assert [e["exit_code"] for e in events if e["msg"] == "stopped"] == [0]
    assert "sqlite flushed" in messages
    assert [e["signal"] for e in events if e["msg"] == "stop requested"] == ["SIGINT"]
    exits = [line for line in pm2_log.splitlines() if "exited with code" in line]
    assert len(exits) == 2 and "SIGKILL" in exits[0], exits  # our kill, then the stop
    assert any(e["msg"] == "recovered bars from redis" for e in events), messages
    assert logs.splitlines()[0][:4].isdigit()  # every line starts with PM2's timestamp

    # No bar lost: everything the daemon put in Redis is in SQLite, with the same values.
    db = sqlite3.connect(Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3")
    for sym in SYMBOLS:
        in_redis = [Bar.unpack(sym, "1s", raw) for raw in r.zrange(f"{prefix}:v1:bars:1s:{sym}", 0, -1)]
        stored = db.execute("SELECT t, o, h, l, c, v FROM bars WHERE symbol=? AND tf='1s' ORDER BY t",
                            (sym,)).fetchall()
        assert len(in_redis) >= 4
        assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in in_redis] == stored


def test_daemon_exits_3_when_redis_stays_unreachable(clean_env: dict[str, str], tmp_path: Path,
                                                     daemons: Callable[..., Daemon]) -> None:
    """What makes PM2 restart it: Redis gone longer than SIDECAR_REDIS_DOWN_EXIT_S -> exit 3."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_HTTP_PORT=str(port),
               SIDECAR_REDIS_URL=server.url, SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_REDIS_DOWN_EXIT_S="2",
               SIDECAR_REDIS_TIMEOUT_S="0.2")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, 30, "/ready")
        server.stop()
        assert proc.wait(30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    events = [json.loads(line) for line in daemon.log_text().splitlines()]
    messages = [e["msg"] for e in events]
    assert messages.count("redis write failed; buffering") == 1, messages
    assert "redis unreachable for too long; exiting for a restart" in messages
    assert [e["exit_code"] for e in events if e["msg"] == "stopped"] == [3]


def test_pm2_runs_shards_on_the_embedded_redis_as_one_app(
        clean_env: dict[str, str], pm2_home: Path, tmp_path: Path) -> None:
    """``SIDECAR_SHARDS=2`` without a Redis URL: one PM2 instance, which runs both shards
    on its embedded Redis; ``pm2 stop`` stops both, each flushing, and the app exits 0."""
    if not PM2.exists():
        pytest.skip("PM2 not installed in node_modules/ (run scripts/setup; needs npm)")
    port = free_ports_below_ephemeral(2)
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,MSFT,NVDA,BTCUSD,ETHUSD,EURUSD",
               SIDECAR_SHARDS="2", SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="1",
               SIDECAR_PM2_NAME=APP, SIDECAR_PM2_LOG_DIR=str(tmp_path / "logs"))
    pm2 = Pm2(pm2_home, env)
    try:
        pm2.run("start", "ecosystem.config.js")
        for i in range(2):
            wait_for(lambda i=i: http_get(port + i, "/ready")[0] == 200, 60, f"/ready of shard {i}")
        app = pm2.app()  # one instance: the supervisor
        assert app["pm2_env"]["status"] == "online"
        shard_pids = {http_get(port + i, "/health")[1]["process"]["pid"] for i in range(2)}
        assert app["pid"] not in shard_pids and len(shard_pids) == 2
        pm2.run("stop", APP)
        stopped = pm2.app()
        assert stopped["pm2_env"]["status"] == "stopped" and stopped["pm2_env"]["exit_code"] == 0
        logs = (tmp_path / "logs" / f"{APP}.err.log").read_text()
    finally:
        pm2.run("delete", "all", check=False)
        pm2.run("kill", check=False)
    events = [json.loads(line.split(": ", 1)[1]) for line in logs.splitlines() if ": {" in line]
    stopped_lines = {e.get("shard", "supervisor"): e["exit_code"] for e in events if e["msg"] == "stopped"}
    assert stopped_lines == {"0/2": 0, "1/2": 0, "supervisor": 0}, stopped_lines
    assert sum(e["msg"] == "sqlite flushed" for e in events) == 2
    assert any(e["msg"] == "embedded redis stopped" for e in events)
