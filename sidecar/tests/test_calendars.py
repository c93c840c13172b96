"""Trading calendars: DST switches, holidays, early closes, lunch breaks, the FX week."""

from __future__ import annotations

from datetime import datetime

import pytest

from sidecar.calendars import ALWAYS_OPEN, FX, Session, get_calendar, resolve
from sidecar.symbols import load_symbol_map, parse_symbol_map

MIN = 60_000


def ms(text: str) -> int:
    """Epoch ms of an ISO 8601 time with its offset."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.parametrize(("name", "before", "after"), [
    # New York springs forward on Sunday 2024-03-10: 09:30 is 14:30 UTC, then 13:30 UTC.
    ("XNYS", "2024-03-08T14:30:00+00:00", "2024-03-11T13:30:00+00:00"),
    # ... and falls back on Sunday 2024-11-03.
    ("XNYS", "2024-11-01T13:30:00+00:00", "2024-11-04T14:30:00+00:00"),
    # London springs forward on 2024-03-31 (Good Friday and Easter Monday are holidays).
    ("XLON", "2024-03-28T08:00:00+00:00", "2024-04-02T07:00:00+00:00"),
    # ... and falls back on 2024-10-27.
    ("XLON", "2024-10-25T07:00:00+00:00", "2024-10-28T08:00:00+00:00"),
])
def test_dst_switch_moves_the_open_in_utc(name: str, before: str, after: str) -> None:
    cal = get_calendar(name)
    for t in (ms(before), ms(after)):
        assert not cal.is_open(t - 1)
        assert cal.is_open(t)
        assert cal.session_open(t + 3 * 3_600_000) == t
    # Closed from the earlier session's close to the open after the switch.
    close = cal.sessions_between(ms(before), ms(before) + 1)[0].close
    assert not cal.is_open(close)
    assert cal.next_open(close) == ms(after)


def test_november_in_london_keeps_its_utc_open_while_new_york_moves() -> None:
    """Between the London (October) and New York (November) switches the gap is 4 h."""
    lon, nyse = get_calendar("LSE"), get_calendar("NYSE")
    assert lon.sessions_between(ms("2024-10-31T00:00:00+00:00"), ms("2024-11-01T00:00:00+00:00")) == [
        Session(ms("2024-10-31T08:00:00+00:00"), ms("2024-10-31T16:30:00+00:00"))]
    assert nyse.session_open(ms("2024-10-31T15:00:00+00:00")) == ms("2024-10-31T13:30:00+00:00")
    assert nyse.session_open(ms("2024-11-05T15:00:00+00:00")) == ms("2024-11-05T14:30:00+00:00")


def test_us_holiday_and_early_close() -> None:
    nyse = get_calendar("XNYS")
    thanksgiving = ms("2024-11-28T15:00:00-05:00")
    assert not nyse.is_open(thanksgiving)
    # The day after closes at 13:00 New York.
    assert nyse.next_open(thanksgiving) == ms("2024-11-29T09:30:00-05:00")
    assert nyse.is_open(ms("2024-11-29T12:59:00-05:00"))
    assert not nyse.is_open(ms("2024-11-29T13:00:00-05:00"))
    assert nyse.next_close(ms("2024-11-29T10:00:00-05:00")) == ms("2024-11-29T13:00:00-05:00")
    assert nyse.next_open(ms("2024-11-29T13:00:00-05:00")) == ms("2024-12-02T09:30:00-05:00")
    assert not nyse.is_open(ms("2024-07-04T11:00:00-04:00"))
    assert not nyse.is_open(ms("2025-01-09T11:00:00-05:00"))  # a day of mourning
    sessions = nyse.sessions_between(ms("2024-11-27T00:00:00-05:00"), ms("2024-12-03T00:00:00-05:00"))
    assert [(s.open, s.close) for s in sessions] == [
        (ms("2024-11-27T09:30:00-05:00"), ms("2024-11-27T16:00:00-05:00")),
        (ms("2024-11-29T09:30:00-05:00"), ms("2024-11-29T13:00:00-05:00")),
        (ms("2024-12-02T09:30:00-05:00"), ms("2024-12-02T16:00:00-05:00")),
    ]


def test_hong_kong_lunch_break() -> None:
    hk = get_calendar("HKEX")
    assert hk.is_open(ms("2024-06-03T11:59:00+08:00"))
    assert not hk.is_open(ms("2024-06-03T12:00:00+08:00"))
    assert not hk.is_open(ms("2024-06-03T12:59:00+08:00"))
    assert hk.next_open(ms("2024-06-03T12:00:00+08:00")) == ms("2024-06-03T13:00:00+08:00")
    assert hk.is_open(ms("2024-06-03T13:00:00+08:00"))
    # One session a day: the afternoon belongs to the morning's session.
    assert hk.session_open(ms("2024-06-03T14:00:00+08:00")) == ms("2024-06-03T09:30:00+08:00")
    assert hk.sessions_between(ms("2024-06-03T00:00:00+08:00"), ms("2024-06-03T23:00:00+08:00")) == [
        Session(ms("2024-06-03T09:30:00+08:00"), ms("2024-06-03T16:00:00+08:00"),
                ms("2024-06-03T12:00:00+08:00"), ms("2024-06-03T13:00:00+08:00"))]
    # Bars a 1m series should have across the break: 11:58, 11:59, then 13:00 on.
    slots = hk.open_slots(ms("2024-06-03T11:58:00+08:00"), ms("2024-06-03T13:02:00+08:00"), MIN)
    assert slots == [ms("2024-06-03T11:58:00+08:00"), ms("2024-06-03T11:59:00+08:00"),
                     ms("2024-06-03T13:00:00+08:00"), ms("2024-06-03T13:01:00+08:00")]


def test_fx_week_is_sunday_to_friday_17_new_york() -> None:
    fx = get_calendar(FX)
    assert fx.is_open(ms("2024-11-29T16:59:00-05:00"))
    assert not fx.is_open(ms("2024-11-29T17:00:00-05:00"))
    assert not fx.is_open(ms("2024-11-30T12:00:00+00:00"))
    assert not fx.is_open(ms("2024-12-01T16:59:00-05:00"))
    assert fx.next_open(ms("2024-11-29T17:00:00-05:00")) == ms("2024-12-01T17:00:00-05:00")
    # Monday 00:30 UTC is open (a Monday-Friday UTC week would say otherwise on Sunday night).
    assert fx.is_open(ms("2024-12-01T23:30:00+00:00"))
    assert fx.is_open(ms("2024-12-02T00:30:00+00:00"))
    # Summer: 17:00 New York is 21:00 UTC.
    assert not fx.is_open(ms("2024-07-05T21:00:00+00:00"))
    assert fx.session_open(ms("2024-12-03T10:00:00+00:00")) == ms("2024-12-02T17:00:00-05:00")


def test_always_open_sessions_are_utc_days() -> None:
    crypto = get_calendar(ALWAYS_OPEN)
    t = ms("2024-11-30T13:45:00+00:00")  # a Saturday
    assert crypto.is_open(t)
    assert crypto.next_open(t) is None
    assert crypto.session_bounds(t) == (ms("2024-11-30T00:00:00+00:00"), ms("2024-12-01T00:00:00+00:00"))
    assert crypto.open_slots(t, t + 3 * MIN, MIN) == [t, t + MIN, t + 2 * MIN]


def test_weekend_has_no_open_bars() -> None:
    nyse = get_calendar("NYSE")
    friday_close = ms("2024-12-06T16:00:00-05:00")
    monday_open = ms("2024-12-09T09:30:00-05:00")
    assert nyse.open_slots(friday_close, monday_open, MIN) == []
    # Hourly bars on the 09:30 grid: the 15:30 bar is the last one before the close.
    assert nyse.open_slots(ms("2024-12-06T14:30:00-05:00"), ms("2024-12-09T10:30:00-05:00"),
                           3_600_000)[:2] == [ms("2024-12-06T14:30:00-05:00"), ms("2024-12-06T15:30:00-05:00")]


def test_names_and_mapping_defaults() -> None:
    assert resolve("NYSE") == resolve("nasdaq") == "XNYS"
    assert resolve("XETRA") == "XETR"
    assert resolve("Tokyo") == "XTKS"
    assert resolve("24/7") == ALWAYS_OPEN
    with pytest.raises(ValueError, match="unknown calendar"):
        resolve("MOON")
    packaged = load_symbol_map()
    assert packaged.calendar("AAPL") == "XNYS"
    assert packaged.calendar("EURUSD") == FX
    assert packaged.calendar("BTCUSD") == ALWAYS_OPEN
    user = parse_symbol_map({
        "VOD.L": {"asset_class": "stock", "calendar": "LSE"},
        "GER40": {"asset_class": "index", "session": "09:00 Europe/Berlin"},
        "BAD": {"asset_class": "stock", "calendar": "MOON"},
    })
    assert user.calendar("VOD.L") == "XLON"
    assert str(user.entry("VOD.L").session) == "08:00 Europe/London"
    assert user.calendar("GER40") == "XETR"
    assert "unknown calendar" in user.rejected["BAD"]
