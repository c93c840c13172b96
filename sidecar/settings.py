"""Daemon settings: one plain dataclass, built from the environment.

The environment is the process's, with the values of the configuration file
filled in beneath it (:mod:`sidecar.config`). Every variable is listed in
docs/configuration.md, which ``sidecar config --reference`` generates from the reads
below (:func:`recording`). A bad value raises :class:`~sidecar.errors.ConfigError`
naming the variable, and the daemon stops at start with that message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.timeframe import Timeframe

DEFAULT_SYMBOLS = ("AAPL", "MSFT", "NVDA", "EURUSD", "BTCUSD")
DEFAULT_SOURCES = ("yahoo", "alphavantage", "twelvedata", "polygon")
DEFAULT_HTTP_PORT = 8787
_DAY_MS = 86_400_000
#: The bearer token of the HTTP endpoints: printable ASCII without spaces.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{16,256}\Z")

#: Canonical symbols: they become part of Redis keys and SQL parameters, so the
#: charset is closed (no spaces, colons, braces, wildcards or quotes). ``\Z``, not ``$``:
#: ``$`` also matches before a trailing newline.
SYMBOL_PATTERN = r"[A-Z0-9][A-Z0-9._-]{0,23}"
SYMBOL_RE = re.compile(rf"^{SYMBOL_PATTERN}\Z")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")
#: A source name: ``yahoo``, or ``ccxt:<exchange id>`` for an exchange through ccxt.
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(:[a-z][a-z0-9_]{0,31})?\Z")


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/sidecar``, else ``~/.local/share/sidecar``."""
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sidecar"


@dataclass(frozen=True, slots=True)
class Definition:
    """One variable as a settings reader read it: its kind, default, bounds and value."""

    name: str
    #: ``text``, ``integer``, ``number``, ``boolean`` or ``choice``.
    kind: str
    default: object = None
    value: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


#: What stands for the instance in a pattern setting's name, one variable per instance
#: (``SIDECAR_CCXT_MARKETS_<ID>``: ``SIDECAR_CCXT_MARKETS_KRAKEN`` for ``ccxt:kraken``).
INSTANCE = "<ID>"

_N = TypeVar("_N", int, float)
_RECORDS: ContextVar[dict[str, Definition] | None] = ContextVar("sidecar_settings_records", default=None)


@contextmanager
def recording() -> Iterator[dict[str, Definition]]:
    """Collect the :class:`Definition` of every variable a reader reads inside the block.

    Reading the settings inside it lists every setting with its default and bounds
    (the configuration reference) and the value it took (``sidecar config``).
    """
    records: dict[str, Definition] = {}
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


class _Reader:
    """Parses typed values out of an environment mapping, naming the variable on error.

    Shared by every settings dataclass (:data:`EnvReader`, e.g. ``provider_settings``).
    Inside :func:`recording` each read also notes the variable's :class:`Definition`.
    """

    __slots__ = ("env",)

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    @staticmethod
    def _note(definition: Definition) -> None:
        records = _RECORDS.get()
        if records is not None:
            records[definition.name] = definition

    def raw(self, name: str) -> str | None:
        """The stripped value of ``name``, or ``None`` when unset or blank."""
        value = self.env.get(name)
        text = None if value is None or value.strip() == "" else value.strip()
        self._note(Definition(name, "text", value=text))
        return text

    def string(self, name: str, default: str) -> str:
        """The value of ``name``, or ``default``."""
        value = self.raw(name) or default
        self._note(Definition(name, "text", default, value))
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        """An integer in ``[low, high]``, or ``default``."""
        return self._bounded(name, default, low, high, int, "integer")

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        """A finite number in ``[low, high]``, or ``default``."""
        return self._bounded(name, default, low, high, float, "number")

    def _bounded(self, name: str, default: _N, low: _N, high: _N, parse: Callable[[str], _N],
                 kind: str) -> _N:
        text = self.raw(name)
        if text is None:
            value = default
        else:
            try:
                value = parse(text)
            except ValueError:
                raise ConfigError(name, f"expected {'an integer' if parse is int else 'a number'}, "
                                        f"got {text!r}") from None
            if not (low <= value <= high):  # also refuses NaN
                raise ConfigError(name, f"{value} is out of range [{low}, {high}]")
        self._note(Definition(name, kind, default, value, low, high))
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """``1/true/yes/on`` or ``0/false/no/off`` (any case), or ``default``."""
        text = self.raw(name)
        if text is None:
            value = default
        elif text.lower() in ("1", "true", "yes", "on"):
            value = True
        elif text.lower() in ("0", "false", "no", "off"):
            value = False
        else:
            raise ConfigError(name, f"expected true/false, got {text!r}")
        self._note(Definition(name, "boolean", default, value))
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (any case), or ``default``."""
        text = self.raw(name)
        if text is not None and text.lower() not in choices:
            raise ConfigError(name, f"{text!r} is not one of {', '.join(choices)}")
        value = default if text is None else text.lower()
        self._note(Definition(name, "choice", default, value, choices=choices))
        return value


#: The public name of the reader, for the other settings modules.
EnvReader = _Reader


@dataclass(frozen=True, slots=True)
class IndicatorPeriods:
    """Parameters of the eight indicators (TA-Lib's defaults unless configured)."""

    rsi: int = 14
    ema: int = 20
    bb: int = 20
    bb_nbdev: float = 2.0
    atr: int = 14
    vol_ma: int = 20
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    mom: int = 10


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon can be told. Build with :meth:`from_env`."""

    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    sources: tuple[str, ...] = DEFAULT_SOURCES
    #: The base timeframe: the lowest kept, the one the sources are asked for.
    timeframe: Timeframe = field(default_factory=lambda: Timeframe.parse("1m"))
    #: The timeframes built from the base in the daemon, lowest first (docs/timeframes.md).
    higher_timeframes: tuple[Timeframe, ...] = ()
    redis_url: str | None = None
    redis_prefix: str = "sidecar"
    data_dir: Path = field(default_factory=lambda: default_data_dir(os.environ))
    sqlite_path: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    #: Bearer token every endpoint but ``/health`` and ``/ready`` asks for beyond loopback.
    http_token: str | None = field(default=None, repr=False)
    # Redis
    bars_cap: int = 5_000
    features_ttl_ms: int = 2_000
    heartbeat_ttl_ms: int = 3_000
    #: Connections of the one Redis pool (not configurable: the cycle's own concurrency).
    redis_pool_size: int = 20
    redis_timeout_s: float = 2.0
    redis_down_exit_s: float = 120.0
    # SQLite
    flush_interval_s: float = 10.0
    #: A flush starts early at this many buffered bars (not configurable).
    flush_max_rows: int = 20_000
    buffer_max_rows: int = 2_000_000
    retention_days: int = 90
    #: Per-timeframe retention (``SIDECAR_RETENTION_DAYS=90,1d:3650``): ``(tf, days)``.
    retention_by_tf: tuple[tuple[str, int], ...] = ()
    warm_bars: int = 5_000
    bootstrap_days: int = 90
    # validation
    clock_skew_ms: int = 2_000
    outlier_k: float = 15.0
    outlier_window: int = 50
    correction_window_bars: int = 10
    fill_gaps: bool = False
    #: Follow each symbol's trading calendar (no requests, gaps or expiry while closed).
    market_hours: bool = True
    # features
    periods: IndicatorPeriods = field(default_factory=IndicatorPeriods)
    #: VWAP session start, minutes past 00:00 UTC for every symbol (SIDECAR_SESSION_ANCHOR);
    #: ``None``: each symbol's own session open (its calendar; 00:00 UTC without one).
    session_anchor_min: int | None = None
    # cycle
    fetch_timeout_s: float = 0.8
    stale_after_ms: int = 5_000
    #: Parse provider answers in a second process: auto (from 500 symbols), on, off.
    parse_process: str = "auto"
    # sources
    sim_seed: int = 42
    replay_file: Path | None = None
    replay_speed: float = 1.0
    # logging
    log_format: str = "auto"
    log_level: str = "info"
    # shards (docs/operations.md, "Shards")
    #: This daemon's shard index (``None``: unsharded) and the number of shards.
    shard: int | None = None
    shards: int = 1
    #: Scanners read from replicas on a Redis Cluster (``READONLY``).
    read_replicas: bool = False

    @property
    def series_timeframes(self) -> tuple[Timeframe, ...]:
        """Every timeframe kept, lowest (the base) first."""
        return (self.timeframe, *self.higher_timeframes)

    def retention_for(self, tf: str) -> int:
        """Days of ``tf`` bars SQLite keeps."""
        return dict(self.retention_by_tf).get(tf, self.retention_days)

    @property
    def sqlite_file(self) -> Path:
        return self.sqlite_path or self.data_dir / "bars.sqlite3"

    def shard_sqlite_file(self, shard: int) -> Path:
        """The SQLite file of shard ``shard``, for a process that is not a shard itself
        (``SIDECAR_SHARDS`` without an index: the supervisor, ``backfill``)."""
        data_dir, sqlite_path = shard_paths(self.data_dir, self.sqlite_path, shard)
        return sqlite_path or data_dir / "bars.sqlite3"

    @property
    def http_loopback(self) -> bool:
        """Whether the HTTP endpoints listen on this machine only."""
        return is_loopback(self.http_host)

    def check_http_auth(self) -> None:
        """Refuse to listen beyond loopback without ``SIDECAR_HTTP_TOKEN``."""
        if not self.http_loopback and self.http_token is None:
            raise ConfigError("SIDECAR_HTTP_TOKEN",
                              f"required when SIDECAR_HTTP_HOST ({self.http_host}) is not a loopback "
                              "address: every endpoint but /health and /ready then asks for it "
                              "as a bearer token")

    @property
    def redis_socket(self) -> Path:
        """Unix socket of the embedded Redis server (used when ``redis_url`` is unset)."""
        return self.data_dir / "redis" / "redis.sock"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``SIDECAR_*`` variables; raise :class:`ConfigError` naming a bad one."""
        env = os.environ if env is None else env
        r = _Reader(env)

        symbols = _parse_symbols(r.raw("SIDECAR_SYMBOLS"))
        sources = _parse_sources(r.raw("SIDECAR_SOURCES"))
        timeframes = _parse_timeframes(r)
        retention_days, retention_by_tf = _parse_retention(r)

        redis_url = r.raw("SIDECAR_REDIS_URL")
        if redis_url is not None:
            _check_redis_url(redis_url)
        redis_server = r.raw("SIDECAR_REDIS_SERVER")
        if redis_server is not None and not (os.path.isfile(redis_server)
                                             and os.access(redis_server, os.X_OK)):
            raise ConfigError("SIDECAR_REDIS_SERVER", f"not an executable file: {redis_server}")
        prefix = r.string("SIDECAR_REDIS_PREFIX", "sidecar")
        if not _PREFIX_RE.match(prefix):
            raise ConfigError("SIDECAR_REDIS_PREFIX", f"{prefix!r} must match {_PREFIX_RE.pattern}")

        data_dir = Path(r.raw("SIDECAR_DATA_DIR") or default_data_dir(env)).expanduser()
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError("SIDECAR_DATA_DIR", f"not a directory: {data_dir}")
        sqlite_raw = r.raw("SIDECAR_SQLITE_PATH")
        sqlite_path = Path(sqlite_raw).expanduser() if sqlite_raw else None
        if sqlite_path is not None and (sqlite_path.is_dir() or (sqlite_path.parent.exists()
                                                                 and not sqlite_path.parent.is_dir())):
            raise ConfigError("SIDECAR_SQLITE_PATH", f"not a file path: {sqlite_path}")
        http_host = r.string("SIDECAR_HTTP_HOST", "127.0.0.1")
        if not _is_host(http_host):
            raise ConfigError("SIDECAR_HTTP_HOST", f"{http_host!r} is not an IP address or host name")
        replay_raw = r.raw("SIDECAR_REPLAY_FILE")
        replay_file = Path(replay_raw).expanduser() if replay_raw else None
        if "replay" in sources:
            if replay_file is None:
                raise ConfigError("SIDECAR_REPLAY_FILE", "the replay source needs a file of bars")
            if not replay_file.is_file():
                raise ConfigError("SIDECAR_REPLAY_FILE", f"no such file: {replay_file}")

        macd = r.string("SIDECAR_MACD", "12,26,9")
        try:
            fast, slow, signal = (int(x) for x in macd.split(","))
        except ValueError:
            raise ConfigError("SIDECAR_MACD", f"expected fast,slow,signal, got {macd!r}") from None
        if not (2 <= fast < slow <= 1000 and 1 <= signal <= 1000):
            raise ConfigError("SIDECAR_MACD", "needs 2 <= fast < slow <= 1000 and 1 <= signal")
        periods = IndicatorPeriods(
            rsi=r.integer("SIDECAR_RSI_PERIOD", 14, low=2, high=1000),
            ema=r.integer("SIDECAR_EMA_PERIOD", 20, low=2, high=1000),
            bb=r.integer("SIDECAR_BB_PERIOD", 20, low=2, high=1000),
            bb_nbdev=r.number("SIDECAR_BB_NBDEV", 2.0, low=0.1, high=10.0),
            atr=r.integer("SIDECAR_ATR_PERIOD", 14, low=1, high=1000),
            vol_ma=r.integer("SIDECAR_VOLMA_PERIOD", 20, low=2, high=1000),
            macd_fast=fast,
            macd_slow=slow,
            macd_signal=signal,
            mom=r.integer("SIDECAR_MOM_PERIOD", 10, low=1, high=1000),
        )

        anchor = r.string("SIDECAR_SESSION_ANCHOR", "")
        match = re.match(r"^([01][0-9]|2[0-3]):([0-5][0-9])$", anchor)
        if anchor and not match:
            raise ConfigError("SIDECAR_SESSION_ANCHOR", f"expected HH:MM (UTC), got {anchor!r}")

        shard, shards = _parse_shard(r)
        read_replicas = r.boolean("SIDECAR_REDIS_READ_REPLICAS", False)
        http_port = r.integer("SIDECAR_HTTP_PORT", DEFAULT_HTTP_PORT, low=0, high=65535)
        if shard is not None:
            if redis_url is None:
                raise ConfigError("SIDECAR_REDIS_URL", "shards write to one shared Redis: set its URL, "
                                                       "or set SIDECAR_SHARDS=N alone to run every shard "
                                                       "from one command on the embedded server")
            # Each shard its own data directory, SQLite file and HTTP port.
            data_dir, sqlite_path = shard_paths(data_dir, sqlite_path, shard)
            if http_port and http_port + shard > 65535:
                raise ConfigError("SIDECAR_HTTP_PORT", f"{http_port} + shard {shard} is past 65535")
            http_port = http_port + shard if http_port else 0

        warm_bars = r.integer("SIDECAR_WARM_BARS", 5_000, low=0, high=1_000_000)
        # ``sim`` makes up its history: by default only the days the warm window spans
        # (a demo needs features, not 90 days of made-up bars per symbol).
        bootstrap_default = (max(1, -(-warm_bars * timeframes[0].ms // _DAY_MS)) if sources == ("sim",)
                             else 90)
        settings = cls(
            symbols=symbols,
            sources=sources,
            timeframe=timeframes[0],
            higher_timeframes=timeframes[1:],
            redis_url=redis_url,
            redis_prefix=prefix,
            data_dir=data_dir,
            sqlite_path=sqlite_path,
            http_host=http_host,
            http_port=http_port,
            http_token=_token(r.raw("SIDECAR_HTTP_TOKEN")),
            bars_cap=r.integer("SIDECAR_BARS_CAP", 5_000, low=100, high=1_000_000),
            features_ttl_ms=r.integer("SIDECAR_FEATURES_TTL_MS", 2_000, low=500, high=3_600_000),
            heartbeat_ttl_ms=r.integer("SIDECAR_HEARTBEAT_TTL_MS", 3_000, low=1_000, high=600_000),
            redis_timeout_s=r.number("SIDECAR_REDIS_TIMEOUT_S", 2.0, low=0.05, high=60.0),
            redis_down_exit_s=r.number("SIDECAR_REDIS_DOWN_EXIT_S", 120.0, low=1.0, high=86_400.0),
            flush_interval_s=r.number("SIDECAR_FLUSH_INTERVAL_S", 10.0, low=0.1, high=3_600.0),
            buffer_max_rows=r.integer("SIDECAR_BUFFER_MAX_ROWS", 2_000_000, low=1, high=100_000_000),
            retention_days=retention_days,
            retention_by_tf=retention_by_tf,
            warm_bars=warm_bars,
            bootstrap_days=r.integer("SIDECAR_BOOTSTRAP_DAYS", bootstrap_default, low=0, high=36_500),
            clock_skew_ms=r.integer("SIDECAR_CLOCK_SKEW_MS", 2_000, low=0, high=600_000),
            outlier_k=r.number("SIDECAR_OUTLIER_K", 15.0, low=0.0, high=1e6),
            outlier_window=r.integer("SIDECAR_OUTLIER_WINDOW", 50, low=2, high=100_000),
            correction_window_bars=r.integer("SIDECAR_CORRECTION_WINDOW_BARS", 10, low=0, high=100_000),
            fill_gaps=r.boolean("SIDECAR_FILL_GAPS", False),
            market_hours=r.boolean("SIDECAR_MARKET_HOURS", True),
            periods=periods,
            session_anchor_min=int(match.group(1)) * 60 + int(match.group(2)) if match else None,
            fetch_timeout_s=r.number("SIDECAR_FETCH_TIMEOUT_S", 0.8, low=0.05, high=60.0),
            stale_after_ms=r.integer("SIDECAR_STALE_AFTER_MS", 5_000, low=500, high=86_400_000),
            parse_process=r.choice("SIDECAR_PARSE_PROCESS", "auto", ("auto", "on", "off")),
            sim_seed=r.integer("SIDECAR_SIM_SEED", 42, low=0, high=2**63 - 1),
            replay_file=replay_file,
            replay_speed=r.number("SIDECAR_REPLAY_SPEED", 1.0, low=0.01, high=10_000.0),
            log_format=r.choice("SIDECAR_LOG_FORMAT", "auto", ("auto", "json", "text")),
            log_level=r.choice("SIDECAR_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            shard=shard,
            shards=shards,
            read_replicas=read_replicas,
        )
        return settings


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def _is_host(text: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name (what a listening socket can bind)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME_RE.match(text))
    return True


def is_loopback(host: str) -> bool:
    """``host`` names this machine only (a loopback address or ``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _token(value: str | None) -> str | None:
    if value is not None and not _TOKEN_RE.match(value):
        # Never echo the value: it is a secret.
        raise ConfigError("SIDECAR_HTTP_TOKEN", "must be 16-256 printable characters without spaces")
    return value


def _check_redis_url(url: str) -> None:
    """Refuse a Redis URL the client could not use: scheme, port, db, unknown options,
    a missing CA/cert file. Builds the connection object without connecting."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("SIDECAR_REDIS_URL", "must start with redis://, rediss:// or unix://")
    from redis.asyncio import ConnectionPool

    try:
        pool = ConnectionPool.from_url(url)
        pool.make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        # The message may quote the URL, and the URL may carry a password.
        raise ConfigError("SIDECAR_REDIS_URL", _without_password(str(exc), url)) from None
    for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = pool.connection_kwargs.get(option)
        if path and not os.path.isfile(path):
            raise ConfigError("SIDECAR_REDIS_URL", f"{option}: no such file: {path}")


def _without_password(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password and len(password) >= 4 else text


def shard_paths(data_dir: Path, sqlite_path: Path | None, shard: int) -> tuple[Path, Path | None]:
    """Shard ``shard``'s data directory and ``SIDECAR_SQLITE_PATH`` (``None``: in its data
    directory), from the configured ones."""
    if sqlite_path is not None:
        sqlite_path = sqlite_path.with_name(f"{sqlite_path.stem}.shard-{shard}{sqlite_path.suffix}")
    return data_dir / f"shard-{shard}", sqlite_path


_SHARD_RE = re.compile(r"^([0-9]{1,4})/([0-9]{1,4})\Z")


def _parse_shard(r: _Reader) -> tuple[int | None, int]:
    """``(shard, shards)`` from ``SIDECAR_SHARD=i/N``, or PM2's ``NODE_APP_INSTANCE=i``
    with ``SIDECAR_SHARDS=N``; ``SIDECAR_SHARDS`` alone (a scanner) gives ``(None, N)``."""
    shards = r.integer("SIDECAR_SHARDS", 1, low=1, high=1024)
    text = r.raw("SIDECAR_SHARD")
    if text is not None:
        match = _SHARD_RE.match(text)
        if not match:
            raise ConfigError("SIDECAR_SHARD", f"expected i/N (e.g. 0/3), got {text!r}")
        shard, count = int(match.group(1)), int(match.group(2))
        if not 1 <= count <= 1024 or shard >= count:
            raise ConfigError("SIDECAR_SHARD", f"needs 0 <= i < N <= 1024, got {text!r}")
        if r.raw("SIDECAR_SHARDS") is not None and shards != count:
            raise ConfigError("SIDECAR_SHARDS", f"{shards} disagrees with SIDECAR_SHARD={text}")
        return shard, count
    instance = r.raw("NODE_APP_INSTANCE")
    if shards > 1 and instance is not None:
        if not instance.isdigit() or int(instance) >= shards:
            raise ConfigError("NODE_APP_INSTANCE", f"{instance!r} is not a shard index below "
                                                   f"SIDECAR_SHARDS={shards}")
        return int(instance), shards
    return None, shards


def _parse_timeframes(r: _Reader) -> tuple[Timeframe, ...]:
    """``SIDECAR_TIMEFRAMES`` (``1m,5m,1h,1d``), else ``SIDECAR_TIMEFRAME`` alone; lowest first.

    The lowest is the base; each higher one must be a whole number of base bars
    (intraday), or ``1d``. With both variables set, ``SIDECAR_TIMEFRAME`` must be the lowest.
    """
    name = "SIDECAR_TIMEFRAMES"
    text = r.raw(name)
    single = r.raw("SIDECAR_TIMEFRAME")
    if text is None:
        name, text = "SIDECAR_TIMEFRAME", single or "1m"
        if "," in text:
            raise ConfigError(name, f"one timeframe, got {text!r} (several: SIDECAR_TIMEFRAMES)")
    out: list[Timeframe] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            tf = Timeframe.parse(part)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
        if any(tf.ms == o.ms for o in out):
            raise ConfigError(name, f"{tf.name} is given twice (or under two spellings)")
        out.append(tf)
    if not out:
        raise ConfigError(name, "no timeframe given")
    out.sort(key=lambda tf: tf.ms)
    base = out[0]
    for tf in out[1:]:
        if tf.ms >= 86_400_000 and tf.name != "1d":
            raise ConfigError(name, f"{tf.name}: above the base, only 1d is built of days")
        if base.ms >= 86_400_000:
            raise ConfigError(name, f"{tf.name}: nothing is built above a daily base")
        if tf.ms < 86_400_000 and tf.ms % base.ms:
            raise ConfigError(name, f"{tf.name} is not a whole number of {base.name} bars (the base)")
    if name == "SIDECAR_TIMEFRAMES" and single is not None:
        try:
            same = Timeframe.parse(single).ms == base.ms
        except ValueError:
            same = False
        if not same:
            raise ConfigError("SIDECAR_TIMEFRAME", f"{single!r} is not the lowest of SIDECAR_TIMEFRAMES "
                                                   f"({base.name}); set SIDECAR_TIMEFRAMES only")
    # What ``sidecar config`` shows: the effective base and list, whichever variable set them.
    r._note(Definition("SIDECAR_TIMEFRAME", "text", "1m", base.name))
    r._note(Definition("SIDECAR_TIMEFRAMES", "text", None, ",".join(tf.name for tf in out)))
    return tuple(out)


def _parse_retention(r: _Reader) -> tuple[int, tuple[tuple[str, int], ...]]:
    """``SIDECAR_RETENTION_DAYS``: ``90`` or ``90,1d:3650,1h:365`` (a default, then per timeframe)."""
    name = "SIDECAR_RETENTION_DAYS"
    text = r.raw(name)
    r._note(Definition(name, "text", "90", text or "90"))
    if text is None:
        return 90, ()
    default: int | None = None
    per_tf: dict[str, int] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        tf_text, sep, days_text = item.rpartition(":")
        try:
            days = int(days_text)
        except ValueError:
            raise ConfigError(name, f"expected days or TF:days, got {item!r}") from None
        if not 1 <= days <= 36_500:
            raise ConfigError(name, f"{days} is out of range [1, 36500]")
        if not sep:
            if default is not None:
                raise ConfigError(name, "two defaults given")
            default = days
            continue
        try:
            tf = Timeframe.parse(tf_text)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
        per_tf[tf.name] = days
    return (90 if default is None else default), tuple(sorted(per_tf.items()))


def _parse_symbols(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_SYMBOLS
    out: list[str] = []
    for part in text.split(","):
        sym = part.strip().upper()
        if not sym:
            continue
        if not SYMBOL_RE.match(sym):
            raise ConfigError(
                "SIDECAR_SYMBOLS", f"{part.strip()!r} is not a valid symbol ({SYMBOL_RE.pattern})"
            )
        if sym not in out:
            out.append(sym)
    if not out:
        raise ConfigError("SIDECAR_SYMBOLS", "no symbols given")
    return tuple(out)


def _parse_sources(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_SOURCES
    out: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if not _SOURCE_RE.match(name):
            raise ConfigError("SIDECAR_SOURCES", f"{part.strip()!r} is not a source name")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("SIDECAR_SOURCES", "no sources given")
    return tuple(out)
