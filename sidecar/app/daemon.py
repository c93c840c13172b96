"""Daemon lifecycle: startup → main loop → shutdown (in the manner of uvicorn).

SIGTERM/SIGINT set a flag: the loop stops taking bars, the SQLite buffer is
flushed, background work gets a few seconds and is then cancelled, Redis and the
embedded server are closed, and the process exits 0. A second SIGINT forces exit.
The process exits non-zero when it cannot do its job at all (bad config, Redis
unreachable past ``SIDECAR_REDIS_DOWN_EXIT_S``), so PM2 restarts it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from typing import Any

from redis.exceptions import RedisError

from sidecar.app.api import ReadApi
from sidecar.app.bootstrap import DAY_MS, backfill_symbol, repair_gaps
from sidecar.app.health import StatusLog, assess
from sidecar.app.http import DaemonView, start_http
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.breaker import SourceCircuits
from sidecar.errors import ConfigError, SidecarError
from sidecar.gc_tuning import settle_gc
from sidecar.parse_worker import ParseWorker, start_for
from sidecar.provider_settings import ProviderSettings
from sidecar.redis_server import EmbeddedRedis
from sidecar.redis_store import RedisStore, connect, redis_refusal
from sidecar.settings import Settings
from sidecar.signals import SignalRules
from sidecar.sources import Source, SourceDisabled, build_source
from sidecar.sqlite_store import BarStore
from sidecar.symbols import load_symbol_map, mapping_report

log = logging.getLogger("sidecar.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REDIS_DOWN = 3
RETENTION_EVERY_S = 3_600.0
GAP_REPAIR_EVERY_S = 60.0
#: Gap repair only spends budgets that sustain at least one request a minute, so it
#: never eats the few daily requests of a source like Alpha Vantage (25/day).
GAP_REPAIR_MAX_PACE_S = 60.0
#: Background backfill waits this long for a budget before giving a range to the next source.
BACKFILL_BUDGET_WAIT_S = 120.0


def build_sources(settings: Settings) -> list[Source]:
    """Create the configured sources in priority order; report disabled ones."""
    sources: list[Source] = []
    for name in settings.sources:
        try:
            sources.append(build_source(name, settings))
        except SourceDisabled as exc:
            log.warning("source disabled", extra={"source": name, "why": str(exc)})
    if not sources:
        raise ConfigError("SIDECAR_SOURCES", "none of the configured sources can run here "
                                             f"({', '.join(settings.sources)}); see the log above")
    return sources


async def open_redis(settings: Settings) -> tuple[RedisStore, EmbeddedRedis | None]:
    """Connect to ``SIDECAR_REDIS_URL``, or start/adopt the embedded server."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.redis_socket)
        url = await embedded.start()
    client = connect(url, pool_size=settings.redis_pool_size, timeout_s=settings.redis_timeout_s)
    store = RedisStore(client, settings.redis_prefix, bars_cap=settings.bars_cap,
                       features_ttl_ms=settings.features_ttl_ms,
                       heartbeat_ttl_ms=settings.heartbeat_ttl_ms)
    return store, embedded


async def _listen(view: DaemonView, settings: Settings, api: ReadApi) -> Any:
    """Serve the HTTP endpoints; a bind failure names the setting to change."""
    host, port = settings.http_host, settings.http_port
    token = None if settings.http_loopback else settings.http_token
    try:
        runner = await start_http(view, host, port, api, token=token)
    except OSError as exc:
        in_use = exc.errno in (errno.EADDRINUSE, errno.EACCES)
        setting = "SIDECAR_HTTP_PORT" if in_use else "SIDECAR_HTTP_HOST"
        raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if token is not None:
        log.warning("HTTP endpoints listen beyond this machine: every endpoint but /health and "
                    f"/ready asks for SIDECAR_HTTP_TOKEN; without TLS, anyone on the path to "
                    f"{host}:{port} can read the token and the data (README: Security)")
    return runner


class Daemon:
    """``python -m sidecar run``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.exit_code = EXIT_OK
        self._tasks: set[asyncio.Task[Any]] = set()
        self.parse_worker: ParseWorker | None = None

    # -- signals ------------------------------------------------------------------
    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            if sig == signal.SIGINT:
                log.warning("second SIGINT: forcing exit without flushing")
                os._exit(130)
            return
        log.info("stop requested", extra={"signal": sig.name})
        self.should_exit.set()

    # -- lifecycle ------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        s.check_http_auth()
        self._install_signals()
        try:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("SIDECAR_DATA_DIR", f"cannot create {s.data_dir}: {exc.strerror}") from None
        provider_settings = ProviderSettings.from_env(os.environ)  # refuses bad values now
        signal_rules = SignalRules.from_env()  # the rules of /v1/signals
        symbol_map = load_symbol_map(provider_settings.symbols_file)
        for symbol, problem in mapping_report(symbol_map, s.symbols):
            log.warning("symbol mapping", extra={"symbol": symbol, "problem": problem})
        sources = build_sources(s)
        circuits = {
            src.name: SourceCircuits.for_source(
                src, s.symbols, fail_max=provider_settings.breaker_fail_max,
                reset_timeout_s=provider_settings.breaker_reset_timeout_s)
            for src in sources if not src.synthetic
        }
        redis_store, embedded = await open_redis(s)
        store = BarStore(s.sqlite_file, flush_interval_s=s.flush_interval_s,
                         flush_max_rows=s.flush_max_rows, buffer_max_rows=s.buffer_max_rows)
        await store.open()
        pipeline = Pipeline(s, sources, redis_store, store, circuits)
        ticker = SecondTicker()
        view = DaemonView(pipeline, ticker)
        api: ReadApi | None = None
        runner = None
        parse_worker: ParseWorker | None = None
        try:
            api = ReadApi.from_settings(s, signal_rules)
            for source in sources:
                await source.start()
            parse_worker = await start_for(sources, s.parse_process, len(s.symbols))
            self.parse_worker = view.parse_worker = parse_worker
            runner = await _listen(view, s, api)
            log.info("daemon starting", extra={
                "symbols": len(s.symbols), "sources": [x.name for x in sources],
                "tf": s.timeframe.name, "http": f"{s.http_host}:{s.http_port}",
                "redis": "embedded" if embedded else "external", "sqlite": str(s.sqlite_file)})
            now_ms = int(time.time() * 1000)
            try:
                await pipeline.write_meta()
            except RedisError as exc:
                refused = redis_refusal(exc)
                if refused:
                    raise ConfigError("SIDECAR_REDIS_URL", refused) from None
                log.warning("redis not reachable at start", extra={"error": str(exc)})
            if await store.is_empty():
                log.warning("bootstrap needed: the bar store is empty",
                            extra={"days": s.bootstrap_days})
                await self._bootstrap(pipeline, sources, store, redis_store, now_ms)
            await pipeline.warm(int(time.time() * 1000))
            settle_gc()
            view.ready = True
            self._spawn(self._retention(store))
            self._spawn(self._repair_gaps(pipeline, sources, store, redis_store))
            await self._main_loop(pipeline, ticker)
        finally:
            await self._shutdown(pipeline, sources, store, redis_store, embedded, runner, parse_worker)
            if api is not None:
                await api.close()
        return self.exit_code

    async def _bootstrap(self, pipeline: Pipeline, sources: list[Source], store: BarStore,
                         redis_store: RedisStore, now_ms: int) -> None:
        """Backfill enough for the features first (in line), the rest in the background."""
        s = self.settings
        tf = s.timeframe
        end = tf.floor(now_ms)
        warm_start = end - max(s.warm_bars, 1) * tf.ms
        full_start = end - s.bootstrap_days * DAY_MS
        for sym in s.symbols:
            result = await backfill_symbol(sym, pipeline.grids[sym], sources, store,
                                           start_ms=max(warm_start, full_start),
                                           end_ms=end, now_ms=now_ms, redis_store=redis_store,
                                           redis_keep=s.bars_cap)
            log.info("bootstrap warm-up window", extra=result.as_dict())

        async def rest() -> None:
            for sym in s.symbols:
                if self.should_exit.is_set():
                    return
                result = await backfill_symbol(sym, pipeline.grids[sym], sources, store,
                                               start_ms=full_start,
                                               end_ms=end, now_ms=now_ms,
                                               budget_wait_s=BACKFILL_BUDGET_WAIT_S)
                log.info("bootstrap done", extra=result.as_dict())
            log.info("bootstrap finished", extra={"symbols": len(s.symbols), "days": s.bootstrap_days})

        if full_start < warm_start:
            self._spawn(rest())
        else:
            log.info("bootstrap finished", extra={"symbols": len(s.symbols), "days": s.bootstrap_days})

    async def _main_loop(self, pipeline: Pipeline, ticker: SecondTicker) -> None:
        s = self.settings
        status_log = StatusLog()
        while not self.should_exit.is_set():
            tick = await ticker.next(self.should_exit)
            if tick is None:
                break
            try:
                await pipeline.run_cycle(tick)
            except SidecarError as exc:
                log.error("cycle failed", extra={"error": str(exc)})
            stats = pipeline.stats
            if stats.cycles == 1:
                log.info("ready", extra={"first_cycle_ms": round(stats.last_duration_ms, 3)})
            status_log.observe(*assess(pipeline, parse_worker=self.parse_worker))
            if stats.redis_down_since is not None:
                down_for = time.monotonic() - stats.redis_down_since
                if down_for > s.redis_down_exit_s:
                    log.critical("redis unreachable for too long; exiting for a restart",
                                 extra={"down_s": round(down_for, 1)})
                    self.exit_code = EXIT_REDIS_DOWN
                    return

    async def _repair_gaps(self, pipeline: Pipeline, sources: list[Source], store: BarStore,
                           redis_store: RedisStore) -> None:
        """Backfill the gaps validation recorded, off the hot path, with budget to spare."""
        while not self.should_exit.is_set():
            try:
                await asyncio.wait_for(self.should_exit.wait(), GAP_REPAIR_EVERY_S)
                return
            except TimeoutError:
                pass
            spare = [s for s in sources if not s.synthetic
                     and (s.budget is None or s.budget.pace_s() <= GAP_REPAIR_MAX_PACE_S)]
            if not spare:
                continue
            try:
                await store.flush()  # the gaps found since the last flush
            except Exception as exc:
                log.error("gap repair: flush failed", extra={"error": str(exc)})
                continue
            for sym, st in pipeline.symbols.items():
                try:
                    result = await repair_gaps(sym, pipeline.grids[sym], spare, store,
                                               now_ms=int(time.time() * 1000),
                                               redis_store=redis_store)
                except Exception as exc:
                    log.error("gap repair failed", extra={"symbol": sym, "error": str(exc)})
                    continue
                if result.bars:
                    st.needs_rebuild = True  # older bars changed: reopen the handles

    async def _retention(self, store: BarStore) -> None:
        while not self.should_exit.is_set():
            cutoff = int(time.time() * 1000) - self.settings.retention_days * DAY_MS
            try:
                await store.delete_older_than(cutoff)
            except Exception as exc:
                log.error("retention failed", extra={"error": str(exc)})
            try:
                await asyncio.wait_for(self.should_exit.wait(), RETENTION_EVERY_S)
            except TimeoutError:
                pass

    async def _shutdown(self, pipeline: Pipeline, sources: list[Source], store: BarStore,
                        redis_store: RedisStore, embedded: EmbeddedRedis | None,
                        runner: Any, parse_worker: ParseWorker | None = None) -> None:
        log.info("shutting down", extra={"buffered": store.buffered})
        self.should_exit.set()
        await pipeline.drain(timeout_s=5.0)
        if parse_worker is not None:  # after the last cycle: nothing parses any more
            await parse_worker.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        await store.close()  # flushes everything buffered
        log.info("sqlite flushed", extra={"rows_total": store.flushed_rows, "dropped": store.dropped})
        for source in sources:
            try:
                await asyncio.wait_for(source.close(), 3.0)
            except Exception as exc:
                log.warning("source close failed", extra={"source": source.name, "error": str(exc)})
        if runner is not None:
            await runner.cleanup()
        try:
            await redis_store.clear_heartbeat()
        except (RedisError, OSError):
            pass
        try:
            await redis_store.close()
        except (RedisError, OSError):
            pass
        if embedded is not None:
            await embedded.stop()
        log.info("stopped", extra={"exit_code": self.exit_code})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def run_daemon(settings: Settings) -> int:
    """Run under uvloop until stopped; returns the process exit code."""
    import uvloop

    return uvloop.run(Daemon(settings).run())
