"""``python -m sidecar fetch SOURCE SYMBOL``: one real request through a source.

Prints the validated bars as JSON lines, oldest first, on stdout; the number of
rejected rows goes to stderr. A provider error prints one stderr line naming its
class and returns that class's exit code from :data:`sidecar.errors.EXIT_CODES`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from sidecar.errors import EXIT_CODES, ConfigError, ProviderError
from sidecar.settings import Settings
from sidecar.sources import SourceDisabled, build_source
from sidecar.timeframe import Timeframe
from sidecar.validation import validate_history

#: Without ``--start``: this many bars before ``end``.
DEFAULT_BARS = 100
EXIT_CONFIG = 2
EXIT_DISABLED = 3


async def run_fetch(
    source_name: str,
    symbol: str,
    tf: Timeframe,
    start: int | None,
    end: int | None,
    settings: Settings,
    env: Mapping[str, str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Fetch ``[start, end)`` (epoch ms; defaults: the last 100 bars up to now) and print it.

    ``symbol`` is canonical, or a provider spelling passed through unchanged.
    Returns the process exit code.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    now_ms = int(time.time() * 1000)
    end_ms = end if end is not None else now_ms
    start_ms = start if start is not None else end_ms - DEFAULT_BARS * tf.ms
    if start_ms >= end_ms:
        print("error: --start must be before --end", file=err)
        return EXIT_CONFIG
    try:
        source = build_source(source_name, settings, env)
    except SourceDisabled as exc:
        print(f"source disabled: {exc}", file=err)
        return EXIT_DISABLED
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=err)
        return EXIT_CONFIG
    try:
        await source.start()
        bars = await source.fetch_history(symbol, tf, start_ms, end_ms)
    except ProviderError as exc:
        print(f"{exc.error_class}: {source_name}: {exc}", file=err)
        return EXIT_CODES.get(exc.error_class, 1)
    finally:
        await source.close()
    grid = source.grid(symbol, tf)  # US stocks' 1h bars open at :30
    accepted, rejected = validate_history(bars, grid, now_ms, settings.clock_skew_ms)
    for bar in accepted:
        out.write(json.dumps(bar.to_json_dict()) + "\n")
    out.flush()
    total = sum(rejected.values())
    if total:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(rejected.items()))
        print(f"rejected {total} rows ({reasons})", file=err)
    print(f"{len(accepted)} bars from {source_name}", file=err)
    return 0
