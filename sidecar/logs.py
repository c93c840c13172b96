"""Structured logging: one JSON object per line off a terminal, readable lines on one.

Fields passed with ``extra=`` become JSON keys. Every line goes through
:func:`redact` (the one redaction of the project, also used for HTTP errors,
``/health`` and ``/metrics``): API keys in URLs (``apikey=...``, ``api_key=...``,
``token=...``), Authorization values and bearer tokens, and the values of the
configured key variables wherever they appear.

The daemon logs one line per state change (a source's circuit opening or closing,
Redis lost and back, status ok/degraded/down, ready, bootstrap finished), never
one per cycle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SECRET_PARAM_RE = re.compile(
    r"(?i)([?&;]|\b)(apikey|api_key|api-key|apiKey|token|access_token|key)=([^&#\s\"']*)"
)
_AUTH_RE = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|apikey\s+|basic\s+)?[^\s\"',}]+"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/]+=*")
SECRET_VARIABLES = ("ALPHAVANTAGE_API_KEY", "TWELVEDATA_API_KEY", "POLYGON_API_KEY", "SIDECAR_HTTP_TOKEN")


def redact(text: object, secrets: Iterable[str] = ()) -> str:
    """``text`` as a string with API keys, tokens and Authorization values replaced.

    Accepts URLs (``apikey=``, ``api_key=``, ``token=``, ``key=`` ... query
    parameters), header dumps and free text. The values of the key variables in
    the environment, and any literal ``secrets`` given, are replaced wherever they
    occur (defence in depth against a key echoed by a provider).
    """
    out = str(text)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    # Each pattern needs a literal (every parameter name ends in "key" or "token"): an
    # ASCII text without it (a large /health body) is not scanned by that pattern.
    # Non-ASCII text is always scanned (case-insensitive matching folds more letters).
    low = out.lower() if out.isascii() else None
    if low is None or "key=" in low or "token=" in low:
        out = _SECRET_PARAM_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}=***", out)
    if low is None or "authorization" in low:
        out = _AUTH_RE.sub(lambda m: f"{m.group(1)}***", out)
    if low is None or "bearer" in low:
        out = _BEARER_RE.sub(r"\1***", out)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class _ShardLabel(logging.Filter):
    """Puts the shard (``i/N``) on every record that has none."""

    def __init__(self, shard: str) -> None:
        super().__init__()
        self.shard = shard

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "shard"):
            record.shard = self.shard
        return True


def setup_logging(fmt: str = "auto", level: str = "info", *, shard: str | None = None) -> None:
    """Configure the root logger on stderr. ``shard``: ``i/N``, added to every line
    (shards run side by side often share one log)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    if shard is not None:
        handler.addFilter(_ShardLabel(shard))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "asyncio", "yfinance", "peewee", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
