"""Start-up time: cold start and warm restart of the daemon at a given number of symbols.

``python -m sidecar run`` on ``sim`` (1-minute bars, its default history: the days
of the 5,000-bar warm window) with its embedded Redis, first on an empty data
directory (cold: every symbol's warm window is fetched), then again on the same
directory once the first run stopped (warm: the stores are full). For each run,
seconds from launch until ``/ready`` answers 200, until every symbol has fresh
features, and until every symbol's handles are open on the warm window
(``/health`` ``warmup.done``), plus the cycles' missed ticks by then.

    .venv/bin/python -m bench.startup [--symbols 500,2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import cli, table, terminate

NAME = "startup"
REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.1
GIVE_UP_S = 900.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return exc.code, dict(json.loads(exc.read()))
    except OSError:
        return None


def one_start(data: str, symbols: int) -> dict[str, Any]:
    """Launch the daemon on ``data``, time its milestones, stop it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
    env.update(SIDECAR_DATA_DIR=data, SIDECAR_LOG_FORMAT="json", SIDECAR_SOURCES="sim",
               SIDECAR_SYMBOLS=",".join(f"S{i:04d}" for i in range(symbols)),
               SIDECAR_TIMEFRAME="1m", SIDECAR_HTTP_PORT=str(port))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"ready_s": None, "fresh_s": None, "warm_s": None}
    try:
        while out["warm_s"] is None:
            elapsed = time.perf_counter() - started
            if proc.poll() is not None or elapsed > GIVE_UP_S:
                raise RuntimeError(f"the daemon gave no answer in time (exit {proc.poll()})")
            if out["ready_s"] is None:
                got = _get(port, "/ready")
                if got is not None and got[0] == 200:
                    out["ready_s"] = elapsed
            else:
                got = _get(port, "/health")
                if got is not None:
                    h = got[1]
                    if out["fresh_s"] is None and all(
                            not s["stale"] and s["newest_bar_t"] is not None for s in h["symbols"].values()):
                        out["fresh_s"] = elapsed
                    if h["warmup"]["done"]:
                        out["warm_s"] = elapsed
                        out["fresh_s"] = out["fresh_s"] or elapsed
                        out["missed_ticks"] = h["cycle"]["missed_ticks"]
                        out["cycles"] = h["cycle"]["count"]
                        out["history_bars"] = h["warmup"]["history_bars"]
                        out["cold_symbols"] = h["warmup"]["cold"]
            time.sleep(POLL_S)
    finally:
        terminate(proc, 120)
    return out


def measure(symbols: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sidecar-startup-") as data:
        cold = one_start(data, symbols)
        warm = one_start(data, symbols)
    return {"symbols": symbols, "cold": cold, "warm": warm}


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    counts = [20] if smoke else [int(x) for x in args.symbols.split(",")]
    return {"runs": [measure(n) for n in counts]}


def render(r: dict[str, Any]) -> str:
    rows = []
    for m in r["runs"]:
        for kind in ("cold", "warm"):
            x = m[kind]
            rows.append([m["symbols"], kind, x["ready_s"], x["fresh_s"], x["warm_s"],
                         x.get("history_bars"), x.get("missed_ticks")])
    return table(["symbols", "start", "s to /ready", "s to all fresh", "s to all warm",
                  "history bars fetched", "missed ticks"], rows)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", default="500,2000", help="comma-separated symbol counts")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
