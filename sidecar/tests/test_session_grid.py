"""US stocks' hourly bars open at 09:30, 10:30 ... New York: the session grid.

Built from the real Yahoo AAPL minute fixture (2024-10-02, 390 regular minutes):
Yahoo answers hourly bars on the session grid (13:30 UTC ...), Polygon only on the
clock's, so Polygon is asked for 30-minute bars that are folded into the same hours.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sidecar.bar import Bar
from sidecar.fetch import run_fetch
from sidecar.settings import Settings
from sidecar.sources import build_source
from sidecar.sources._parsing import ParseContext, rebucket
from sidecar.symbols import load_symbol_map, parse_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.timeframe import US_EQUITY_SESSION, Session, Timeframe
from sidecar.validation import check_bar, validate_history

AAPL_1M = "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json"
H1 = Timeframe.parse("1h")
GRID = H1.on_session(US_EQUITY_SESSION)
OPEN_EDT = 1727875800000  # 2024-10-02 13:30 UTC = 09:30 New York (EDT)
HOUR = 3_600_000


def minute_rows() -> list[tuple[int, float, float, float, float, float]]:
    """The fixture's complete minutes (nulls and the trailing live entry dropped)."""
    r = json.loads(fixture(AAPL_1M))["chart"]["result"][0]
    q = r["indicators"]["quote"][0]
    rows = [(t * 1000, q["open"][i], q["high"][i], q["low"][i], q["close"][i], q["volume"][i])
            for i, t in enumerate(r["timestamp"][:-1])]
    return [row for row in rows if row[4] is not None]


def aggregate(rows, start: int, step: int) -> list[tuple[int, float, float, float, float, float]]:
    """Independent reference: OHLCV per ``step`` from ``start`` (no project code)."""
    out: dict[int, list] = {}
    for t, o, h, l, c, v in rows:
        k = start + (t - start) // step * step
        if k not in out:
            out[k] = [k, o, h, l, c, v]
        else:
            b = out[k]
            b[2], b[3], b[4], b[5] = max(b[2], h), min(b[3], l), c, b[5] + v
    return [tuple(out[k]) for k in sorted(out)]


def test_grid_follows_new_york_through_dst():
    assert GRID.session == US_EQUITY_SESSION and GRID.clock == Timeframe.parse("30m")
    assert GRID.is_aligned(OPEN_EDT) and not GRID.is_aligned(OPEN_EDT + 1_800_000)
    assert GRID.floor(OPEN_EDT + 59 * 60_000) == OPEN_EDT
    winter_open = 1733149800000  # 2024-12-02 14:30 UTC = 09:30 EST
    assert GRID.is_aligned(winter_open) and GRID.floor(winter_open - 1) == winter_open - HOUR
    # Minute and 30-minute grids and daily stamps are the clock's whatever the session.
    for name in ("1m", "5m", "30m", "1d"):
        tf = Timeframe.parse(name)
        assert tf.on_session(US_EQUITY_SESSION) is tf
    assert H1.on_session(None) is H1 and GRID.on_session(None) == H1
    # A session on whole hours keeps the clock's hourly grid.
    assert H1.on_session(Session.parse("00:00 UTC")) is H1
    with pytest.raises(ValueError):
        Session.parse("9:30 Mars/Olympus")


def test_symbol_map_sessions():
    m = load_symbol_map()
    assert m.grid("AAPL", H1) == GRID and m.grid("NAS100", H1) == GRID
    assert m.grid("UNLISTED", H1) == GRID  # an unlisted symbol is a US stock
    assert m.grid("EURUSD", H1) == H1 and m.grid("BTCUSD", H1) == H1
    custom = parse_symbol_map({"SAP": {"asset_class": "stock", "session": "09:00 Europe/Berlin"},
                               "FX24": {"asset_class": "stock", "session": False}})
    assert custom.grid("SAP", H1) is H1  # 09:00 Berlin sits on the clock's hours
    assert custom.grid("FX24", H1) is H1


def test_validation_accepts_session_bars_and_rejects_clock_bars_for_stocks():
    hours = aggregate(minute_rows(), OPEN_EDT, HOUR)
    bars = [Bar("AAPL", "1h", t, o, h, l, c, float(v), "yahoo") for t, o, h, l, c, v in hours]
    assert [b.t for b in bars] == [OPEN_EDT + i * HOUR for i in range(7)]
    now = OPEN_EDT + 10 * HOUR
    assert all(check_bar(b, GRID, now, 0) is None for b in bars)
    assert all(check_bar(b, H1, now, 0) == "misaligned_time" for b in bars)  # the old behaviour


def test_rebucket_equals_independent_aggregation():
    rows = minute_rows()
    halves = [Bar("AAPL", "30m", t, o, h, l, c, float(v), "polygon")
              for t, o, h, l, c, v in aggregate(rows, OPEN_EDT, 1_800_000)]
    folded = rebucket(halves, ParseContext("AAPL", GRID, "polygon", OPEN_EDT + 10 * HOUR))
    expected = aggregate(rows, OPEN_EDT, HOUR)
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in folded] == [
        (t, o, h, l, c, float(v)) for t, o, h, l, c, v in expected]
    assert {(b.symbol, b.tf, b.src) for b in folded} == {("AAPL", "1h", "polygon")}
    assert folded[-1].t == OPEN_EDT + 6 * HOUR and not folded[-1].forming  # 15:30-16:00, closed
    now = OPEN_EDT + 6 * HOUR + 600_000
    assert rebucket(halves, ParseContext("AAPL", GRID, "polygon", now))[-1].forming
    # A part without volume leaves its hour without volume.
    halves[1].v = None
    assert [b.v for b in rebucket(halves, ParseContext("AAPL", GRID, "polygon", now))[:2]] == [
        None, float(expected[1][5])]


def yahoo_hourly_body() -> bytes:
    """The real chart answer with its minutes folded into Yahoo's hourly (09:30) stamps."""
    doc = json.loads(fixture(AAPL_1M))
    result = doc["chart"]["result"][0]
    hours = aggregate(minute_rows(), OPEN_EDT, HOUR)
    result["timestamp"] = [t // 1000 for t, *_ in hours]
    result["indicators"]["quote"] = [{k: [row[i + 1] for row in hours] for i, k in
                                      enumerate(("open", "high", "low", "close", "volume"))}]
    return json.dumps(doc).encode()


def polygon_halfhour_body() -> bytes:
    halves = aggregate(minute_rows(), OPEN_EDT, 1_800_000)
    results = [{"t": t, "o": o, "h": h, "l": l, "c": c, "v": v} for t, o, h, l, c, v in halves]
    return json.dumps({"ticker": "AAPL", "status": "DELAYED", "results": results,
                       "resultsCount": len(results)}).encode()


@pytest.mark.asyncio
async def test_yahoo_hourly_and_polygon_folded_into_the_session_agree(
    fake: FakeProviders, tmp_path: Path
) -> None:
    fake.default["yahoo"] = Reply(body=yahoo_hourly_body())
    fake.default["polygon"] = Reply(body=polygon_halfhour_body())
    env = {"SIDECAR_YAHOO_BASE_URL": fake.base_url, "SIDECAR_YAHOO_STREAM": "0",
           "POLYGON_API_KEY": "K", "SIDECAR_POLYGON_BASE_URL": fake.base_url}
    start, end = OPEN_EDT - HOUR, OPEN_EDT + 8 * HOUR
    # fetch: Yahoo's own hourly stamps (09:30 ...) validate on the session grid.
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch("yahoo", "AAPL", H1, start, end, Settings(data_dir=tmp_path), env,
                           out=out, err=err)
    assert code == 0 and "rejected" not in err.getvalue(), err.getvalue()
    yahoo = [json.loads(x) for x in out.getvalue().splitlines()]
    # The daemon asks Polygon for the session grid: 30-minute aggregates, folded.
    polygon = build_source("polygon", Settings(), env)
    assert polygon.grid("AAPL", H1) is H1 and polygon.grid("AAPL", GRID) == GRID
    assert polygon.series_grid("AAPL", H1) == GRID
    await polygon.start()
    try:
        folded = await polygon.fetch_history("AAPL", GRID, start, end)
    finally:
        await polygon.close()
    expected = [(t, o, h, l, c, float(v)) for t, o, h, l, c, v in aggregate(minute_rows(), OPEN_EDT, HOUR)]
    assert [(x["t"], x["o"], x["h"], x["l"], x["c"], x["v"]) for x in yahoo] == expected
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in folded] == expected
    assert "/range/30/minute/" in fake.requests_to("polygon")[0].path
    assert fake.requests_to("yahoo")[0].query["interval"] == "60m"


@pytest.mark.asyncio
async def test_fetch_polygon_hourly_prints_its_own_clock_stamps(fake: FakeProviders) -> None:
    rel = "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json"
    fake.default["polygon"] = Reply.fixture(rel)
    env = {"POLYGON_API_KEY": "K", "SIDECAR_POLYGON_BASE_URL": fake.base_url}
    rows = json.loads(fixture(rel))["results"]
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch("polygon", "AAPL", H1, rows[0]["t"], rows[-1]["t"] + HOUR, Settings(), env,
                           out=out, err=err)
    assert code == 0 and "rejected" not in err.getvalue(), err.getvalue()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["t"], x["o"], x["h"], x["l"], x["c"], x["v"]) for x in lines] == [
        (r["t"], float(r["o"]), float(r["h"]), float(r["l"]), float(r["c"]), float(round(r["v"])))
        for r in rows]
    assert "/range/1/hour/" in fake.requests_to("polygon")[0].path


def test_history_validation_uses_the_grid():
    hours = aggregate(minute_rows(), OPEN_EDT, HOUR)
    bars = [Bar("AAPL", "1h", t, o, h, l, c, float(v), "twelvedata") for t, o, h, l, c, v in hours]
    ok, rejected = validate_history(bars, GRID, OPEN_EDT + 10 * HOUR)
    assert len(ok) == 7 and not rejected
