"""``python -m sidecar run`` with ``SIDECAR_SHARDS=N`` and no shard index: one process
runs the N shards as its children, on one (embedded or given) Redis. Real processes."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.shards import owned
from sidecar.tests.helpers import REPO, Daemon, RedisServer, free_ports_below_ephemeral, http_get, scan

SYMBOLS = "AAPL,MSFT,NVDA,BTCUSD,ETHUSD,EURUSD"


def _env(clean_env: dict[str, str], **extra: str) -> dict[str, str]:
    return dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=SYMBOLS, SIDECAR_SHARDS="2",
                SIDECAR_HTTP_PORT=str(free_ports_below_ephemeral(2)), SIDECAR_BOOTSTRAP_DAYS="1", **extra)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_health(port: int, timeout: float = 60, other_than: int | None = None) -> tuple[int, list[str]]:
    """The pid and the symbols of the shard on ``port`` once its ``/health`` answers
    (from a process other than ``other_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http_get(port, "/health")
            if status in (200, 503) and body["process"]["pid"] != other_than:
                return int(body["process"]["pid"]), list(body["symbols"])
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no shard answered on {port}"
        time.sleep(0.2)


def test_runs_every_shard_on_the_embedded_redis_and_stops_them(
        clean_env: dict[str, str], daemons: Callable[..., Daemon]) -> None:
    env = _env(clean_env)
    supervisor = daemons(env, name="shards")
    port = int(env["SIDECAR_HTTP_PORT"])
    symbols = SYMBOLS.split(",")
    pids = []
    for i in range(2):
        pid, served = _wait_health(port + i)
        assert sorted(served) == sorted(owned(symbols, i, 2))
        pids.append(pid)
    assert supervisor.proc.pid not in pids
    # A scanner that knows the shards reads every symbol, each fresh under its owner's heartbeat.
    deadline = time.monotonic() + 60
    rows = scan(env)
    while any(r["stale"] or r.get("warming") or r.get("rsi") is None for r in rows):
        assert time.monotonic() < deadline, f"features never fresh: {rows}"
        time.sleep(0.3)
        rows = scan(env)
    assert [r["symbol"] for r in rows] == symbols
    # A reader not told of the shards finds them (their registry and heartbeats).
    unaware = {k: v for k, v in env.items() if k != "SIDECAR_SHARDS"}
    assert not any(r["stale"] for r in scan(unaware)), scan(unaware)
    # Each shard its own SQLite file; the log says which shard wrote each line.
    for i in range(2):
        assert (Path(env["SIDECAR_DATA_DIR"]) / f"shard-{i}").is_dir()
    shards_said = {rec.get("shard") for rec in supervisor.logs() if rec.get("logger") == "sidecar.daemon"}
    assert {"0/2", "1/2"} <= shards_said
    redis_pid = supervisor.embedded_redis_pid()
    assert redis_pid is not None and _alive(redis_pid)

    assert supervisor.stop(60) == 0
    assert not any(_alive(pid) for pid in pids)
    assert not _alive(redis_pid)
    stopped = [rec for rec in supervisor.logs() if rec.get("msg") == "stopped"]
    assert {rec.get("shard") for rec in stopped} >= {"0/2", "1/2"}  # each shard stopped cleanly
    assert all(rec["exit_code"] == 0 for rec in stopped)


def test_a_shard_that_dies_is_started_again(clean_env: dict[str, str], redis_server: RedisServer,
                                            daemons: Callable[..., Daemon]) -> None:
    env = _env(clean_env, SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX=f"t{os.getpid()}")
    supervisor = daemons(env, name="shards")
    port = int(env["SIDECAR_HTTP_PORT"])
    first = _wait_health(port + 1)[0]
    other = _wait_health(port)[0]
    os.kill(first, signal.SIGKILL)
    again = _wait_health(port + 1, other_than=first)[0]
    assert again != first
    assert _wait_health(port)[0] == other  # the other shard untouched
    supervisor.wait_log("shard exited; starting it again")
    restarted = next(rec for rec in supervisor.logs() if rec.get("msg") == "shard exited; starting it again")
    assert restarted["exit_code"] == -signal.SIGKILL and restarted["shard"] == "1/2"
    assert supervisor.stop(60) == 0
    assert not _alive(again) and not _alive(other)


def test_a_shard_with_a_bad_configuration_stops_them_all(
        clean_env: dict[str, str], redis_server: RedisServer, daemons: Callable[..., Daemon]) -> None:
    env = _env(clean_env, SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX=f"t{os.getpid()}")
    port = int(env["SIDECAR_HTTP_PORT"])
    with socket.socket() as taken:  # shard 1's port is someone else's
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        supervisor = daemons(env, name="shards")
        code = supervisor.proc.wait(60)
    assert code == 2, supervisor.log_tail()
    text = supervisor.log_text()
    assert "SIDECAR_HTTP_PORT" in text and "a shard stopped on a bad configuration" in text
    logs = supervisor.logs()
    pids = next(rec["pids"] for rec in logs if rec.get("msg") == "shards started")
    assert not any(_alive(pid) for pid in pids)  # no shard left running
    if any(rec.get("msg") == "shard" and rec.get("shard") == "0/2" for rec in logs):
        # Shard 0 got as far as starting (it may still have been importing): it stopped cleanly.
        stopped = [rec for rec in logs if rec.get("msg") == "stopped" and rec.get("shard") == "0/2"]
        assert stopped and stopped[0]["exit_code"] == 0


def test_shards_that_cannot_all_own_symbols_are_refused_at_start(clean_env: dict[str, str]) -> None:
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,MSFT", SIDECAR_SHARDS="8")
    done = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "SIDECAR_SHARDS" in done.stderr and "would own none of the 2 symbols" in done.stderr
    assert not (Path(env["SIDECAR_DATA_DIR"]) / "redis").exists()  # refused before anything started


def test_backfill_fills_each_shards_own_store_and_the_shards_start_warm(
        clean_env: dict[str, str], daemons: Callable[..., Daemon]) -> None:
    """``backfill`` with ``SIDECAR_SHARDS=2`` writes each symbol's history into the SQLite
    file of the shard that owns it; the shards then start with nothing to bootstrap."""
    env = _env(clean_env)
    done = subprocess.run([sys.executable, "-m", "sidecar", "backfill", "--days", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = Path(env["SIDECAR_DATA_DIR"])
    symbols = SYMBOLS.split(",")
    for i in range(2):
        with sqlite3.connect(data / f"shard-{i}" / "bars.sqlite3") as db:
            stored = {row[0] for row in db.execute("SELECT DISTINCT symbol FROM bars")}
        assert stored == set(owned(symbols, i, 2)), i
    assert not (data / "bars.sqlite3").exists()  # no store for a daemon that does not run
    supervisor = daemons(env, name="shards")
    for i in range(2):
        _wait_health(int(env["SIDECAR_HTTP_PORT"]) + i)
    deadline = time.monotonic() + 60
    while len([r for r in supervisor.logs() if r.get("msg") == "warm-up finished"]) < 2:
        assert time.monotonic() < deadline, supervisor.log_tail()
        time.sleep(0.2)
    warmed = [r for r in supervisor.logs() if r.get("msg") == "warm-up finished"]
    assert all(r["cold"] == 0 for r in warmed), warmed
    assert "bootstrap needed" not in supervisor.log_text()
    assert supervisor.stop(60) == 0


def test_the_embedded_redis_is_started_again_and_the_shards_go_on(
        clean_env: dict[str, str], daemons: Callable[..., Daemon]) -> None:
    env = _env(clean_env)
    supervisor = daemons(env, name="shards")
    port = int(env["SIDECAR_HTTP_PORT"])
    pids = [_wait_health(port + i)[0] for i in range(2)]
    first = supervisor.embedded_redis_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    supervisor.wait_log("embedded redis died; restarting it")
    deadline = time.monotonic() + 60
    while (again := supervisor.embedded_redis_pid()) in (None, first) or not _alive(again):
        assert time.monotonic() < deadline, supervisor.log_tail()
        time.sleep(0.2)
    rows = scan(env)
    while any(r["stale"] or r.get("missing") for r in rows):  # the shards write to the new server
        assert time.monotonic() < deadline, f"never fresh again: {rows}"
        time.sleep(0.3)
        rows = scan(env)
    assert [_wait_health(port + i)[0] for i in range(2)] == pids  # the same shard processes
    assert supervisor.stop(60) == 0
    assert not _alive(again)


def test_shards_stop_when_their_supervisor_is_killed(clean_env: dict[str, str], redis_server: RedisServer,
                                                      daemons: Callable[..., Daemon]) -> None:
    env = _env(clean_env, SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX=f"t{os.getpid()}")
    supervisor = daemons(env, name="shards")
    port = int(env["SIDECAR_HTTP_PORT"])
    pids = [_wait_health(port + i)[0] for i in range(2)]
    supervisor.proc.kill()
    supervisor.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids):  # SIGTERM from the kernel: each stops as asked
        assert time.monotonic() < deadline, supervisor.log_tail()
        time.sleep(0.2)
    stopped = [rec for rec in supervisor.logs() if rec.get("msg") == "stopped"]
    assert {rec.get("shard") for rec in stopped} == {"0/2", "1/2"}
    assert all(rec["exit_code"] == 0 for rec in stopped)
