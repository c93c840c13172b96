"""The read API of a real daemon process: loopback by default, the cycle stream, the
bearer token beyond loopback (read from ``.env`` by the configuration layer, never
logged), and the refusal to listen beyond loopback without one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.tests.helpers import REPO, Daemon, free_port, read_events, tcp_listeners

TOKEN = "s3cret-token-of-the-daemon-test"


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def stream_cycles(port: int, n: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/v1/stream", params={"symbols": "AAPL,EURUSD"}) as resp:
        assert resp.status == 200
        return await read_events(resp, n)


def test_loopback_by_default_and_the_cycle_stream(clean_env: dict[str, str],
                                                  daemons: Callable[..., Daemon]) -> None:
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,EURUSD,BTCUSD",
               SIDECAR_TIMEFRAMES="1m,5m", SIDECAR_BOOTSTRAP_DAYS="0")
    daemon = daemons(env)
    port = daemon.port
    daemon.wait_ready()
    assert tcp_listeners(port) == {"127.0.0.1"}
    status, body = get(port, "/v1/features")  # no token asked on loopback
    assert status == 200
    assert [r["symbol"] for r in json.loads(body)["rows"]] == ["AAPL", "EURUSD", "BTCUSD"]
    status, body = get(port, "/v1/features?symbols=AAPL&timeframes=1m,5m")
    assert status == 200
    assert [(r["symbol"], r["tf"]) for r in json.loads(body)["rows"]] == [("AAPL", "1m"), ("AAPL", "5m")]
    events = asyncio.run(stream_cycles(port, 4))
    cycles = [e["cycle"] for e in events]
    assert cycles == list(range(cycles[0], cycles[0] + 4)), cycles  # each cycle, once
    assert [r["symbol"] for r in events[0]["rows"]] == ["AAPL", "EURUSD"]
    assert all(r["src"] == "sim" for e in events for r in e["rows"])
    assert daemon.stop() == 0


def test_beyond_loopback_every_endpoint_but_health_and_ready_needs_the_token(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".env").write_text(f"# keys\nSIDECAR_HTTP_TOKEN='{TOKEN}'\nSOMETHING_ELSE=kept-out\n")
    (workdir / ".env").chmod(0o600)
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,EURUSD",
               SIDECAR_HTTP_HOST="0.0.0.0", SIDECAR_BOOTSTRAP_DAYS="0", PYTHONPATH=str(REPO))
    daemon = daemons(env, cwd=workdir)
    port = daemon.port
    daemon.wait_ready()
    assert tcp_listeners(port) == {"0.0.0.0"}
    for path in ("/health", "/ready"):
        assert get(port, path)[0] == 200, path
    for path in ("/", "/metrics", "/v1/features", "/v1/signals", "/v1/stream", "/v1/bars?symbol=AAPL",
                 "/v1/closes", "/nowhere"):
        status, body = get(port, path)
        assert status == 401, path
        assert get(port, path, "wrong-" + TOKEN)[0] == 401, path
    assert json.loads(body) == {"error": "missing or wrong bearer token"}
    for path in ("/", "/metrics", "/v1/features", "/v1/signals", "/v1/bars?symbol=AAPL", "/v1/closes"):
        assert get(port, path, TOKEN)[0] == 200, path
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert TOKEN not in log and TOKEN[:12] not in log
    (read,) = [rec for rec in daemon.logs() if rec.get("msg") == "read .env"]
    assert read["loaded"] == ["SIDECAR_HTTP_TOKEN"] and read["environment_wins"] == []
    assert read["open_to_others"] is False and read["level"] == "info"


def test_a_dotenv_others_may_read_is_warned_and_the_environment_wins(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".env").write_text(f"SIDECAR_HTTP_TOKEN={'f' * 20}\n")
    (workdir / ".env").chmod(0o644)
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_HTTP_HOST="0.0.0.0",
               SIDECAR_HTTP_TOKEN=TOKEN, SIDECAR_BOOTSTRAP_DAYS="0", PYTHONPATH=str(REPO))
    daemon = daemons(env, cwd=workdir)
    daemon.wait_ready()
    assert get(daemon.port, "/v1/features", TOKEN)[0] == 200  # the environment's token
    assert get(daemon.port, "/v1/features", "f" * 20)[0] == 401
    assert daemon.stop() == 0
    (read,) = [rec for rec in daemon.logs() if rec.get("msg") == "read .env"]
    assert read["loaded"] == [] and read["environment_wins"] == ["SIDECAR_HTTP_TOKEN"]
    assert read["open_to_others"] is True and read["level"] == "warning"
    assert "f" * 20 not in daemon.log_text()


def test_beyond_loopback_without_a_token_refuses_to_start(clean_env: dict[str, str]) -> None:
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_HTTP_HOST="0.0.0.0",
               SIDECAR_HTTP_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                         capture_output=True, timeout=60)
    assert out.returncode == 2
    assert "SIDECAR_HTTP_TOKEN" in out.stderr.decode()
    short = subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, capture_output=True,
                           env=dict(env, SIDECAR_HTTP_TOKEN="short"), timeout=60)
    assert short.returncode == 2 and b"SIDECAR_HTTP_TOKEN" in short.stderr
    assert b"short" not in short.stderr.replace(b"SIDECAR_HTTP_TOKEN", b"")
