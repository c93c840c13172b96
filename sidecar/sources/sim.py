"""``sim``: a seeded synthetic market for offline use, demos and tests.

Each symbol follows a geometric random walk, stepped once per second, with a
U-shaped intraday volume profile. It starts near the symbol's real price level
and moves with its asset class's volatility (:func:`profile`): EURUSD near 1.08
at ~7 % a year, BTCUSD in the tens of thousands at ~55 %, stocks at their usual
level (or a plausible one) at ~30 %, so a demo's features look like real ones.
The asset class is the symbol mapping's, else guessed from the name. Every bar it
makes is labelled ``src="sim"`` and ``synthetic=True``; the daemon never picks
this source unless ``SIDECAR_SOURCES`` names it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from sidecar import foreground
from sidecar.bar import Bar
from sidecar.sources.base import LatestResult, Source
from sidecar.timeframe import DAY_MS, Timeframe


class Profile(NamedTuple):
    """Where a simulated symbol starts and how much it moves."""

    price: float
    #: Volatility per second of trading (a random-walk step's standard deviation).
    sigma: float
    #: Mean volume per second at a quiet moment.
    volume: float


def _per_second(annual: float, trading_seconds_per_year: float) -> float:
    return annual / math.sqrt(trading_seconds_per_year)


_STOCK_SECONDS = 252 * 6.5 * 3600  # regular sessions
_FX_SECONDS = 260 * 86_400  # the FX week
_CRYPTO_SECONDS = 365 * 86_400  # around the clock
#: Annual volatility, the seconds it is spread over, and the quiet volume per second.
_CLASSES: dict[str, tuple[float, float, float]] = {
    "stock": (0.30, _STOCK_SECONDS, 400.0),
    "etf": (0.18, _STOCK_SECONDS, 1_000.0),
    "index": (0.18, _STOCK_SECONDS, 50.0),
    "fx": (0.07, _FX_SECONDS, 20.0),
    "metal": (0.15, _FX_SECONDS, 10.0),
    "crypto": (0.55, _CRYPTO_SECONDS, 2.0),
}
#: Price levels of well-known symbols (a recent order of magnitude, not a quote).
LEVELS: dict[str, float] = {
    "EURUSD": 1.08, "GBPUSD": 1.27, "USDJPY": 150.0, "USDCHF": 0.88, "AUDUSD": 0.66,
    "USDCAD": 1.36, "NZDUSD": 0.61, "EURGBP": 0.85, "EURJPY": 162.0,
    "XAUUSD": 2_300.0, "XAGUSD": 27.0,
    "BTCUSD": 60_000.0, "ETHUSD": 3_000.0, "SOLUSD": 150.0, "XRPUSD": 0.55, "DOGEUSD": 0.15,
    "NAS100": 18_000.0, "SPX500": 5_200.0, "US30": 39_000.0, "GER40": 18_000.0,
    "AAPL": 190.0, "MSFT": 420.0, "NVDA": 900.0, "AMZN": 180.0, "TSLA": 180.0, "GOOGL": 160.0,
    "META": 480.0, "BRK.B": 410.0, "JPM": 195.0, "SPY": 520.0, "QQQ": 440.0,
}
#: Where a symbol not in :data:`LEVELS` starts, by asset class: a range a hash picks from.
_DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "stock": (20.0, 500.0), "etf": (30.0, 500.0), "index": (1_000.0, 30_000.0),
    "fx": (0.5, 2.0), "metal": (20.0, 2_500.0), "crypto": (0.1, 500.0),
}
_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY", "CHF", "AUD", "CAD", "NZD", "SEK", "NOK", "DKK",
                         "SGD", "HKD", "MXN", "ZAR", "TRY", "PLN", "CNH"})
_CRYPTO_QUOTES = ("USDT", "USDC", "USD", "EUR", "BTC")
#: At most this many seconds are simulated per call; a longer pause is a jump.
_MAX_STEPS = 300


def _symbol_hash(seed: int, symbol: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{symbol}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def guess_asset_class(symbol: str) -> str:
    """The asset class a symbol's name suggests: two currency codes are FX, XAU/XAG a
    metal, a crypto base over a quote currency crypto; anything else a stock."""
    if len(symbol) == 6 and symbol[:3] in ("XAU", "XAG", "XPT", "XPD"):
        return "metal"
    if len(symbol) == 6 and symbol[:3] in _CURRENCIES and symbol[3:] in _CURRENCIES:
        return "fx"
    for quote in _CRYPTO_QUOTES:
        if symbol.endswith(quote) and 2 <= len(symbol) - len(quote) <= 6 and symbol.isalpha():
            return "crypto"
    return "stock"


def profile(seed: int, symbol: str, asset_class: str | None = None) -> Profile:
    """Start price, per-second volatility and volume of ``symbol`` (deterministic per seed).

    The price is the symbol's known level (:data:`LEVELS`), else one from its asset
    class's range, log-uniform by a hash of the symbol; the seed moves it by up to ±5 %.
    """
    cls = asset_class if asset_class in _CLASSES else guess_asset_class(symbol)
    annual, seconds, volume = _CLASSES[cls]
    h = _symbol_hash(seed, symbol)
    u = (h % 1_000_003) / 1_000_003  # uniform in [0, 1)
    level = LEVELS.get(symbol)
    if level is None:
        low, high = _DEFAULT_RANGES[cls]
        level = low * (high / low) ** (_symbol_hash(0, symbol) % 1_000_003 / 1_000_003)
    jitter = math.exp(0.05 * (2.0 * u - 1.0))
    volume *= 0.5 + (h >> 20) % 1_000 / 1_000  # 0.5x to 1.5x
    return Profile(level * jitter, _per_second(annual, seconds), volume)


def volume_profile(t_ms: np.ndarray | int) -> np.ndarray:
    """Relative trading intensity over the UTC day: busy at both ends, quiet mid-day."""
    frac = (np.asarray(t_ms, dtype=np.float64) % DAY_MS) / DAY_MS
    return np.asarray(0.5 + 2.0 * (2.0 * frac - 1.0) ** 2)


class SimSource(Source):
    """Seeded random-walk market; deterministic for a given seed and call sequence."""

    name = "sim"
    synthetic = True

    def __init__(self, seed: int = 42, clock: Callable[[], float] = time.time,
                 asset_classes: Mapping[str, str] | None = None) -> None:
        """``asset_classes``: symbol -> asset class (the mapping's); others are guessed."""
        self._seed = seed
        self._clock = clock
        self._asset_classes = dict(asset_classes or {})
        self._sigma = np.empty(0)
        self._anchors: dict[tuple[str, str], tuple[int, float]] = {}
        self._start_price = np.empty(0)
        self._rng = np.random.default_rng(seed)
        self._index: dict[str, int] = {}
        self._price = np.empty(0)
        self._base_volume = np.empty(0)
        self._o = np.empty(0)
        self._h = np.empty(0)
        self._l = np.empty(0)
        self._v = np.empty(0)
        self._bar_t: int | None = None
        self._last_second: int | None = None
        self._tf: Timeframe | None = None

    def _add_symbols(self, symbols: Sequence[str]) -> None:
        new = [s for s in symbols if s not in self._index]
        if not new:
            return
        for s in new:
            self._index[s] = len(self._index)
        profiles = [profile(self._seed, s, self._asset_classes.get(s)) for s in new]
        start = np.array([p.price for p in profiles])
        base_vol = np.array([p.volume for p in profiles])
        self._sigma = np.concatenate([self._sigma, [p.sigma for p in profiles]])
        self._price = np.concatenate([self._price, start])
        self._start_price = np.concatenate([self._start_price, start])
        self._base_volume = np.concatenate([self._base_volume, base_vol])
        self._o = np.concatenate([self._o, start])
        self._h = np.concatenate([self._h, start])
        self._l = np.concatenate([self._l, start])
        self._v = np.concatenate([self._v, np.zeros(len(new))])

    def _step(self, second_ms: int) -> None:
        n = len(self._price)
        self._price = self._price * np.exp(self._sigma * self._rng.standard_normal(n))
        np.maximum(self._h, self._price, out=self._h)
        np.minimum(self._l, self._price, out=self._l)
        noise = self._rng.lognormal(0.0, 0.5, n)
        self._v += np.round(self._base_volume * float(volume_profile(second_ms)) * noise)

    async def fetch_latest(
        self, symbols: Sequence[str], tf: Timeframe, now_ms: int
    ) -> LatestResult:
        self._add_symbols(symbols)
        if self._tf is None or self._tf != tf:
            self._tf = tf
            self._bar_t = None
        second = now_ms - now_ms % 1000
        closed: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        if self._bar_t is None or self._last_second is None:
            self._open_bar(tf.floor(second))
            for sym in symbols:
                price = float(self._price[self._index[sym]])
                self._anchors.setdefault((sym, tf.name), (tf.floor(second), price))
            self._last_second = second
        steps = min((second - self._last_second) // 1000, _MAX_STEPS)
        for k in range(int(steps), 0, -1):
            s = second - (k - 1) * 1000
            bar_t = tf.floor(s)
            if bar_t != self._bar_t:
                assert self._bar_t is not None
                closed.append(
                    (self._bar_t, self._o.copy(), self._h.copy(), self._l.copy(),
                     self._price.copy(), self._v.copy())
                )
                self._open_bar(bar_t)
            self._step(s)
        self._last_second = max(self._last_second, second)

        out: LatestResult = {}
        assert self._bar_t is not None
        bar_t = self._bar_t
        for sym in symbols:
            i = self._index[sym]
            bars = [
                Bar(sym, tf.name, t, float(o[i]), float(h[i]), float(l[i]), float(c[i]),
                    float(v[i]), self.name, forming=False, synthetic=True)
                for (t, o, h, l, c, v) in closed[-2:]
            ]
            bars.append(
                Bar(sym, tf.name, bar_t, float(self._o[i]), float(self._h[i]), float(self._l[i]),
                    float(self._price[i]), float(self._v[i]), self.name, forming=True,
                    synthetic=True)
            )
            out[sym] = bars
        return out

    def _open_bar(self, bar_t: int) -> None:
        self._bar_t = bar_t
        self._o = self._price.copy()
        self._h = self._price.copy()
        self._l = self._price.copy()
        self._v = np.zeros(len(self._price))

    async def fetch_history(
        self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int
    ) -> list[Bar]:
        """Closed bars over ``[start_ms, end_ms)`` that lead up to the live walk.

        The walk is generated backwards from the price and bar at which the
        symbol joined the simulation, from a generator seeded by (seed, symbol,
        timeframe): any two ranges agree where they overlap, so backfilling in
        chunks gives one continuous series that joins the live bars.
        """
        self._add_symbols([symbol])
        anchor_t, anchor_price = self._anchor(symbol, tf)
        first = max(tf.floor(start_ms) + (tf.ms if start_ms % tf.ms else 0), 0)
        last_open = min(tf.floor(end_ms - 1), anchor_t - tf.ms)
        if last_open < first:
            return []
        i = self._index[symbol]
        walk = _Walk(symbol, tf, self.name, _symbol_hash(self._seed, f"{symbol}/{tf.name}"),
                     anchor_t, anchor_price, float(self._sigma[i]) * math.sqrt(tf.ms / 1000),
                     float(self._base_volume[i]) * (tf.ms / 1000))
        if last_open - first < THREAD_BARS * tf.ms:
            return walk.bars(first, last_open)
        # A long range is made in a worker thread that steps aside while a cycle runs.
        return await asyncio.to_thread(walk.bars, first, last_open)

    def _anchor(self, symbol: str, tf: Timeframe) -> tuple[int, float]:
        """Open time of the first live bar of ``symbol`` and its opening price."""
        key = (symbol, tf.name)
        anchor = self._anchors.get(key)
        if anchor is None:
            i = self._index[symbol]
            anchor = (tf.floor(int(self._clock() * 1000)), float(self._start_price[i]))
            self._anchors[key] = anchor
        return anchor


#: Ranges longer than this many bars are generated in a worker thread.
THREAD_BARS = 500
#: Bars made between two looks at whether a cycle runs (in the worker thread).
SLICE_BARS = 1_000


class _Walk(NamedTuple):
    """One symbol's history walk: generated backwards from its anchor (the first live
    bar and its opening price) by generators seeded by (seed, symbol, timeframe)."""

    symbol: str
    tf: Timeframe
    src: str
    seed: int
    anchor_t: int
    anchor_price: float
    sigma: float  # per bar
    volume: float  # base volume per bar

    def bars(self, first: int, last_open: int) -> list[Bar]:
        """The closed bars opening in ``[first, last_open]``, oldest first."""
        tf, anchor_t, sigma = self.tf, self.anchor_t, self.sigma
        k_max = (anchor_t - first) // tf.ms  # bar k opens at anchor_t - k * tf
        rets = np.random.default_rng([self.seed, 1]).standard_normal(k_max)
        wick = np.abs(np.random.default_rng([self.seed, 2]).standard_normal((k_max, 2)))
        noise = np.random.default_rng([self.seed, 3]).lognormal(0.0, 0.5, k_max)
        cum = np.concatenate([[0.0], np.cumsum(sigma * rets)])  # cum[k] = S_k
        k = np.arange((anchor_t - last_open) // tf.ms, k_max + 1)[::-1]  # oldest first
        times = anchor_t - k * tf.ms
        closes = self.anchor_price * np.exp(-cum[k - 1])
        opens = self.anchor_price * np.exp(-cum[k])
        highs = np.maximum(opens, closes) * np.exp(wick[k - 1, 0] * sigma * 0.5)
        lows = np.minimum(opens, closes) * np.exp(-wick[k - 1, 1] * sigma * 0.5)
        vols = np.round(self.volume * volume_profile(times) * noise[k - 1])
        rows = list(zip(times.tolist(), opens.tolist(), highs.tolist(), lows.tolist(), closes.tolist(),
                        vols.tolist(), strict=True))
        out: list[Bar] = []
        in_thread = threading.current_thread() is not threading.main_thread()
        symbol, name, src = self.symbol, tf.name, self.src
        for j in range(0, len(rows), SLICE_BARS):
            if in_thread:
                foreground.wait_idle_blocking()
            out.extend(Bar(symbol, name, int(t), float(o), float(h), float(lo), float(c), float(v),
                           src, forming=False, synthetic=True)
                       for t, o, h, lo, c, v in rows[j:j + SLICE_BARS])
        return out
