"""``python -m sidecar {run,scan,backfill,fetch,symbols}``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sidecar.dotenv import load_dotenv
from sidecar.errors import ConfigError, SidecarError
from sidecar.settings import SYMBOL_RE, Settings
from sidecar.timeframe import Timeframe

if TYPE_CHECKING:
    from sidecar.signals import SignalRules

FEATURE_COLUMNS = ("symbol", "broker", "t", "close", "rsi", "ema", "bb_lower", "bb_upper", "atr", "vwap",
                   "macd_hist", "mom", "age_ms", "stale")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon in the foreground")
    scan = sub.add_parser("scan", help="print the current features from Redis")
    scan.add_argument("--symbols", help="comma-separated (default: SIDECAR_SYMBOLS)")
    scan.add_argument("--timeframe", help="default: SIDECAR_TIMEFRAME")
    scan.add_argument("--json", action="store_true", help="one JSON object per symbol (or signal)")
    scan.add_argument("--signals", action="store_true",
                      help="print the signals of the rules in SIDECAR_SIGNAL_* instead of the table")
    scan.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    bf = sub.add_parser("backfill", help="fill SQLite (and Redis) with history, then exit")
    bf.add_argument("--days", type=int, help="default: SIDECAR_BOOTSTRAP_DAYS")
    fetch = sub.add_parser("fetch", help="one request through a source; prints bars as JSON lines")
    fetch.add_argument("source")
    fetch.add_argument("symbol")
    fetch.add_argument("--timeframe", default=None)
    fetch.add_argument("--start", help="ISO 8601 (UTC if no zone)")
    fetch.add_argument("--end", help="ISO 8601 (UTC if no zone)")
    syms = sub.add_parser("symbols", help="print the symbol mapping: asset class, broker and "
                                          "provider spellings")
    syms.add_argument("--symbols", help="comma-separated (default: SIDECAR_SYMBOLS)")
    syms.add_argument("--all", action="store_true", help="also every entry of the mapping file")
    syms.add_argument("--json", action="store_true", help="one JSON object per symbol")
    return p


def _symbols_arg(text: str | None, settings: Settings) -> list[str]:
    """``--symbols A,B`` (upper-cased, canonical or refused), or the configured symbols."""
    if not text:
        return list(settings.symbols)
    symbols = [s.strip().upper() for s in text.split(",") if s.strip()]
    for sym in symbols:
        if not SYMBOL_RE.match(sym):
            raise ConfigError("--symbols", f"{sym[:40]!r} is not a canonical symbol ({SYMBOL_RE.pattern})")
    return symbols


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
        dotenv = load_dotenv(os.environ)
        settings = Settings.from_env()
        from sidecar.logs import setup_logging

        setup_logging(settings.log_format, settings.log_level)
        if dotenv is not None:  # names only: the values are secrets
            logging.getLogger("sidecar.cli").log(
                logging.WARNING if dotenv.ignored or dotenv.open_to_others else logging.INFO, "read .env",
                extra={"path": str(dotenv.path.resolve()), "loaded": dotenv.loaded,
                       "environment_wins": dotenv.overridden, "ignored_not_keys": dotenv.ignored,
                       "open_to_others": dotenv.open_to_others})
        if args.command == "run":
            from sidecar.app.daemon import run_daemon

            return run_daemon(settings)
        if args.command == "scan":
            try:
                return asyncio.run(_scan(settings, args))
            except KeyboardInterrupt:  # --watch ends with Ctrl-C
                return 0
        if args.command == "backfill":
            return asyncio.run(_backfill(settings, args.days))
        if args.command == "fetch":
            return asyncio.run(_fetch(settings, args))
        if args.command == "symbols":
            return _symbols(settings, args)
    except ConfigError as exc:
        print(f"sidecar: bad configuration: {exc}", file=sys.stderr)
        return 2
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 2


async def _scan(settings: Settings, args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from sidecar.redis_store import redis_refusal
    from sidecar.scanner import Scanner
    from sidecar.signals import SignalRules

    if args.timeframe:
        try:
            settings = _with_tf(settings, args.timeframe)
        except ValueError as exc:
            raise ConfigError("--timeframe", str(exc)) from None
    symbols = _symbols_arg(args.symbols, settings)
    rules = SignalRules.from_env() if args.signals else None
    scanner = Scanner.from_settings(settings)
    clear = args.watch and sys.stdout.isatty() and not args.json
    try:
        while True:
            try:
                rows = await scanner.read(symbols)
            except (RedisError, OSError) as exc:
                refused = redis_refusal(exc) if isinstance(exc, RedisError) else None
                if refused:
                    raise ConfigError("SIDECAR_REDIS_URL", refused) from None
                raise SidecarError(f"cannot reach Redis: {exc}") from None
            if clear:
                print("\x1b[H\x1b[J", end="")
            _print_scan(rows, rules, as_json=args.json)
            if not args.watch:
                return 0
            sys.stdout.flush()
            # Just after the next wall-clock second: the daemon's cycle has landed by then.
            await asyncio.sleep(1.05 - (time.time() % 1.0))
    finally:
        await scanner.close()


def _print_scan(rows: list[dict[str, Any]], rules: SignalRules | None, *, as_json: bool) -> None:
    if rules is not None:
        from sidecar.signals import evaluate, signal_rows

        if as_json:
            for item in signal_rows(rows, rules):
                print(json.dumps(item))
            return
        signals = evaluate(rows, rules)
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        fresh = sum(1 for r in rows if not r["stale"])
        print(f"{stamp}  {len(signals)} signal(s) over {fresh} fresh of {len(rows)} symbols")
        for sig in signals:
            bar_time = datetime.fromtimestamp(sig.t / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            values = " ".join(f"{k}={v:.6g}" for k, v in sig.values.items())
            print(f"{sig.symbol:<10} {sig.broker:<10} {sig.rule:<17} {bar_time}"
                  f"{' forming' if sig.forming else ''}  {values}")
        return
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(" ".join(f"{c:>11}" for c in FEATURE_COLUMNS))
    for row in rows:
        cells = []
        for c in FEATURE_COLUMNS:
            v = row.get(c)
            cells.append(f"{v:>11.4f}" if isinstance(v, float) else f"{v!s:>11}")
        print(" ".join(cells))


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
    from sidecar.fetch import run_fetch

    try:
        tf = Timeframe.parse(args.timeframe or settings.timeframe.name)
    except ValueError as exc:
        raise ConfigError("--timeframe", str(exc)) from None
    start = _iso_ms(args.start, "--start") if args.start else None
    end = _iso_ms(args.end, "--end") if args.end else None
    return await run_fetch(args.source, args.symbol, tf, start, end, settings, os.environ)


SYMBOL_COLUMNS = ("symbol", "asset_class", "broker", "yahoo", "alphavantage", "twelvedata", "polygon",
                  "session")


def _symbols(settings: Settings, args: argparse.Namespace) -> int:
    """The mapping of the configured (or given) symbols, as the daemon and the scanner use it."""
    from sidecar.provider_settings import ProviderSettings
    from sidecar.symbols import load_symbol_map

    symbol_map = load_symbol_map(ProviderSettings.from_env(os.environ).symbols_file)
    if symbol_map.rejected:  # the daemon runs without them; this command is where to fix them
        raise ConfigError("SIDECAR_SYMBOLS_FILE", "; ".join(symbol_map.rejected.values()))
    symbols = _symbols_arg(args.symbols, settings)
    if args.all:
        symbols += [s for s in symbol_map if s not in symbols]
    rows = [symbol_map.entry(sym).as_dict() for sym in symbols]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0

    def cell(value: Any) -> str:
        if value is None:
            return "-"  # cannot serve (or no session: the clock's grid)
        if isinstance(value, dict):
            return f"{value['from']}/{value['to']}"
        return str(value)

    print(f"mapping: {symbol_map.path}", file=sys.stderr, flush=True)
    table = [list(SYMBOL_COLUMNS)] + [[cell(row[c]) for c in SYMBOL_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(SYMBOL_COLUMNS))]
    for line in table:
        print("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip())
    return 0
