"""Where features are computed: TA-Lib stream handles per symbol and timeframe.

A closed bar goes through ``update`` (O(1), committed); the forming bar goes
through ``peek`` every cycle (nothing committed). Until a handle has enough
history to open (``talib.InsufficientHistory``), its value for a bar is taken
from TA-Lib's batch function over the short history, which is what the batch
function reports for that bar anyway — so every value equals TA-Lib's batch
output on the same series, warm-up included (``None`` where batch gives NaN).

VWAP is anchored at the session start: the symbol's own session (its calendar's
open, see :meth:`sidecar.calendars.MarketCalendar.session_bounds`), or the UTC day
shifted by a configured anchor; a fresh handle is opened at each session's first bar. VWAP
and the volume average are ``None`` for bars without volume.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
import numpy as np
import talib
from talib import abstract, stream

from sidecar.bar import Bar, pack_msgpack
from sidecar.settings import IndicatorPeriods
from sidecar.timeframe import DAY_MS

#: Feature fields in the order :meth:`FeatureEngine.values` returns them.
FEATURE_FIELDS: tuple[str, ...] = (
    "rsi", "ema", "bb_upper", "bb_middle", "bb_lower", "atr", "vwap", "vol_ma",
    "macd", "macd_signal", "macd_hist", "mom",
)

Values = list[float | None]


def _clean(x: float) -> float | None:
    return None if x != x else float(x)  # NaN -> None


class _Indicator:
    """One TA-Lib function: its stream handle once open, batch fallback while warming."""

    __slots__ = ("batch", "factory", "handle", "inputs", "kwargs", "lookback", "multi", "name")

    def __init__(
        self,
        name: str,
        inputs: str,
        factory: Callable[..., Any],
        batch: Callable[..., Any],
        kwargs: dict[str, Any],
        multi: bool,
    ) -> None:
        self.name = name
        self.inputs = inputs  # "c" close, "hlc" high/low/close, "v" volume
        self.factory = factory
        self.batch = batch
        self.kwargs = kwargs
        self.multi = multi
        #: Bars TA-Lib skips before the first value: up to this many, neither the handle
        #: opens nor the batch function gives a value.
        self.lookback = _lookback(batch.__name__, kwargs)
        self.handle: Any = None

    def copy(self) -> _Indicator:
        """This indicator with its handle copied (the rest is shared: never mutated)."""
        twin = copy.copy(self)
        twin.handle = None if self.handle is None else self.handle.copy()
        return twin


@lru_cache(maxsize=64)
def _lookback_cached(function: str, kwargs: tuple[tuple[str, Any], ...]) -> int:
    fn = abstract.Function(function)  # type: ignore[attr-defined]
    fn.set_parameters(dict(kwargs))
    return int(fn.lookback)


def _lookback(function: str, kwargs: dict[str, Any]) -> int:
    """TA-Lib's lookback of ``function`` with these parameters."""
    return _lookback_cached(function, tuple(sorted(kwargs.items())))


@lru_cache(maxsize=16)
def _specs(p: IndicatorPeriods) -> tuple[tuple[str, str, Callable[..., Any], Callable[..., Any],
                                               dict[str, Any], bool], ...]:
    # Shared by every engine with these periods (never mutated): one engine per symbol
    # and timeframe would otherwise hold its own seven argument dicts.
    return (
        ("rsi", "c", stream.RSI, talib.RSI, {"timeperiod": p.rsi}, False),
        ("ema", "c", stream.EMA, talib.EMA, {"timeperiod": p.ema}, False),
        ("bb", "c", stream.BBANDS, talib.BBANDS,
         {"timeperiod": p.bb, "nbdevup": p.bb_nbdev, "nbdevdn": p.bb_nbdev, "matype": 0}, True),
        ("atr", "hlc", stream.ATR, talib.ATR, {"timeperiod": p.atr}, False),
        ("vol_ma", "v", stream.SMA, talib.SMA, {"timeperiod": p.vol_ma}, False),
        ("macd", "c", stream.MACD, talib.MACD,
         {"fastperiod": p.macd_fast, "slowperiod": p.macd_slow, "signalperiod": p.macd_signal}, True),
        ("mom", "c", stream.MOM, talib.MOM, {"timeperiod": p.mom}, False),
    )


def _indicators(p: IndicatorPeriods) -> list[_Indicator]:
    return [_Indicator(*spec) for spec in _specs(p)]


class Columns(NamedTuple):
    """Closed bars as the arrays :meth:`FeatureEngine.load_arrays` takes, oldest first:
    open times (int64) and high, low, close, volume (float64; NaN: no volume)."""

    t: np.ndarray
    h: np.ndarray
    l: np.ndarray
    c: np.ndarray
    v: np.ndarray

    @classmethod
    def empty(cls) -> Columns:
        f = np.empty(0, dtype=np.float64)
        return cls(np.empty(0, dtype=np.int64), f, f, f, f)

    @property
    def rows(self) -> int:
        return len(self.t)

    def last_before(self, t_ms: int) -> int:
        """The newest open time before ``t_ms`` (-1: none)."""
        i = int(np.searchsorted(self.t, t_ms, "left"))
        return int(self.t[i - 1]) if i else -1

    def cut(self, lo: int, hi: int) -> Columns:
        """The rows ``lo:hi``."""
        return Columns(self.t[lo:hi], self.h[lo:hi], self.l[lo:hi], self.c[lo:hi], self.v[lo:hi])


def bar_columns(bars: Sequence[Bar]) -> Columns:
    """``bars`` (closed, oldest first) as :class:`Columns`."""
    nan, f8 = float("nan"), np.float64
    return Columns(np.array([b.t for b in bars], dtype=np.int64), np.array([b.h for b in bars], dtype=f8),
                   np.array([b.l for b in bars], dtype=f8), np.array([b.c for b in bars], dtype=f8),
                   np.array([nan if b.v is None else b.v for b in bars], dtype=f8))


def join_columns(parts: Sequence[Columns]) -> Columns:
    """``parts`` one after the other."""
    if len(parts) == 1:
        return parts[0]
    return Columns(*(np.concatenate([p[k] for p in parts]) for k in range(5)))


def session_of(t_ms: int, anchor_ms: int) -> int:
    """Index of the session (day starting at ``anchor_ms`` past 00:00 UTC) containing ``t_ms``."""
    return (t_ms - anchor_ms) // DAY_MS


class FeatureEngine:
    """The eight indicators of one symbol and timeframe, kept current bar by bar."""

    __slots__ = (
        "_anchor_ms", "_fast", "_hist_c", "_hist_h", "_hist_l", "_hist_v", "_ind",
        "_session", "_session_hi", "_session_lo", "_sessions", "_volma", "_vwap", "_warming", "closed_values",
        "last_closed_t", "prev_macd_hist", "symbol", "tf",
    )

    def __init__(self, symbol: str, tf: str, periods: IndicatorPeriods, session_anchor_min: int = 0,
                 sessions: Callable[[int], tuple[int, int]] | None = None):
        """``sessions``: a bar's open time -> its session's ``[start, next start)`` (epoch ms),
        the VWAP anchor; without it, UTC days starting ``session_anchor_min`` past midnight."""
        self.symbol = symbol
        self._sessions = sessions
        self.tf = tf
        self._anchor_ms = session_anchor_min * 60_000
        self._ind = _indicators(periods)
        self._volma = next(ind for ind in self._ind if ind.inputs == "v")
        #: The six price handles (rsi, ema, bb, atr, macd, mom) once all are open: the
        #: steady-state path, which calls them directly without per-indicator dispatch.
        self._fast: tuple[Any, ...] | None = None
        self._warming = True
        # Closed history kept only while some handle is still warming up.
        self._hist_h: list[float] = []
        self._hist_l: list[float] = []
        self._hist_c: list[float] = []
        self._hist_v: list[float] = []
        self._vwap: Any = None
        self._session: int | None = None
        # [lo, hi): the open VWAP handle's session in epoch ms (empty while no handle),
        # so the per-bar check is two comparisons rather than a division.
        self._session_lo = 0
        self._session_hi = 0
        self.last_closed_t: int | None = None
        self.closed_values: Values = [None] * len(FEATURE_FIELDS)
        #: MACD histogram of the closed bar before the newest one (for zero crossings).
        self.prev_macd_hist: float | None = None

    # -- history ----------------------------------------------------------------
    def load(self, bars: Sequence[Bar]) -> None:
        """Open the handles on closed history (oldest first) in one pass per indicator."""
        if not bars:
            return
        self.load_arrays(*bar_columns(bars))

    def load_arrays(self, t: np.ndarray, h: np.ndarray, l: np.ndarray, c: np.ndarray,
                    v: np.ndarray) -> None:
        """:meth:`load` from columns of closed history, oldest first: open times
        (int64) and high, low, close, volume (float64, contiguous; NaN volume: a bar
        without volume). The same values in the same order give the same features
        as :meth:`load` of the bars (which calls this)."""
        n = len(c)
        if n == 0:
            return
        for ind in self._ind:
            ind.handle = None
        # Only the trailing run of bars with volume feeds the volume indicators.
        gaps = np.flatnonzero(np.isnan(v))
        start_v = int(gaps[-1]) + 1 if gaps.size else 0
        vol = v[start_v:]
        self.last_closed_t = int(t[-1])
        out: Values = [None] * len(FEATURE_FIELDS)
        warming = False
        self.prev_macd_hist = None
        for ind in self._ind:
            arrays: tuple[np.ndarray, ...] | None = (
                (c,) if ind.inputs == "c" else (h, l, c) if ind.inputs == "hlc" else
                (vol,) if len(vol) else None)
            if arrays is None:
                self._put(out, ind, None)
                continue
            if ind.name == "macd" and n >= 2:
                # Opened one bar short, the handle gives the histogram one bar back too.
                try:
                    ind.handle = ind.factory(c[:-1], **ind.kwargs)
                    self.prev_macd_hist = _clean(ind.handle.value[2])
                    self._put(out, ind, ind.handle.update(c[-1]))
                    continue
                except talib.InsufficientHistory:  # type: ignore[attr-defined]
                    self.prev_macd_hist = _clean(ind.batch(c[:-1], **ind.kwargs)[2][-1])
            try:
                ind.handle = ind.factory(*arrays, **ind.kwargs)
            except talib.InsufficientHistory:  # type: ignore[attr-defined]
                warming = warming or ind.inputs != "v"
                self._put(out, ind, ind.batch(*arrays, **ind.kwargs), last=True)
                continue
            self._put(out, ind, ind.handle.value)
        self._warming = warming
        # Short histories are kept for the handles still warming (see update).
        short = (h.tolist(), l.tolist(), c.tolist()) if warming else ([], [], [])
        self._hist_h, self._hist_l, self._hist_c = short
        self._hist_v = vol.tolist() if self._volma.handle is None else []
        # VWAP over the last session's bars.
        lo, hi = self._bounds(self.last_closed_t)
        self._set_vwap(None, lo)
        if len(vol):
            tv = t[start_v:]
            i = start_v + int(np.searchsorted(tv, lo, "left"))
            j = start_v + int(np.searchsorted(tv, hi, "left"))
            self._set_vwap(stream.VWAP(h[i:j], l[i:j], c[i:j], v[i:j]), lo, hi)
            out[6] = _clean(self._vwap.value)
        self.closed_values = out
        self._refresh_fast()

    def copy(self) -> FeatureEngine:
        """An independent engine in the same state: every handle copied (TA-Lib's stream
        handles continue bit-identically from a copy), the warming history and the
        newest closed values with them. Updating one leaves the other as it was."""
        twin = copy.copy(self)  # the immutable state shared, what changes copied below
        twin._ind = [ind.copy() for ind in self._ind]
        twin._volma = twin._ind[self._ind.index(self._volma)]
        twin._hist_h, twin._hist_l = self._hist_h[:], self._hist_l[:]
        twin._hist_c, twin._hist_v = self._hist_c[:], self._hist_v[:]
        twin._vwap = None if self._vwap is None else self._vwap.copy()
        twin.closed_values = self.closed_values[:]
        twin._refresh_fast()
        return twin

    def _bounds(self, t_ms: int) -> tuple[int, int]:
        """``[start, next start)`` of the session the bar opening at ``t_ms`` belongs to."""
        if self._sessions is not None:
            return self._sessions(t_ms)
        lo = session_of(t_ms, self._anchor_ms) * DAY_MS + self._anchor_ms
        return lo, lo + DAY_MS

    def _set_vwap(self, handle: Any, session: int | None, end: int = 0) -> None:
        """Install the session VWAP handle (``None``: closed) for the session ``[session, end)``."""
        self._vwap = handle
        self._session = session
        if handle is None or session is None:
            self._session_lo = self._session_hi = 0
        else:
            self._session_lo = session
            self._session_hi = end

    def _refresh_fast(self) -> None:
        price = {ind.name: ind.handle for ind in self._ind if ind.inputs != "v"}
        if self._warming or any(h is None for h in price.values()):
            self._fast = None
        else:
            self._fast = (price["rsi"], price["ema"], price["bb"], price["atr"], price["macd"],
                          price["mom"])

    def _arrays(self, inputs: str) -> tuple[np.ndarray, ...] | None:
        if inputs == "c":
            return (np.array(self._hist_c),) if self._hist_c else None
        if inputs == "hlc":
            if not self._hist_c:
                return None
            return (np.array(self._hist_h), np.array(self._hist_l), np.array(self._hist_c))
        return (np.array(self._hist_v, dtype=np.float64),) if self._hist_v else None

    @staticmethod
    def _put(out: Values, ind: _Indicator, value: Any, last: bool = False) -> None:
        if ind.multi:
            parts: Any = value if value is not None else (None, None, None)
            if last:
                parts = tuple(p[-1] for p in parts)
            cleaned = [None if p is None else _clean(p) for p in parts]
            if ind.name == "bb":
                out[2], out[3], out[4] = cleaned
            else:
                out[8], out[9], out[10] = cleaned
            return
        v = None if value is None else _clean(value[-1] if last else value)
        out[_INDEX[ind.name]] = v

    def _trim_history(self) -> None:
        if not self._warming:
            self._hist_h, self._hist_l, self._hist_c = [], [], []
            if all(ind.handle is not None for ind in self._ind if ind.inputs == "v"):
                self._hist_v = []

    # -- live bars --------------------------------------------------------------
    def update(self, bar: Bar) -> Values:
        """Commit a closed bar; returns its feature values."""
        fast = self._fast
        v = bar.v
        volma = self._volma.handle
        if fast is not None and (volma is not None or v is None):
            # Steady state: every price handle open, called directly.
            rsi, ema, bb, atr, macd, mom = fast
            c = bar.c
            r = rsi.update(c)
            e = ema.update(c)
            bu, bm, bl = bb.update(c)
            a = atr.update(bar.h, bar.l, c)
            m, ms, mh = macd.update(c)
            mo = mom.update(c)
            if v is None:
                # No volume: the volume series restarts when volume comes back.
                self._volma.handle = None
                self._hist_v = []
                self._set_vwap(None, self._session)
                vwap = vm = None
            else:
                vm = volma.update(v)
                if self._session_lo <= bar.t < self._session_hi:
                    vwap = self._vwap.update(bar.h, bar.l, c, v)
                else:
                    vwap = self._update_vwap(bar)
            closed: Values = [r, e, bu, bm, bl, a, vwap, vm, m, ms, mh, mo]
            # x != x only for NaN (compared without allocating, unlike a sum).
            if not (r == r and e == e and bu == bu and bm == bm and bl == bl and a == a
                    and vwap == vwap and vm == vm and m == m and ms == ms and mh == mh and mo == mo):
                closed = [None if x is None or x != x else x for x in closed]
            self.last_closed_t = bar.t
            self.prev_macd_hist = self.closed_values[_MACD_HIST]
            self.closed_values = closed
            return closed
        out: Values = [None] * len(FEATURE_FIELDS)
        if bar.v is None:
            # No volume: the volume series restarts when volume comes back.
            self._hist_v = []
            for ind in self._ind:
                if ind.inputs == "v":
                    ind.handle = None
        if self._warming:
            self._hist_h.append(bar.h)
            self._hist_l.append(bar.l)
            self._hist_c.append(bar.c)
        if bar.v is not None and any(ind.handle is None for ind in self._ind if ind.inputs == "v"):
            self._hist_v.append(bar.v)
        for ind in self._ind:
            handle = ind.handle
            if handle is None:
                continue
            if ind.inputs == "c":
                self._put(out, ind, handle.update(bar.c))
            elif ind.inputs == "hlc":
                self._put(out, ind, handle.update(bar.h, bar.l, bar.c))
            else:
                self._put(out, ind, handle.update(bar.v))
        if any(ind.handle is None for ind in self._ind):
            for i, v in enumerate(self._open_unopened()):
                if v is not None:
                    out[i] = v
            self._trim_history()
            self._refresh_fast()
        out[6] = self._update_vwap(bar)
        self.last_closed_t = bar.t
        self.prev_macd_hist = self.closed_values[_MACD_HIST]
        self.closed_values = out
        return out

    def _open_unopened(self) -> Values:
        out: Values = [None] * len(FEATURE_FIELDS)
        warming = False
        for ind in self._ind:
            if ind.handle is not None:
                continue
            held = len(self._hist_v if ind.inputs == "v" else self._hist_c)
            if held == 0:
                continue
            if held <= ind.lookback:  # no handle, no value yet: not worth the attempt
                warming = warming or ind.inputs != "v"
                continue
            arrays = self._arrays(ind.inputs)
            if arrays is None:
                continue
            try:
                ind.handle = ind.factory(*arrays, **ind.kwargs)
                self._put(out, ind, ind.handle.value)
            except talib.InsufficientHistory:  # type: ignore[attr-defined]
                if ind.inputs != "v":
                    warming = True
                self._put(out, ind, ind.batch(*arrays, **ind.kwargs), last=True)
        self._warming = warming
        return out

    def _update_vwap(self, bar: Bar) -> float | None:
        if bar.v is None:
            self._set_vwap(None, self._session)
            return None
        lo, hi = self._bounds(bar.t)
        if self._vwap is None or lo != self._session:
            self._set_vwap(stream.VWAP(
                np.array([bar.h]), np.array([bar.l]), np.array([bar.c]), np.array([bar.v])
            ), lo, hi)
            return _clean(self._vwap.value)
        return _clean(self._vwap.update(bar.h, bar.l, bar.c, bar.v))

    def peek(self, bar: Bar) -> Values:
        """Values the forming ``bar`` would get if it closed now; commits nothing."""
        fast = self._fast
        if fast is not None:  # steady state: every price handle open, called directly
            rsi, ema, bb, atr, macd, mom = fast
            c = bar.c
            v = bar.v
            r = rsi.peek(c)
            e = ema.peek(c)
            bu, bm, bl = bb.peek(c)
            a = atr.peek(bar.h, bar.l, c)
            m, ms, mh = macd.peek(c)
            mo = mom.peek(c)
            vwap: float | None = None
            vm: float | None = None
            if v is not None:
                volma = self._volma.handle
                if volma is not None:
                    vm = volma.peek(v)
                else:  # the volume average is still warming: batch over the short history
                    vm = float(self._volma.batch(np.array([*self._hist_v, v], dtype=np.float64),
                                                 **self._volma.kwargs)[-1])
                if self._session_lo <= bar.t < self._session_hi:
                    vwap = self._vwap.peek(bar.h, bar.l, c, v)
                else:
                    vwap = float(talib.VWAP(np.array([bar.h]), np.array([bar.l]), np.array([c]),
                                            np.array([v], dtype=np.float64))[-1])
            peeked: Values = [r, e, bu, bm, bl, a, vwap, vm, m, ms, mh, mo]
            if not (r == r and e == e and bu == bu and bm == bm and bl == bl and a == a
                    and vwap == vwap and vm == vm and m == m and ms == ms and mh == mh and mo == mo):
                peeked = [None if x is None or x != x else x for x in peeked]
            return peeked
        out: Values = [None] * len(FEATURE_FIELDS)
        for ind in self._ind:
            handle = ind.handle
            if handle is not None:
                if ind.inputs == "c":
                    self._put(out, ind, handle.peek(bar.c))
                elif ind.inputs == "hlc":
                    self._put(out, ind, handle.peek(bar.h, bar.l, bar.c))
                elif bar.v is not None:
                    self._put(out, ind, handle.peek(bar.v))
                continue
            if len(self._hist_v if ind.inputs == "v" else self._hist_c) < ind.lookback:
                continue  # with this bar still no more than the lookback: no value yet
            # Warming: batch over the short history plus this bar.
            if ind.inputs == "v":
                if bar.v is None:
                    continue
                arrays: tuple[np.ndarray, ...] = (np.array([*self._hist_v, bar.v], dtype=np.float64),)
            elif ind.inputs == "c":
                arrays = (np.array([*self._hist_c, bar.c]),)
            else:
                arrays = (np.array([*self._hist_h, bar.h]), np.array([*self._hist_l, bar.l]),
                          np.array([*self._hist_c, bar.c]))
            self._put(out, ind, ind.batch(*arrays, **ind.kwargs), last=True)
        if bar.v is not None:
            if self._vwap is not None and self._session_lo <= bar.t < self._session_hi:
                out[6] = _clean(self._vwap.peek(bar.h, bar.l, bar.c, bar.v))
            else:
                out[6] = _clean(
                    talib.VWAP(np.array([bar.h]), np.array([bar.l]), np.array([bar.c]),
                               np.array([bar.v], dtype=np.float64))[-1]
                )
        return out

_INDEX = {name: i for i, name in enumerate(FEATURE_FIELDS)}
_MACD_HIST = _INDEX["macd_hist"]


def features_map(
    bar: Bar,
    values: Values,
    computed_at: int,
    stale: bool = False,
    *,
    updated_at: int | None = None,
    via: str | None = None,
    macd_hist_prev: float | None = None,
    market_open: bool = True,
    next_open: int | None = None,
    extended_hours: bool = False,
    extended: bool = False,
    completeness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The msgpack map the scanner reads (CONTRACT.md "Features", docs/redis-layout.md).

    ``updated_at``: when a source last answered for the symbol (``data_age_ms`` is
    ``computed_at`` minus it); ``via``: how its newest bar came (poll, stream, last);
    ``macd_hist_prev``: the histogram one bar back, so a zero crossing shows in one read;
    ``market_open``: whether the symbol's calendar says open; ``next_open``: while closed,
    when it opens next (epoch ms); ``extended_hours``: the symbol includes bars outside
    its regular session; ``extended``: this bar lies outside it; ``completeness``: the
    share of expected bars received (:meth:`sidecar.completeness.Completeness.view`).
    Built as one literal (keys in a fixed order): this runs per symbol every cycle.
    """
    rsi, ema, bb_upper, bb_middle, bb_lower, atr, vwap, vol_ma, macd, macd_signal, macd_hist, mom = values
    return {
        "symbol": bar.symbol, "tf": bar.tf, "t": bar.t, "open": bar.o, "high": bar.h, "low": bar.l,
        "close": bar.c, "v": bar.v,
        "rsi": rsi, "ema": ema, "bb_upper": bb_upper, "bb_middle": bb_middle, "bb_lower": bb_lower,
        "atr": atr, "vwap": vwap, "vol_ma": vol_ma, "macd": macd, "macd_signal": macd_signal,
        "macd_hist": macd_hist, "mom": mom,
        "forming": bar.forming, "src": bar.src, "synthetic": bar.synthetic, "stale": stale,
        "computed_at": computed_at, "updated_at": updated_at, "via": via,
        "data_age_ms": None if updated_at is None else computed_at - updated_at,
        "macd_hist_prev": macd_hist_prev,
        "market_open": market_open, "next_open": next_open,
        "extended_hours": extended_hours, "extended": extended, "completeness": completeness,
    }


def pack_features(fmap: dict[str, Any]) -> bytes:
    """``fmap`` as msgpack: the same bytes as ``msgpack.packb(fmap)``, without a Packer per call."""
    return pack_msgpack(fmap)


#: A symbol's part of its feature maps, the same on each of its timeframes (:func:`symbol_part`):
#: the map's header, then its pairs from ``stale`` to ``data_age_ms``, those from
#: ``market_open`` to ``extended_hours``, and ``warming`` (``None`` unless warming),
#: each pre-encoded.
SymbolPart = tuple[bytes, msgspec.Raw, msgspec.Raw, msgspec.Raw | None]

#: Pairs of the map that :func:`pack_series_features` packs per timeframe: the bar's and
#: its values (``symbol`` ... ``synthetic``), ``macd_hist_prev``, ``extended``, ``completeness``.
_SERIES_PAIRS = 26
_WARMING = msgspec.Raw(pack_msgpack(["warming", True])[1:])
#: msgpack as ``msgpack.packb`` writes these types (float64 floats, the smallest int and
#: str encodings, maps in insertion order), with :class:`msgspec.Raw` spliced in as is.
_encode = msgspec.msgpack.Encoder().encode


def symbol_part(
    computed_at: int, stale: bool, *, updated_at: int | None, via: str | None, market_open: bool,
    next_open: int | None, extended_hours: bool = False, warming: bool = False,
) -> SymbolPart:
    """The fields of :func:`features_map` that do not depend on the timeframe, packed once
    per symbol for :func:`pack_series_features`."""
    age = None if updated_at is None else computed_at - updated_at
    # Packed as arrays of at most 15 items (a one-byte header, cut off): their items
    # are the map's keys and values in order.
    before = _encode(["stale", stale, "computed_at", computed_at, "updated_at", updated_at,
                      "via", via, "data_age_ms", age])
    middle = _encode(["market_open", market_open, "next_open", next_open, "extended_hours", extended_hours])
    pairs = _SERIES_PAIRS + 5 + 3 + warming
    return (b"\xde" + pairs.to_bytes(2, "big"), msgspec.Raw(before[1:]), msgspec.Raw(middle[1:]),
            _WARMING if warming else None)


def pack_series_features(bar: Bar, values: Values, macd_hist_prev: float | None, part: SymbolPart,
                         extended: bool = False, completeness: dict[str, Any] | None = None) -> bytes:
    """The bytes of ``pack_features(features_map(...))`` (and ``"warming": True`` while
    warming) for one timeframe of a symbol whose other fields are ``part``
    (:func:`symbol_part`): the map is never built. Its keys and values are encoded as
    one array, the symbol's pre-encoded pairs spliced in, and the array's header
    replaced by the map's."""
    rsi, ema, bb_upper, bb_middle, bb_lower, atr, vwap, vol_ma, macd, macd_signal, macd_hist, mom = values
    head, before, middle, warming = part
    items = [
        "symbol", bar.symbol, "tf", bar.tf, "t", bar.t, "open", bar.o, "high", bar.h, "low", bar.l,
        "close", bar.c, "v", bar.v,
        "rsi", rsi, "ema", ema, "bb_upper", bb_upper, "bb_middle", bb_middle, "bb_lower", bb_lower,
        "atr", atr, "vwap", vwap, "vol_ma", vol_ma, "macd", macd, "macd_signal", macd_signal,
        "macd_hist", macd_hist, "mom", mom,
        "forming", bar.forming, "src", bar.src, "synthetic", bar.synthetic,
        before, "macd_hist_prev", macd_hist_prev, middle, "extended", extended, "completeness", completeness,
    ]
    if warming is not None:
        items.append(warming)
    # 54 or 55 items: an array header of three bytes.
    return head + _encode(items)[3:]
