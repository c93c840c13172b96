"""The embedded Redis left running by an earlier daemon: adopted, not started twice, and
stopped through its pidfile (it is not our child), saving its data."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from sidecar.redis_server import EmbeddedRedis
from sidecar.tests.helpers import REPO

#: A daemon that starts the embedded server and dies without stopping it (SIGKILL, OOM).
_START_AND_DIE = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from sidecar.redis_server import EmbeddedRedis
    asyncio.run(EmbeddedRedis(Path(sys.argv[1])).start())
    os._exit(9)
""")


def left_running(sock: Path) -> int:
    """Start an embedded server from a process that then dies; returns the server's pid."""
    subprocess.run([sys.executable, "-c", _START_AND_DIE, str(sock)], cwd=REPO, check=False, timeout=60)
    pid = int((sock.parent / "redis.pid").read_text())
    os.kill(pid, 0)  # still running, orphaned
    return pid


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent to reap it counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


async def test_a_running_server_is_adopted_and_stopped_by_its_pidfile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.redis_server")
    sock = tmp_path / "redis" / "redis.sock"
    pid = left_running(sock)
    try:
        redis.Redis(unix_socket_path=str(sock)).set("kept", b"1")
        embedded = EmbeddedRedis(sock)
        assert await embedded.start() == f"unix://{sock}"
        assert embedded.adopted
        assert int((sock.parent / "redis.pid").read_text()) == pid  # not started twice

        await embedded.stop()
        assert gone(pid)
        assert (sock.parent / "dump.rdb").exists()  # it saved on SIGTERM
        assert "SIGTERM" in (sock.parent / "redis.log").read_text()
        messages = [r.getMessage() for r in caplog.records]
        assert "adopted running embedded redis" in messages and "embedded redis stopped" in messages
        assert not any("did not stop" in m for m in messages)  # no SIGKILL: it saved and exited

        again = EmbeddedRedis(sock)
        await again.start()
        try:
            assert not again.adopted
            assert redis.Redis(unix_socket_path=str(sock)).get("kept") == b"1"
        finally:
            await again.stop()
    finally:
        if not gone(pid):
            os.kill(pid, 9)
