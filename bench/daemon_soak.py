"""The daemon as a user runs it under load: memory, missed ticks, descriptors, tasks.

``python -m sidecar run`` with 1,000 ``sim`` symbols on 1-second bars and its embedded
Redis, as ``scripts/soak`` and the suite's soak test start it. After ``--warm-up``
seconds (per-symbol state fills up over the first ~50 bars: validator windows, the
feature engine's history) it samples ``/health`` every 5 s for ``--seconds`` and reports
RSS at the end of the warm-up and at the end (and the growth), missed ticks, open file
descriptors, asyncio tasks, cycle p50/p99 and the bars flushed. A measurement, not a
verdict: the test suite checks only what does not depend on the machine's speed.

    .venv/bin/python -m bench.daemon_soak [--smoke] [--seconds 120] [--symbols 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import cli, daemon_health, free_port, table, terminate

NAME = "daemon_soak"
REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 5.0


def measure(symbols: int, warm_up_s: float, seconds: float) -> dict[str, Any]:
    """Run the daemon for ``warm_up_s + seconds`` and sample its ``/health``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as data:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
        env.update(SIDECAR_DATA_DIR=data, SIDECAR_LOG_FORMAT="json", SIDECAR_SOURCES="sim",
                   SIDECAR_SYMBOLS=",".join(f"S{i:04d}" for i in range(symbols)),
                   SIDECAR_TIMEFRAME="1s", SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_HTTP_PORT=str(port))
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while (h := daemon_health(port)) is None or not h["ready"]:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not become ready (exit {proc.poll()})")
                time.sleep(0.2)
            time.sleep(warm_up_s)
            samples = [daemon_health(port)]
            end_at = time.monotonic() + seconds
            while time.monotonic() < end_at:
                time.sleep(min(SAMPLE_EVERY_S, max(0.0, end_at - time.monotonic())))
                samples.append(daemon_health(port))
        finally:
            terminate(proc, 60)
    got = [s for s in samples if s is not None]
    warm, end = got[0], got[-1]

    def proc_of(h: dict[str, Any], key: str) -> int:
        return int(h["process"][key])

    return {
        "symbols": symbols, "warm_up_s": warm_up_s, "seconds": seconds, "samples": len(got),
        "cycles": end["cycle"]["count"] - warm["cycle"]["count"],
        "rss_mb": {"warm": proc_of(warm, "rss_bytes") / 2**20, "end": proc_of(end, "rss_bytes") / 2**20},
        "rss_growth_pct": 100 * (proc_of(end, "rss_bytes") / proc_of(warm, "rss_bytes") - 1),
        "missed_ticks": end["cycle"]["missed_ticks"] - warm["cycle"]["missed_ticks"],
        "open_fds": [proc_of(warm, "open_fds"), max(proc_of(h, "open_fds") for h in got),
                     proc_of(end, "open_fds")],
        "asyncio_tasks": [proc_of(warm, "asyncio_tasks"), proc_of(end, "asyncio_tasks")],
        "cycle_p50_ms": end["cycle"]["p50_ms"], "cycle_p99_ms": end["cycle"]["p99_ms"],
        "bars_flushed": end["sqlite"]["flushed_rows"] - warm["sqlite"]["flushed_rows"],
        "status": end["status"],
    }


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    if smoke:
        return measure(20, 2.0, 3.0)
    return measure(args.symbols, args.warm_up, args.seconds)


def render(r: dict[str, Any]) -> str:
    rows = [[r["symbols"], round(r["seconds"]), r["cycles"], r["rss_mb"]["warm"], r["rss_mb"]["end"],
             r["rss_growth_pct"], r["missed_ticks"], "→".join(str(x) for x in r["open_fds"]),
             "→".join(str(x) for x in r["asyncio_tasks"]), r["cycle_p50_ms"], r["cycle_p99_ms"],
             r["bars_flushed"]]]
    return table(["symbols", "seconds after warm-up", "cycles", "RSS MB warm", "RSS MB end", "RSS growth %",
                  "missed ticks", "open fds (warm→max→end)", "asyncio tasks", "cycle p50 ms",
                  "cycle p99 ms", "bars flushed"], rows)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=120.0, help="measured after the warm-up")
    parser.add_argument("--warm-up", type=float, default=60.0, help="seconds before the first sample")
    parser.add_argument("--symbols", type=int, default=1_000)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
