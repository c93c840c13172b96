"""Signals against a running daemon (a real process, real Redis and SQLite): a second
SIGINT forces the exit while the graceful shutdown waits on something slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sidecar.tests.conftest import REPO, RedisServer
from sidecar.tests.test_daemon import free_port, wait_ready

#: Holds the database's write lock (``BEGIN EXCLUSIVE``) until killed.
LOCKER = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
          "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)")


def wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until ``text`` appears in the log file ``path``."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None or text in path.read_text(errors="replace"), path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{path.read_text()}"
        time.sleep(0.1)


def test_second_sigint_forces_exit_while_the_final_flush_waits_on_a_locked_database(
        clean_env: dict[str, str], redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,BTCUSD", SIDECAR_TIMEFRAME="1s",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=redis_server.url,
               SIDECAR_REDIS_PREFIX=f"sig{os.getpid()}", SIDECAR_FLUSH_INTERVAL_S="3600",
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="0")
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                                stdout=log, stderr=log)
    locker: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(proc, port)
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path)], stdout=subprocess.PIPE)
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"

        proc.send_signal(signal.SIGINT)  # graceful: the final flush now waits for the lock
        wait_for_line(log_path, '"shutting down"', proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert locker.poll() is None  # the lock was still held: the exit did not wait for it
    finally:
        for p in (proc, locker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    text = log_path.read_text()
    assert "second SIGINT: forcing exit without flushing" in text
    assert '"stopped"' not in text and '"sqlite flushed"' not in text
