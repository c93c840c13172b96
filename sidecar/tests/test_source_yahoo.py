"""Yahoo: chart fixtures, trailing live entry, errors; yfinance through the fake server; stream."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources._parsing import ParseContext
from sidecar.sources.yahoo import YahooSource, parse_chart
from sidecar.sources.yahoo_stream import YahooStream
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

AAPL_1M = "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json"
RECORDED = 1728043664000  # Fri, 04 Oct 2024 12:07:44 GMT


def ctx(tf, now=RECORDED, hv=True):
    return ParseContext("X", Timeframe.parse(tf), "yahoo", now, hv)


def raw_rows(rel):
    r = json.loads(fixture(rel))["chart"]["result"][0]
    q = r["indicators"]["quote"][0]
    return [(t * 1000, q["open"][i], q["high"][i], q["low"][i], q["close"][i], q["volume"][i])
            for i, t in enumerate(r["timestamp"])]


def test_aapl_1m_nulls_dropped_live_entry_dropped():
    rows = raw_rows(AAPL_1M)
    bars = parse_chart(fixture(AAPL_1M), 200, ctx("1m"), end_ms=1727913600000)
    assert len(rows) == 391
    kept = [r for r in rows[:-1] if r[4] is not None]
    assert len(bars) == len(kept) == 389
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == [tuple(float(x) if i else x for i, x in enumerate(r))
                                                              for r in kept]
    assert bars[0].t == 1727875800000 and bars[-1].t == 1727899140000 and not bars[-1].forming


def test_live_entry_becomes_forming_bar_in_current_period():
    live_t = 1727985600000
    bars = parse_chart(fixture(AAPL_1M), 200, ctx("1m", now=live_t + 20_000), end_ms=1727913600000)
    assert len(bars) == 390 and bars[-1].forming and bars[-1].t == live_t
    assert bars[-1].c == pytest.approx(225.67, abs=1e-3)


def test_entry_at_or_after_the_end_asked_is_the_live_one():
    # Without meta.regularMarketTime, the trailing entry (on the grid) is told apart by the
    # end of the range asked: at or after it, it is the live entry (dropped: not current).
    data = json.loads(fixture(AAPL_1M))
    del data["chart"]["result"][0]["meta"]["regularMarketTime"]
    body = json.dumps(data)
    live_t = 1727985600000
    assert len(parse_chart(body, 200, ctx("1m"), end_ms=live_t)) == 389
    as_a_bar = parse_chart(body, 200, ctx("1m"), end_ms=live_t + 60_000)
    assert len(as_a_bar) == 390 and as_a_bar[-1].t == live_t and not as_a_bar[-1].forming
    assert len(parse_chart(body, 200, ctx("1m"))) == 390
    # Without an end: the entry at meta.regularMarketTime (within a second) is the live one ...
    assert len(parse_chart(fixture(AAPL_1M), 200, ctx("1m"))) == 389
    # ... and so is one off the bar grid, whatever the meta says.
    data["chart"]["result"][0]["timestamp"][-1] += 1
    assert len(parse_chart(json.dumps(data), 200, ctx("1m"))) == 389


def test_body_that_is_not_json_by_status():
    with pytest.raises(ProviderError) as info:
        parse_chart(b"<html>maintenance</html>", 200, ctx("1m"))
    assert (str(info.value), info.value.source) == ("bad_response: body is not JSON: '<html>maintenance</html>'",
                                                     "yahoo")
    with pytest.raises(ProviderError) as info:
        parse_chart(b"<html>maintenance</html>", 201, ctx("1m"))
    assert str(info.value) == "bad_response: HTTP 201 (non-JSON body)"


def _error(code: str | None = "Bad Request", desc: str | None = "Invalid input") -> str:
    err = {k: v for k, v in (("code", code), ("description", desc)) if v is not None}
    return json.dumps({"chart": {"result": None, "error": err}})


DELISTED = "No data found, symbol may be delisted"


@pytest.mark.parametrize(
    ("body", "status", "cls", "message"),
    [(b"Too Many Requests", 429, "rate_limited", "HTTP 429 Too Many Requests"),
     (b"slow down", 429, "rate_limited", "HTTP 429 slow down"),
     (b"Too Many Requests\r\n" + b"x" * 100, 200, "rate_limited", "HTTP 200 Too Many Requests\r\n" + "x" * 61),
     (b"<html>down</html>", 503, "unavailable", "HTTP 503 (non-JSON body)"),
     (b'{"foo": 1}', 500, "unavailable", "HTTP 500 "),
     (b'{"foo": 1}', 200, "bad_response", "no 'chart' object"),
     (_error("Not Found", DELISTED), 404, "unknown_symbol", f"Not Found: {DELISTED}"),
     (_error("Not Found", "x"), 200, "unknown_symbol", "Not Found: x"),
     (_error("Bad Request", "Symbol is delisted"), 200, "unknown_symbol", "Bad Request: Symbol is delisted"),
     (_error("Bad Request", "No data found for this range"), 200, "unknown_symbol",
      "Bad Request: No data found for this range"),
     (_error("Bad Request", "x"), 404, "unknown_symbol", "Bad Request: x"),
     (_error("Internal Server Error", "boom"), 500, "unavailable", "HTTP 500 Internal Server Error: boom"),
     (_error("Unprocessable Entity", "1m data not available for startTime"), 422, "not_entitled",
      "Unprocessable Entity: 1m data not available for startTime"),
     (_error("Unprocessable Entity", "The requested range must be within the last 60 days"), 422,
      "not_entitled", "Unprocessable Entity: The requested range must be within the last 60 days"),
     (_error(), 200, "bad_response", "HTTP 400 Bad Request: Invalid input"),
     (_error(), 403, "not_entitled", "HTTP 403 Bad Request: Invalid input"),
     (_error(code=None), 200, "bad_response", "HTTP 400 : Invalid input"),
     (_error(desc=None), 200, "bad_response", "HTTP 400 Bad Request: "),
     (_error(desc="d" * 300), 200, "bad_response", "HTTP 400 Bad Request: " + "d" * 200),
     (b'{"chart": {"error": "boom"}}', 200, "bad_response", "HTTP 400 : "),
     (b'{"chart": {"result": [], "error": null}}', 200, "bad_response", "chart.result is empty"),
     (b'{"chart": {"result": [1], "error": null}}', 200, "bad_response", "chart.result is empty")],
)
def test_error_answers_with_message_source_and_back_off(body, status, cls, message):
    with pytest.raises(ProviderError) as info:
        parse_chart(body, status, ctx("1m"), retry_after=3.0)
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "yahoo")
    assert err.retry_after == (3.0 if cls in ("rate_limited", "unavailable") else None)


def _chart(stamps: list[int], closes: list[float | None], tz: str = "UTC", **meta) -> str:
    quote = {"open": [c and c - 0.5 for c in closes], "high": [c and c + 1 for c in closes],
             "low": [c and c - 1 for c in closes],
             "close": closes, "volume": [None if c is None else 100 for c in closes]}
    quote["volume"][0] = None  # a row with prices but no volume
    return json.dumps({"chart": {"result": [{
        "meta": {"exchangeTimezoneName": tz, "instrumentType": "EQUITY", **meta},
        "timestamp": stamps, "indicators": {"quote": [quote]}}], "error": None}})


def test_live_entry_updates_the_bar_of_its_period_or_opens_the_next():
    t0 = 1_727_877_600  # 2024-10-02 14:00 UTC, on the 5-minute grid
    rows = [t0 - 300, t0, t0 + 300]
    # The live entry inside the newest bar's period: that bar takes its close and extremes.
    same = parse_chart(_chart([*rows, t0 + 457], [5.0, 10.0, 20.0, 25.0]), 200, ctx("5m", now=(t0 + 460) * 1000))
    assert [(b.t, b.o, b.h, b.l, b.c, b.v, b.forming) for b in same] == [
        ((t0 - 300) * 1000, 4.5, 6.0, 4.0, 5.0, None, False), (t0 * 1000, 9.5, 11.0, 9.0, 10.0, 100.0, False),
        ((t0 + 300) * 1000, 19.5, 25.0, 19.0, 25.0, 100.0, True)]
    low = parse_chart(_chart([*rows, t0 + 457], [5.0, 10.0, 20.0, 15.0]), 200, ctx("5m", now=(t0 + 460) * 1000))
    assert (low[-1].h, low[-1].l, low[-1].c) == (21.0, 15.0, 15.0)
    # In the next period: a new forming bar at the period's open, every price its close.
    nxt = parse_chart(_chart([*rows, t0 + 617], [5.0, 10.0, 20.0, 22.0]), 200, ctx("5m", now=(t0 + 620) * 1000))
    assert [(b.t, b.o, b.h, b.l, b.c, b.forming) for b in nxt[2:]] == [
        ((t0 + 300) * 1000, 19.5, 21.0, 19.0, 20.0, False), ((t0 + 600) * 1000, 22.0, 22.0, 22.0, 22.0, True)]


def test_daily_bar_takes_its_date_in_the_exchange_zone():
    stamp = 1_577_890_800  # 2020-01-01 15:00 UTC = 2020-01-02 00:00 in Tokyo
    bars = parse_chart(_chart([stamp], [10.0], tz="Asia/Tokyo"), 200, ctx("1d"))
    assert [b.t for b in bars] == [1_577_923_200_000]  # 2020-01-02 00:00 UTC
    assert [b.t for b in parse_chart(_chart([stamp], [10.0], tz="Nowhere/Else"), 200, ctx("1d"))] == [
        1_577_836_800_000]  # an unknown zone: UTC's date


def test_daily_stamps_equity_fx_and_split():
    aapl = parse_chart(fixture("yahoo/chart_AAPL_1d_2020-01-01_2020-01-03.json"), 200, ctx("1d"))
    assert [b.t for b in aapl] == [1577923200000]  # 2020-01-02 00:00 UTC (was 14:30 UTC)
    assert aapl[0].c == 75.0875015258789 and aapl[0].v == 135480400.0
    fx = parse_chart(fixture("yahoo/chart_EURUSD=X_1d_2020-01-01_2020-01-03.json"), 200, ctx("1d"))
    assert [b.t for b in fx] == [1577836800000, 1577923200000, 1578009600000]
    assert all(b.v is None for b in fx)
    nvda_rows = raw_rows("yahoo/chart_NVDA_1d_1y_events_split.json")
    nvda = parse_chart(fixture("yahoo/chart_NVDA_1d_1y_events_split.json"), 200, ctx("1d"))
    assert len(nvda) == len([r for r in nvda_rows if r[4] is not None])
    assert all(b.t % 86_400_000 == 0 for b in nvda)


def test_parts_of_the_wrong_shape_read_as_absent():
    """``meta``, ``indicators`` or its quote that is not an object: no bars or no meta,
    never an unclassified error."""
    stamp = 1_577_975_400
    good = json.loads(_chart([stamp], [10.0]))
    result = good["chart"]["result"][0]
    for part, value, bars in (("meta", [result["meta"]], 1), ("indicators", [1], 0),
                              ("indicators", {"quote": {"close": [1.0]}}, 0),
                              ("indicators", {"quote": [[1.0]]}, 0)):
        body = json.loads(json.dumps(good))
        body["chart"]["result"][0][part] = value
        assert len(parse_chart(json.dumps(body), 200, ctx("1d"))) == bars, (part, value)


def test_index_without_timestamps_is_empty():
    assert parse_chart(fixture("yahoo/chart_^VXAPL_index_1d_2020-01-01.json"), 200, ctx("1d")) == []


@pytest.mark.parametrize(
    ("rel", "status", "cls"),
    [("yahoo/chart_error_SI_404_not_found.json", 404, "unknown_symbol"),
     ("yahoo/error_429_edge_too_many_requests.txt", 429, "rate_limited")],
)
def test_error_fixtures(rel, status, cls):
    with pytest.raises(ProviderError) as info:
        parse_chart(fixture(rel), status, ctx("1m"))
    assert info.value.error_class == cls


@pytest.mark.parametrize(
    ("body", "status", "cls"),
    [(b'{"chart":{"result":null,"error":{"code":"Unprocessable Entity","description":"1m data not '
      b'available for startTime=1. The requested range must be within the last 30 days."}}}', 422, "not_entitled"),
     (b'{"chart":{"result":[{"meta":{}', 200, "bad_response"),
     (b"<html>busy</html>", 503, "unavailable")],
)
def test_error_bodies(body, status, cls):
    with pytest.raises(ProviderError) as info:
        parse_chart(body, status, ctx("1m"))
    assert info.value.error_class == cls


def make(fake, budget, tmp_path, stream=False, tickers=()):
    provider = ProviderSettings.from_env({
        "SIDECAR_YAHOO_BASE_URL": fake.base_url, "SIDECAR_YAHOO_STREAM_URL": fake.stream_url,
        "SIDECAR_YAHOO_STREAM": "1" if stream else "0", "SIDECAR_HTTP_TIMEOUT_S": "2",
        "SIDECAR_YAHOO_POLL_S": "60"})
    return YahooSource(provider, load_symbol_map(), budget, cache_dir=tmp_path / "yf",
                       stream_tickers=tickers)


@pytest.mark.asyncio
async def test_history_through_yfinance_and_fake_server(fake: FakeProviders, tmp_path):
    fake.push("yahoo", Reply.fixture(AAPL_1M))
    src = make(fake, RateBudget("yahoo", per_minute=60), tmp_path)
    await src.start()
    try:
        bars = await src.fetch_history("AAPL", Timeframe.parse("1m"), 1727875800000, 1727876400000)
        assert [b.t for b in bars] == [1727875800000 + i * 60_000 for i in range(10)]
        chart = fake.requests_to("yahoo")
        assert chart[0].path == "/v8/finance/chart/AAPL" and chart[0].query["interval"] == "1m"
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_unknown_symbol_cached_and_429(fake: FakeProviders, tmp_path):
    fake.default["yahoo"] = Reply.fixture("yahoo/chart_error_SI_404_not_found.json", 404)
    c = Clock(0.0)
    src = make(fake, RateBudget("yahoo", per_minute=60, clock=c), tmp_path)
    await src.start()
    try:
        with pytest.raises(ProviderError) as info:
            await src.fetch_history("SI", Timeframe.parse("1d"), 0, 10**12)
        assert info.value.error_class == "unknown_symbol"
        n = len(fake.requests_to("yahoo"))
        assert not src.can_serve("SI")
        with pytest.raises(ProviderError):
            await src.fetch_history("SI", Timeframe.parse("1d"), 0, 10**12)
        assert len(fake.requests_to("yahoo")) == n  # known-bad: nothing sent
        fake.default["yahoo"] = Reply.fixture("yahoo/error_429_edge_too_many_requests.txt", 429)
        with pytest.raises(ProviderError) as info:  # every symbol 429'd: the whole call fails
            await src.fetch_latest(["AAPL", "MSFT"], Timeframe.parse("1m"), RECORDED)
        assert info.value.error_class == "rate_limited"
        sent = len(fake.requests_to("yahoo"))
        res = await src.fetch_latest(["AAPL"], Timeframe.parse("1m"), RECORDED)
        assert isinstance(res["AAPL"], BudgetExhausted) and len(fake.requests_to("yahoo")) == sent
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_stream_moves_forming_bar_between_polls(fake: FakeProviders, tmp_path):
    live_t = 1727985600000
    now = live_t + 20_000
    fake.stream_messages = [{"id": "AAPL", "price": 230.5, "time": now + 5_000}]
    fake.default["yahoo"] = Reply.fixture(AAPL_1M)
    src = make(fake, RateBudget("yahoo", per_minute=60), tmp_path, stream=True, tickers=["AAPL"])
    await src.start()
    try:
        first = await src.fetch_latest(["AAPL"], Timeframe.parse("1m"), now)
        assert first["AAPL"][-1].forming and first["AAPL"][-1].c == pytest.approx(225.67, abs=1e-3)
        for _ in range(100):
            if src._stream and src._stream.ticks.get("AAPL"):
                break
            await asyncio.sleep(0.02)
        second = await src.fetch_latest(["AAPL"], Timeframe.parse("1m"), now + 10_000)
        bar = second["AAPL"][-1]
        assert bar.c == pytest.approx(230.5) and bar.h == pytest.approx(230.5)
        assert len(fake.requests_to("yahoo")) == 1  # the second answer came from the stream, not REST
        assert fake.stream_subscriptions and fake.stream_subscriptions[0]["subscribe"] == ["AAPL"]
    finally:
        await src.close()


def test_stream_ignores_bad_and_old_ticks():
    s = YahooStream("ws://127.0.0.1:1/", ["AAPL"])
    s.on_message({"id": "AAPL", "price": 10.0, "time": "2000"})
    s.on_message({"id": "AAPL", "price": 9.0, "time": "1000"})
    s.on_message({"id": "AAPL", "price": -1.0, "time": "3000"})
    s.on_message({"error": "x"})
    assert s.ticks["AAPL"].price == 10.0
