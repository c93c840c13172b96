"""Completeness on the cycle's hot path: 5,000 US symbols (NYSE calendar) x 4 timeframes
(``1m,5m,15m,1h``), driven on a simulated clock through a regular session.

Times what the cycle spends in :class:`sidecar.completeness.Completeness` (in this
process, no I/O) against the raw calendar doing the same job the obvious way
(:class:`NaiveCompleteness`: per symbol and timeframe a set of the received bars per
session; every cycle, each symbol's current and previous sessions asked of
``sidecar.calendars`` and their ended buckets counted), interleaved in the same run,
and checks that both give every symbol the same views. ``--before REV`` adds the
module of git revision ``REV`` (loaded from git) as a third contender.

- ``build``: constructing the tracker for every symbol (start-up);
- ``steady``: one cycle inside a minute: ``views`` for every symbol (what the features
  maps carry);
- ``minute``: the cycle on a minute boundary: every symbol's closed 1m bar (and the
  5m/15m/1h bars whose buckets end) observed, then ``views`` for every symbol, with the
  expected counts moving in the same cycle.

    .venv/bin/python -m bench.completeness [--smoke] [--symbols 5000] [--minutes 20] [--before REV]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench._common import machine, table, write_results
from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar, get_calendar
from sidecar.completeness import LATE_MS, Completeness
from sidecar.timeframe import Timeframe

NAME = "completeness"
REPO = Path(__file__).resolve().parents[1]
TIMEFRAMES = ("1m", "5m", "15m", "1h")

#: Builds a tracker: ``(calendars, timeframes, now_ms)``.
Factory = Callable[[dict[str, MarketCalendar], Sequence[Timeframe], int], Any]


class NaiveCompleteness:
    """Completeness straight from the calendar, as a first implementation would do it.

    Per symbol and timeframe, the open times of the received closed bars in a set per
    session (keyed by its open). Every :meth:`views` asks the calendar for the symbol's
    current and previous sessions and counts, per timeframe, their buckets that ended
    :data:`~sidecar.completeness.LATE_MS` ago: nothing is shared between symbols or
    kept between cycles. Regular sessions without a lunch break (the bench's NYSE);
    neither synthetic nor late bars (the bench has none).
    """

    def __init__(self, calendars: dict[str, MarketCalendar], timeframes: Sequence[Timeframe],
                 now_ms: int) -> None:
        self.calendars = calendars
        self.timeframes = tuple(timeframes)
        self.received: dict[str, dict[str, dict[int, set[int]]]] = {
            sym: {tf.name: {} for tf in self.timeframes} for sym in calendars}

    def observe(self, bars: Iterable[Bar], now_ms: int) -> None:
        """Add the closed bars among ``bars`` to their session's set."""
        for b in bars:
            if b.forming:
                continue
            per_tf = self.received.get(b.symbol)
            got = None if per_tf is None else per_tf.get(b.tf)
            span = self.calendars[b.symbol].session_span(b.t)
            if got is not None and span is not None and b.t < span[1]:
                got.setdefault(span[0], set()).add(b.t)

    def views(self, symbol: str, now_ms: int) -> list[dict[str, Any]] | None:
        """Per timeframe: ``session`` and ``previous`` shares, ``synthetic`` and ``late``."""
        cal = self.calendars.get(symbol)
        span = None if cal is None else cal.session_span(now_ms)
        if cal is None or span is None:
            return None
        prev = cal.session_span(span[0] - 1)
        assert prev is not None
        until = now_ms - LATE_MS
        sessions = [(lo, cal.open_periods(lo, close)) for lo, close, _ in (span, prev)]
        out: list[dict[str, Any]] = []
        for tf in self.timeframes:
            got, ms = self.received[symbol][tf.name], tf.ms
            shares: list[float | None] = []
            for lo, periods in sessions:
                expected = sum(-(-(b - a) // ms) if until >= b else max(0, until - a) // ms
                               for a, b in periods)
                received = len(got.get(lo, ()))
                shares.append(None if expected <= 0 else min(1.0, round(received / expected, 4)))
            out.append({"session": shares[0], "previous": shares[1], "synthetic": 0, "late": 0})
        return out


def _before(rev: str) -> Factory:
    """``Completeness`` of ``sidecar/completeness.py`` at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:sidecar/completeness.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    name = f"_completeness_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(source, f"{rev}:sidecar/completeness.py", "exec"), mod.__dict__)
    factory: Factory = mod.Completeness
    return factory


class _Driver:
    """One tracker driven minute by minute from 10:00 New York on a regular Monday."""

    def __init__(self, factory: Factory, symbols: list[str]) -> None:
        self.symbols = symbols
        self.tfs = [Timeframe.parse(x) for x in TIMEFRAMES]
        nyse = get_calendar("XNYS")
        self.calendars = dict.fromkeys(symbols, nyse)
        self.now = 1_733_151_600_000  # 2024-12-02 10:00 New York (the Friday before closed early)
        started = time.perf_counter()
        self.tracker: Any = factory(self.calendars, self.tfs, self.now)
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
                bars += [Bar(sym, tf.name, t, 1.0, 1.0, 1.0, 1.0, 1.0, "bench") for sym in self.symbols]
        started = time.perf_counter()
        self.tracker.observe(bars, now)
        self._views()
        return (time.perf_counter() - started) * 1000

    def all_views(self) -> list[Any]:
        """Every symbol's views now, for comparing contenders."""
        return [self.tracker.views(sym, self.now) for sym in self.symbols]


def run(smoke: bool, symbols: int = 5_000, minutes: int = 20, before: str | None = None) -> dict[str, Any]:
    """Build, steady and minute-boundary times (ms, medians) of the raw calendar and the
    tracker (and revision ``before``'s tracker), and their ratios."""
    n = 50 if smoke else symbols
    minutes = 2 if smoke else minutes
    syms = [f"S{i:05d}" for i in range(n)]
    factories: dict[str, Factory] = {"raw": NaiveCompleteness, "tracker": Completeness}
    if before is not None:
        factories["before"] = _before(before)
    builds: dict[str, list[float]] = {k: [] for k in factories}
    for factory in factories.values():
        _Driver(factory, syms[:10])  # the calendar's first lookups
    for _ in range(1 if smoke else 5):
        for name, factory in factories.items():
            builds[name].append(_Driver(factory, syms).build_ms)
    drivers = {name: _Driver(factory, syms) for name, factory in factories.items()}
    steady: dict[str, list[float]] = {k: [] for k in factories}
    minute: dict[str, list[float]] = {k: [] for k in factories}
    gc.collect()
    for _ in range(minutes):
        for name, d in drivers.items():
            minute[name].append(d.minute())
            steady[name] += [d.steady() for _ in range(5)]
    views = {name: d.all_views() for name, d in drivers.items()}
    out: dict[str, Any] = {"smoke": smoke, "symbols": n, "timeframes": list(TIMEFRAMES), "minutes": minutes,
                           "before_rev": before, "load_avg": machine()["load_avg"],
                           "same_views": all(v == views["raw"] for v in views.values())}
    for name in factories:
        out[name] = {"build_ms": statistics.median(builds[name]),
                     "steady_ms": statistics.median(steady[name]),
                     "minute_ms": statistics.median(minute[name]),
                     "minute_max_ms": max(minute[name])}
    out["tracker_vs_raw"] = {k: out["tracker"][k] / out["raw"][k] for k in out["raw"]}
    return out


def render(r: dict[str, Any]) -> str:
    """The results as a Markdown table (also of results from before the raw baseline)."""
    rows = [k for k in ("raw", "before", "tracker", "after") if isinstance(r.get(k), dict)]
    cols = ("build_ms", "steady_ms", "minute_ms", "minute_max_ms")
    body = [[k if k != "before" else f"before (`{r['before_rev']}`)",
             *(f"{r[k][c]:.2f}" if c == "steady_ms" else f"{r[k][c]:.1f}" for c in cols)] for k in rows]
    if "tracker_vs_raw" in r:
        body.append(["tracker / raw", *(f"{r['tracker_vs_raw'][c]:.3g}×" for c in cols)])
    same = ""
    if "same_views" in r:
        same = "; every symbol's views equal the raw ones" if r["same_views"] else "; **views differ**"
    return (f"{r['symbols']} symbols x {len(r['timeframes'])} timeframes ({', '.join(r['timeframes'])}), "
            f"medians over {r['minutes']} simulated minutes{same}\n\n"
            + table(["", "build ms", "steady cycle ms", "minute cycle ms", "minute max ms"], body))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.completeness", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="results directory (default bench/results)")
    parser.add_argument("--symbols", type=int, default=5_000)
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument("--before", metavar="REV",
                        help="also time sidecar/completeness.py of this git revision")
    args = parser.parse_args(argv)
    try:
        res = run(args.smoke, args.symbols, args.minutes, args.before)
    except (OSError, subprocess.CalledProcessError) as exc:
        parser.error(f"--before {args.before}: cannot load it from git ({exc})")
    write_results(NAME, res, Path(args.out) if args.out else None)
    print(f"load average {res['load_avg']}")
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
