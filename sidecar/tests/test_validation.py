"""Validation rules, one by one: per-bar checks, ordering, revisions, outliers and gaps."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest

from sidecar.bar import MAX_EPOCH_MS, Bar
from sidecar.calendars import extended_calendar, get_calendar
from sidecar.tests.helpers import bar as make_bar
from sidecar.tests.helpers import ny
from sidecar.timeframe import US_EQUITY_SESSION, Timeframe
from sidecar.validation import (
    GAP_LOG_LINES,
    MAX_FILL_BARS,
    Gap,
    Outcome,
    Validator,
    Verdict,
    check_bar,
    validate_history,
)

TF = Timeframe.parse("1m")
M = TF.ms
T0 = 1_727_827_200_000  # 2024-10-02 00:00 UTC, aligned to every timeframe used here
NOW = T0 + 30 * 86_400_000  # well after every bar below, so nothing is "future"
SYM = "AAPL"


def mk(i: int, c: float = 100.0, *, rng: float = 1.0, v: float | None = 10.0, symbol: str = SYM,
       forming: bool = False, **kw) -> Bar:
    """Bar number ``i`` (open time T0 + i minutes) closing at ``c`` with range ``rng``."""
    made = make_bar(T0 + i * M, c, h=c + rng / 2, l=c - rng / 2, v=v, symbol=symbol, forming=forming)
    return replace(made, **kw) if kw else made


def rejections(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sidecar.validation" and r.getMessage() == "bar rejected"]


def primed(n: int = 20, *, c: float = 100.0, **kw) -> Validator:
    """A validator that already stored bars 0..n-1 of ``SYM``, each with range 1.0."""
    val = Validator(TF, **kw)
    val.prime(SYM, [mk(i, c) for i in range(n)])
    return val


# -- rules of one bar ------------------------------------------------------------

GOOD = mk(0, 100.0)

BAD_BARS = [
    pytest.param(replace(GOOD, o=math.nan), "bad_price", id="nan-open"),
    pytest.param(replace(GOOD, c=math.nan), "bad_price", id="nan-close"),
    pytest.param(replace(GOOD, h=math.inf), "bad_price", id="inf-high"),
    pytest.param(replace(GOOD, l=-math.inf), "bad_price", id="minus-inf-low"),
    pytest.param(replace(GOOD, o=0.0, l=0.0), "bad_price", id="zero-open"),
    pytest.param(replace(GOOD, o=0.0), "bad_price", id="zero-open-only"),
    pytest.param(replace(GOOD, h=0.0), "bad_price", id="zero-high"),
    pytest.param(replace(GOOD, c=0.0), "bad_price", id="zero-close"),
    pytest.param(replace(GOOD, o=math.inf), "bad_price", id="inf-open"),
    pytest.param(replace(GOOD, l=math.inf), "bad_price", id="inf-low"),
    pytest.param(replace(GOOD, c=math.inf), "bad_price", id="inf-close"),
    pytest.param(replace(GOOD, l=0.0), "bad_price", id="zero-low"),
    pytest.param(replace(GOOD, o=-1.0, h=-0.5, l=-2.0, c=-1.0), "bad_price", id="negative"),
    pytest.param(replace(GOOD, o=100.0, h=99.0, l=98.0, c=98.5), "high_below_open_close", id="h<o"),
    pytest.param(replace(GOOD, o=98.5, h=99.0, l=98.0, c=100.0), "high_below_open_close", id="h<c"),
    pytest.param(replace(GOOD, o=100.0, h=101.0, l=100.5, c=100.7), "low_above_open_close", id="l>o"),
    pytest.param(replace(GOOD, o=100.7, h=101.0, l=100.5, c=100.0), "low_above_open_close", id="l>c"),
    pytest.param(replace(GOOD, v=-1.0), "bad_volume", id="negative-volume"),
    pytest.param(replace(GOOD, v=math.nan), "bad_volume", id="nan-volume"),
    pytest.param(replace(GOOD, v=math.inf), "bad_volume", id="inf-volume"),
    pytest.param(replace(GOOD, tf="5m"), "wrong_timeframe", id="wrong-tf"),
    pytest.param(replace(GOOD, t=T0 + 1), "misaligned_time", id="misaligned-1ms"),
    pytest.param(replace(GOOD, t=T0 + 30_000), "misaligned_time", id="misaligned-30s"),
]


@pytest.mark.parametrize(("bar", "reason"), BAD_BARS)
def test_check_bar_reason(bar: Bar, reason: str) -> None:
    assert check_bar(bar, TF, NOW, 2_000) == reason


def test_check_bar_time_range() -> None:
    at = replace(GOOD, t=0)  # 1970-01-01 00:00: the first valid stamp
    assert check_bar(at, TF, NOW, 2_000) is None
    assert check_bar(replace(GOOD, t=-M), TF, NOW, 2_000) == "bad_time"
    # The last second a store holds (9999-12-31 23:59:59) is a valid stamp, the next is not.
    s1 = Timeframe.parse("1s")
    assert check_bar(replace(GOOD, tf="1s", t=MAX_EPOCH_MS), s1, MAX_EPOCH_MS, 0) is None
    assert check_bar(replace(GOOD, tf="1s", t=MAX_EPOCH_MS + 1_000), s1, MAX_EPOCH_MS + 1_000, 0) == "bad_time"


def test_prices_below_one_are_prices() -> None:
    assert check_bar(replace(GOOD, o=0.5, h=0.75, l=0.25, c=0.5), TF, NOW, 2_000) is None


def test_check_bar_accepts_good_bars() -> None:
    assert check_bar(GOOD, TF, NOW, 2_000) is None
    assert check_bar(replace(GOOD, v=None), TF, NOW, 2_000) is None  # FX: no volume
    assert check_bar(replace(GOOD, v=0.0), TF, NOW, 2_000) is None
    flat = replace(GOOD, o=5.0, h=5.0, l=5.0, c=5.0)
    assert check_bar(flat, TF, NOW, 2_000) is None


@pytest.mark.parametrize(("bar", "reason"), BAD_BARS)
def test_validator_rejects_counts_and_logs_once(
    bar: Bar, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    val = primed(3)
    caplog.set_level(logging.DEBUG, logger="sidecar.validation")
    out = val.check(replace(bar, t=bar.t + 5 * M), NOW)
    assert out.verdict is Verdict.REJECTED
    assert out.bars == []
    assert out.reason == reason
    assert val.rejected == {reason: 1}
    assert val.accepted == 0
    assert val.newest(SYM) == mk(2)  # state untouched
    recs = rejections(caplog)
    assert len(recs) == 1
    rec = recs[0]
    assert rec.levelno == logging.WARNING
    assert rec.reason == reason
    assert rec.symbol == SYM
    assert rec.t == bar.t + 5 * M
    for name in ("o", "h", "l", "c", "v"):
        got, want = getattr(rec, name), getattr(bar, name)
        assert (math.isnan(got) and math.isnan(want)) if isinstance(want, float) and math.isnan(want) \
            else got == want
    assert rec.tf == bar.tf
    assert rec.src == bar.src


def test_rejections_are_counted_per_reason() -> None:
    val = primed(3)
    for i in (5, 6):
        assert val.check(replace(mk(i), c=math.nan), NOW).reason == "bad_price"
    assert val.check(replace(mk(7), tf="5m"), NOW).reason == "wrong_timeframe"
    assert val.rejected == {"bad_price": 2, "wrong_timeframe": 1}


def test_bar_labelled_with_another_symbol_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(3)
    caplog.set_level(logging.WARNING, logger="sidecar.validation")
    other = mk(3, symbol="MSFT")
    out = val.check(other, NOW, symbol=SYM)
    assert (out.verdict, out.reason, out.bars) == (Verdict.REJECTED, "wrong_symbol", [])
    assert val.rejected == {"wrong_symbol": 1}
    assert val.newest("MSFT") is None and val.newest(SYM) == mk(2)
    recs = rejections(caplog)
    assert len(recs) == 1 and recs[0].reason == "wrong_symbol" and recs[0].symbol == "MSFT"
    # The symbol asked for is accepted as usual.
    assert val.check(mk(3), NOW, symbol=SYM).verdict is Verdict.NEW


def test_unknown_symbol_has_no_newest_and_nothing_held() -> None:
    val = primed(3)
    assert val.newest("MSFT") is None
    assert val.held_bar("MSFT") is None
    assert val.held_bar(SYM) is None


def test_session_grid_symbols_are_checked_on_their_grid() -> None:
    h1 = Timeframe.parse("1h")
    grid = h1.on_session(US_EQUITY_SESSION)
    open_edt = 1_727_875_800_000  # 2024-10-02 13:30 UTC = 09:30 New York
    now = open_edt + 10 * 3_600_000
    val = Validator(h1, grids={"AAPL": grid, "EURUSD": h1})

    def bar(symbol: str, t: int) -> Bar:
        return Bar(symbol, "1h", t, 100.0, 101.0, 99.0, 100.5, 10.0, "test")

    # The first bar and later ones of a symbol on the session grid: 09:30, 10:30 ...
    assert val.check(bar("AAPL", open_edt), now).verdict is Verdict.NEW
    assert val.check(bar("AAPL", open_edt + 3_600_000), now).verdict is Verdict.NEW
    assert val.check(bar("AAPL", open_edt + 5_400_000), now).reason == "misaligned_time"
    # A symbol on the clock's grid: 13:00, 14:00 ...
    assert val.check(bar("EURUSD", open_edt), now).reason == "misaligned_time"
    assert val.check(bar("EURUSD", open_edt + 1_800_000), now).verdict is Verdict.NEW
    assert val.check(bar("EURUSD", open_edt + 3_600_000), now).reason == "misaligned_time"
    assert val.rejected == {"misaligned_time": 3}


def test_future_beyond_skew_rejected(caplog: pytest.LogCaptureFixture) -> None:
    val = Validator(TF, skew_ms=2_000)
    caplog.set_level(logging.WARNING, logger="sidecar.validation")
    bar = mk(10)
    now = bar.t - 2_001  # the bar opens 2.001 s in the future
    assert check_bar(bar, TF, now, 2_000) == "future"
    out = val.check(bar, now)
    assert out.verdict is Verdict.REJECTED and out.reason == "future"
    assert val.rejected == {"future": 1}
    assert len(rejections(caplog)) == 1
    assert rejections(caplog)[0].symbol == SYM


@pytest.mark.parametrize("ahead_ms", [0, 1, 1_999, 2_000])
def test_future_within_skew_accepted(ahead_ms: int) -> None:
    val = Validator(TF, skew_ms=2_000)
    bar = mk(10)
    out = val.check(bar, bar.t - ahead_ms)
    assert out.verdict is Verdict.NEW
    assert out.bars == [bar]
    assert not val.rejected


def test_first_bar_is_new() -> None:
    val = Validator(TF)
    bar = mk(0)
    out = val.check(bar, NOW)
    assert out.verdict is Verdict.NEW and out.bars == [bar]
    assert val.accepted == 1
    assert val.newest(SYM) == bar
    other = mk(0, symbol="MSFT")
    assert val.check(other, NOW).verdict is Verdict.NEW
    assert val.accepted == 2  # counted over all symbols
    assert val.newest("MSFT") == other


def test_prime_adds_to_what_is_known() -> None:
    val = Validator(TF)
    val.prime(SYM, [mk(i) for i in range(5)])
    val.prime(SYM, [mk(i) for i in range(5, 10)])
    assert val.newest(SYM) == mk(9)
    assert val.check(mk(2), NOW).verdict is Verdict.DUPLICATE
    assert val.check(mk(10, 200.0), NOW).verdict is Verdict.HELD  # 10 ranges known: enough to judge


# -- ordering ------------------------------------------------------------------


def test_stale_beyond_correction_window(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(21, correction_window_bars=10)  # newest opens at bar 20
    caplog.set_level(logging.WARNING, logger="sidecar.validation")
    old = mk(9, 101.0)  # 11 bars older than the newest, other values
    out = val.check(old, NOW)
    assert out.verdict is Verdict.REJECTED and out.reason == "stale"
    assert out.bars == []
    assert val.rejected == {"stale": 1}
    recs = rejections(caplog)
    assert len(recs) == 1
    assert recs[0].reason == "stale" and recs[0].symbol == SYM and recs[0].t == old.t
    assert recs[0].c == 101.0


def test_default_correction_window_is_ten_bars() -> None:
    val = Validator(TF)
    val.prime(SYM, [mk(i) for i in range(21)])
    assert val.check(mk(10, 101.0), NOW).verdict is Verdict.CORRECTION
    assert val.check(mk(9, 101.0), NOW).reason == "stale"


def test_bars_within_the_window_stay_known_as_older_ones_are_dropped() -> None:
    # Enough bars that the oldest are dropped from memory: every bar inside the window,
    # the one at its edge included, is still known (identical again: a duplicate).
    val = primed(27, correction_window_bars=10)  # newest opens at bar 26
    for i in range(16, 27):
        assert val.check(mk(i), NOW).verdict is Verdict.DUPLICATE, i
    assert val.duplicates == 11
    assert val.check(mk(16, 100.3), NOW).verdict is Verdict.CORRECTION
    assert val.check(mk(15, 100.3), NOW).reason == "stale"


def test_correction_at_window_edge_accepted() -> None:
    val = primed(21, correction_window_bars=10)
    edge = mk(10, 100.2)  # exactly 10 bars older: still inside the window
    out = val.check(edge, NOW)
    assert out.verdict is Verdict.CORRECTION
    assert out.bars == [edge]
    assert not val.rejected


def test_correction_of_recent_closed_bar() -> None:
    val = primed(21)
    accepted_before = val.accepted
    fixed = mk(15, 100.3, v=99.0)
    out = val.check(fixed, NOW)
    assert out.verdict is Verdict.CORRECTION
    assert out.bars == [fixed]
    assert val.accepted == accepted_before + 1
    assert val.newest(SYM) == mk(20)  # a correction does not move the newest bar
    assert val.check(mk(21), NOW).verdict is Verdict.NEW
    assert val.check(mk(16, 100.2), NOW).verdict is Verdict.CORRECTION
    assert val.accepted == accepted_before + 3
    # The corrected values are what is remembered: re-delivering them is a duplicate ...
    again = val.check(mk(15, 100.3, v=99.0), NOW)
    assert again.verdict is Verdict.DUPLICATE and again.bars == []
    # ... and the original values are a correction again.
    assert val.check(mk(15), NOW).verdict is Verdict.CORRECTION


def test_duplicate_of_newest_not_stored() -> None:
    val = Validator(TF)
    bar = mk(0, forming=True)
    assert val.check(bar, NOW).verdict is Verdict.NEW
    for n in range(1, 4):
        out = val.check(mk(0, forming=True), NOW)
        assert out.verdict is Verdict.DUPLICATE
        assert out.bars == []
        assert val.duplicates == n
    assert val.accepted == 1
    assert not val.rejected


def test_duplicate_of_older_bar_not_stored() -> None:
    val = primed(21)
    out = val.check(mk(18), NOW)
    assert out.verdict is Verdict.DUPLICATE and out.bars == []
    assert val.duplicates == 1
    assert val.accepted == 0


def test_closing_the_forming_bar_is_a_revision_not_a_duplicate() -> None:
    val = Validator(TF)
    val.check(mk(0, forming=True), NOW)
    closed = mk(0, forming=False)  # same prices, now closed
    out = val.check(closed, NOW)
    assert out.verdict is Verdict.REVISION
    assert out.bars == [closed]
    assert val.duplicates == 0


def test_revision_of_forming_bar() -> None:
    val = primed(20)
    first = mk(20, 100.0, forming=True, v=5.0)
    assert val.check(first, NOW).verdict is Verdict.NEW
    revised = mk(20, 100.4, forming=True, v=8.0)
    out = val.check(revised, NOW)
    assert out.verdict is Verdict.REVISION
    assert out.bars == [revised]
    assert val.newest(SYM) == revised
    assert val.duplicates == 0
    assert not val.gaps and not val.new_gaps
    assert val.accepted == 2
    # The revised values are what is remembered, after newer bars too.
    assert val.check(mk(21), NOW).verdict is Verdict.NEW
    assert val.check(mk(20, 100.4, forming=True, v=8.0), NOW).verdict is Verdict.DUPLICATE
    assert val.accepted == 3


def test_revision_that_jumps_is_held() -> None:
    val = primed(20)
    first = mk(20, 100.0, forming=True)
    assert val.check(first, NOW).verdict is Verdict.NEW
    out = val.check(mk(20, 200.0, forming=True), NOW)
    assert (out.verdict, out.bars) == (Verdict.HELD, [])
    assert val.newest(SYM) == first
    assert val.held_bar(SYM) == mk(20, 200.0, forming=True)


def test_revision_of_the_newest_bar_while_a_later_one_is_held() -> None:
    val = primed(20)
    assert val.check(mk(20), NOW).verdict is Verdict.NEW
    spike = mk(21, 200.0)
    assert val.check(spike, NOW).verdict is Verdict.HELD
    # Bar 20 revised (a wider range, no jump): the market did not follow the spike.
    revised = mk(20, 100.4, rng=5.0)
    out = val.check(revised, NOW)
    assert (out.verdict, out.bars) == (Verdict.REVISION, [revised])
    assert val.newest(SYM) == revised
    assert val.held_bar(SYM) is None
    assert val.rejected == {"outlier": 1}
    # A revision is not another bar: the typical range is still that of bars 0..20
    # (1.0 each), so a move of 15.5 from the revised close is an outlier (k = 15).
    assert val.check(mk(21, 115.9), NOW).verdict is Verdict.HELD


@pytest.mark.parametrize(("bad", "reason"), BAD_BARS)
def test_revision_of_a_vetted_bar_gets_the_reason_check_bar_gives(bad: Bar, reason: str) -> None:
    # The forming bar's revisions skip the time rules its open time already passed:
    # every other rule must still give the verdict it gives a bar seen for the first time.
    val = primed(20)
    assert val.check(mk(20, 100.0, forming=True), NOW).verdict is Verdict.NEW
    revised = replace(bad, t=bad.t + 20 * M, forming=True)
    assert check_bar(revised, TF, NOW, 2_000) == reason
    out = val.check(revised, NOW)
    assert (out.verdict, out.reason) == (Verdict.REJECTED, reason)
    assert val.newest(SYM) == mk(20, 100.0, forming=True)


def test_revision_within_the_skew_allowance_is_accepted() -> None:
    val = primed(20)
    assert val.check(mk(20, 100.0, forming=True), NOW).verdict is Verdict.NEW
    opens = T0 + 20 * M
    out = val.check(mk(20, 100.2, forming=True), opens - 2_000)  # 2 s ahead of the clock: allowed
    assert out.verdict is Verdict.REVISION
    assert not val.rejected


def test_revision_after_the_clock_stepped_back_is_future() -> None:
    val = primed(20)
    assert val.check(mk(20, 100.0, forming=True), NOW).verdict is Verdict.NEW
    before = T0 + 20 * M - 2_001  # the wall clock stepped back past the bar's open time
    out = val.check(mk(20, 100.2, forming=True), before)
    assert (out.verdict, out.reason) == (Verdict.REJECTED, "future")
    assert val.check(mk(20, 100.2, forming=True), NOW).verdict is Verdict.REVISION


def test_symbols_are_independent() -> None:
    val = primed(5)
    other = mk(0, 50.0, symbol="MSFT")
    out = val.check(other, NOW)  # older than AAPL's newest but MSFT has no history
    assert out.verdict is Verdict.NEW
    assert val.newest("MSFT") == other
    assert val.newest(SYM) == mk(4)


# -- outliers ------------------------------------------------------------------


def test_outlier_held_not_stored(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(20)
    caplog.set_level(logging.INFO, logger="sidecar.validation")
    spike = mk(20, 200.0)
    out = val.check(spike, NOW)
    assert out.verdict is Verdict.HELD
    assert out.bars == []
    assert spike not in out.bars
    assert val.held == 1
    assert val.held_bar(SYM) == spike
    assert val.newest(SYM) == mk(19)
    assert not val.rejected
    held_logs = [r for r in caplog.records if r.getMessage() == "outlier held"]
    assert len(held_logs) == 1
    rec = held_logs[0]
    assert (rec.symbol, rec.t, rec.o, rec.h, rec.l, rec.c) == (SYM, spike.t, 200.0, 200.5, 199.5, 200.0)
    assert rec.ref == 100.0  # the close it jumped from


def test_held_bars_are_counted() -> None:
    val = primed(20)
    assert val.check(mk(20, 200.0), NOW).verdict is Verdict.HELD
    assert val.check(mk(21, 100.1), NOW).verdict is Verdict.NEW  # the spike is dropped
    assert val.check(mk(22, 300.0), NOW).verdict is Verdict.HELD
    assert val.held == 2


def _typical_two(**kw) -> Validator:
    """50 bars of range 2.0 after 10 of range 9.0, all closing at 1000: typical range 2.0."""
    val = Validator(TF, **kw)
    val.prime(SYM, [mk(i, 1000.0, rng=9.0 if i < 10 else 2.0) for i in range(60)])
    return val


def test_outlier_bound_is_k_times_the_mean_range_of_the_last_50_bars() -> None:
    # Defaults: k = 15 over the last 50 ranges, so the bound is 30.0 exactly. Ranges that
    # left the window no longer count (with them the mean would be 3.17).
    assert _typical_two().check(mk(60, 1030.0, rng=2.0), NOW).verdict is Verdict.NEW
    assert _typical_two().check(mk(60, 970.0, rng=2.0), NOW).verdict is Verdict.NEW
    assert _typical_two().check(mk(60, 1030.5, rng=2.0), NOW).verdict is Verdict.HELD
    assert _typical_two().check(mk(60, 969.5, rng=2.0), NOW).verdict is Verdict.HELD
    # The same bound for the bar's own range.
    assert _typical_two().check(mk(60, 1000.0, rng=30.0), NOW).verdict is Verdict.NEW
    assert _typical_two().check(mk(60, 1000.0, rng=30.5), NOW).verdict is Verdict.HELD
    # The window is configurable: over all 60 bars the mean is 19 / 6, the bound 47.5.
    assert _typical_two(outlier_window=60).check(mk(60, 1040.0, rng=2.0), NOW).verdict is Verdict.NEW


def test_any_positive_outlier_k_detects() -> None:
    val = primed(20, outlier_k=1.0)  # typical range 1.0: a move over 1.0 is a jump
    assert val.check(mk(20, 101.5), NOW).verdict is Verdict.HELD


def test_wide_range_bar_is_an_outlier_too() -> None:
    val = primed(20)
    wide = Bar(SYM, "1m", T0 + 20 * M, 100.0, 130.0, 90.0, 100.0, 1.0, "test")
    assert val.check(wide, NOW).verdict is Verdict.HELD


def test_no_outlier_detection_before_enough_history() -> None:
    val = primed(9)  # fewer than 10 ranges: no basis to judge
    out = val.check(mk(9, 200.0), NOW)
    assert out.verdict is Verdict.NEW
    assert primed(10).check(mk(10, 200.0), NOW).verdict is Verdict.HELD  # 10 are enough


def test_outlier_detection_disabled_with_k_zero() -> None:
    val = primed(20, outlier_k=0.0)
    assert val.check(mk(20, 200.0), NOW).verdict is Verdict.NEW


def test_outlier_confirmed_by_next_bar_is_released(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(20)
    caplog.set_level(logging.INFO, logger="sidecar.validation")
    spike = mk(20, 200.0)
    assert val.check(spike, NOW).verdict is Verdict.HELD
    follow = mk(21, 200.5)
    out = val.check(follow, NOW)
    assert out.verdict is Verdict.NEW
    assert out.bars == [spike, follow]
    assert val.held_bar(SYM) is None
    assert val.newest(SYM) == follow
    assert not val.rejected
    assert not val.new_gaps  # the held bar filled its own slot
    assert val.accepted == 2
    confirmed = [r for r in caplog.records if r.getMessage() == "outlier confirmed"]
    assert len(confirmed) == 1 and (confirmed[0].symbol, confirmed[0].t) == (SYM, spike.t)


def test_outlier_dropped_when_market_does_not_follow(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(20)
    caplog.set_level(logging.WARNING, logger="sidecar.validation")
    spike = mk(20, 200.0)
    val.check(spike, NOW)
    back = mk(21, 100.2)
    out = val.check(back, NOW)
    assert out.verdict is Verdict.NEW
    assert spike not in out.bars
    assert out.bars == [back]
    assert val.rejected == {"outlier": 1}
    assert val.held_bar(SYM) is None
    recs = rejections(caplog)
    assert len(recs) == 1
    assert recs[0].reason == "outlier" and recs[0].symbol == SYM
    assert recs[0].t == spike.t and recs[0].c == 200.0
    # The dropped bar's slot is now a gap of one bar.
    assert val.new_gaps == [Gap(SYM, spike.t, spike.t, 1)]


def test_held_forming_bar_replaced_by_its_revision() -> None:
    val = primed(20)
    assert val.check(mk(20, 200.0, forming=True), NOW).verdict is Verdict.HELD
    calm = mk(20, 100.1, forming=True)
    out = val.check(calm, NOW)
    assert out.verdict is Verdict.NEW
    assert out.bars == [calm]
    assert not val.rejected


# -- gaps ------------------------------------------------------------------------


def test_gap_detected_not_filled_by_default(caplog: pytest.LogCaptureFixture) -> None:
    val = primed(5)  # bars 0..4
    caplog.set_level(logging.INFO, logger="sidecar.validation")
    bar = mk(10)
    out = val.check(bar, NOW)
    assert out.verdict is Verdict.NEW
    assert out.bars == [bar]
    gap = Gap(SYM, T0 + 5 * M, T0 + 9 * M, 5, filled=False)
    assert val.new_gaps == [gap]
    assert type(val.new_gaps[0].missing) is int
    assert list(val.gaps[SYM]) == [gap]
    logged = [r for r in caplog.records if r.getMessage() == "gap detected"]
    assert len(logged) == 1
    rec = logged[0]
    assert (rec.symbol, rec.start, rec.end, rec.missing, rec.filled) == (SYM, gap.start, gap.end, 5, False)
    assert val.accepted == 1


def test_the_last_100_gaps_per_symbol_are_kept() -> None:
    val = primed(1)
    for i in range(1, 102):
        val.check(mk(2 * i), NOW)  # one missing bar before each
    assert len(val.new_gaps) == 101
    kept = val.gaps[SYM]
    assert len(kept) == 100 and kept[0] == val.new_gaps[1] and kept[-1] == val.new_gaps[-1]


def test_adjacent_bar_is_not_a_gap() -> None:
    val = primed(5)
    val.check(mk(5), NOW)
    assert not val.new_gaps and not val.gaps


def test_gap_filled_with_synthetic_bars() -> None:
    val = primed(5, fill_gaps=True)
    bar = mk(10, 101.0)
    out = val.check(bar, NOW)
    assert out.verdict is Verdict.NEW
    assert out.bars[-1] == bar
    fillers = out.bars[:-1]
    assert [f.t for f in fillers] == [T0 + i * M for i in range(5, 10)]
    prev_close = mk(4).c
    for f in fillers:
        assert f.synthetic is True
        assert f.src == "gapfill"
        assert f.forming is False
        assert f.symbol == SYM and f.tf == "1m"
        assert f.o == f.h == f.l == f.c == prev_close
        assert f.v == 0.0
        assert check_bar(f, TF, NOW, 0) is None
    assert val.new_gaps == [Gap(SYM, T0 + 5 * M, T0 + 9 * M, 5, filled=True)]
    # The filled bars are now known: re-delivering one is a duplicate.
    assert val.check(fillers[2], NOW).verdict is Verdict.DUPLICATE


def test_gap_fill_keeps_missing_volume_missing() -> None:
    val = Validator(TF, fill_gaps=True)
    val.prime(SYM, [mk(0, v=None)])
    out = val.check(mk(3, v=None), NOW)
    assert [f.v for f in out.bars[:-1]] == [None, None]


def test_gap_fill_at_limit() -> None:
    val = primed(1, fill_gaps=True)
    bar = mk(MAX_FILL_BARS + 1)
    out = val.check(bar, NOW)
    assert len(out.bars) == MAX_FILL_BARS + 1
    assert all(b.synthetic and b.src == "gapfill" for b in out.bars[:-1])
    assert val.new_gaps[0].missing == MAX_FILL_BARS and val.new_gaps[0].filled


def test_gap_larger_than_limit_recorded_not_filled() -> None:
    val = primed(1, fill_gaps=True)
    bar = mk(MAX_FILL_BARS + 2)
    out = val.check(bar, NOW)
    assert out.bars == [bar]
    assert val.new_gaps == [Gap(SYM, T0 + M, T0 + (MAX_FILL_BARS + 1) * M, MAX_FILL_BARS + 1)]
    assert val.new_gaps[0].filled is False


def test_new_gaps_accumulate_until_cleared() -> None:
    val = primed(1)
    val.check(mk(3), NOW)
    val.check(mk(6), NOW)
    assert [(g.start, g.missing) for g in val.new_gaps] == [(T0 + M, 2), (T0 + 4 * M, 2)]
    val.new_gaps.clear()
    val.check(mk(9), NOW)
    assert [(g.start, g.end, g.missing) for g in val.new_gaps] == [(T0 + 7 * M, T0 + 8 * M, 2)]
    assert len(val.gaps[SYM]) == 3


# -- history -----------------------------------------------------------------------


def test_validate_history_dedups_sorts_and_counts() -> None:
    a0, a1, a2 = mk(0), mk(1), mk(2)
    a1_rev = mk(1, 100.5)
    bad = replace(mk(3), c=math.nan)
    misaligned = replace(mk(4), t=T0 + 4 * M + 7)
    future = mk(100)
    bars = [a2, a0, a1, bad, a1_rev, misaligned, future]
    out, rejected = validate_history(bars, TF, now_ms=T0 + 10 * M, skew_ms=0)
    assert out == [a0, a1_rev, a2]  # oldest first; the later same-time bar wins
    assert rejected == {"duplicate": 1, "bad_price": 1, "misaligned_time": 1, "future": 1}
    _, twice = validate_history([a0, a0, a0, bad, bad], TF, now_ms=T0 + 10 * M, skew_ms=0)
    assert twice == {"duplicate": 2, "bad_price": 2}


def test_validate_history_allows_two_seconds_of_skew_by_default() -> None:
    bar = mk(10)
    assert validate_history([bar], TF, now_ms=bar.t - 2_000) == ([bar], {})
    assert validate_history([bar], TF, now_ms=bar.t - 2_001) == ([], {"future": 1})


def test_validate_history_empty_and_clean() -> None:
    assert validate_history([], TF, NOW) == ([], {})
    clean = [mk(i) for i in range(5)]
    out, rejected = validate_history(reversed(clean), TF, NOW)
    assert out == clean
    assert not rejected


def test_gaps_past_the_log_lines_are_not_logged_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.validation")
    val = primed(1)
    for i in range(1, GAP_LOG_LINES + 6):
        val.check(mk(2 * i), NOW)  # one missing bar before each
    assert len(val.new_gaps) == GAP_LOG_LINES + 5
    assert sum(r.getMessage() == "gap detected" for r in caplog.records) == GAP_LOG_LINES


def test_status_reports_what_validation_did() -> None:
    val = primed(3)
    assert val.status() == {"accepted": 0, "duplicates": 0, "held_outliers": 0, "rejected": {},
                            "gaps": 0}
    assert val.check(mk(3), NOW).verdict is Verdict.NEW
    assert val.check(mk(3), NOW).verdict is Verdict.DUPLICATE
    assert val.check(replace(mk(4), c=math.nan), NOW).verdict is Verdict.REJECTED
    assert val.check(replace(mk(5), tf="5m"), NOW).verdict is Verdict.REJECTED
    assert val.check(mk(8), NOW).verdict is Verdict.NEW  # bars 4..7 missing: one gap
    assert val.check(mk(12), NOW).verdict is Verdict.NEW  # 9..11: another
    assert val.status() == {"accepted": 3, "duplicates": 1, "held_outliers": 0,
                            "rejected": {"bad_price": 1, "wrong_timeframe": 1}, "gaps": 2}


# -- market hours ----------------------------------------------------------------

NY_NOW = ny("2024-12-04T00:00")  # after every New York bar below


def at(when: str, symbol: str = SYM, **kw) -> Bar:
    """A valid 1m bar of ``symbol`` opening at New York wall time ``when``."""
    return make_bar(ny(when), symbol=symbol, **kw)


def test_with_a_calendar_only_bars_in_regular_or_included_extended_hours_are_accepted() -> None:
    """AAPL includes extended hours (04:00-20:00), MSFT does not, BTC has no calendar."""
    nyse = get_calendar("XNYS")
    val = Validator(TF, calendars={"AAPL": nyse, "MSFT": nyse}, extended={"AAPL": extended_calendar("XNYS")},
                    outlier_k=0.0)
    cases = [
        (at("2024-12-02T03:00"), Verdict.REJECTED),  # before the pre-market
        (at("2024-12-02T08:00"), Verdict.NEW),  # pre-market, included
        (at("2024-12-02T09:30"), Verdict.NEW),
        (at("2024-12-02T07:00", "MSFT", c=math.nan), Verdict.REJECTED),  # bad and outside: bad_price
        (at("2024-12-02T08:00", "MSFT"), Verdict.REJECTED),  # pre-market, not included
        (at("2024-12-02T09:30", "MSFT"), Verdict.NEW),
        (at("2024-12-02T03:00", "BTC"), Verdict.NEW),  # no calendar: any time
    ]
    outcomes = [val.check(b, NY_NOW, symbol=b.symbol) for b, _ in cases]
    assert [o.verdict for o in outcomes] == [v for _, v in cases]
    assert [o.reason for o in outcomes] == [
        "outside_session", None, None, "bad_price", "outside_session", None, None]
    assert all(o.bars == [] for o in outcomes if o.verdict is Verdict.REJECTED)
    assert val.rejected == {"outside_session": 2, "bad_price": 1}
    assert val.gaps == {}  # 08:00 -> 09:30 misses no bar of the regular session


def test_a_bar_outside_regular_hours_is_logged_at_debug_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    val = Validator(TF, calendars={SYM: get_calendar("XNYS")})
    caplog.set_level(logging.DEBUG, logger="sidecar.validation")
    b = at("2024-12-02T17:30")
    assert val.check(b, NY_NOW) == Outcome(Verdict.REJECTED, [], "outside_session")
    assert rejections(caplog) == []
    logged = [r for r in caplog.records if r.name == "sidecar.validation"]
    assert [(r.levelno, r.getMessage(), r.symbol, r.t) for r in logged] == [
        (logging.DEBUG, "bar outside regular hours", SYM, b.t)]


def test_with_a_calendar_only_the_bars_of_open_hours_are_missing() -> None:
    """Overnight is no gap; gaps inside the session and across the open count their open
    minutes only."""
    val = Validator(TF, calendars={SYM: get_calendar("XNYS")}, outlier_k=0.0)
    for when in ("2024-12-02T15:58", "2024-12-02T15:59", "2024-12-03T09:30", "2024-12-03T09:35",
                 "2024-12-03T15:59", "2024-12-04T09:32"):
        assert val.check(at(when), ny("2024-12-05T00:00")).verdict is Verdict.NEW, when
    assert val.new_gaps == [
        Gap(SYM, ny("2024-12-03T09:31"), ny("2024-12-03T09:34"), 4),
        Gap(SYM, ny("2024-12-03T09:36"), ny("2024-12-03T15:58"), 383),
        Gap(SYM, ny("2024-12-04T09:30"), ny("2024-12-04T09:31"), 2),
    ]
