"""The cycle's series stage: each symbol's series on every timeframe, and its features.

:class:`SymbolState` is a symbol in the cycle: it applies each accepted base bar to the
symbol's series (:meth:`SymbolState.apply`: a forming-bar revision, a close, a
correction) and brings the higher timeframes up to the base's forming bar
(:meth:`SymbolState.advance`); each :class:`~sidecar.series.Series` owns its bars, its
forming bar, its feature handles and its fold into the next timeframe. It also keeps
how the symbol's sources and market are doing (the router books them), and makes the
symbol's row of ``/health`` (:meth:`SymbolState.status`).
:class:`SeriesStage` packs the symbols' feature maps for Redis, every timeframe, and
closes the forming bars a closed market leaves behind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.app.planner import VIA_LAST
from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.completeness import Completeness
from sidecar.features import FEATURE_FIELDS, pack_series_features, symbol_part
from sidecar.redis_store import FeatureRow
from sidecar.series import Series
from sidecar.timeframe import Timeframe
from sidecar.validation import Verdict

MACD_HIST = FEATURE_FIELDS.index("macd_hist")


def _rsi(features: dict[str, Any] | None) -> float | None:
    """The RSI of a features map, to 3 decimals (``None`` without a map or a value)."""
    rsi = None if features is None else features.get("rsi")
    return None if rsi is None else round(rsi, 3)


@dataclass(slots=True)
class SymbolState:
    """A symbol in the cycle: its series (the base timeframe first, then each higher
    one, see :mod:`sidecar.series`) and how its sources and market are doing."""

    #: Its series, lowest timeframe first; ``series[0]`` is the base the sources feed.
    series: list[Series]
    updated_ms: int | None = None  # when a source last answered for this symbol
    via: str = VIA_LAST  # how its newest bar came this cycle: poll, stream or last
    expect_ms: int = 0  # the refresh interval planned for it (its source's budget pace)
    #: Its calendar says its market is open (always, for a symbol without a calendar).
    market_open: bool = True
    #: While closed: when its market opens next (epoch ms; ``None`` while open).
    next_open: int | None = None
    #: Its handles are not yet open on the warm window (start-up): the features map says so.
    warming: bool = False

    #: ``series[0]`` and ``series[1:]``, kept apart: the cycle reads them for every symbol.
    base: Series = field(init=False)
    higher: list[Series] = field(init=False)

    def __post_init__(self) -> None:
        self.base = self.series[0]
        self.higher = self.series[1:]

    @property
    def needs_rebuild(self) -> bool:
        """Some series' older closed bars changed (a correction, gap repair)."""
        return any(s.needs_rebuild for s in self.series)

    @property
    def rebuilding(self) -> dict[int, Bar] | None:
        """While a rebuild (or warm-up) reads history: the base bars applied meanwhile."""
        return self.base.rebuilding

    @rebuilding.setter
    def rebuilding(self, value: dict[int, Bar] | None) -> None:
        """``None`` ends every series' rebuild; a dict starts the base's, the others' empty."""
        for ser in self.series:
            ser.rebuilding = None if value is None else {}
        self.base.rebuilding = value

    @property
    def features(self) -> dict[str, Any] | None:
        """The base feature map last written to Redis."""
        return self.base.features

    def stale(self, now_ms: int, stale_after_ms: int) -> bool:
        """No answer for longer than planned (its refresh interval) plus ``stale_after_ms``;
        never while its market is closed (nothing new is expected then)."""
        if not self.market_open:
            return False
        return self.updated_ms is None or now_ms - self.updated_ms > stale_after_ms + self.expect_ms

    def status(self, now_ms: int, stale_after_ms: int, *, calendar: str | None,
               extended_hours: str | None, completeness: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        """The symbol's row in ``/health`` at ``now_ms``: its newest base bar, when a
        source last answered, whether it is stale (:meth:`stale`), how its bar came, its
        market, each timeframe (:meth:`Series.status <sidecar.series.Series.status>`) and whether it warms.
        ``calendar``: its calendar's name; ``extended_hours``: ``include``/``exclude``
        (``None`` without a calendar); ``completeness``: per timeframe name, its share of
        expected bars (:meth:`~sidecar.completeness.Completeness.report`)."""
        base = self.base
        bar = base.forming or base.last
        rsi = _rsi(base.features)  # the base's map, decoded once for its row and its timeframe's
        updated = self.updated_ms
        return {
            "newest_bar_t": bar.t if bar else None,
            "newest_bar_age_ms": None if bar is None else now_ms - bar.t,
            "updated_age_ms": None if updated is None else now_ms - updated,
            "last_price": bar.c if bar else None,
            "forming": bar.forming if bar else None,
            "rsi": rsi,
            "src": bar.src if bar else None,
            "stale": self.stale(now_ms, stale_after_ms),
            "via": self.via,
            "refresh_interval_ms": self.expect_ms,
            "calendar": calendar,
            "market_open": self.market_open,
            "next_open": self.next_open,
            "extended_hours": extended_hours,
            "timeframes": {
                ser.tf.name: ser.status(now_ms, rsi if ser is base else _rsi(ser.features),
                                        None if completeness is None else completeness.get(ser.tf.name))
                for ser in self.series},
            "warming": self.warming,
        }

    def apply(self, bar: Bar, verdict: Verdict, fixed: list[Bar] | None = None) -> list[Bar]:
        """Fold an accepted bar into the symbol's series; returns the bars to store
        (higher timeframes' bars that closed with it included).

        A correction (or a revision of the newest closed bar) is redone in memory where
        it is within reach (:meth:`correct`); the closed higher bars it changes go to
        ``fixed`` (to the bars returned if not given). Otherwise the handles are
        reopened on stored history after the cycle, every higher bar containing it
        re-aggregated there.
        """
        base = self.base
        forming = base.forming
        if verdict is Verdict.CORRECTION or (
                not (forming is not None and bar.t == forming.t)
                and base.last is not None and bar.t <= base.last.t):
            if not bar.forming and (base.last is None or bar.t > base.last.t) and (
                    forming is None or bar.t < forming.t):
                # A closed bar that came after a newer forming one: in order all the same.
                out = [bar, *self.close(bar, fixed)]
                base.forming = forming
                return out
            made: list[Bar] = [] if fixed is None else fixed
            if self.correct(bar, made):
                return [bar] if fixed is not None else [bar, *made]
            base.revise(bar)
            if self.higher:
                self.higher[0].mark_dirty(bar.t)
            return [bar]
        if forming is not None and bar.t == forming.t:
            if bar.forming:
                base.forming = bar
                return [bar]
            return [bar, *self.close(bar, fixed)]
        stored: list[Bar] = []
        if forming is not None:
            # A newer bar closes the forming one with its last revision.
            closed = Bar(forming.symbol, forming.tf, forming.t, forming.o, forming.h, forming.l,
                         forming.c, forming.v, forming.src, False, forming.synthetic)
            stored.append(closed)
            stored += self.close(closed, fixed)
        if bar.forming:
            base.forming = bar
            stored.append(bar)
        else:
            stored.append(bar)
            stored += self.close(bar, fixed)
        return stored

    def correct(self, bar: Bar, fixed: list[Bar]) -> bool:
        """Redo a correction of a closed base bar in memory, if every series can
        (:meth:`Series.reaches <sidecar.series.Series.reaches>`, :meth:`Series.regroup
        <sidecar.series.Series.regroup>`): the base's handles, and the bar of each higher
        bucket holding it with its handles (a closed bar, added to ``fixed``) or its
        current aggregate. Returns whether it did: if not, nothing but the base's
        ``recent`` changed (it holds the corrected bar)."""
        base = self.base
        if self.warming or bar.forming or not base.reaches(bar.t):
            return False
        base.place(bar)
        groups = []
        for ser in self.higher:
            assert ser.grid is not None
            if not ser.grid.holds(bar.t):
                continue
            group = ser.regroup(base.recent, bar.t)
            if group is None:
                return False
            groups.append((ser, group))
        base.replay()
        for ser, group in groups:
            changed = ser.refold(group)
            if changed is not None:
                fixed.append(changed)
        return True

    def close(self, bar: Bar, fixed: list[Bar] | None = None) -> list[Bar]:
        """Commit a closed base bar to the symbol's handles (and to a rebuild in flight)
        and fold it upward; returns the higher bars that closed with it. A bar late into
        a complete higher bucket re-aggregates that bucket's bar (:meth:`Series.fold
        <sidecar.series.Series.fold>`), added to ``fixed`` (to the bars returned if not
        given). While the symbol warms nothing is folded: warm-up folds the bars applied
        meanwhile (:meth:`~sidecar.app.history.History.fold_up`), with the base bars of
        each bucket it started before."""
        base = self.base
        left = base.close(bar)
        if not self.higher or self.warming:
            return []
        if left is not None:
            for ser in self.higher:
                ser.leave(left)
        return self.higher[0].fold(bar, base.recent if base.reaches(bar.t) else None, fixed)

    def advance(self, now_ms: int, out: list[Bar]) -> None:
        """Bring the higher timeframes up to the base's forming bar: close complete
        buckets (added to ``out``) and set each forming bar. A higher forming bar is not
        stored: it is the aggregate of the base bars from its open time on, and its
        features map carries it."""
        base_forming = self.base.forming
        for ser in self.higher:
            if ser.acc is not None:
                out += ser.settle(now_ms, base_forming)
            ser.view(base_forming)


class SeriesStage:
    """Every symbol's series, as the cycle uses them after validation: forming bars a
    closed market leaves are closed, feature maps are packed."""

    __slots__ = ("calendars", "completeness", "extended", "features_ttl_ms", "stale_after_ms", "symbols",
                 "tf")

    def __init__(self, symbols: dict[str, SymbolState], tf: Timeframe, calendars: dict[str, MarketCalendar],
                 extended: dict[str, MarketCalendar], completeness: Completeness, *, stale_after_ms: int,
                 features_ttl_ms: int) -> None:
        """``calendars``: each symbol's regular hours, ``extended``: the extended hours of
        those that include them (their maps flag bars outside the regular session);
        ``completeness``: each map's share of expected bars; ``stale_after_ms``: no answer
        for longer (past the planned interval) makes a symbol stale; ``features_ttl_ms``:
        how long a features key lives (while its market is open)."""
        self.symbols = symbols
        self.tf = tf
        self.calendars = calendars
        self.extended = extended
        self.completeness = completeness
        self.stale_after_ms = stale_after_ms
        self.features_ttl_ms = features_ttl_ms

    def settle_closed(self, closed: Iterable[str], now_ms: int) -> list[Bar]:
        """Close the forming bar of each of the ``closed`` symbols (their market closed)
        once its time has passed: no later bar will come to close it until the market
        reopens. Returns the bars to store (higher timeframes' bars that closed too)."""
        stored: list[Bar] = []
        for sym in closed:
            st = self.symbols[sym]
            forming = st.base.forming
            if forming is None or forming.t + self.tf.ms > now_ms:
                continue
            bar = Bar(forming.symbol, forming.tf, forming.t, forming.o, forming.h, forming.l,
                         forming.c, forming.v, forming.src, False, forming.synthetic)
            stored.append(bar)
            stored += st.close(bar)
        return stored

    def features(self, symbols: Iterable[str], now_ms: int,
                 stored: list[Bar] | None = None) -> tuple[list[FeatureRow], list[Bar]]:
        """The feature maps of ``symbols`` on every timeframe (those with a bar), packed
        for Redis; while a symbol's market is closed, its maps are kept until shortly
        after the market opens.

        The higher timeframes are brought up to the base first (:meth:`SymbolState.advance`):
        the bars that closed go to ``stored`` when it is given (the symbols a source
        answered for), else they are returned with the maps, to be stored. A forming
        bar that did not change is not peeked again; its map is rewritten (it says when
        it was computed) and so never expires.
        """
        out: list[FeatureRow] = []
        append = out.append
        ttl = self.features_ttl_ms
        stale_after = self.stale_after_ms
        states = self.symbols
        extended, completeness = self.extended, self.completeness.views
        settled: list[Bar] = []
        for sym in symbols:
            st = states[sym]
            if st.higher and not st.warming:
                # While warming the higher series wait for warm-up to fold the base into them.
                st.advance(now_ms, settled)
            hold = 0 if st.market_open or st.next_open is None else st.next_open - now_ms + ttl
            regular = self.calendars[sym] if sym in extended else None
            shares = completeness(sym, now_ms)
            part = symbol_part(now_ms, st.stale(now_ms, stale_after), updated_at=st.updated_ms, via=st.via,
                               market_open=st.market_open, next_open=st.next_open,
                               extended_hours=regular is not None, warming=st.warming)
            for i, ser in enumerate(st.series):
                bar = ser.forming or ser.last
                if bar is not None:
                    engine = ser.engine
                    # The histogram one bar back, so a reader sees a zero crossing in one read.
                    if bar.forming:
                        prev = engine.closed_values[MACD_HIST]
                        values = ser.values(bar)
                    else:
                        prev = engine.prev_macd_hist
                        values = engine.closed_values
                    packed = ser.packed = pack_series_features(
                        bar, values, prev, part,
                        regular is not None and i == 0 and not regular.is_open(bar.t),
                        None if shares is None else shares[i])
                    append((ser.tf.name, sym, packed, hold))
        if settled and stored is not None:
            stored += settled
            settled = []
        return out, settled
