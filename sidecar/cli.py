"""``sidecar {run,scan,status,backfill,fetch,symbols,config}`` (also ``python -m sidecar ...``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sidecar.config import Configuration
from sidecar.errors import ConfigError, SidecarError
from sidecar.settings import SYMBOL_RE, Settings
from sidecar.timeframe import Timeframe

if TYPE_CHECKING:
    from sidecar.signals import SignalRules

FEATURE_COLUMNS = ("symbol", "broker", "tf", "t", "close", "rsi", "ema", "bb_lower", "bb_upper", "atr",
                   "vwap", "macd_hist", "mom", "age_ms", "stale")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="The market-data daemon and its clients "
                                "(also: python -m sidecar).")
    config_help = "TOML configuration file (default: SIDECAR_CONFIG); the environment overrides it"
    p.add_argument("--config", metavar="PATH", help=config_help)
    # Also after the command (``sidecar run --config x``); SUPPRESS keeps the one given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    command("run", help="run the daemon in the foreground")
    scan = command("scan", help="print the current features from Redis")
    scan.add_argument("--symbols", help="comma-separated (default: SIDECAR_SYMBOLS)")
    scan.add_argument("--timeframe", help="default: the base timeframe (the lowest of SIDECAR_TIMEFRAMES)")
    scan.add_argument("--timeframes", help="several, comma-separated (e.g. 1m,1h): one MGET for all")
    scan.add_argument("--json", action="store_true", help="one JSON object per symbol (or signal)")
    scan.add_argument("--signals", action="store_true",
                      help="print the signals of the rules in SIDECAR_SIGNAL_* instead of the table")
    scan.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    status = command("status", help="is the daemon alive: its heartbeat and meta from Redis "
                                           "(exit 0 alive, 1 not)")
    status.add_argument("--json", action="store_true", help="one JSON object")
    bf = command("backfill", help="fill SQLite (and Redis) with history, then exit")
    bf.add_argument("--days", type=int, help="default: SIDECAR_BOOTSTRAP_DAYS")
    fetch = command("fetch", help="one request through a source; prints bars as JSON lines")
    fetch.add_argument("source")
    fetch.add_argument("symbol")
    fetch.add_argument("--timeframe", default=None)
    fetch.add_argument("--start", help="ISO 8601, UTC if no zone; a date alone is that day's start")
    fetch.add_argument("--end", help="ISO 8601, UTC if no zone, exclusive; a date alone includes that "
                                     "day (--start D --end D: the bars of day D)")
    syms = command("symbols", help="print the symbol mapping: asset class, broker and "
                                          "provider spellings")
    syms.add_argument("--symbols", help="comma-separated (default: SIDECAR_SYMBOLS)")
    syms.add_argument("--all", action="store_true", help="also every entry of the mapping file")
    syms.add_argument("--json", action="store_true", help="one JSON object per symbol")
    conf = command("config", help="print the effective configuration: each setting, its value "
                                  "(secrets masked) and where it came from (default, file, env, .env)")
    conf.add_argument("--json", action="store_true", help="one JSON object per setting")
    conf.add_argument("--reference", action="store_true",
                      help="print the configuration reference (docs/configuration.md) instead")
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


def _iso_ms(text: str, flag: str, *, end: bool = False) -> int:
    """Epoch ms of an ISO 8601 time (UTC if no zone). A date alone (``2024-03-15``) is
    that day's 00:00 UTC, or with ``end`` the next day's: an end date includes its day."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return int(((start + timedelta(days=1)) if end else start).timestamp() * 1000)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(flag, f"not an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code (2: bad configuration, naming where it came from)."""
    args = _parser().parse_args(argv)
    config: Configuration | None = None
    try:
        if args.command == "config" and args.reference:
            from sidecar.config_reference import reference_markdown

            print(reference_markdown(), end="")
            return 0
        config = Configuration.load(args.config, os.environ)
        config.apply(os.environ)
        settings = Settings.from_env()
        from sidecar.logs import setup_logging

        setup_logging(settings.log_format, settings.log_level,
                      shard=None if settings.shard is None else f"{settings.shard}/{settings.shards}")
        dotenv = config.dotenv_report()
        if dotenv is not None:  # names only: the values are secrets
            logging.getLogger("sidecar.cli").log(
                logging.WARNING if dotenv["open_to_others"] else logging.INFO, "read .env", extra=dotenv)
        if args.command == "run":
            if settings.shard is None and settings.shards > 1:
                from sidecar.app.shard_supervisor import run_shards
                from sidecar.sources._http import Providers

                return run_shards(settings, Providers.from_env().symbols)
            from sidecar.app.daemon import run_daemon

            return run_daemon(settings)
        if args.command == "scan":
            try:
                return asyncio.run(_scan(settings, args))
            except KeyboardInterrupt:  # --watch ends with Ctrl-C
                return 0
        if args.command == "status":
            return asyncio.run(_status(settings, as_json=args.json))
        if args.command == "backfill":
            return asyncio.run(_backfill(settings, args.days))
        if args.command == "fetch":
            return asyncio.run(_fetch(settings, args))
        if args.command == "symbols":
            return _symbols(settings, args)
        if args.command == "config":
            return _config(config, as_json=args.json)
    except ConfigError as exc:
        where = config.locate(exc.setting) if config is not None else exc.setting
        print(f"sidecar: bad configuration: {where}: {exc.problem}", file=sys.stderr)
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
    timeframes: list[str] | None = None
    if args.timeframes:
        try:
            timeframes = [Timeframe.parse(x).name for x in args.timeframes.split(",") if x.strip()]
        except ValueError as exc:
            raise ConfigError("--timeframes", str(exc)) from None
        if not timeframes:
            raise ConfigError("--timeframes", "no timeframe given")
    symbols = _symbols_arg(args.symbols, settings)
    rules = SignalRules.from_env() if args.signals else None
    scanner = Scanner.from_settings(settings)
    clear = args.watch and sys.stdout.isatty() and not args.json
    try:
        while True:
            try:
                rows = await scanner.read(symbols, timeframes)
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


async def _status(settings: Settings, *, as_json: bool) -> int:
    """Whether the daemon runs, from its Redis: the unsharded daemon's heartbeat and meta,
    and every shard that registered (owner process, heartbeat, cycle time, symbols),
    then the configured symbols no live daemon owns. Exits 0 when some daemon is alive
    and every symbol has a live owner, else 1."""
    from redis.exceptions import RedisError

    from sidecar.redis_store import RedisStore, open_client, redis_refusal

    where = "SIDECAR_REDIS_URL" if settings.redis_url else f"the embedded socket {settings.redis_socket}"
    url = settings.redis_url or f"unix://{settings.redis_socket}"
    registry: dict[str, dict[str, Any]] = {}
    beats: dict[int | None, dict[str, Any] | None] = {}
    meta: dict[str, Any] | None = None
    error: str | None = None
    try:
        client = await open_client(url, pool_size=2, timeout_s=settings.redis_timeout_s)
        store = RedisStore(client, settings.redis_prefix)
        try:
            registry = await store.read_shards()
            indexes = sorted({int(name.split("/")[0]) for name in registry})
            beats = await store.read_heartbeats([None, *indexes])
            meta = await store.read_meta()
        finally:
            await store.close()
    except (RedisError, OSError) as exc:
        refused = redis_refusal(exc) if isinstance(exc, RedisError) else None
        if refused:
            raise ConfigError("SIDECAR_REDIS_URL", refused) from None
        error = f"cannot reach Redis at {where}: {exc}"
    now = int(time.time() * 1000)
    shards: list[dict[str, Any]] = []
    live_owned: set[str] = set()
    for name in sorted(registry, key=lambda n: tuple(int(x) for x in n.split("/"))):
        entry = registry[name]
        shard, count = (int(x) for x in name.split("/"))
        beat = beats.get(shard)
        live = beat is not None and beat.get("shards") == count
        owned = list(entry.get("owned", []))
        if live and beat is not None:
            owned = list(beat.get("owned", owned))
            live_owned.update(owned)
        shards.append({"shard": name, "live": live, "pid": (beat or entry).get("pid"),
                       "http_port": entry.get("http_port"),
                       "heartbeat_age_ms": now - beat["t"] if live and beat else None,
                       "cycle": beat.get("cycle") if live and beat else None,
                       "cycle_ms": beat.get("cycle_ms") if live and beat else None,
                       "symbols": len(owned), "owned": owned})
    heartbeat = beats.get(None)
    if heartbeat is not None:
        live_owned.update(settings.symbols)  # an unsharded daemon: all its configured symbols
    unowned = [s for s in settings.symbols if s not in live_owned]
    alive = heartbeat is not None or any(r["live"] for r in shards)
    report: dict[str, Any] = {
        "alive": alive,
        "heartbeat": heartbeat,
        "heartbeat_age_ms": None if heartbeat is None else now - int(heartbeat["t"]),
        "meta": meta,
        "uptime_s": None if heartbeat is None or meta is None
        else round((now - int(meta["started_at"])) / 1000),
        "shards": shards,
        "unowned": unowned,
        "error": error,
    }
    if as_json:
        print(json.dumps(report))
    else:
        if heartbeat is not None:
            print(f"alive: pid {heartbeat['pid']}, cycle {heartbeat['cycle']}, timeframe {heartbeat['tf']}, "
                  f"{heartbeat['symbols']} symbols, last cycle {report['heartbeat_age_ms']} ms ago"
                  + (f", up {report['uptime_s']} s" if report["uptime_s"] is not None else ""))
        elif not shards:
            print(f"not running: {error or f'no heartbeat in Redis at {where}'}")
        if shards:
            print(f"{'shard':<8}{'live':<6}{'pid':>8}{'port':>7}{'hb age ms':>11}{'cycle':>8}"
                  f"{'cycle ms':>10}{'symbols':>9}")
            for r in shards:
                cell = {k: "-" if r[k] is None else r[k]
                        for k in ("pid", "http_port", "heartbeat_age_ms", "cycle", "cycle_ms")}
                print(f"{r['shard']:<8}{'yes' if r['live'] else 'no':<6}{cell['pid']:>8}"
                      f"{cell['http_port']:>7}{cell['heartbeat_age_ms']:>11}{cell['cycle']:>8}"
                      f"{cell['cycle_ms']:>10}{r['symbols']:>9}")
        if alive:
            print(f"unowned ({len(unowned)}): {', '.join(unowned) if unowned else '-'}")
    return 0 if alive and not unowned else 1


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
    from sidecar.app.daemon import build_sources, open_redis
    from sidecar.app.warmup import BUDGET_WAIT_S as BACKFILL_BUDGET_WAIT_S
    from sidecar.shards import explicit_shards, owned, shard_of
    from sidecar.sources._http import Providers
    from sidecar.sources.base import series_grid
    from sidecar.sqlite_store import BarStore

    providers = Providers.from_env()
    sources = build_sources(settings, providers)
    # Each symbol into the SQLite file of the daemon that serves it: with shards, its
    # owner's (this shard's symbols only, with SIDECAR_SHARD).
    explicit = explicit_shards(providers.symbols)
    if settings.shard is not None:
        symbols = owned(settings.symbols, settings.shard, settings.shards, explicit)
        owner = dict.fromkeys(symbols, settings.shard)
        files = {settings.shard: settings.sqlite_file}
    elif settings.shards > 1:
        symbols = settings.symbols
        owner = {sym: shard_of(sym, settings.shards, explicit) for sym in symbols}
        files = {i: settings.shard_sqlite_file(i) for i in sorted(set(owner.values()))}
    else:
        symbols = settings.symbols
        owner = dict.fromkeys(symbols, 0)
        files = {0: settings.sqlite_file}
    stores = {i: BarStore(path) for i, path in files.items()}
    for store in stores.values():
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
        for sym in symbols:
            grid = series_grid(sym, tf, sources)  # the daemon's bar grid for the symbol
            result = await backfill_symbol(sym, grid, sources, stores[owner[sym]], start_ms=start, end_ms=end,
                                           now_ms=now, redis_store=redis_store,
                                           redis_keep=settings.bars_cap,
                                           budget_wait_s=BACKFILL_BUDGET_WAIT_S)
            failed += result.error is not None
            print(json.dumps(result.as_dict()))
        return 1 if failed == len(symbols) else 0
    finally:
        for source in sources:
            await source.close()
        for store in stores.values():
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
    end = _iso_ms(args.end, "--end", end=True) if args.end else None
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
    # Each configured ccxt exchange gets its own column; without one, the default spelling.
    exchanges = [s for s in settings.sources if s.startswith("ccxt:")]
    rows = []
    for sym in symbols:
        row = symbol_map.entry(sym).as_dict()
        row["extended_hours"] = "include" if symbol_map.extended_hours(sym) else "exclude"
        for name in exchanges:
            spelling = symbol_map.for_source(name, sym)
            row[name] = None if spelling is None else spelling.ticker
        rows.append(row)
    columns = (*SYMBOL_COLUMNS[:-1], *(exchanges or ["ccxt"]), SYMBOL_COLUMNS[-1])
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0

    def cell(value: Any) -> str:
        if value is None:
            return "-"  # cannot serve (or no session: the clock's grid)
        if isinstance(value, dict) and "from" in value:
            return f"{value['from']}/{value['to']}"
        if isinstance(value, dict):  # the ccxt table: its default spelling
            return cell(value.get("default"))
        return str(value)

    print(f"mapping: {symbol_map.path}", file=sys.stderr, flush=True)
    table = [list(columns)] + [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _config(config: Configuration, *, as_json: bool) -> int:
    """Every setting's effective value (secrets masked) and where it came from."""
    from sidecar.config import effective_rows

    rows = effective_rows(config, os.environ)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"configuration file: {config.file or '- (--config PATH or SIDECAR_CONFIG)'}")
    print(f"secrets file: {config.dotenv or '- (.env in the working directory)'}")
    widths = [max(len(r[c]) for r in [*rows, {"variable": "variable", "value": "value"}])
              for c in ("variable", "value")]
    print(f"{'variable':<{widths[0]}}  {'value':<{widths[1]}}  from")
    for row in rows:
        print(f"{row['variable']:<{widths[0]}}  {row['value']:<{widths[1]}}  {row['from']}")
    return 0
