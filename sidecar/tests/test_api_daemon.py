"""The read API of a real daemon process: loopback by default, the cycle stream, the
bearer token beyond loopback (read from ``.env``, never logged), the refusal to listen
beyond loopback without one, and the ``.env`` rules."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.dotenv import load_dotenv
from sidecar.errors import ConfigError
from sidecar.tests.conftest import REPO
from sidecar.tests.test_api import read_events
from sidecar.tests.test_daemon import free_port, start, tcp_listeners, wait_ready

TOKEN = "s3cret-token-of-the-daemon-test"


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(10)
    return code, (proc.stderr.read().decode() if proc.stderr else "")


async def stream_cycles(port: int, n: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/v1/stream", params={"symbols": "AAPL,EURUSD"}) as resp:
        assert resp.status == 200
        return await read_events(resp, n)


def test_loopback_by_default_and_the_cycle_stream(clean_env: dict[str, str]) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,EURUSD,BTCUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="0")
    proc = start(env)
    try:
        wait_ready(proc, port)
        assert tcp_listeners(port) == {"127.0.0.1"}
        status, body = get(port, "/v1/features")  # no token asked on loopback
        assert status == 200
        assert [r["symbol"] for r in json.loads(body)["rows"]] == ["AAPL", "EURUSD", "BTCUSD"]
        events = asyncio.run(stream_cycles(port, 4))
        cycles = [e["cycle"] for e in events]
        assert cycles == list(range(cycles[0], cycles[0] + 4)), cycles  # each cycle, once
        assert [r["symbol"] for r in events[0]["rows"]] == ["AAPL", "EURUSD"]
        assert all(r["src"] == "sim" for e in events for r in e["rows"])
    finally:
        code, _ = stop(proc)
    assert code == 0


def test_beyond_loopback_every_endpoint_but_health_and_ready_needs_the_token(
        clean_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".env").write_text(f"# keys\nSIDECAR_HTTP_TOKEN='{TOKEN}'\nSIDECAR_SYMBOLS=IGNORED\n")
    (workdir / ".env").chmod(0o600)
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,EURUSD",
               SIDECAR_HTTP_HOST="0.0.0.0", SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="0",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(proc, port)
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
    finally:
        code, stderr = stop(proc)
    assert code == 0
    assert TOKEN not in stderr and TOKEN[:12] not in stderr
    read = [json.loads(line) for line in stderr.splitlines() if '"read .env"' in line]
    assert read and read[0]["loaded"] == ["SIDECAR_HTTP_TOKEN"]
    assert read[0]["ignored_not_keys"] == ["SIDECAR_SYMBOLS"] and read[0]["open_to_others"] is False


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


def test_dotenv_fills_only_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("\n".join([
        "# a comment", "", "export POLYGON_API_KEY=from-file-1  # trailing comment",
        'TWELVEDATA_API_KEY="quoted value"', "ALPHAVANTAGE_API_KEY=from-file-2",
        "SIDECAR_REDIS_URL=unix:///elsewhere",
    ]))
    environ = {"ALPHAVANTAGE_API_KEY": "from-environment", "TWELVEDATA_API_KEY": "  "}
    result = load_dotenv(environ, path)
    assert result is not None
    assert environ == {"ALPHAVANTAGE_API_KEY": "from-environment", "TWELVEDATA_API_KEY": "quoted value",
                       "POLYGON_API_KEY": "from-file-1"}
    assert (result.loaded, result.overridden, result.ignored) == (
        ["POLYGON_API_KEY", "TWELVEDATA_API_KEY"], ["ALPHAVANTAGE_API_KEY"], ["SIDECAR_REDIS_URL"])
    path.chmod(0o644)
    assert load_dotenv({}, path).open_to_others is True  # type: ignore[union-attr]
    path.chmod(0o600)
    assert load_dotenv({}, path).open_to_others is False  # type: ignore[union-attr]
    assert load_dotenv({}, tmp_path / "missing.env") is None
    path.write_text("POLYGON_API_KEY from-file-1\n")
    with pytest.raises(ConfigError) as err:
        load_dotenv({}, path)
    assert "line 1" in str(err.value) and "from-file" not in str(err.value)
