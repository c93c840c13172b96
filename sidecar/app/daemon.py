"""Daemon lifecycle: startup → main loop → shutdown (in the manner of uvicorn).

SIGTERM/SIGINT set a flag: the loop stops taking bars, the SQLite buffer is
flushed, background work gets a few seconds and is then cancelled, Redis and the
embedded server are closed, and the process exits 0. A second SIGINT forces exit.
The process exits non-zero when it cannot do its job at all (bad config, Redis
unreachable past ``SIDECAR_REDIS_DOWN_EXIT_S``), so PM2 restarts it.

The daemon's time is one :data:`~sidecar.clock.Clock`, given to the pipeline (bar
grid, validation, calendars, features), the ticker and ``/health``: the wall clock,
or, when ``replay`` plays at a speed other than 1, the recording's time
(:meth:`Daemon._replay_step`: closed markets with nothing recorded pass at once, and
the clock stops when the recording is exhausted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sqlite3
import time
from typing import Any

from redis.exceptions import RedisError

from sidecar import foreground
from sidecar.app.api import ReadApi
from sidecar.app.bootstrap import DAY_MS, repair_gaps
from sidecar.app.health import StatusLog, assess
from sidecar.app.http import DaemonView, start_http
from sidecar.app.pipeline import Pipeline
from sidecar.app.reconcile import reconcile
from sidecar.app.tasks import stopping_within
from sidecar.app.ticker import SecondTicker
from sidecar.app.warmup import warm_up
from sidecar.breaker import SourceCircuits
from sidecar.clock import Clock, WallClock, iso_ms
from sidecar.errors import ConfigError, SidecarError
from sidecar.gc_tuning import settle_gc
from sidecar.parse_worker import ParseWorker, start_for
from sidecar.redis_server import EmbeddedRedis, keep_running
from sidecar.redis_store import RedisStore, open_client, redis_refusal, wait_loaded
from sidecar.settings import Settings
from sidecar.shards import explicit_shards, owned
from sidecar.signals import SignalRules
from sidecar.sources import Source, SourceDisabled, build_source
from sidecar.sources._http import Providers
from sidecar.sources.replay import ReplaySource
from sidecar.sqlite_store import BarStore
from sidecar.symbols import mapping_report

log = logging.getLogger("sidecar.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_REDIS_DOWN = 3
RETENTION_EVERY_S = 3_600.0
#: How often Redis's identity is checked (a restart from an older snapshot keeps the meta key).
REDIS_IDENTITY_EVERY_S = 1.0
GAP_REPAIR_EVERY_S = 60.0
#: Gap repair only spends budgets that sustain at least one request a minute, so it
#: never eats the few daily requests of a source like Alpha Vantage (25/day).
GAP_REPAIR_MAX_PACE_S = 60.0


def build_sources(settings: Settings, providers: Providers | None = None) -> list[Source]:
    """Create the configured sources in priority order; report disabled ones.

    ``providers``: the provider settings and symbol map (read from the environment if not given).
    """
    sources: list[Source] = []
    providers = providers or Providers.from_env()
    for name in settings.sources:
        try:
            sources.append(build_source(name, settings, providers=providers))
        except SourceDisabled as exc:
            log.warning("source disabled", extra={"source": name, "why": str(exc)})
    if not sources:
        raise ConfigError("SIDECAR_SOURCES", "none of the configured sources can run here "
                                             f"({', '.join(settings.sources)}); see the log above")
    return sources


async def open_redis(settings: Settings) -> tuple[RedisStore, EmbeddedRedis | None]:
    """Connect to ``SIDECAR_REDIS_URL`` (a single server or any node of a Redis Cluster),
    or start/adopt the embedded server."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.redis_socket)
        url = await embedded.start()
    client = await open_client(url, pool_size=settings.redis_pool_size,
                               timeout_s=settings.redis_timeout_s)
    store = RedisStore(client, settings.redis_prefix, bars_cap=settings.bars_cap,
                       features_ttl_ms=settings.features_ttl_ms,
                       heartbeat_ttl_ms=settings.heartbeat_ttl_ms, shard=settings.shard)
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
                    f"{host}:{port} can read the token and the data (docs/reliability.md: Security)")
    return runner


def redis_run_ids(info: dict[str, Any]) -> frozenset[str]:
    """The ``run_id`` of the server (or of every cluster node) in an ``INFO server`` reply."""
    if "run_id" in info:
        return frozenset({str(info["run_id"])})
    return frozenset(str(v["run_id"]) for v in info.values() if isinstance(v, dict) and "run_id" in v)


async def repair_round(pipeline: Pipeline, sources: list[Source], store: BarStore,
                       redis_store: RedisStore, *, now_ms: int) -> int:
    """Backfill every symbol's recorded gaps from ``sources``; returns the bars added.

    A symbol that got bars has older history changed: after the next cycle the higher
    bars containing them are re-aggregated and stored, and the feature handles of every
    timeframe rebuilt (:meth:`Pipeline.history_changed`); its base bars are counted for
    completeness from the store now, the re-aggregated higher bars as the rebuild
    stores them.
    """
    added = 0
    tf = pipeline.tf.name
    for sym in pipeline.symbols:
        try:
            result = await repair_gaps(sym, pipeline.grids[sym], sources, store,
                                       now_ms=now_ms, redis_store=redis_store,
                                       calendar=pipeline.calendars.get(sym))
            if not result.bars:
                continue
            repaired = await store.bars_between(sym, tf, result.got_first or 0, (result.got_last or 0) + 1)
        except Exception as exc:
            log.error("gap repair failed", extra={"symbol": sym, "error": str(exc)})
            continue
        added += result.bars
        pipeline.history_changed(sym, [b.t for b in repaired])
        if not result.in_redis:
            pipeline.redis_replaced()  # put back once it answers
        await recount_completeness(pipeline, store, sym, now_ms)
    return added


async def recount_completeness(pipeline: Pipeline, store: BarStore, symbol: str, now_ms: int) -> None:
    """Count ``symbol``'s received and synthetic bars of its current and previous session
    on every timeframe from the store (at start, and after its history changed)."""
    span = pipeline.completeness.sessions(symbol, now_ms)
    if span is None:
        return
    for tf in pipeline.timeframes:
        bars = await store.bars_between(symbol, tf.name, span[0], span[1])
        pipeline.completeness.load(symbol, tf.name, bars, now_ms)

async def _open_sqlite(store: BarStore, stack: contextlib.AsyncExitStack) -> None:
    """Open the bar store and register its close (which flushes what is buffered)."""
    try:
        await store.open()
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(Exception):
            await store.close()
        raise SidecarError(f"cannot open the SQLite store {store.path}: {exc}") from None

    async def close() -> None:
        await store.close()
        log.info("sqlite flushed", extra={"rows_total": store.flushed_rows, "dropped": store.dropped})

    stack.push_async_callback(close)


async def _close_source(source: Source) -> None:
    try:
        await asyncio.wait_for(source.close(), 3.0)
    except Exception as exc:
        log.warning("source close failed", extra={"source": source.name, "error": str(exc)})


async def _close_redis(redis_store: RedisStore) -> None:
    """Take the heartbeat down (readers see the daemon gone at once) and close the pool."""
    with contextlib.suppress(RedisError, OSError):
        await redis_store.clear_heartbeat()
    with contextlib.suppress(RedisError, OSError):
        await redis_store.close()


class Daemon:
    """``python -m sidecar run``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.exit_code = EXIT_OK
        self._tasks: set[asyncio.Task[Any]] = set()
        self.parse_worker: ParseWorker | None = None
        #: The daemon's time (a replay at speed puts the recording's time here).
        self.clock: Clock = WallClock()
        #: The replay source whose recording sets the clock (speed other than 1), if any.
        self._replay: ReplaySource | None = None

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
        """Start-up → main loop → shutdown; returns the exit code.

        Each start-up step registers its teardown on one :class:`AsyncExitStack` as
        soon as what it started exists, so a failure at any step (SQLite cannot
        open, the port is taken, Redis refuses) releases exactly what was started,
        in reverse order, and the error reaches the caller (its exit code).
        """
        self.settings.check_http_auth()  # beyond loopback only with a token: refused before anything starts
        self._install_signals()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(lambda: log.info("stopped", extra={"exit_code": self.exit_code}))
            pipeline, ticker, _view = await self._startup(stack)
            replay = self._replay
            if replay is not None and replay.clock is not None:
                replay.clock.begin()
                log.info("replaying", extra={"speed": replay.clock.speed,
                                             "from": iso_ms(int(replay.clock() * 1000))})
            await self._main_loop(pipeline, ticker, replay)
        return self.exit_code

    async def _startup(self, stack: contextlib.AsyncExitStack) -> tuple[Pipeline, SecondTicker, DaemonView]:
        """Everything before the first cycle; the history comes in the background.

        The order of teardown is the reverse of this: the loop stops taking bars,
        background work gets a few seconds, the parse worker, sources and HTTP stop,
        SQLite is flushed and closed, Redis closed and the embedded server stopped.
        """
        s = self.settings
        try:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("SIDECAR_DATA_DIR", f"cannot create {s.data_dir}: {exc.strerror}") from None
        providers = Providers.from_env()  # refuses bad values now
        provider_settings, symbol_map = providers.settings, providers.symbols
        signal_rules = SignalRules.from_env()  # the rules of /v1/signals; refuses bad values now
        configured = s  # the read API serves every configured symbol, a shard's or not
        if s.shard is not None:
            mine = owned(s.symbols, s.shard, s.shards, explicit_shards(symbol_map))
            if not mine:
                raise ConfigError("SIDECAR_SHARD", f"shard {s.shard}/{s.shards} owns none of the "
                                                   f"{len(s.symbols)} symbols")
            s = self.settings = dataclasses.replace(s, symbols=mine)
            log.info("shard", extra={"shard": f"{s.shard}/{s.shards}", "owned": list(mine)})
        for symbol, problem in mapping_report(symbol_map, s.symbols):
            log.warning("symbol mapping", extra={"symbol": symbol, "problem": problem})
        sources = build_sources(s, providers)
        replay = next((src for src in sources if isinstance(src, ReplaySource) and src.clock), None)
        clock = self.clock = replay.clock if replay is not None and replay.clock else WallClock()
        circuits = {
            src.name: SourceCircuits.for_source(
                src, s.symbols, fail_max=provider_settings.breaker_fail_max,
                reset_timeout_s=provider_settings.breaker_reset_timeout_s)
            for src in sources if not src.synthetic
        }
        redis_store, embedded = await open_redis(s)
        if embedded is not None:
            stack.push_async_callback(embedded.stop)
        stack.push_async_callback(_close_redis, redis_store)
        store = BarStore(s.sqlite_file, flush_interval_s=s.flush_interval_s,
                         flush_max_rows=s.flush_max_rows, buffer_max_rows=s.buffer_max_rows)
        await _open_sqlite(store, stack)
        for source in sources:
            stack.push_async_callback(_close_source, source)
            await source.start()
        parse_worker = await start_for(sources, s.parse_process, len(s.symbols))
        if parse_worker is not None:
            stack.push_async_callback(parse_worker.close)  # after the last cycle: nothing parses
        pipeline = Pipeline(s, sources, redis_store, store, circuits, symbol_map=symbol_map,
                            clock=clock)
        ticker = SecondTicker(clock=clock)
        view = DaemonView(pipeline, ticker, parse_worker=parse_worker)
        self.parse_worker = parse_worker
        api = ReadApi.from_settings(configured, signal_rules)
        stack.push_async_callback(api.close)  # after the server: its streams end first
        runner = await _listen(view, s, api)
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(self._stop_background, pipeline)
        log.info("daemon starting", extra={
            "symbols": len(s.symbols), "sources": [x.name for x in sources],
            "tf": s.timeframe.name, "tfs": [tf.name for tf in s.series_timeframes],
            "http": f"{s.http_host}:{s.http_port}",
            "redis": "embedded" if embedded else ("cluster" if redis_store.cluster else "external"),
            "sqlite": str(s.sqlite_file)})
        await wait_loaded(redis_store.redis, self.should_exit,
                          running=None if embedded is None else embedded.running)
        try:
            await pipeline.write_meta()
        except RedisError as exc:
            refused = redis_refusal(exc)
            if refused:
                raise ConfigError("SIDECAR_REDIS_URL", refused) from None
            log.warning("redis not reachable at start", extra={"error": str(exc)})
        if s.shard is not None:
            await self._adopt(pipeline, store, redis_store)
        cold = await pipeline.begin_warmup(int(clock() * 1000))
        self._spawn(warm_up(pipeline, sources, store, redis_store, cold,
                            stopping=self.should_exit.is_set))
        settle_gc()
        view.ready = True
        if embedded is not None:
            self._spawn(self._supervise_redis(embedded, pipeline))
        self._spawn(self._watch_redis_identity(pipeline))
        self._spawn(self._retention(store))
        self._spawn(self._repair_gaps(pipeline, sources, store, redis_store))
        self._spawn(self._count_completeness(pipeline, store))
        self._replay = replay
        return pipeline, ticker, view

    async def _stop_background(self, pipeline: Pipeline) -> None:
        """First step of shutdown: no more cycles, background work finishes or is cancelled."""
        log.info("shutting down", extra={"buffered": pipeline.store.buffered})
        self.should_exit.set()
        await pipeline.drain(timeout_s=5.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    async def _adopt(self, pipeline: Pipeline, store: BarStore, redis_store: RedisStore) -> None:
        """Take over the history of symbols this shard now owns (the number of shards
        changed) from Redis: a symbol SQLite has no bar of gets Redis's bars."""
        tf = pipeline.tf.name
        for sym in pipeline.symbols:
            if await store.last_bars(sym, tf, 1):
                continue
            try:
                done = await reconcile(sym, tf, redis_store, store, self.settings.bars_cap)
            except (RedisError, OSError) as exc:
                log.warning("redis unreachable: moved symbols not warmed from it",
                            extra={"error": str(exc)})
                return
            if done.to_sqlite:
                log.info("moved symbol warmed from redis", extra={"symbol": sym, "bars": done.to_sqlite})

    async def _main_loop(self, pipeline: Pipeline, ticker: SecondTicker,
                         replay: ReplaySource | None = None) -> None:
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
            if replay is not None:
                self._replay_step(pipeline, replay)
            status_log.observe(*assess(pipeline, parse_worker=self.parse_worker))
            if stats.redis_down_since is not None:
                down_for = time.monotonic() - stats.redis_down_since
                if down_for > s.redis_down_exit_s:
                    log.critical("redis unreachable for too long; exiting for a restart",
                                 extra={"down_s": round(down_for, 1)})
                    self.exit_code = EXIT_REDIS_DOWN
                    return

    @staticmethod
    def _replay_step(pipeline: Pipeline, replay: ReplaySource) -> None:
        """After a cycle on the recording's time: say so and stop the clock once the
        recording is exhausted; else, while every symbol's market is closed, move the
        clock at once to the next open or the next recorded bar, whichever is first."""
        clock = replay.clock
        if clock is None or clock.finished:
            return
        now_ms = int(clock() * 1000)
        if replay.exhausted(now_ms):
            clock.finish()
            log.info("replay finished: the recording is exhausted", extra={
                "recorded_time": iso_ms(now_ms), "bars_stored": pipeline.stats.bars_accepted})
            return
        states = pipeline.symbols.values()
        if not states or any(st.market_open for st in states):
            return
        nexts = [st.next_open for st in states if st.next_open is not None]
        release = replay.next_release_ms(now_ms)
        if release is not None:
            nexts.append(release)
        if nexts and clock.skip_to(min(nexts) / 1000):
            log.debug("replay: closed hours skipped", extra={"to": iso_ms(min(nexts))})

    async def _repair_gaps(self, pipeline: Pipeline, sources: list[Source], store: BarStore,
                           redis_store: RedisStore) -> None:
        """Backfill the gaps validation recorded, off the hot path, with budget to spare."""
        while not self.should_exit.is_set():
            if await self._stopping_within(GAP_REPAIR_EVERY_S):
                return
            spare = [s for s in sources if not s.synthetic
                     and (s.budget is None or s.budget.pace_s() <= GAP_REPAIR_MAX_PACE_S)]
            if not spare:
                continue
            try:
                await store.flush()  # the gaps found since the last flush
            except Exception as exc:
                log.error("gap repair: flush failed", extra={"error": str(exc)})
                continue
            await repair_round(pipeline, spare, store, redis_store, now_ms=int(self.clock() * 1000))

    async def _count_completeness(self, pipeline: Pipeline, store: BarStore) -> None:
        """Once warm-up is done, count each symbol's stored bars of its current and
        previous session (:func:`recount_completeness`), one symbol at a time between cycles."""
        while pipeline.warmup.finished_ms is None:
            if await self._stopping_within(1.0):
                return
        todo = [sym for sym in pipeline.symbols if sym in pipeline.completeness]
        if not todo:
            return  # no symbol has a calendar (simulated markets, SIDECAR_MARKET_HOURS=false)
        try:
            await store.flush()  # the bars the cycles counted are read back
            for sym in todo:
                await foreground.wait_idle()
                await recount_completeness(pipeline, store, sym, int(self.clock() * 1000))
        except Exception as exc:
            log.error("completeness count failed", extra={"error": str(exc)})

    async def _watch_redis_identity(self, pipeline: Pipeline) -> None:
        """Notice a Redis that restarted under us (its ``run_id`` changed): it may have
        come back from an older snapshot, still holding the meta key but missing the bars
        written since. The pipeline then puts back what it lacks (only what differs)."""
        known: frozenset[str] | None = None
        while not self.should_exit.is_set():
            if await self._stopping_within(REDIS_IDENTITY_EVERY_S):
                return
            try:
                ids = redis_run_ids(await pipeline.redis.redis.info("server"))
            except (RedisError, OSError):
                continue  # an outage: the write path notices and recovers it
            if known is not None and ids and ids != known:
                log.warning("redis restarted; checking what it lacks")
                pipeline.redis_replaced()
            if ids:
                known = ids

    async def _supervise_redis(self, embedded: EmbeddedRedis, pipeline: Pipeline) -> None:
        """Restart the embedded server at once if it dies (from its RDB), then let the
        pipeline put back what the restarted server lacks. An external Redis is only
        reconnected to (by the client, on the next write)."""

        async def restarted() -> None:
            await wait_loaded(pipeline.redis.redis, self.should_exit, running=embedded.running)
            pipeline.redis_replaced()

        await keep_running(embedded, self.should_exit, restarted)

    async def _retention(self, store: BarStore) -> None:
        while not self.should_exit.is_set():
            now_ms = int(self.clock() * 1000)
            cutoff = now_ms - self.settings.retention_days * DAY_MS
            by_tf = {tf: now_ms - days * DAY_MS for tf, days in self.settings.retention_by_tf}
            try:
                await store.delete_older_than(cutoff, by_tf)
            except Exception as exc:
                log.error("retention failed", extra={"error": str(exc)})
            await self._stopping_within(RETENTION_EVERY_S)

    async def _stopping_within(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as a stop is requested."""
        return await stopping_within(self.should_exit, seconds)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def run_daemon(settings: Settings) -> int:
    """Run under uvloop until stopped; returns the process exit code."""
    import uvloop

    return uvloop.run(Daemon(settings).run())
