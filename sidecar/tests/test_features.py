"""Features equal TA-Lib's batch functions on the same series, bit for bit."""

from __future__ import annotations

import math
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import talib
from hypothesis import given
from hypothesis import strategies as st

from sidecar.bar import Bar
from sidecar.features import (
    DAY_MS,
    FEATURE_FIELDS,
    Columns,
    FeatureEngine,
    _indicators,
    bar_columns,
    features_map,
    join_columns,
    pack_features,
    pack_series_features,
    session_of,
    symbol_part,
)
from sidecar.settings import IndicatorPeriods
from sidecar.tests.helpers import FEATURES_T0 as T0
from sidecar.tests.helpers import assert_row_equal, batch_values, make_series


@pytest.mark.parametrize("anchor_min", [0, 13 * 60 + 30])
def test_stream_equals_batch_with_forming_revisions_over_10k_bars(anchor_min: int) -> None:
    bars = make_series(10_500)
    assert len({session_of(b.t, anchor_min * 60_000) for b in bars}) >= 7  # session boundaries
    expected = batch_values(bars, anchor_min)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods(), session_anchor_min=anchor_min)
    rng = np.random.default_rng(3)
    for i, bar in enumerate(bars):
        # The forming bar is revised a few times before it closes; peek must match
        # batch over the series that ends with the *revised* bar.
        for _ in range(2):
            k = float(rng.uniform(0.999, 1.001))
            revised = Bar(bar.symbol, bar.tf, bar.t, bar.o, max(bar.h, bar.c * k, bar.o),
                          min(bar.l, bar.c * k, bar.o), bar.c * k, (bar.v or 0) / 2, "test",
                          forming=True)
            peeked = engine.peek(revised)
            if i % 997 == 0:  # batch over the whole series is slow: check a sample
                exp_rev = batch_values([*bars[:i], revised], anchor_min)
                assert_row_equal(peeked, exp_rev, i)
        assert_row_equal(engine.update(bar), expected, i)


def test_load_from_history_then_stream_equals_batch() -> None:
    bars = make_series(6_000, seed=11)
    expected = batch_values(bars)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    engine.load(bars[:5_000])
    assert_row_equal(engine.closed_values, expected, 4_999)
    for i in range(5_000, 6_000):
        assert_row_equal(engine.update(bars[i]), expected, i)


@pytest.mark.parametrize("n", [1, 2, 5, 15, 25, 33, 34, 35])
def test_short_history_load_gives_warmup_nulls_equal_to_batch(n: int) -> None:
    bars = make_series(n + 40, seed=n)
    expected = batch_values(bars)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    engine.load(bars[:n])
    assert_row_equal(engine.closed_values, expected, n - 1)
    for i in range(n, n + 40):
        assert_row_equal(engine.peek(bars[i]), expected, i)
        assert_row_equal(engine.update(bars[i]), expected, i)


def test_no_volume_series_has_null_vwap_and_volume_average() -> None:
    bars = make_series(300, volume=False)
    expected = batch_values(bars)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    for i, bar in enumerate(bars):
        assert_row_equal(engine.peek(bar), expected, i)
        values = engine.update(bar)
        assert_row_equal(values, expected, i)
    out = dict(zip(FEATURE_FIELDS, values, strict=True))
    assert out["vwap"] is None and out["vol_ma"] is None and out["rsi"] is not None
    loaded = FeatureEngine("TEST", "1m", IndicatorPeriods())
    loaded.load(bars[:200])
    assert_row_equal(loaded.closed_values, expected, 199)
    for i in range(200, 300):
        assert_row_equal(loaded.peek(bars[i]), expected, i)
        assert_row_equal(loaded.update(bars[i]), expected, i)


def assert_bookkeeping(engine: FeatureEngine, bars: list[Bar], expected: dict[str, np.ndarray], i: int) -> None:
    """After bar ``i``: the newest closed time and the MACD histogram one bar back."""
    assert engine.last_closed_t == bars[i].t
    want_prev = expected["macd_hist"][i - 1] if i > 0 else np.nan
    assert engine.prev_macd_hist == (None if np.isnan(want_prev) else want_prev), i


def load_and_compare(engine: FeatureEngine, history: list[Bar], expected: dict[str, np.ndarray]) -> None:
    engine.load(history)
    assert_row_equal(engine.closed_values, expected, len(history) - 1)
    assert_bookkeeping(engine, history, expected, len(history) - 1)


def run_and_compare(engine: FeatureEngine, bars: list[Bar], expected: dict[str, np.ndarray],
                    start: int = 0) -> None:
    """Peek then commit every bar from ``start``: both equal batch, bookkeeping follows."""
    for i in range(start, len(bars)):
        assert_row_equal(engine.peek(bars[i]), expected, i)
        assert_row_equal(engine.update(bars[i]), expected, i)
        assert_bookkeeping(engine, bars, expected, i)


def test_new_engine_has_no_values() -> None:
    engine = FeatureEngine("EURUSD", "5m", IndicatorPeriods())
    assert (engine.symbol, engine.tf) == ("EURUSD", "5m")
    assert engine.closed_values == [None] * len(FEATURE_FIELDS)
    assert engine.last_closed_t is None and engine.prev_macd_hist is None
    engine.load([])
    assert engine.closed_values == [None] * len(FEATURE_FIELDS) and engine.last_closed_t is None


@pytest.mark.parametrize("start_min", [13 * 60, 23 * 60 + 45], ids=["boundary-when-warm", "boundary-while-warming"])
def test_peek_and_update_of_every_bar_equal_batch_across_a_session_boundary(start_min: int) -> None:
    # Peeking a bar before committing it gives what committing gives, at every step:
    # warm-up, steady state and the first bars of a session.
    t0 = 1_727_827_200_000 + start_min * 60_000
    bars = make_series(800, seed=5, t0=t0)
    assert len({session_of(b.t, 0) for b in bars}) == 2
    run_and_compare(FeatureEngine("TEST", "1m", IndicatorPeriods()), bars, batch_values(bars))


# Bars without volume: one while the prices warm up but the volume average is open; one
# and then five while the prices are warm and the volume average warms up again; a run
# across the session boundary with every handle open before it.
NO_VOLUME = {25, 40, *range(60, 65), *range(655, 666)}


@pytest.mark.parametrize("loaded", [0, 5, 25, 26, 30, 41, 50, 62, 65, 100, 658])
def test_volume_that_comes_and_goes_restarts_the_volume_indicators(loaded: int) -> None:
    bars = [replace(b, v=None) if i in NO_VOLUME else b for i, b in enumerate(make_series(700, seed=9))]
    expected = batch_values(bars)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    if loaded:
        load_and_compare(engine, bars[:loaded], expected)
    run_and_compare(engine, bars, expected, start=loaded)


@pytest.mark.parametrize("loaded", [0, 1, 17, 36, 60])
def test_every_configured_period_is_used(loaded: int) -> None:
    # Each longer than TA-Lib's default, so a default used anywhere during warm-up
    # gives a value where batch has none.
    periods = IndicatorPeriods(rsi=20, ema=40, bb=10, bb_nbdev=1.5, atr=20, vol_ma=35,
                               macd_fast=10, macd_slow=30, macd_signal=7, mom=12)
    bars = make_series(120, seed=13)
    expected = batch_values(bars, periods=periods)
    engine = FeatureEngine("TEST", "1m", periods)
    if loaded:
        load_and_compare(engine, bars[:loaded], expected)
    run_and_compare(engine, bars, expected, start=loaded)


def test_values_that_overflow_are_null_never_nan() -> None:
    # Valid (finite, positive) but absurd prices: the Bollinger Bands' variance overflows
    # and TA-Lib answers NaN; the features carry null there, as batch-equal as the rest.
    bars = [replace(b, o=b.o * 1e200, h=b.h * 1e200, l=b.l * 1e200, c=b.c * 1e200)
            for b in make_series(150, seed=3)]
    expected = batch_values(bars)
    assert np.isnan(expected["bb_upper"][-1]) and not np.isnan(expected["bb_middle"][-1])
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    for i, bar in enumerate(bars):
        for values in (engine.peek(bar), engine.update(bar)):
            assert not any(isinstance(x, float) and math.isnan(x) for x in values), i
            assert_row_equal(values, expected, i)


def test_custom_periods_follow_configuration() -> None:
    bars = make_series(400)
    periods = IndicatorPeriods(rsi=7, ema=50, mom=3)
    engine = FeatureEngine("TEST", "1m", periods)
    for bar in bars:
        values = dict(zip(FEATURE_FIELDS, engine.update(bar), strict=True))
    c = np.array([b.c for b in bars])
    assert values["rsi"] == talib.RSI(c, 7)[-1]
    assert values["ema"] == talib.EMA(c, 50)[-1]
    assert values["mom"] == talib.MOM(c, 3)[-1]


def test_vwap_follows_the_sessions_given_not_the_anchor() -> None:
    """``sessions`` (a symbol's calendar) decides where VWAP restarts; ``session_anchor_min``
    is then not used: here sessions start at 13:30 UTC, the anchor says 00:00."""
    anchor = (13 * 60 + 30) * 60_000

    def sessions(t_ms: int) -> tuple[int, int]:
        lo = session_of(t_ms, anchor) * DAY_MS + anchor
        return lo, lo + DAY_MS

    bars = make_series(160)  # from 13:00 UTC: a session starts at bar 30
    expected = batch_values(bars, anchor_min=13 * 60 + 30)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods(), session_anchor_min=0, sessions=sessions)
    load_and_compare(engine, bars[:20], expected)
    run_and_compare(engine, bars, expected, start=20)
    loaded = FeatureEngine("TEST", "1m", IndicatorPeriods(), sessions=sessions)
    load_and_compare(loaded, bars[:100], expected)  # VWAP over the loaded session's 70 bars
    run_and_compare(loaded, bars, expected, start=100)


def test_a_bar_without_volume_peeked_while_the_volume_average_is_one_bar_short() -> None:
    """The volume average's history is one bar short of opening its handle and the forming
    bar has no volume: no average, and the indicators after it still get their values."""
    bars = make_series(20)
    bars[19] = replace(bars[19], v=None)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    engine.load(bars[:19])  # 19 volumes: the SMA(20)'s lookback
    assert_row_equal(engine.peek(bars[19]), batch_values(bars), 19)


def test_vwap_restarts_at_each_session() -> None:
    bars = make_series(3 * 1440)
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    for bar in bars:
        values = dict(zip(FEATURE_FIELDS, engine.update(bar), strict=True))
        if bar.t % DAY_MS == 0:  # first bar of a session: VWAP is its typical price
            assert values["vwap"] == pytest.approx((bar.h + bar.l + bar.c) / 3, rel=1e-12)


def test_features_map_is_not_stale_unless_told() -> None:
    bar = Bar("AAPL", "1m", T0, 1.0, 2.0, 0.5, 1.5, 10.0, "yahoo")
    fmap = features_map(bar, [None] * len(FEATURE_FIELDS), T0 + 1_000)
    assert fmap["stale"] is False
    assert fmap["updated_at"] is None and fmap["data_age_ms"] is None and fmap["via"] is None
    assert fmap["macd_hist_prev"] is None
    # Unless told: the market open, regular hours only, not warming.
    assert (fmap["market_open"], fmap["next_open"], fmap["extended_hours"], fmap["extended"]) == (
        True, None, False, False)
    assert "warming" not in fmap
    part = symbol_part(T0 + 1_000, False, updated_at=None, via=None, market_open=True, next_open=None)
    assert pack_series_features(bar, [None] * len(FEATURE_FIELDS), None, part) == pack_features(fmap)


def _map_as_first_written(bar: Bar, values: list[float | None], computed_at: int, stale: bool,
                          updated_at: int | None, via: str, prev: float | None,
                          next_open: int | None) -> dict[str, object]:
    """The features map built key by key, as the contract lists its fields."""
    out: dict[str, object] = {"symbol": bar.symbol, "tf": bar.tf, "t": bar.t, "open": bar.o, "high": bar.h,
                              "low": bar.l, "close": bar.c, "v": bar.v}
    out.update(zip(FEATURE_FIELDS, values, strict=True))
    out.update(forming=bar.forming, src=bar.src, synthetic=bar.synthetic, stale=stale,
               computed_at=computed_at, updated_at=updated_at, via=via,
               data_age_ms=None if updated_at is None else computed_at - updated_at,
               macd_hist_prev=prev, market_open=next_open is None, next_open=next_open,
               extended_hours=False, extended=False, completeness=None)
    return out


@given(
    values=st.lists(st.one_of(st.none(), st.floats(allow_nan=False)), min_size=12, max_size=12),
    v=st.one_of(st.none(), st.floats(min_value=0, allow_infinity=False)),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    t=st.integers(0, 253_402_300_799_000),
    age=st.one_of(st.none(), st.integers(0, 10**10)),
    via=st.sampled_from(["poll", "stream", "last"]),
    prev=st.one_of(st.none(), st.floats(allow_nan=False)),
    next_open=st.one_of(st.none(), st.integers(0, 253_402_300_799_000)),
)
def test_packed_features_are_the_bytes_readers_always_got(
    values: list[float | None], v: float | None, flags: tuple[bool, bool, bool], t: int,
    age: int | None, via: str, prev: float | None, next_open: int | None,
) -> None:
    forming, synthetic, stale = flags
    bar = Bar("BRK.B", "1m", t, 1.0, 2.0, 0.5, 1.5, v, "twelvedata", forming, synthetic)
    now = t + 5_000
    updated = None if age is None else now - age
    fmap = features_map(bar, values, now, stale, updated_at=updated, via=via, macd_hist_prev=prev,
                        market_open=next_open is None, next_open=next_open)
    legacy = _map_as_first_written(bar, values, now, stale, updated, via, prev, next_open)
    packed = pack_features(fmap)
    assert packed == msgpack.packb(legacy)  # byte for byte, key order included
    decoded = msgpack.unpackb(packed)
    assert decoded == legacy
    assert [type(x) for x in decoded.values()] == [type(x) for x in legacy.values()]
    assert pack_features(fmap) == packed  # the shared packer leaves nothing behind


@given(
    values=st.lists(st.one_of(st.none(), st.floats(allow_nan=False)), min_size=12, max_size=12),
    v=st.one_of(st.none(), st.floats(min_value=0, allow_infinity=False)),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    t=st.integers(0, 253_402_300_799_000),
    age=st.one_of(st.none(), st.integers(0, 10**10)),
    via=st.sampled_from(["poll", "stream", "last", None]),
    prev=st.one_of(st.none(), st.floats(allow_nan=False)),
    next_open=st.one_of(st.none(), st.integers(0, 253_402_300_799_000)),
    tf=st.sampled_from(["1m", "5m", "1h", "1d"]),
    hours=st.tuples(st.booleans(), st.booleans()),
    completeness=st.one_of(st.none(), st.fixed_dictionaries(
        {"session": st.floats(0, 1), "previous": st.one_of(st.none(), st.floats(0, 1)),
         "synthetic": st.integers(0, 500), "late": st.integers(0, 500)})),
)
def test_a_symbols_part_packed_once_gives_each_timeframe_the_same_bytes(
    values: list[float | None], v: float | None, flags: tuple[bool, bool, bool, bool], t: int,
    age: int | None, via: str | None, prev: float | None, next_open: int | None, tf: str,
    hours: tuple[bool, bool], completeness: dict[str, object] | None,
) -> None:
    forming, synthetic, stale, warming = flags
    extended_hours, extended = hours
    bar = Bar("BRK.B", tf, t, 1.0, 2.0, 0.5, 1.5, v, "twelvedata", forming, synthetic)
    now = t + 5_000
    updated = None if age is None else now - age
    fmap = features_map(bar, values, now, stale, updated_at=updated, via=via, macd_hist_prev=prev,
                        market_open=next_open is None, next_open=next_open, extended_hours=extended_hours,
                        extended=extended, completeness=completeness)
    if warming:
        fmap["warming"] = True
    part = symbol_part(now, stale, updated_at=updated, via=via, market_open=next_open is None,
                       next_open=next_open, extended_hours=extended_hours, warming=warming)
    packed = pack_series_features(bar, values, prev, part, extended=extended, completeness=completeness)
    assert packed == pack_features(fmap)


def test_lookback_is_where_handles_open_and_batch_gives_values() -> None:
    """Up to an indicator's lookback a warming engine neither tries its handle nor its
    batch function: with that many bars TA-Lib gives neither, with one more both."""
    for ind in _indicators(IndicatorPeriods()):
        for n, opens in ((ind.lookback, False), (ind.lookback + 1, True)):
            k = 1 if ind.inputs in ("c", "v") else 3
            arrays = tuple(np.linspace(1.0, 2.0, n) + j for j in range(k))
            out = ind.batch(*arrays, **ind.kwargs)
            last = (out[0] if ind.multi else out)[-1]
            assert math.isnan(last) is not opens, ind.name
            if opens:
                ind.factory(*arrays, **ind.kwargs)
            else:
                with pytest.raises(talib.InsufficientHistory):  # type: ignore[attr-defined]
                    ind.factory(*arrays, **ind.kwargs)


# -- warm-window columns ---------------------------------------------------------


def assert_columns(cols: Columns, t: list[int], h: list[float], l: list[float], c: list[float],
                   v: list[float]) -> None:
    assert [a.dtype for a in cols] == [np.int64] + [np.float64] * 4
    assert cols.t.tolist() == t and cols.h.tolist() == h and cols.l.tolist() == l and cols.c.tolist() == c
    np.testing.assert_array_equal(cols.v, np.array(v, dtype=np.float64))  # NaN equals NaN here
    assert cols.rows == len(t)


def test_bar_columns_are_the_bars_fields_with_nan_for_no_volume() -> None:
    bars = [Bar("S", "1m", 60_000 * i, 1.0, 2.0 + i, 0.5 + i, 1.5 + i, None if i == 1 else 10.0 * i, "test")
            for i in range(3)]
    assert_columns(bar_columns(bars), [0, 60_000, 120_000], [2.0, 3.0, 4.0], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5],
                   [0.0, math.nan, 20.0])
    assert_columns(bar_columns([]), [], [], [], [], [])
    assert_columns(Columns.empty(), [], [], [], [], [])


def test_columns_last_before_cut_and_join() -> None:
    bars = [Bar("S", "1m", 10 * i, 1.0, 2.0, 0.5, 1.0 + i, float(i), "test") for i in range(1, 6)]
    cols = bar_columns(bars)  # t 10 .. 50
    assert [cols.last_before(t) for t in (0, 10, 11, 20, 50, 51, 10**12)] == [-1, -1, 10, 10, 40, 50, 50]
    assert type(cols.last_before(30)) is int
    assert Columns.empty().last_before(10) == -1
    middle = cols.cut(1, 3)
    assert_columns(middle, [20, 30], [2.0, 2.0], [0.5, 0.5], [3.0, 4.0], [2.0, 3.0])
    for parts in ([cols], [cols.cut(0, 2), cols.cut(2, 2), cols.cut(2, 5)], [Columns.empty(), cols]):
        assert_columns(join_columns(parts), cols.t.tolist(), cols.h.tolist(), cols.l.tolist(), cols.c.tolist(),
                       cols.v.tolist())


@given(split=st.integers(0, 120), redo=st.integers(0, 12), gap=st.integers(0, 130))
def test_a_copy_continues_bit_identical_and_leaves_its_original_alone(split: int, redo: int, gap: int) -> None:
    """An engine copied at any point of a series (warming or not, around a bar without
    volume and a session boundary) and then advanced over the rest gives what batch gives;
    the original, advanced no further, still gives its own values (nothing shared)."""
    bars = make_series(160, t0=T0 + 9 * 3_600_000)
    bars[gap] = replace(bars[gap], v=None)
    expected = batch_values(bars)
    original = FeatureEngine("TEST", "1m", IndicatorPeriods())
    original.load(bars[:split])
    before = (original.closed_values, original.prev_macd_hist, original.peek(bars[split]))
    copy = original.copy()
    for i in range(split, min(split + redo + 20, len(bars))):
        assert_row_equal(copy.peek(replace(bars[i], forming=True)), expected, i)
        assert_row_equal(copy.update(bars[i]), expected, i)
    assert (original.closed_values, original.prev_macd_hist, original.peek(bars[split])) == before
