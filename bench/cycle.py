"""The whole 1-second cycle for N = 100 … 5,000 symbols, as the daemon runs it.

Per N, a fresh process (so its RSS is its own) builds what ``Daemon.run`` builds — the
real Twelve Data source module (budget raised for the benchmark) pointed at a local
fake provider (``bench/fake_market.py``, its own process, which renders each second's
answers in the idle part of the second before, as a remote provider's CPU is not on
this machine; its CPU per cycle is reported), its circuit breakers, the
Redis store on a real redis-server, the SQLite store on a real file — pre-fills
history that the fake market continues exactly, warms the pipeline from it and then
runs ``Pipeline.run_cycle`` on every ``SecondTicker`` tick, like the daemon's main
loop. Every cycle fetches all N symbols over HTTP (batches of ``--batch``), validates
them, writes Redis (an EVALSHA per piece of each answer) and the SQLite buffer (flushed
every 10 s in the background) and updates the features.

Like the daemon, N >= 500 runs the parse worker (``SIDECAR_PARSE_PROCESS=auto``; the
variable set for the benchmark decides as it would for the daemon).

The largest N runs once more with several timeframes (``--multi-tf``), in one process and
then as ``--shards`` shards at once (``SIDECAR_SHARD=i/N``, one process each, as
``SIDECAR_SHARDS=N`` runs them; default one per core), all on the one Redis and ticking
together: a tick's cycle is done when every shard's is, so its time is the slowest shard's.

Measured per N: cycle time p50/p99/max (``Pipeline.stats``; the first cycle after
warm-up, the start-up's, apart), CPU time per symbol per
cycle (the whole process: event loop, aiosqlite thread; and the parse worker's, from
``/proc/<pid>/stat``, counted separately and added up; the redis-server's, from ``INFO
cpu``), the time of the cycle's features stage (``SeriesStage.features``: every symbol's
higher series brought up to the base, every forming bar peeked, every map packed), missed
ticks, tick lateness, RSS at start and end of the run, the load average at the end. A PNG
plots cycle time vs N.

    .venv/bin/python -m bench.cycle [--smoke] [--sizes 100,500] [--seconds 20]
    .venv/bin/python -m bench.cycle --soak      # 5,000 symbols for 5 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import fake_market
from bench._common import RESULTS_DIR, PrivateRedis, cli, rss_mb, summary, table

NAME = "cycle"
REPO = Path(__file__).resolve().parents[1]
SIZES = (100, 500, 1_000, 2_000, 5_000)
HISTORY_BARS = 60  # enough for every handle (MACD needs 34) and the outlier window (50)
#: The Redis counter sharded runs meet at after warm-up, so their cycles share their ticks.
SHARD_BARRIER = "bench:cycle:shards-ready"


async def run_one(n: int, seconds: int, redis_url: str, market_url: str, batch: int,
                  timeframes: str = "1m", shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """One N in this process: set up like the daemon (``timeframes`` as
    ``SIDECAR_TIMEFRAMES``), then tick for ``seconds``. ``shard``: ``(i, N)``, this
    process is shard ``i`` of ``N`` (``SIDECAR_SHARD=i/N``) and owns its part of the
    N symbols; the shards start ticking together (:data:`SHARD_BARRIER`)."""
    from sidecar.app.pipeline import Pipeline
    from sidecar.app.ticker import SecondTicker
    from sidecar.breaker import SourceCircuits
    from sidecar.gc_tuning import settle_gc
    from sidecar.parse_worker import process_cpu_s, start_for
    from sidecar.provider_settings import ProviderSettings
    from sidecar.rate_budget import RateBudget
    from sidecar.redis_store import RedisStore, connect
    from sidecar.series import aggregate, aggregate_all
    from sidecar.settings import Settings
    from sidecar.shards import shard_of
    from sidecar.sources.twelvedata import TwelveDataSource
    from sidecar.sqlite_store import BarStore
    from sidecar.symbols import load_symbol_map
    from sidecar.timeframe import Timeframe

    logging.basicConfig(level=logging.ERROR)
    everyone = [fake_market.symbol_name(i) for i in range(n)]
    index = [i for i, sym in enumerate(everyone) if shard is None or shard_of(sym, shard[1]) == shard[0]]
    symbols = tuple(everyone[i] for i in index)
    tmp = tempfile.TemporaryDirectory(prefix="sidecar-bench-cycle-")
    data = Path(tmp.name)
    env_settings = Settings.from_env()  # SIDECAR_PARSE_PROCESS, as the daemon reads it
    tfs = sorted((Timeframe.parse(x) for x in timeframes.split(",")), key=lambda tf: tf.ms)
    settings = Settings(symbols=symbols, sources=("twelvedata",), redis_url=redis_url, data_dir=data,
                        timeframe=tfs[0], higher_timeframes=tuple(tfs[1:]),
                        warm_bars=HISTORY_BARS, parse_process=env_settings.parse_process,
                        market_hours=False,  # the full load at whatever hour it runs
                        shard=None if shard is None else shard[0], shards=1 if shard is None else shard[1])
    provider = ProviderSettings(twelvedata_api_key="bench-key", twelvedata_base_url=market_url,
                                twelvedata_credits_per_minute=batch, http_pool_size=20)
    # The free tier's 8 credits a minute would serve 8 symbols; the benchmark lifts it.
    budget = RateBudget("twelvedata", per_minute=10**9, per_day=10**12)
    source = TwelveDataSource(provider, load_symbol_map(None), budget)
    circuits = {source.name: SourceCircuits.for_source(
        source, symbols, fail_max=provider.breaker_fail_max,
        reset_timeout_s=provider.breaker_reset_timeout_s)}
    client = connect(redis_url, pool_size=settings.redis_pool_size, timeout_s=settings.redis_timeout_s)
    if shard is None:
        await client.flushall()  # shards: the parent flushed before starting them
    redis_store = RedisStore(client, settings.redis_prefix, bars_cap=settings.bars_cap, shard=settings.shard)
    store = BarStore(settings.sqlite_file)
    await store.open()
    pipeline = Pipeline(settings, [source], redis_store, store, circuits)
    # The features stage's own time in each cycle (every call, answers' and the rest's).
    timed = pipeline.series = TimedStage(pipeline.series)  # type: ignore[assignment]
    now = int(time.time() * 1000)
    base_start = now - now % 60_000 - HISTORY_BARS * 60_000
    for i in index:  # history that the fake market continues exactly
        base_history = fake_market.history(i, now, HISTORY_BARS)
        await store.write_history(base_history)
        for ser in pipeline.symbols[everyone[i]].higher:
            # As after a day of running: enough bars of each higher timeframe for its
            # handles to open at warm-up, the complete buckets of the base history
            # aggregated as the daemon does, and older ones before them.
            assert ser.grid is not None
            groups = aggregate_all(ser.grid, everyone[i], base_history)
            if groups and groups[-1][1][-1].t + 60_000 < groups[-1][0].end:
                groups.pop()  # the bucket still forming
            made = [aggregate(everyone[i], ser.tf.name, bucket.t, parts) for bucket, parts in groups]
            first = made[0].t if made else base_start - base_start % ser.tf.ms
            older = [dataclasses.replace(b, tf=ser.tf.name, t=first - (HISTORY_BARS - k) * ser.tf.ms)
                     for k, b in enumerate(base_history)]
            await store.write_history(older + made)
    await source.start()
    n = len(symbols)
    worker = await start_for([source], settings.parse_process, n)
    setup_started = time.perf_counter()
    await pipeline.warm(int(time.time() * 1000))
    warm_s = time.perf_counter() - setup_started
    settle_gc()  # as Daemon.run does after warm-up
    if shard is not None:
        if await client.incr(SHARD_BARRIER) == shard[1]:  # the last one in lets everyone go
            await client.rpush(SHARD_BARRIER + ":go", *range(shard[1]))
        await client.blpop([SHARD_BARRIER + ":go"], timeout=600)

    ticker = SecondTicker()
    durations: list[float] = []
    ticks: list[int] = []
    cpu_per_symbol_us: list[float] = []
    stage_ms: list[float] = []
    worker_cpu_us: list[float] = []
    lateness: list[float] = []
    rss_start = rss_mb()
    rss_samples = [rss_start]
    await ticker.next()  # the first tick only aligns
    # The first cycle after warm-up is the start-up's, reported apart (bench/startup.py
    # measures start-up): every symbol's recent bars come back from the provider once
    # (the parse worker's memo of closed rows starts empty) and the fake market renders
    # its closed rows the first time.
    tick = await ticker.next()
    assert tick is not None
    await pipeline.run_cycle(tick)
    first_cycle_ms = pipeline.stats.last_duration_ms
    ticker.missed = 0
    redis_cpu0 = await _redis_cpu_s(client)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tick = await ticker.next()
        assert tick is not None
        lateness.append(ticker.lateness_ms)
        cpu0 = time.process_time()
        timed.seconds = 0.0
        wcpu0 = process_cpu_s(worker.pid) if worker is not None and worker.pid else None
        await pipeline.run_cycle(tick)
        cpu_per_symbol_us.append((time.process_time() - cpu0) / n * 1e6)
        if wcpu0 is not None and worker is not None and worker.pid:
            wcpu1 = process_cpu_s(worker.pid)  # its answers are all in by the cycle's end
            if wcpu1 is not None:
                worker_cpu_us.append((wcpu1 - wcpu0) / n * 1e6)
        durations.append(pipeline.stats.last_duration_ms)
        ticks.append(tick)
        stage_ms.append(timed.seconds * 1000)
        rss_samples.append(rss_mb())
    redis_cpu_us = (await _redis_cpu_s(client) - redis_cpu0) / max(1, len(durations)) / n * 1e6
    await pipeline.drain()
    state = pipeline.sources[0]
    worker_status = worker.status() if worker is not None else None
    if worker is not None:
        await worker.close()
    # The worker's CPU is counted in clock ticks (10 ms): per-cycle values are coarse, the
    # mean over the run is not.
    worker_mean = sum(worker_cpu_us) / len(worker_cpu_us) if worker_cpu_us else 0.0
    out = {
        "symbols": n, "timeframes": timeframes, "seconds": seconds, "cycles": len(durations), "batch": batch,
        "cycle_ms": summary(durations), "cycle_ms_each": [round(d, 1) for d in durations],
        "ticks": ticks, "lateness_ms_each": [round(x, 1) for x in lateness],
        "first_cycle_ms": round(first_cycle_ms, 1),
        "cpu_us_per_symbol": summary(cpu_per_symbol_us),
        "features_stage_ms": summary(stage_ms),
        "parse_worker": worker_status,
        "worker_cpu_us_per_symbol_mean": worker_mean,
        "daemon_cpu_us_per_symbol_mean": sum(cpu_per_symbol_us) / max(1, len(cpu_per_symbol_us)),
        "redis_cpu_us_per_symbol_mean": redis_cpu_us,
        "load_average": os.getloadavg(),
        "missed_ticks": ticker.missed, "lateness_ms": summary(lateness),
        "rss_mb": {"start": rss_start, "end": rss_samples[-1], "max": max(rss_samples)},
        "warm_s": warm_s,
        "bars_accepted": pipeline.stats.bars_accepted,
        "bars_accepted_per_cycle": pipeline.stats.bars_accepted / max(1, len(durations)),
        "rejected": dict(pipeline.validator.rejected), "duplicates": pipeline.validator.duplicates,
        "source_errors": state.errors, "source_last_error": state.last_error_class,
        "sqlite_rows_flushed": store.flushed_rows, "redis_ok": pipeline.stats.redis_ok,
    }
    await source.close()
    await store.close()
    await redis_store.close()
    tmp.cleanup()
    return out


class TimedStage:
    """A pipeline's :class:`~sidecar.app.symbol_state.SeriesStage` that adds up the time
    its ``features`` calls take (every symbol's fold, peeks and packed maps)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.seconds = 0.0

    def features(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.stage.features(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)


async def _redis_cpu_s(client: Any) -> float:
    """The redis-server's CPU seconds so far (user + system, as ``INFO cpu`` counts them)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class FakeMarketProcess:
    """``bench.fake_market`` in a process of its own."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fake_market"], stdout=subprocess.PIPE,
                                     text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"fake market did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def measured(self, child: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """``child(*args)``'s result, with the fake market's CPU per cycle meanwhile (ms;
        the warm-up's history requests included, so an upper bound)."""
        from sidecar.parse_worker import process_cpu_s

        before = process_cpu_s(self.proc.pid)
        result = child(*args)
        after = process_cpu_s(self.proc.pid)
        if before is not None and after is not None:
            result["market_cpu_ms_per_cycle"] = round((after - before) * 1000 / max(1, result["cycles"]), 1)
        return result


def _command(n: int, seconds: int, redis_url: str, market_url: str, batch: int, timeframes: str,
             shard: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bench.cycle", "--one", str(n), "--seconds", str(seconds),
           "--redis", redis_url, "--market", market_url, "--batch", str(batch), "--timeframes", timeframes]
    return cmd if shard is None else [*cmd, "--shard", shard]


def _result(n: int, returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    if returncode != 0:
        raise RuntimeError(f"cycle run for N={n} failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _child(n: int, seconds: int, redis_url: str, market_url: str, batch: int,
           timeframes: str = "1m") -> dict[str, Any]:
    done = subprocess.run(_command(n, seconds, redis_url, market_url, batch, timeframes),
                          capture_output=True, text=True, timeout=seconds + 600, cwd=REPO)
    return _result(n, done.returncode, done.stdout, done.stderr)


def _sharded(n: int, seconds: int, redis_url: str, market_url: str, batch: int, timeframes: str,
             shards: int) -> dict[str, Any]:
    """N symbols served by ``shards`` processes at once (``SIDECAR_SHARD=i/N``, one per
    core), ticking together. A tick's cycle is done once every shard's is: its time is
    the slowest shard's cycle for that tick. CPU per symbol adds up the shards'."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    procs = [subprocess.Popen(_command(n, seconds, redis_url, market_url, batch, timeframes, f"{i}/{shards}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for i in range(shards)]
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 600)
        parts.append(_result(n, proc.returncode, out, err))
    by_tick: dict[int, list[float]] = {}
    for part in parts:
        for tick, ms in zip(part["ticks"], part["cycle_ms_each"], strict=True):
            by_tick.setdefault(tick, []).append(ms)
    durations = [max(ms) for ms in by_tick.values() if len(ms) == shards]
    lateness = [x for part in parts for x in part["lateness_ms_each"]]
    cycles = len(durations)

    def mean_sum(key: str) -> float:
        return sum(p[key] * p["symbols"] for p in parts) / n

    return {
        "symbols": n, "timeframes": timeframes, "shards": shards, "seconds": seconds, "cycles": cycles,
        "batch": batch, "cycle_ms": summary(durations), "cycle_ms_each": [round(d, 1) for d in durations],
        "first_cycle_ms": max(p["first_cycle_ms"] for p in parts),
        "cpu_us_per_symbol": {"p50": round(mean_sum("daemon_cpu_us_per_symbol_mean"), 1)},
        "features_stage_ms": {"p50": max(p["features_stage_ms"]["p50"] for p in parts)},
        "parse_worker": [p["parse_worker"] for p in parts],
        "worker_cpu_us_per_symbol_mean": mean_sum("worker_cpu_us_per_symbol_mean"),
        "daemon_cpu_us_per_symbol_mean": mean_sum("daemon_cpu_us_per_symbol_mean"),
        # Every shard sees the one server's CPU over the same window: one shard's share of it.
        "redis_cpu_us_per_symbol_mean": parts[0]["redis_cpu_us_per_symbol_mean"] * parts[0]["symbols"] / n,
        "load_average": os.getloadavg(),
        "missed_ticks": sum(p["missed_ticks"] for p in parts), "lateness_ms": summary(lateness),
        "rss_mb": {k: sum(p["rss_mb"][k] for p in parts) for k in ("start", "end", "max")},
        "bars_accepted_per_cycle": sum(p["bars_accepted_per_cycle"] for p in parts),
        "source_errors": sum(p["source_errors"] for p in parts),
        "shard_runs": [{k: p[k] for k in ("symbols", "cycles", "cycle_ms", "features_stage_ms",
                                           "daemon_cpu_us_per_symbol_mean", "warm_s")} for p in parts],
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["symbols"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(ns, [r["cycle_ms"]["p50"] for r in runs], "o-", label="p50")
    ax.plot(ns, [r["cycle_ms"]["p99"] for r in runs], "s--", label="p99")
    ax.plot(ns, [r["cycle_ms"]["max"] for r in runs], "^:", label="max", alpha=0.6)
    ax.axhline(250, color="green", lw=0.8, ls="--", label="target p50 at 5,000 (250 ms)")
    ax.axhline(500, color="orange", lw=0.8, ls="--", label="target p99 at 5,000 (500 ms)")
    ax.axhline(1000, color="red", lw=0.8, label="the 1-second budget")
    ax.set_xlabel("symbols per cycle")
    ax.set_ylabel("cycle time (ms)")
    ax.set_title("Whole cycle (fetch, validate, Redis, SQLite buffer, features), 2 cores")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    if args.soak:
        sizes: Sequence[int] = (5_000,)
        seconds = 300
    elif smoke:
        sizes, seconds = (20,), 3
    else:
        sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else SIZES
        seconds = args.seconds
    market = FakeMarketProcess()
    try:
        with PrivateRedis() as redis:
            runs = [market.measured(_child, n, seconds, redis.url, market.url, args.batch) for n in sizes]
            # The largest N again with several timeframes per symbol (built in the daemon).
            multi = [] if args.soak or not args.multi_tf else [market.measured(
                _child, max(sizes), seconds, redis.url, market.url, args.batch, args.multi_tf)]
            # And served by one shard per core (docs/operations.md, "Shards").
            if multi and args.shards > 1:
                multi.append(market.measured(_sharded, max(sizes), seconds, redis.url, market.url, args.batch,
                                             args.multi_tf, args.shards))
    finally:
        market.stop()
    out_dir = args.out or RESULTS_DIR
    results: dict[str, Any] = {"runs": runs, "multi_tf": multi, "soak": bool(args.soak),
                               "targets": {"p50_ms_at_5000": 250, "p99_ms_at_5000": 500, "rss_mb_max": 300}}
    if not smoke and not args.soak:  # the soak is one size: nothing to plot against N
        png = out_dir / "cycle.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(runs, png)
        results["plot"] = png.name
    return results


def render(r: dict[str, Any]) -> str:
    rows = [[x["symbols"], x.get("timeframes", "1m"), x.get("shards", 1), x["cycles"],
             x["cycle_ms"]["p50"], x["cycle_ms"]["p99"], x["cycle_ms"]["max"], x.get("first_cycle_ms", "—"),
             x["cpu_us_per_symbol"]["p50"], x.get("features_stage_ms", {}).get("p50", "—"),
             *_worker_cells(x), _redis_cell(x), x["missed_ticks"],
             x["lateness_ms"]["p99"], x.get("market_cpu_ms_per_cycle", "—"),
             f'{x["rss_mb"]["start"]:.0f}→{x["rss_mb"]["end"]:.0f}', round(x["bars_accepted_per_cycle"]),
             x["source_errors"]] for x in [*r["runs"], *r.get("multi_tf", [])]]
    return table(["symbols", "timeframes", "shards", "cycles", "p50 ms", "p99 ms", "max ms", "first cycle ms",
                  "daemon CPU µs/symbol", "features stage p50 ms",
                  "worker CPU µs/symbol", "daemon + worker mean", "Redis CPU µs/symbol", "missed ticks",
                  "tick late p99 ms", "fake market CPU ms/cycle", "RSS MB", "bars/cycle",
                  "source errors"], rows)


def _redis_cell(x: dict[str, Any]) -> Any:
    """The redis-server's CPU per symbol per cycle (mean; "—": not measured)."""
    redis = x.get("redis_cpu_us_per_symbol_mean")
    return "—" if redis is None else round(redis, 1)


def _worker_cells(x: dict[str, Any]) -> list[Any]:
    """The parse worker's CPU per symbol (mean) and the sum with the daemon's mean ("—": none ran)."""
    if not x.get("parse_worker"):
        return ["—", "—"]
    worker = x["worker_cpu_us_per_symbol_mean"]
    return [round(worker, 1), round(x["daemon_cpu_us_per_symbol_mean"] + worker, 1)]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", help="comma-separated symbol counts (default 100,500,1000,2000,5000)")
    parser.add_argument("--seconds", type=int, default=20, help="seconds of cycles per size")
    parser.add_argument("--batch", type=int, default=500, help="symbols per provider request")
    parser.add_argument("--soak", action="store_true", help="5,000 symbols for 5 minutes")
    parser.add_argument("--multi-tf", default="1m,5m,15m,1h",
                        help="timeframes of the extra run at the largest size ('' for none)")
    parser.add_argument("--shards", type=int, default=os.cpu_count() or 1,
                        help="the extra run once more with this many shards (default: one per core; 1: not)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--one" in argv:  # a child run: one N, JSON on stdout
        parser = argparse.ArgumentParser()
        parser.add_argument("--one", type=int, required=True)
        parser.add_argument("--seconds", type=int, required=True)
        parser.add_argument("--redis", required=True)
        parser.add_argument("--market", required=True)
        parser.add_argument("--batch", type=int, default=500)
        parser.add_argument("--timeframes", default="1m")
        parser.add_argument("--shard", help="i/N: run as shard i of N")
        a = parser.parse_args(argv)
        import uvloop

        shard = None if a.shard is None else (int(a.shard.split("/")[0]), int(a.shard.split("/")[1]))
        result = uvloop.run(run_one(a.one, a.seconds, a.redis, a.market, a.batch, a.timeframes, shard))
        print(json.dumps(result))
        return result
    name = NAME + "_soak" if "--soak" in argv else NAME
    return cli(name, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
