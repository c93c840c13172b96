"""Feature engine per bar per symbol vs raw talib.stream, talipp and batch recomputation.

All four keep the same eight indicators (RSI 14, EMA 20, BBANDS 20/2, ATR 14, session
VWAP, SMA 20 of volume, MACD 12/26/9, MOM 10; talipp has no MOM, ROC 10 stands in) on
the same series: ``WARM`` closed bars of history, then ``LIVE`` new bars. Timed per new
bar: ``update`` (a bar closes) and ``peek`` (the forming bar is revised). Batch
recomputation is what a DataFrame-based bot does every candle: the eight batch
functions over the last 5,000 bars. The engine's values are also checked ``==`` against
the batch functions over the whole series, forming-bar revisions and sessions included.

    .venv/bin/python -m bench.features [--smoke]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import talib
from talib import stream

from bench._common import cli, interleaved, table
from sidecar.bar import Bar
from sidecar.features import DAY_MS, FEATURE_FIELDS, FeatureEngine, session_of
from sidecar.settings import IndicatorPeriods

NAME = "features"
TF_MS = 60_000
WINDOW = 5_000


def make_bars(n: int, seed: int = 7, start_ms: int = 1_767_225_600_000) -> list[Bar]:
    """A seeded random walk of ``n`` closed 1-minute bars with volume (several UTC days)."""
    rng = np.random.default_rng(seed)
    closes = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    opens = np.concatenate(([100.0], closes[:-1]))
    spread = np.abs(rng.normal(0, 0.0008, n)) * closes
    highs = np.maximum(opens, closes) + spread
    lows = np.minimum(opens, closes) - spread * rng.random(n)
    vols = rng.integers(100, 10_000, n).astype(float)
    return [Bar("BENCH", "1m", start_ms + i * TF_MS, float(opens[i]), float(highs[i]), float(lows[i]),
                float(closes[i]), float(vols[i]), "bench") for i in range(n)]


def forming_of(bar: Bar) -> Bar:
    """A mid-bar revision of ``bar``: same open, a close half-way."""
    c = (bar.o + bar.c) / 2
    return Bar(bar.symbol, bar.tf, bar.t, bar.o, max(bar.o, c), min(bar.o, c), c,
               (bar.v or 0.0) / 2, bar.src, forming=True)


# -- the raw library, the same eight indicators -------------------------------------
class RawStream:
    """Eight ``talib.stream`` handles and nothing else: the floor."""

    def __init__(self, warm: Sequence[Bar]) -> None:
        h = np.array([b.h for b in warm])
        l = np.array([b.l for b in warm])
        c = np.array([b.c for b in warm])
        v = np.array([b.v or 0.0 for b in warm])
        sess = session_of(warm[-1].t, 0)
        first = next(i for i, b in enumerate(warm) if session_of(b.t, 0) == sess)
        p = IndicatorPeriods()
        self.rsi = stream.RSI(c, timeperiod=p.rsi)
        self.ema = stream.EMA(c, timeperiod=p.ema)
        self.bb = stream.BBANDS(c, timeperiod=p.bb, nbdevup=p.bb_nbdev, nbdevdn=p.bb_nbdev, matype=0)
        self.atr = stream.ATR(h, l, c, timeperiod=p.atr)
        self.vwap = stream.VWAP(h[first:], l[first:], c[first:], v[first:])
        self.volma = stream.SMA(v, timeperiod=p.vol_ma)
        self.macd = stream.MACD(c, fastperiod=p.macd_fast, slowperiod=p.macd_slow,
                                signalperiod=p.macd_signal)
        self.mom = stream.MOM(c, timeperiod=p.mom)

    def update(self, b: Bar) -> None:
        c = b.c
        self.rsi.update(c)
        self.ema.update(c)
        self.bb.update(c)
        self.atr.update(b.h, b.l, c)
        self.vwap.update(b.h, b.l, c, b.v)
        self.volma.update(b.v)
        self.macd.update(c)
        self.mom.update(c)

    def peek(self, b: Bar) -> None:
        c = b.c
        self.rsi.peek(c)
        self.ema.peek(c)
        self.bb.peek(c)
        self.atr.peek(b.h, b.l, c)
        self.vwap.peek(b.h, b.l, c, b.v)
        self.volma.peek(b.v)
        self.macd.peek(c)
        self.mom.peek(c)


class Talipp:
    """talipp's incremental indicators on the same series (ROC stands in for MOM)."""

    def __init__(self, warm: Sequence[Bar]) -> None:
        from talipp.indicators import ATR, BB, EMA, MACD, ROC, RSI, SMA, VWAP
        from talipp.ohlcv import OHLCV

        self._ohlcv = OHLCV
        c = [b.c for b in warm]
        v = [b.v or 0.0 for b in warm]
        bars = [OHLCV(b.o, b.h, b.l, b.c, b.v) for b in warm]
        sess = session_of(warm[-1].t, 0)
        first = next(i for i, b in enumerate(warm) if session_of(b.t, 0) == sess)
        self.closes: list[Any] = [RSI(14, c), EMA(20, c), BB(20, 2.0, c), MACD(12, 26, 9, c), ROC(10, c)]
        self.ohlc: list[Any] = [ATR(14, bars), VWAP(bars[first:])]
        self.volma = SMA(20, v)

    def update(self, b: Bar) -> None:
        ohlcv = self._ohlcv(b.o, b.h, b.l, b.c, b.v)
        for ind in self.closes:
            ind.add(b.c)
        for ind in self.ohlc:
            ind.add(ohlcv)
        self.volma.add(b.v)

    def peek(self, b: Bar) -> None:
        # talipp revises the newest input in place: the forming-bar equivalent.
        ohlcv = self._ohlcv(b.o, b.h, b.l, b.c, b.v)
        for ind in self.closes:
            ind.update(b.c)
        for ind in self.ohlc:
            ind.update(ohlcv)
        self.volma.update(b.v)


class BatchWindow:
    """The eight batch functions over the last ``WINDOW`` bars, every bar.

    The series lives in preallocated arrays (as in a DataFrame), so only the batch
    functions are timed, not list-to-array conversions.
    """

    def __init__(self, warm: Sequence[Bar], room: int = 10_000) -> None:
        self.n = len(warm)
        self.hlcv = np.zeros((4, self.n + room))
        self.hlcv[:, :self.n] = [[b.h for b in warm], [b.l for b in warm], [b.c for b in warm],
                                 [b.v or 0.0 for b in warm]]
        self.session_start = self.n - sum(
            1 for b in warm if session_of(b.t, 0) == session_of(warm[-1].t, 0))

    def _compute(self, end: int) -> None:
        start = max(0, end - WINDOW)
        hh, ll, cc, vv = self.hlcv[:, start:end]
        talib.RSI(cc, 14)
        talib.EMA(cc, 20)
        talib.BBANDS(cc, 20, 2.0, 2.0, 0)
        talib.ATR(hh, ll, cc, 14)
        s = max(0, self.session_start - start)
        talib.VWAP(hh[s:], ll[s:], cc[s:], vv[s:])
        talib.SMA(vv, 20)
        talib.MACD(cc, 12, 26, 9)
        talib.MOM(cc, 10)

    def update(self, b: Bar) -> None:
        self.hlcv[:, self.n] = (b.h, b.l, b.c, b.v or 0.0)
        self.n += 1
        self._compute(self.n)

    def peek(self, b: Bar) -> None:
        # The forming bar sits in the next slot, overwritten by each revision.
        self.hlcv[:, self.n] = (b.h, b.l, b.c, b.v or 0.0)
        self._compute(self.n + 1)


class Engine:
    """The daemon's FeatureEngine, as the pipeline drives it."""

    def __init__(self, warm: Sequence[Bar]) -> None:
        self.engine = FeatureEngine("BENCH", "1m", IndicatorPeriods())
        self.engine.load(warm)
        self.update = self.engine.update
        self.peek = self.engine.peek


# -- timing -----------------------------------------------------------------------------
def _timer(factory: Callable[[Sequence[Bar]], Any], warm: Sequence[Bar], live: Sequence[Bar],
           method: str) -> Callable[[], float]:
    # Revisions of the one forming bar that follows the history (what a cycle peeks).
    nxt = warm[-1].t + TF_MS
    revisions = [forming_of(Bar(b.symbol, b.tf, nxt, warm[-1].c, max(warm[-1].c, b.h),
                                min(warm[-1].c, b.l), b.c, b.v, b.src)) for b in live]

    def once() -> float:
        obj = factory(warm)
        if method == "update":
            fn = obj.update
            t0 = time.perf_counter()
            for b in live:
                fn(b)
        else:
            fn = obj.peek
            t0 = time.perf_counter()
            for b in revisions:
                fn(b)
        return (time.perf_counter() - t0) / len(live) * 1e6

    return once


# -- bit-identity ------------------------------------------------------------------------
def batch_reference(bars: Sequence[Bar], p: IndicatorPeriods) -> np.ndarray:
    """Every feature of every bar from TA-Lib's batch functions (rows = bars, NaN in warm-up)."""
    h = np.array([b.h for b in bars])
    l = np.array([b.l for b in bars])
    c = np.array([b.c for b in bars])
    v = np.array([b.v for b in bars], dtype=np.float64)
    out = np.full((len(bars), len(FEATURE_FIELDS)), np.nan)
    out[:, 0] = talib.RSI(c, p.rsi)
    out[:, 1] = talib.EMA(c, p.ema)
    out[:, 2], out[:, 3], out[:, 4] = talib.BBANDS(c, p.bb, p.bb_nbdev, p.bb_nbdev, 0)
    out[:, 5] = talib.ATR(h, l, c, p.atr)
    sessions = np.array([session_of(b.t, 0) for b in bars])
    for s in np.unique(sessions):
        idx = np.nonzero(sessions == s)[0]
        out[idx, 6] = talib.VWAP(h[idx], l[idx], c[idx], v[idx])
    out[:, 7] = talib.SMA(v, p.vol_ma)
    out[:, 8], out[:, 9], out[:, 10] = talib.MACD(c, p.macd_fast, p.macd_slow, p.macd_signal)
    out[:, 11] = talib.MOM(c, p.mom)
    return out


def _same(values: Sequence[float | None], expected: np.ndarray) -> bool:
    for got, want in zip(values, expected, strict=True):
        if (got is None) != bool(np.isnan(want)):
            return False
        if got is not None and got != want:
            return False
    return True


def check_identity(warm: int, live: int) -> dict[str, Any]:
    """Engine values (updates and peeks) ``==`` TA-Lib batch over the full series."""
    bars = make_bars(warm + live, seed=11)
    engine = FeatureEngine("BENCH", "1m", IndicatorPeriods())
    engine.load(bars[:warm])
    closed_ref = batch_reference(bars, IndicatorPeriods())
    mismatches = 0
    checked = 0
    for i in range(warm, warm + live):
        forming = forming_of(bars[i])
        # The handles carry the whole history (EMA, RSI, ATR, MACD never forget), so the
        # reference is the batch function over the whole series, not a window.
        peek_ref = batch_reference([*bars[:i], forming], IndicatorPeriods())[-1]
        checked += 2
        mismatches += not _same(engine.peek(forming), peek_ref)
        mismatches += not _same(engine.update(bars[i]), closed_ref[i])
    sessions = len({session_of(b.t, 0) for b in bars[warm:]})
    return {"values_checked": checked * len(FEATURE_FIELDS), "bars_checked": checked,
            "mismatches": mismatches, "bit_identical": mismatches == 0, "sessions_crossed": sessions}


# -- the run -----------------------------------------------------------------------------
def run(smoke: bool) -> dict[str, Any]:
    warm_n, live_n, batch_n, repeats = (300, 200, 20, 2) if smoke else (5_000, 2_000, 200, 7)
    bars = make_bars(warm_n + live_n)
    warm, live = bars[:warm_n], bars[warm_n:]
    results: dict[str, Any] = {"warm_bars": warm_n, "live_bars": live_n, "repeats": repeats,
                               "unit": "us per bar per symbol"}
    rows: dict[str, dict[str, float]] = {}
    for method in ("update", "peek"):
        # All four in the same rounds: the ratios compare what ran side by side.
        cases = {
            "engine": _timer(Engine, warm, live, method),
            "raw_stream": _timer(RawStream, warm, live, method),
            "talipp": _timer(Talipp, warm, live, method),
            "batch_5000": _timer(BatchWindow, warm, live[:batch_n], method),
        }
        rows[method] = interleaved(cases, repeats)
    results["us_per_bar"] = rows
    results["ratios"] = {
        method: {
            "engine_vs_raw": m["engine"] / m["raw_stream"],
            "talipp_vs_engine": m["talipp"] / m["engine"],
            "batch_vs_engine": m["batch_5000"] / m["engine"],
        }
        for method, m in rows.items()
    }
    results["targets"] = {"engine_vs_raw_max": 1.5, "talipp_vs_engine_min": 10, "batch_vs_engine_min": 50}
    results["identity"] = check_identity(*((120, 80) if smoke else (WINDOW, 1_500)))
    results["identity"]["day_ms"] = DAY_MS
    return results


def render(r: dict[str, Any]) -> str:
    rows = []
    for method, m in r["us_per_bar"].items():
        raw = m["raw_stream"]
        rows.extend([method, name, m[name], m[name] / raw]
                    for name in ("raw_stream", "engine", "talipp", "batch_5000"))
    ident = r["identity"]
    return (table(["per bar", "method", "µs", "× raw stream"], rows)
            + f"\n\nbit-identical to batch: {ident['bit_identical']} "
              f"({ident['values_checked']:,} values, {ident['mismatches']} mismatching bars)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv)


if __name__ == "__main__":
    main()
