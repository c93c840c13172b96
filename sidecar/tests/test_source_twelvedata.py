"""Twelve Data: fixtures parse exactly, batch with a failing symbol, error classes, budget."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources._parsing import ParseContext
from sidecar.sources.twelvedata import TwelveDataSource, parse_batch, parse_time_series
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

NOW = 1_900_000_000_000
KEY = "TDSECRET999"


def ctx(tf="1min", hv=True):
    return ParseContext("X", Timeframe.parse(tf.replace("min", "m").replace("1day", "1d")), "twelvedata",
                        NOW, hv)


def test_aapl_1min_exact():
    raw = json.loads(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"))
    bars = parse_time_series(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"), 200, ctx())
    ny = ZoneInfo("America/New_York")
    exp = sorted(
        (int(datetime.fromisoformat(v["datetime"]).replace(tzinfo=ny).timestamp() * 1000),
         float(v["open"]), float(v["high"]), float(v["low"]), float(v["close"]), float(v["volume"]))
        for v in raw["values"]
    )
    assert len(bars) == len(raw["values"]) == 30
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == exp
    assert bars[-1].t == int(datetime(2023, 8, 24, 15, 9, tzinfo=UTC).timestamp() * 1000)


def test_batch_fx_daily_exact_and_no_volume():
    body = fixture("twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json")
    raw = json.loads(body)
    ctxs = {k: ParseContext(k, Timeframe.parse("1d"), "twelvedata", NOW, False) for k in raw}
    out = parse_batch(body, 200, ctxs)
    for k, series in raw.items():
        bars = out[k]
        assert isinstance(bars, list) and len(bars) == len(series["values"]) == 4
        assert [b.t for b in bars] == sorted(
            int(datetime.fromisoformat(v["datetime"]).replace(tzinfo=UTC).timestamp() * 1000)
            for v in series["values"])
        assert bars[-1].c == float(series["values"][0]["close"]) and all(b.v is None for b in bars)
        assert all(b.t % 86_400_000 == 0 for b in bars)


def test_one_symbol_fails_inside_batch():
    body = json.loads(fixture("twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json"))
    body["USD/EUR"] = {"code": 400, "message": "**symbol** not found: USD/EUR", "status": "error"}
    ctxs = {k: ParseContext(k, Timeframe.parse("1d"), "twelvedata", NOW, False) for k in body}
    out = parse_batch(json.dumps(body), 200, ctxs)
    assert isinstance(out["USD/EUR"], ProviderError) and out["USD/EUR"].error_class == "unknown_symbol"
    assert isinstance(out["USD/CZK"], list) and len(out["USD/CZK"]) == 4


@pytest.mark.parametrize(
    ("rel", "status", "cls"),
    [("twelvedata/error_401_invalid_apikey.json", 200, "auth"),
     ("twelvedata/error_401_invalid_apikey.json", 401, "auth"),
     ("twelvedata/error_429_out_of_credits_minute.json", 200, "rate_limited"),
     ("twelvedata/error_429_out_of_credits_minute.json", 429, "rate_limited"),
     ("twelvedata/error_404_page_not_found_unknown_path.json", 404, "bad_response")],
)
def test_error_fixtures(rel, status, cls):
    with pytest.raises(ProviderError) as info:
        parse_time_series(fixture(rel), status, ctx())
    assert info.value.error_class == cls


@pytest.mark.parametrize(
    ("body", "status", "cls"),
    [(b'{"code":403,"message":"available starting with Grow plan","status":"error"}', 200, "not_entitled"),
     (b'{"code":500,"message":"internal","status":"error"}', 200, "unavailable"),
     (b'{"meta":{"symbol":"AAPL"},"values":[{"datetime":"2023-08-24 11:09:00","open":"1"', 200, "bad_response"),
     (b"upstream down", 503, "unavailable")],
)
def test_error_bodies(body, status, cls):
    with pytest.raises(ProviderError) as info:
        parse_time_series(body, status, ctx())
    assert info.value.error_class == cls


def test_null_rows_dropped():
    body = {"meta": {"exchange_timezone": "UTC"}, "status": "ok", "values": [
        {"datetime": "2024-01-02 10:01:00", "open": None, "high": None, "low": None, "close": None},
        {"datetime": "2024-01-02 10:00:00", "open": "1", "high": "2", "low": "0.5", "close": "1.5",
         "volume": "10"}]}
    bars = parse_time_series(json.dumps(body), 200, ctx())
    assert len(bars) == 1 and bars[0].v == 10.0


def make(fake, budget):
    provider = ProviderSettings.from_env({"TWELVEDATA_API_KEY": KEY,
                                          "SIDECAR_TWELVEDATA_BASE_URL": fake.base_url})
    return TwelveDataSource(provider, load_symbol_map(), budget)


@pytest.mark.asyncio
async def test_batch_within_credit_budget(fake: FakeProviders):
    c = Clock(0.0)
    budget = RateBudget("twelvedata", per_minute=3, per_day=800, clock=c,
                        wall_clock=lambda: 1_700_000_000.0)
    src = make(fake, budget)
    body = {
        "EUR/USD": {"meta": {"symbol": "EUR/USD"}, "status": "ok", "values": [
            {"datetime": "2024-01-02 10:00:00", "open": "1.1", "high": "1.2", "low": "1.0", "close": "1.15"}]},
        "AAPL": {"code": 404, "message": "symbol not found", "status": "error"},
        "MSFT": {"meta": {"symbol": "MSFT", "exchange_timezone": "America/New_York"}, "status": "ok",
                 "values": [{"datetime": "2024-01-02 10:00:00", "open": "1", "high": "2", "low": "1",
                             "close": "2", "volume": "5"}]},
    }
    fake.push("td", Reply.json(body))
    try:
        res = await src.fetch_latest(["EURUSD", "AAPL", "MSFT", "NVDA", "XAUUSD"], Timeframe.parse("1m"), NOW)
        seen = fake.requests_to("td")
        assert len(seen) == 1 and seen[0].query["symbol"] == "EUR/USD,AAPL,MSFT"
        assert KEY not in seen[0].url and seen[0].headers["Authorization"] == f"apikey {KEY}"
        assert isinstance(res["EURUSD"], list) and res["EURUSD"][0].v is None
        assert isinstance(res["AAPL"], ProviderError) and res["AAPL"].error_class == "unknown_symbol"
        assert isinstance(res["MSFT"], list) and res["MSFT"][0].t == int(
            datetime(2024, 1, 2, 15, 0, tzinfo=UTC).timestamp() * 1000)
        assert isinstance(res["NVDA"], BudgetExhausted) and isinstance(res["XAUUSD"], BudgetExhausted)
        res = await src.fetch_latest(["NVDA"], Timeframe.parse("1m"), NOW)
        assert isinstance(res["NVDA"], BudgetExhausted) and len(fake.requests_to("td")) == 1
        assert src.status()["budget"]["day_used"] == 3
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_429_whole_batch_raises_and_backs_off(fake: FakeProviders):
    c = Clock(0.0)
    budget = RateBudget("twelvedata", per_minute=8, clock=c)
    src = make(fake, budget)
    fake.push("td", Reply.fixture("twelvedata/error_429_out_of_credits_minute.json", 429,
                                  headers={"Retry-After": "17"}))
    try:
        with pytest.raises(ProviderError) as info:
            await src.fetch_latest(["AAPL", "MSFT"], Timeframe.parse("1m"), NOW)
        assert info.value.error_class == "rate_limited" and info.value.retry_after == 17
        assert budget.remaining() == 0
        c.advance(17)
        assert budget.remaining() > 0
    finally:
        await src.close()


def test_closed_rows_are_parsed_once_and_revisions_are_not_missed():
    """A repeated closed row gets its bar back; a changed one, the forming one and a
    shifted zone are parsed anew; every answer equals the parse without the memo."""
    from sidecar.sources.twelvedata import ClosedRows

    body = fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json")
    newest = parse_time_series(body, 200, ctx())[-1].t
    now = newest + 30_000  # the newest row is still forming
    c = ParseContext("X", Timeframe.parse("1m"), "twelvedata", now, True)
    memo = ClosedRows()
    first = parse_batch(body, 200, {"X": c}, memo=memo)["X"]
    again = parse_batch(body, 200, {"X": c}, memo=memo)["X"]
    plain = parse_batch(body, 200, {"X": c})["X"]
    assert isinstance(first, list) and isinstance(again, list) and isinstance(plain, list)
    assert [b.to_json_dict() for b in again] == [b.to_json_dict() for b in plain]
    assert again[-1].forming and again[-1] is not first[-1]  # the forming bar: always parsed
    assert all(a is b for a, b in zip(again[-1 - ClosedRows.PER_SERIES:-1],
                                      first[-1 - ClosedRows.PER_SERIES:-1], strict=True))
    assert len(memo) == ClosedRows.PER_SERIES  # bounded per series

    raw = json.loads(body)
    raw["values"][1]["close"] = "999.5"  # a correction of the newest closed bar
    revised = parse_batch(json.dumps(raw), 200, {"X": c}, memo=memo)["X"]
    assert isinstance(revised, list) and revised[-2].c == 999.5 and revised[-3] is first[-3]
    raw["meta"]["exchange_timezone"] = "UTC"  # another zone: other open times, parsed anew
    shifted = parse_batch(json.dumps(raw), 200, {"X": c}, memo=memo)["X"]
    assert isinstance(shifted, list) and shifted[-3] is not first[-3]
    assert shifted[-3].t == first[-3].t - 4 * 3_600_000


def test_volume_of_the_wrong_type_is_dropped_not_raised():
    body = {"values": [{"datetime": "2023-08-24 09:30:00", "open": "1", "high": "2", "low": "0.5",
                        "close": "1.5", "volume": [1, 2]}],
            "meta": {"exchange_timezone": "America/New_York"}, "status": "ok"}
    bars = parse_time_series(json.dumps(body), 200, ctx())
    assert len(bars) == 1 and bars[0].v is None and bars[0].c == 1.5


def _minute_body(*tickers: str, rows: int, now_ms: int) -> dict[str, object]:
    """A batch answer of ``rows`` 1-minute rows per ticker (UTC stamps), newest first."""
    current = now_ms - now_ms % 60_000
    values = [{"datetime": datetime.fromtimestamp((current - k * 60_000) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"),
               "open": "1", "high": "2", "low": "1", "close": "1.5", "volume": "3"} for k in range(rows)]
    return {t: {"meta": {"symbol": t, "exchange_timezone": "UTC"}, "status": "ok", "values": values}
            for t in tickers}


@pytest.mark.asyncio
async def test_rows_asked_cover_what_was_not_seen_closed(fake: FakeProviders):
    """Three rows for a symbol never answered; then the forming bar alone, plus the bars
    closed since the least recently answered symbol of the request (their final values)
    or within the revision window; never more than MAX_LATEST_BARS."""
    from sidecar.sources.twelvedata import LATEST_BARS, MAX_LATEST_BARS, REVISION_WINDOW_MS

    src = make(fake, RateBudget("twelvedata", per_minute=10**6, per_day=10**9))
    tf = Timeframe.parse("1m")
    start = NOW - NOW % 60_000 + 20_000  # 20 s into a minute

    async def asked(symbols: list[str], now_ms: int, rows_in_body: int) -> int:
        fake.push("td", Reply.json(_minute_body("AAPL", "MSFT", rows=rows_in_body, now_ms=now_ms)))
        res = await src.fetch_latest(symbols, tf, now_ms)
        assert all(isinstance(v, list) for v in res.values())
        return int(fake.requests_to("td")[-1].query["outputsize"])

    try:
        assert await asked(["AAPL", "MSFT"], start, 3) == LATEST_BARS  # never answered
        assert await asked(["AAPL", "MSFT"], start + 1_000, 1) == 1  # same minute: forming only
        # 1 s after the close: the closed bar's final values, and the new forming bar ...
        assert await asked(["AAPL", "MSFT"], start + 41_000, 2) == 2
        # ... asked again within the revision window after the close, then not.
        assert await asked(["AAPL", "MSFT"], start + 40_000 + REVISION_WINDOW_MS - 1_000, 2) == 2
        assert await asked(["AAPL", "MSFT"], start + 40_000 + REVISION_WINDOW_MS + 1_000, 1) == 1
        # MSFT alone, answered 3 minutes later: the bars it has not seen closed.
        later = start + 40_000 + REVISION_WINDOW_MS + 1_000 + 180_000
        assert await asked(["MSFT"], later, 4) == 4
        # A request asks as far back as its least recently answered symbol needs.
        assert await asked(["AAPL", "MSFT"], later + 1_000, 4) == 4
        assert await asked(["AAPL", "MSFT"], later + 2_000, 1) == 1
        # A long outage is gap repair's: a cycle never asks more than MAX_LATEST_BARS.
        assert await asked(["AAPL"], later + 3 * 3_600_000, MAX_LATEST_BARS) == MAX_LATEST_BARS
    finally:
        await src.close()
