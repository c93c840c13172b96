"""Completeness on the cycle's hot path: 5,000 US symbols (NYSE calendar) x 4 timeframes
(``1m,5m,15m,1h``), driven on a simulated clock through a regular session.

Times what the cycle spends in :class:`sidecar.completeness.Completeness` (in this
process, no I/O), for this tree's module and for an older one (``--before REV``, loaded
from git) in the same run, interleaved:

- ``build``: constructing the tracker for every symbol (start-up);
- ``steady``: one cycle inside a minute: ``views`` for every symbol (what the features
  maps carry);
- ``minute``: the cycle on a minute boundary: every symbol's closed 1m bar (and the
  5m/15m/1h bars whose buckets end) observed, then ``views`` for every symbol, with the
  expected counts moving in the same cycle.

    .venv/bin/python -m bench.completeness [--smoke] [--symbols 5000] [--minutes 20]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bench._common import machine, table, write_results

NAME = "completeness"
REPO = Path(__file__).resolve().parents[1]
#: The module as it was before views were interned per timeframe.
BEFORE = "8e7d1d3"
TIMEFRAMES = ("1m", "5m", "15m", "1h")


def _module(rev: str | None) -> ModuleType:
    """``sidecar.completeness`` of this tree (``rev`` None) or of git revision ``rev``."""
    if rev is None:
        import sidecar.completeness

        return sidecar.completeness
    source = subprocess.run(["git", "show", f"{rev}:sidecar/completeness.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    name = f"_completeness_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(source, f"{rev}:sidecar/completeness.py", "exec"), mod.__dict__)
    return mod


class _Driver:
    """One tracker driven minute by minute from 10:00 New York on a regular Monday."""

    def __init__(self, mod: ModuleType, symbols: list[str]) -> None:
        from sidecar.bar import Bar
        from sidecar.calendars import get_calendar
        from sidecar.timeframe import Timeframe

        self.bar = Bar
        self.symbols = symbols
        self.tfs = [Timeframe.parse(x) for x in TIMEFRAMES]
        nyse = get_calendar("XNYS")
        self.calendars = dict.fromkeys(symbols, nyse)
        self.now = 1_733_151_600_000  # 2024-12-02 10:00 New York
        started = time.perf_counter()
        self.tracker: Any = mod.Completeness(self.calendars, self.tfs, self.now)
        self.build_ms = (time.perf_counter() - started) * 1000
        self._views()

    def _views(self) -> None:
        views, now = self.tracker.views, self.now
        for sym in self.symbols:
            views(sym, now)

    def steady(self) -> float:
        """One cycle inside the minute (ms)."""
        self.now += 1000
        started = time.perf_counter()
        self._views()
        return (time.perf_counter() - started) * 1000

    def minute(self) -> float:
        """The cycle at the next minute boundary (ms)."""
        now = self.now = self.now - self.now % 60_000 + 60_000
        bars = []
        for tf in self.tfs:
            if now % tf.ms == 1_800_000 % tf.ms:  # NYSE buckets start at :30
                t = now - tf.ms
                bars += [self.bar(sym, tf.name, t, 1.0, 1.0, 1.0, 1.0, 1.0, "bench") for sym in self.symbols]
        started = time.perf_counter()
        self.tracker.observe(bars, now)
        self._views()
        return (time.perf_counter() - started) * 1000


def run(smoke: bool, symbols: int = 5_000, minutes: int = 20, before: str = BEFORE) -> dict[str, Any]:
    """Build, steady and minute-boundary times (ms, medians) before and after."""
    n = 50 if smoke else symbols
    minutes = 2 if smoke else minutes
    syms = [f"S{i:05d}" for i in range(n)]
    mods = {"before": _module(before), "after": _module(None)}
    builds: dict[str, list[float]] = {k: [] for k in mods}
    for mod in mods.values():
        _Driver(mod, syms[:10])  # the calendar's first lookups
    for _ in range(1 if smoke else 5):
        for name, mod in mods.items():
            builds[name].append(_Driver(mod, syms).build_ms)
    drivers = {name: _Driver(mod, syms) for name, mod in mods.items()}
    steady: dict[str, list[float]] = {k: [] for k in mods}
    minute: dict[str, list[float]] = {k: [] for k in mods}
    gc.collect()
    for _ in range(minutes):
        for name, d in drivers.items():
            minute[name].append(d.minute())
            steady[name] += [d.steady() for _ in range(5)]
    out: dict[str, Any] = {"smoke": smoke, "symbols": n, "timeframes": list(TIMEFRAMES), "minutes": minutes,
                           "before_rev": before, "load_avg": machine()["load_avg"]}
    for name in mods:
        out[name] = {"build_ms": statistics.median(builds[name]),
                     "steady_ms": statistics.median(steady[name]),
                     "minute_ms": statistics.median(minute[name]),
                     "minute_max_ms": max(minute[name])}
    return out


def render(r: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    return (f"{r['symbols']} symbols x {len(r['timeframes'])} timeframes ({', '.join(r['timeframes'])}), "
            f"medians over {r['minutes']} simulated minutes; before = `{r['before_rev']}`\n\n"
            + table(["", "build ms", "steady cycle ms", "minute cycle ms", "minute max ms"],
                    [[k, f"{r[k]['build_ms']:.1f}", f"{r[k]['steady_ms']:.2f}", f"{r[k]['minute_ms']:.1f}",
                      f"{r[k]['minute_max_ms']:.1f}"] for k in ("before", "after")]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.completeness", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="results directory (default bench/results)")
    parser.add_argument("--symbols", type=int, default=5_000)
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    args = parser.parse_args(argv)
    res = run(args.smoke, args.symbols, args.minutes, args.before)
    write_results(NAME, res, Path(args.out) if args.out else None)
    print(f"load average {res['load_avg']}")
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
