"""The daemon as a user runs it: a real process, real Redis, real SQLite file."""

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

import pytest

from sidecar.bar import Bar
from sidecar.tests.helpers import REPO, Daemon, RedisServer, free_port, http_get, scan, tcp_listeners

SYMBOLS = "AAPL,MSFT,EURUSD,BTCUSD"


def test_embedded_redis_scan_health_and_clean_stop(clean_env: dict[str, str],
                                                   daemons: Callable[..., Daemon]) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=SYMBOLS,
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="2")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        rows = scan(env)
        while any(r["stale"] or r.get("warming") for r in rows):  # warm: handles on the history
            assert time.monotonic() < deadline, f"features never fresh and warm: {rows}"
            time.sleep(0.3)
            rows = scan(env)
        assert [r["symbol"] for r in rows] == SYMBOLS.split(",")
        for r in rows:
            assert r["rsi"] is not None and r["src"] == "sim"
        status, health = http_get(port, "/health")
        assert status == 200 and health["status"] == "ok", health
        sock = Path(env["SIDECAR_DATA_DIR"]) / "redis" / "redis.sock"
        assert sock.exists() and (sock.stat().st_mode & 0o077) == 0  # private socket
        assert (sock.parent.stat().st_mode & 0o777) == 0o700  # in a private directory
        # The embedded Redis has no TCP port; the HTTP endpoints listen on loopback only.
        assert "port 0" in (sock.parent / "redis.conf").read_text().splitlines()
        import redis

        assert redis.Redis(unix_socket_path=str(sock)).config_get("port") == {"port": "0"}
        assert tcp_listeners(port) == {"127.0.0.1"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The embedded server was stopped with the daemon.
    assert not any(_answers(sock) for _ in range(3))


def _answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(str(sock))
            return True
    except OSError:
        return False


def test_sigterm_with_full_buffer_loses_no_bar(clean_env: dict[str, str], redis_server: RedisServer,
                                               daemons: Callable[..., Daemon]) -> None:
    port = free_port()
    prefix = f"t{os.getpid()}"
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=SYMBOLS, SIDECAR_TIMEFRAME="1s",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=redis_server.url,
               SIDECAR_REDIS_PREFIX=prefix, SIDECAR_FLUSH_INTERVAL_S="3600",
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="0")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready()
        import redis

        r = redis.Redis(unix_socket_path=str(redis_server.socket))
        deadline = time.monotonic() + 60
        while min(r.zcard(f"{prefix}:v1:bars:1s:{sym}") for sym in SYMBOLS.split(",")) < 3:
            assert time.monotonic() < deadline, "three bars of each symbol never reached Redis"
            time.sleep(0.2)
        _, health = http_get(port, "/health")
        assert health["sqlite"]["buffered"] > 0 and health["sqlite"]["flushed_rows"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    db = sqlite3.connect(Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3")
    total = 0
    for sym in SYMBOLS.split(","):
        raws = r.zrange(f"{prefix}:v1:bars:1s:{sym}", 0, -1)
        in_redis = [Bar.unpack(sym, "1s", raw) for raw in raws]  # type: ignore[arg-type]
        rows = db.execute("SELECT t, o, h, l, c, v FROM bars WHERE symbol=? AND tf='1s' ORDER BY t",
                          (sym,)).fetchall()
        assert len(in_redis) >= 3
        assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in in_redis] == rows
        total += len(rows)
    assert total > 0


def test_bad_setting_stops_start_with_its_name(clean_env: dict[str, str]) -> None:
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,BAD SYMBOL")
    out = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                         capture_output=True, timeout=30)
    assert out.returncode == 2
    assert "SIDECAR_SYMBOLS" in out.stderr.decode()


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. the data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.parametrize("step", ["sqlite", "port", "redis"])
def test_startup_failure_at_each_step_leaves_no_process_behind(
        step: str, clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """SQLite cannot open (exit 1), the HTTP port is taken (2), Redis refuses the
    daemon (2): what start-up had started (the embedded Redis) is stopped."""
    data = Path(clean_env["SIDECAR_DATA_DIR"])
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_BOOTSTRAP_DAYS="0")
    expected = 2
    held: socket.socket | None = None
    server: RedisServer | None = None
    if step == "sqlite":
        data.mkdir(parents=True)
        (data / "bars.sqlite3").write_bytes(b"this is not a database" * 100)
        expected = 1
    elif step == "port":
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        env["SIDECAR_HTTP_PORT"] = str(held.getsockname()[1])
    else:
        server = RedisServer(tmp_path / "auth-redis", "--requirepass", "secret")
        server.start()
        env["SIDECAR_REDIS_URL"] = server.url  # no password: refused
    try:
        daemon = daemons(env)
        assert daemon.proc.wait(60) == expected, daemon.log_tail()
        redis_pid = daemon.embedded_redis_pid()
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(data)):
            assert time.monotonic() < deadline, _processes_mentioning(str(data))
            time.sleep(0.1)
        if redis_pid is not None:
            assert not Path(f"/proc/{redis_pid}").exists() or \
                "zombie" in Path(f"/proc/{redis_pid}/status").read_text().lower()
        if step != "redis":
            assert "embedded redis stopped" in daemon.log_text()
    finally:
        if held is not None:
            held.close()
        if server is not None:
            server.stop()
