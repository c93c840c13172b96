"""``python -m sidecar run`` with ``SIDECAR_SHARDS=N`` and no shard index: this process
runs the N shards itself, one child process each (docs/operations.md, "Shards").

Shard ``i`` is a child ``python -m sidecar run`` with ``SIDECAR_SHARD=i/N``: its part of
the symbols, its own data directory, SQLite file and HTTP port (``SIDECAR_HTTP_PORT + i``),
its own parse worker. Every shard writes to one Redis: ``SIDECAR_REDIS_URL``, or the
embedded server this process starts and keeps running (restarted from its RDB if it
dies; each shard notices the new server and puts back what it lacks).

A shard that exits is started again after a back-off (0.5 s, doubling up to 10 s; a
shard that ran for a minute starts again at once), unless it exited on a bad
configuration (exit status 2): then every shard is stopped and this process exits 2,
the shard's log naming the setting. SIGTERM/SIGINT stop the shards (each flushes its
SQLite buffer and takes its heartbeat down, as a daemon does), then the embedded
server. A second SIGINT kills the shards at once. A shard whose supervisor dies
without stopping it gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.app.tasks import stopping_within
from sidecar.errors import ConfigError
from sidecar.redis_server import EmbeddedRedis, keep_running
from sidecar.settings import Settings
from sidecar.shards import explicit_shards, owned
from sidecar.symbols import SymbolMap

log = logging.getLogger("sidecar.shards")

#: A shard's exit status on a bad configuration (``python -m sidecar``'s).
EXIT_BAD_CONFIG = 2
#: A shard's restart back-off.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
#: A shard that ran this long before it exited is started again without waiting.
STEADY_S = 60.0
#: How long the shards may take to stop (each flushes SQLite) before they are killed:
#: under PM2's 30 s kill timeout, with time left to stop the embedded server.
STOP_TIMEOUT_S = 20.0
WATCH_EVERY_S = 0.25
_PR_SET_PDEATHSIG = 1
#: Looked up here, not in the forked child (no loader lock taken between fork and exec).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True)
class _Shard:
    """One child: its index, process, and when it may start again."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restart_at: float | None = None
    backoff_s: float = RESTART_MIN_S
    restarts: int = 0


def check_shards(settings: Settings, symbol_map: SymbolMap) -> None:
    """Refuse, naming the setting, a set of shards that cannot run: one that would own
    none of the symbols, or an HTTP port past 65535."""
    n = settings.shards
    explicit = explicit_shards(symbol_map)
    for i in range(n):
        if not owned(settings.symbols, i, n, explicit):
            raise ConfigError("SIDECAR_SHARDS", f"shard {i} of {n} would own none of the "
                                                f"{len(settings.symbols)} symbols")
    port = settings.http_port
    if port and port + n - 1 > 65535:
        raise ConfigError("SIDECAR_HTTP_PORT", f"{port} + shard {n - 1} is past 65535")


class ShardSupervisor:
    """Starts, watches and stops the shards of one machine (see the module docstring)."""

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None,
                 command: Sequence[str] | None = None) -> None:
        """``environ``: the shards' environment, each given its ``SIDECAR_SHARD`` and the
        Redis URL (this process's if not given); ``command``: how a shard is started."""
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.command = list(command or (sys.executable, "-m", "sidecar", "run"))
        self.shards = [_Shard(i) for i in range(settings.shards)]
        self.should_exit = asyncio.Event()
        self.exit_code = 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: killing the shards")
                for shard in self.shards:
                    if shard.proc is not None and shard.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            shard.proc.kill()
                os._exit(130)
            return
        log.info("stop requested", extra={"signal": sig.name})
        self.should_exit.set()

    async def run(self) -> int:
        """Start Redis (embedded, if no URL) and every shard, restart those that exit
        until a stop is asked, then stop them and Redis; returns the exit code."""
        self.settings.check_http_auth()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(lambda: log.info("stopped", extra={"exit_code": self.exit_code}))
            embedded: EmbeddedRedis | None = None
            url = self.settings.redis_url
            if url is None:
                embedded = EmbeddedRedis(self.settings.redis_socket)
                url = await embedded.start()
                stack.push_async_callback(embedded.stop)
                # Kept running until the shards have stopped (the stop sets ``should_exit``).
                watcher = asyncio.ensure_future(keep_running(embedded, self.should_exit))
                stack.push_async_callback(asyncio.wait, [watcher])
            stack.push_async_callback(self._stop_all)
            for shard in self.shards:
                await self._start(shard, url)
            log.info("shards started", extra={
                "shards": len(self.shards), "pids": [s.proc.pid for s in self.shards if s.proc],
                "redis": "embedded" if embedded is not None else "external"})
            await self._watch(url)
        return self.exit_code

    def _label(self, shard: _Shard) -> str:
        return f"{shard.index}/{len(self.shards)}"

    async def _start(self, shard: _Shard, url: str) -> None:
        env = dict(self.environ, SIDECAR_SHARD=self._label(shard), SIDECAR_SHARDS=str(len(self.shards)),
                   SIDECAR_REDIS_URL=url)
        env.pop("NODE_APP_INSTANCE", None)
        shard.proc = await asyncio.create_subprocess_exec(
            *self.command, env=env, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
        shard.started = asyncio.get_running_loop().time()
        shard.restart_at = None

    async def _watch(self, url: str) -> None:
        """Until a stop is asked: start again the shards that exit."""
        loop = asyncio.get_running_loop()
        while not await stopping_within(self.should_exit, WATCH_EVERY_S):
            now = loop.time()
            for shard in self.shards:
                proc = shard.proc
                if proc is not None and proc.returncode is not None:
                    shard.proc = None
                    if proc.returncode == EXIT_BAD_CONFIG:
                        log.error("a shard stopped on a bad configuration (its log names the setting); "
                                  "stopping every shard", extra={"shard": self._label(shard)})
                        self.exit_code = EXIT_BAD_CONFIG
                        return
                    if now - shard.started >= STEADY_S:
                        shard.backoff_s = 0.0
                    log.error("shard exited; starting it again", extra={
                        "shard": self._label(shard), "exit_code": proc.returncode,
                        "restart_in_s": shard.backoff_s, "restarts_before": shard.restarts})
                    shard.restart_at = now + shard.backoff_s
                    shard.backoff_s = min(max(shard.backoff_s * 2, RESTART_MIN_S), RESTART_MAX_S)
                if shard.proc is None and shard.restart_at is not None and now >= shard.restart_at:
                    shard.restarts += 1
                    await self._start(shard, url)

    async def _stop_all(self) -> None:
        """SIGTERM every running shard, wait for them (a second SIGINT kills them), kill
        the ones still running after :data:`STOP_TIMEOUT_S`."""
        self.should_exit.set()
        running = [s.proc for s in self.shards if s.proc is not None and s.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not running:
            return
        log.info("stopping the shards", extra={"running": len(running)})
        waits = [asyncio.ensure_future(proc.wait()) for proc in running]
        await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
        for proc in running:
            if proc.returncode is None:
                log.warning("shard did not stop in time; killing it", extra={"pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(*waits, return_exceptions=True)


def run_shards(settings: Settings, symbol_map: SymbolMap) -> int:
    """Run the shards under uvloop until stopped; returns the process exit code."""
    import uvloop

    check_shards(settings, symbol_map)
    return uvloop.run(ShardSupervisor(settings).run())
