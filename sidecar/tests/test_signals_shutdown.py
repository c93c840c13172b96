"""Signals against a running daemon (a real process, real Redis and SQLite): a second
SIGINT forces the exit while the graceful shutdown waits on something slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sidecar.tests.helpers import Daemon, RedisServer, free_port

#: Holds the database's write lock (``BEGIN EXCLUSIVE``) until killed.
LOCKER = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
          "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)")


def test_second_sigint_forces_exit_while_the_final_flush_waits_on_a_locked_database(
        clean_env: dict[str, str], redis_server: RedisServer, daemons: Callable[..., Daemon]) -> None:
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,BTCUSD", SIDECAR_TIMEFRAME="1s",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=redis_server.url,
               SIDECAR_REDIS_PREFIX=f"sig{os.getpid()}", SIDECAR_FLUSH_INTERVAL_S="3600",
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="0")
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env)
    locker: subprocess.Popen[bytes] | None = None
    try:
        daemon.wait_ready()
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_path)], stdout=subprocess.PIPE)
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"

        daemon.proc.send_signal(signal.SIGINT)  # graceful: the final flush now waits for the lock
        daemon.wait_log('"shutting down"')
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(60) == 130
        assert locker.poll() is None  # the lock was still held: the exit did not wait for it
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait(10)
    text = daemon.log_text()
    assert "second SIGINT: forcing exit without flushing" in text
    assert '"stopped"' not in text and '"sqlite flushed"' not in text
