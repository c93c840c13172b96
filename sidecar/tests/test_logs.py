"""Structured logs: JSON lines off a terminal, readable lines on one (a real pty), keys
redacted everywhere, and one line per state change rather than per cycle (a real daemon
with a failing keyed provider in front of the sim source)."""

from __future__ import annotations

import json
import logging
import os
import pty
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest

from sidecar.app.health import StatusLog
from sidecar.logs import JsonFormatter, TextFormatter, redact
from sidecar.tests.helpers import REPO, Daemon, free_port, http_get

KEY = "Zq9kT3stK3yValue77"


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("sidecar.test", logging.WARNING, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_keys_are_redacted_in_messages_extras_and_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWELVEDATA_API_KEY", KEY)
    url = f"https://api.twelvedata.com/time_series?symbol=AAPL&apikey={KEY}&interval=1min"
    rec = record(f"GET {url} failed", url=url, headers={"Authorization": f"Bearer {KEY}"},
                 echoed=f"provider said: invalid key {KEY}")
    try:
        raise RuntimeError(f"boom on {url}")
    except RuntimeError:
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert KEY not in line
    data = json.loads(line)
    assert data["level"] == "warning" and data["logger"] == "sidecar.test"
    assert "apikey=***" in data["msg"] and "apikey=***" in data["url"]
    assert "boom on" in data["exc"]
    text = TextFormatter().format(rec)
    assert KEY not in text and "apikey=***" in text
    assert "WARNING" in text and "sidecar.test: GET" in text
    for leaky in (f"api_key={KEY}", f"token={KEY}", f"Authorization: Bearer {KEY}",
                  f"{{'Authorization': 'apikey {KEY}'}}", f"?apiKey={KEY}"):
        assert KEY not in redact(leaky), leaky


def test_status_is_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.health")
    status = StatusLog()
    seen = [status.observe(s, [] if s == "ok" else ["why"])
            for s in ("ok", "ok", "degraded", "degraded", "degraded", "ok", "down")]
    assert seen == [True, False, True, False, False, True, True]
    assert [(r.getMessage(), r.levelname) for r in caplog.records] == [
        ("status ok", "INFO"), ("status degraded", "WARNING"), ("status ok", "INFO"),
        ("status down", "WARNING")]
    assert caplog.records[1].__dict__["reasons"] == ["why"]


PROGRAM = ("import logging; from sidecar.logs import setup_logging; setup_logging('auto', 'info'); "
           "logging.getLogger('sidecar.x').info('hello', extra={'symbol': 'AAPL'})")


def test_json_off_a_terminal_text_on_a_terminal() -> None:
    piped = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, timeout=30)
    assert json.loads(piped.stderr)["msg"] == "hello"

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, stderr=follower, timeout=30)
        assert proc.returncode == 0
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    line = out.decode().strip()
    assert not line.startswith("{") and "INFO" in line and "sidecar.x: hello" in line
    assert "symbol=AAPL" in line


def test_daemon_logs_state_changes_not_cycles_and_never_a_key(clean_env: dict[str, str],
                                                               daemons: Callable[..., Daemon]) -> None:
    dead = free_port()  # nothing listens here: every Twelve Data call fails
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="twelvedata,sim", SIDECAR_SYMBOLS="AAPL,MSFT",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="1", TWELVEDATA_API_KEY=KEY,
               SIDECAR_TWELVEDATA_BASE_URL=f"http://127.0.0.1:{dead}", SIDECAR_BREAKER_FAIL_MAX="1")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        while http_get(port, "/health")[1]["cycle"]["count"] < 5:  # five cycles
            assert time.monotonic() < deadline, "five cycles did not come"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    text = daemon.log_text()
    assert KEY not in text
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    messages = Counter(e["msg"] for e in events)
    assert messages["ready"] == 1
    assert messages["status degraded"] == 1, messages
    assert any("closed -> open" in m for m in messages), messages
    assert messages["bootstrap finished"] == 1
    # Nothing is logged per cycle: no line repeats more than once per symbol.
    assert max(messages.values()) <= 2, messages.most_common(3)
    assert any("127.0.0.1" in json.dumps(e) for e in events if e["msg"] == "source error")
