"""Settings of the real data providers: keys, endpoints, timeouts, rate budgets.

Kept apart from :mod:`sidecar.settings` so the provider modules own their knobs.
Build with :meth:`ProviderSettings.from_env`; a bad value raises
:class:`~sidecar.errors.ConfigError` naming the variable. API keys are excluded
from ``repr``/``str`` and are never echoed in an error message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.settings import EnvReader

DEFAULT_ALPHAVANTAGE_URL = "https://www.alphavantage.co"
DEFAULT_TWELVEDATA_URL = "https://api.twelvedata.com"
DEFAULT_POLYGON_URL = "https://api.polygon.io"
DEFAULT_YAHOO_STREAM_URL = "wss://streamer.finance.yahoo.com/?version=2"

_KEY_RE = re.compile(r"^[\x21-\x7e]{1,256}\Z")  # printable ASCII, no spaces


def _key(r: EnvReader, name: str) -> str | None:
    value = r.raw(name)
    if value is None:
        return None
    if not _KEY_RE.match(value):
        # Never echo the value: it is a secret.
        raise ConfigError(name, "must be 1-256 printable characters without spaces")
    return value


def _url(r: EnvReader, name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
    """A ``schemes`` URL (a base URL: no query string, no trailing slash)."""
    value = r.raw(name)
    if value is None:
        return default
    if not value.startswith(tuple(f"{s}://" for s in schemes)) or len(value.split("://", 1)[1]) == 0:
        raise ConfigError(name, f"expected a {' or '.join(schemes)} URL, got {value!r}")
    if "?" in value and schemes != ("ws", "wss"):
        raise ConfigError(name, "a base URL must not carry a query string")
    return value.rstrip("/") if schemes != ("ws", "wss") else value


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """Everything the four provider modules can be told (see README "Configuration")."""

    alphavantage_api_key: str | None = field(default=None, repr=False)
    twelvedata_api_key: str | None = field(default=None, repr=False)
    polygon_api_key: str | None = field(default=None, repr=False)
    #: ``None`` means yfinance's own hard-coded Yahoo hosts.
    yahoo_base_url: str | None = None
    alphavantage_base_url: str = DEFAULT_ALPHAVANTAGE_URL
    twelvedata_base_url: str = DEFAULT_TWELVEDATA_URL
    polygon_base_url: str = DEFAULT_POLYGON_URL
    yahoo_stream_url: str = DEFAULT_YAHOO_STREAM_URL
    yahoo_stream: bool = True
    # HTTP
    http_timeout_s: float = 10.0
    # Not configurable: the shared session's connect timeout and pool, Yahoo's threads.
    http_connect_timeout_s: float = 5.0
    http_pool_size: int = 20
    yahoo_workers: int = 4
    # budgets (numbers are today's free tiers)
    alphavantage_per_day: int = 25
    alphavantage_per_second: int = 1
    twelvedata_credits_per_minute: int = 8
    twelvedata_credits_per_day: int = 800
    polygon_per_minute: int = 5
    yahoo_per_minute: int = 60
    yahoo_per_day: int = 20_000
    #: Seconds between two REST polls of one symbol on Yahoo (the stream fills in between).
    yahoo_poll_s: float = 5.0
    #: Back-off after a 429 that did not say how long to wait.
    cooldown_429_s: float = 60.0
    # circuit breakers
    breaker_fail_max: int = 5
    breaker_reset_timeout_s: float = 30.0
    #: User mapping file; ``None`` means the packaged ``sidecar/symbols.toml``.
    symbols_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProviderSettings:
        """Read the provider variables; raise :class:`ConfigError` naming a bad one."""
        r = EnvReader(os.environ if env is None else env)
        http = ("http", "https")
        symbols_raw = r.raw("SIDECAR_SYMBOLS_FILE")
        symbols_file = Path(symbols_raw).expanduser() if symbols_raw else None
        if symbols_file is not None and not symbols_file.is_file():
            raise ConfigError("SIDECAR_SYMBOLS_FILE", f"no such file: {symbols_file}")
        return cls(
            alphavantage_api_key=_key(r, "ALPHAVANTAGE_API_KEY"),
            twelvedata_api_key=_key(r, "TWELVEDATA_API_KEY"),
            polygon_api_key=_key(r, "POLYGON_API_KEY"),
            yahoo_base_url=_url(r, "SIDECAR_YAHOO_BASE_URL", None, http),
            alphavantage_base_url=_url(r, "SIDECAR_ALPHAVANTAGE_BASE_URL", None, http)
            or DEFAULT_ALPHAVANTAGE_URL,
            twelvedata_base_url=_url(r, "SIDECAR_TWELVEDATA_BASE_URL", None, http)
            or DEFAULT_TWELVEDATA_URL,
            polygon_base_url=_url(r, "SIDECAR_POLYGON_BASE_URL", None, http) or DEFAULT_POLYGON_URL,
            yahoo_stream_url=_url(r, "SIDECAR_YAHOO_STREAM_URL", None, ("ws", "wss"))
            or DEFAULT_YAHOO_STREAM_URL,
            yahoo_stream=r.boolean("SIDECAR_YAHOO_STREAM", True),
            http_timeout_s=r.number("SIDECAR_HTTP_TIMEOUT_S", 10.0, low=0.1, high=300.0),
            alphavantage_per_day=r.integer("SIDECAR_ALPHAVANTAGE_PER_DAY", 25, low=0, high=10_000_000),
            alphavantage_per_second=r.integer("SIDECAR_ALPHAVANTAGE_PER_SECOND", 1, low=1, high=1_000),
            twelvedata_credits_per_minute=r.integer("SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE", 8,
                                                    low=1, high=100_000),
            twelvedata_credits_per_day=r.integer("SIDECAR_TWELVEDATA_CREDITS_PER_DAY", 800,
                                                 low=0, high=100_000_000),
            polygon_per_minute=r.integer("SIDECAR_POLYGON_PER_MINUTE", 5, low=1, high=100_000),
            yahoo_per_minute=r.integer("SIDECAR_YAHOO_PER_MINUTE", 60, low=1, high=100_000),
            yahoo_per_day=r.integer("SIDECAR_YAHOO_PER_DAY", 20_000, low=0, high=100_000_000),
            yahoo_poll_s=r.number("SIDECAR_YAHOO_POLL_S", 5.0, low=0.0, high=86_400.0),
            cooldown_429_s=r.number("SIDECAR_429_COOLDOWN_S", 60.0, low=0.0, high=86_400.0),
            breaker_fail_max=r.integer("SIDECAR_BREAKER_FAIL_MAX", 5, low=1, high=1_000),
            breaker_reset_timeout_s=r.number("SIDECAR_BREAKER_RESET_S", 30.0, low=0.01, high=86_400.0),
            symbols_file=symbols_file,
        )

    def secrets(self) -> tuple[str, ...]:
        """The configured key values, for :func:`sidecar.http_session.redact`."""
        return tuple(
            k for k in (self.alphavantage_api_key, self.twelvedata_api_key, self.polygon_api_key) if k
        )
