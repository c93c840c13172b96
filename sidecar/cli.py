"""``python -m sidecar {run,scan,backfill,fetch}``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from sidecar.errors import ConfigError, SidecarError
from sidecar.settings import Settings
from sidecar.timeframe import Timeframe

FEATURE_COLUMNS = ("symbol", "t", "close", "rsi", "ema", "bb_lower", "bb_upper", "atr", "vwap",
                   "macd_hist", "mom", "age_ms", "stale")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon in the foreground")
    scan = sub.add_parser("scan", help="print the current features from Redis")
    scan.add_argument("--symbols", help="comma-separated (default: SIDECAR_SYMBOLS)")
    scan.add_argument("--timeframe", help="default: SIDECAR_TIMEFRAME")
    scan.add_argument("--json", action="store_true", help="one JSON object per symbol")
    bf = sub.add_parser("backfill", help="fill SQLite (and Redis) with history, then exit")
    bf.add_argument("--days", type=int, help="default: SIDECAR_BOOTSTRAP_DAYS")
    fetch = sub.add_parser("fetch", help="one request through a source; prints bars as JSON lines")
    fetch.add_argument("source")
    fetch.add_argument("symbol")
    fetch.add_argument("--timeframe", default=None)
    fetch.add_argument("--start", help="ISO 8601 (UTC if no zone)")
    fetch.add_argument("--end", help="ISO 8601 (UTC if no zone)")
    return p


def _iso_ms(text: str, flag: str) -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(flag, f"not an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        from sidecar.logs import setup_logging

        setup_logging(settings.log_format, settings.log_level)
        if args.command == "run":
            from sidecar.app.daemon import run_daemon

            return run_daemon(settings)
        if args.command == "scan":
            return asyncio.run(_scan(settings, args))
        if args.command == "backfill":
            return asyncio.run(_backfill(settings, args.days))
        if args.command == "fetch":
            return asyncio.run(_fetch(settings, args))
    except ConfigError as exc:
        print(f"sidecar: bad configuration: {exc}", file=sys.stderr)
        return 2
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 2


async def _scan(settings: Settings, args: argparse.Namespace) -> int:
    from sidecar.scanner import Scanner

    if args.timeframe:
        try:
            settings = _with_tf(settings, args.timeframe)
        except ValueError as exc:
            raise ConfigError("--timeframe", str(exc)) from None
    symbols = [s.strip().upper() for s in args.symbols.split(",")] if args.symbols else list(settings.symbols)
    scanner = Scanner.from_settings(settings)
    try:
        rows = await scanner.read(symbols)
    except OSError as exc:
        raise SidecarError(f"cannot reach Redis: {exc}") from None
    finally:
        await scanner.close()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(" ".join(f"{c:>11}" for c in FEATURE_COLUMNS))
    for row in rows:
        cells = []
        for c in FEATURE_COLUMNS:
            v = row.get(c)
            cells.append(f"{v:>11.4f}" if isinstance(v, float) else f"{v!s:>11}")
        print(" ".join(cells))
    return 0


def _with_tf(settings: Settings, tf: str) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, timeframe=Timeframe.parse(tf))


async def _backfill(settings: Settings, days: int | None) -> int:
    from sidecar.app.bootstrap import DAY_MS, backfill_symbol
    from sidecar.app.daemon import BACKFILL_BUDGET_WAIT_S, build_sources, open_redis
    from sidecar.sources.base import series_grid
    from sidecar.sqlite_store import BarStore

    sources = build_sources(settings)
    store = BarStore(settings.sqlite_file)
    await store.open()
    redis_store, embedded = await open_redis(settings)
    try:
        for source in sources:
            await source.start()
        now = int(time.time() * 1000)
        tf = settings.timeframe
        end = tf.floor(now)
        start = end - (days if days is not None else settings.bootstrap_days) * DAY_MS
        failed = 0
        for sym in settings.symbols:
            grid = series_grid(sym, tf, sources)  # the daemon's bar grid for the symbol
            result = await backfill_symbol(sym, grid, sources, store, start_ms=start, end_ms=end,
                                           now_ms=now, redis_store=redis_store,
                                           redis_keep=settings.bars_cap,
                                           budget_wait_s=BACKFILL_BUDGET_WAIT_S)
            failed += result.error is not None
            print(json.dumps(result.as_dict()))
        return 1 if failed == len(settings.symbols) else 0
    finally:
        for source in sources:
            await source.close()
        await store.close()
        await redis_store.close()
        if embedded is not None:
            await embedded.stop()


async def _fetch(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from sidecar.fetch import run_fetch

    try:
        tf = Timeframe.parse(args.timeframe or settings.timeframe.name)
    except ValueError as exc:
        raise ConfigError("--timeframe", str(exc)) from None
    start = _iso_ms(args.start, "--start") if args.start else None
    end = _iso_ms(args.end, "--end") if args.end else None
    return await run_fetch(args.source, args.symbol, tf, start, end, settings, os.environ)
