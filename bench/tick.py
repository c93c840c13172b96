"""Lateness of cycle starts vs the wall-clock second: ``SecondTicker`` idle and under load.

The daemon's ticker (``sidecar/app/ticker.py``) under uvloop, as the daemon runs it,
for ``--seconds`` each (60 by default):

* ``idle`` — nothing else in the process;
* ``gil_load`` — another Python thread in the process computing without pause (the
  GIL contention a busy aiosqlite flush or a CPU-bound helper thread causes);
* ``loop_load`` — the event loop itself busy: after each tick a 300 ms synchronous
  burst of work (a cycle), so the next wake-up competes with nothing but the clock.

Lateness = when ``next()`` returned minus the wall-clock second it was for.

    .venv/bin/python -m bench.tick [--smoke] [--seconds 60]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvloop

from bench._common import cli, summary, table

NAME = "tick"


def _spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x += i * i


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        x += 1


async def measure(seconds: int, mode: str) -> dict[str, Any]:
    from sidecar.app.ticker import SecondTicker

    ticker = SecondTicker()
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True) if mode == "gil_load" else None
    if spinner is not None:
        spinner.start()
    lateness: list[float] = []
    try:
        await ticker.next()
        ticker.missed = 0
        for _ in range(seconds):
            tick = await ticker.next()
            lateness.append(time.time() * 1000 - float(tick or 0))
            if mode == "loop_load":
                _busy(300)
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
    return {"mode": mode, "lateness_ms": summary(lateness), "missed": ticker.missed,
            "clock_jumps": ticker.clock_jumps}


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    seconds = 1 if smoke else args.seconds
    runs = [uvloop.run(measure(seconds, mode)) for mode in ("idle", "gil_load", "loop_load")]
    return {"seconds": seconds, "runs": runs, "targets": {"idle_p99_ms_max": 5}}


def render(r: dict[str, Any]) -> str:
    rows = [[x["mode"], x["lateness_ms"]["n"], x["lateness_ms"]["p50"], x["lateness_ms"]["p99"],
             x["lateness_ms"]["max"], x["missed"]] for x in r["runs"]]
    return table(["load", "ticks", "late p50 ms", "late p99 ms", "late max ms", "missed"], rows)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=60, help="ticks per mode")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
