"""Alpha Vantage: parser on every recorded body, error classes, budget, fake server."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources._parsing import ParseContext
from sidecar.sources.alphavantage import AlphaVantageSource, parse_time_series
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

NOW = 1_900_000_000_000
KEY = "AVSECRETKEY123"


def ctx(tf: str = "1m", has_volume: bool = True, now: int = NOW) -> ParseContext:
    return ParseContext("X", Timeframe.parse(tf), "alphavantage", now, has_volume)


def expected(rel: str, tz: str) -> list[tuple[int, float, float, float, float, float | None]]:
    data = json.loads(fixture(rel))
    series = next(v for k, v in data.items() if k.startswith("Time Series"))
    out = []
    for stamp, row in series.items():
        t = int(datetime.fromisoformat(stamp).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)
        vals = [float(v) for k, v in sorted(row.items())]
        out.append((t, *vals))
    return sorted(out)


def test_stock_intraday_fixture_exact():
    rel = "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json"
    bars = parse_time_series(fixture(rel), 200, ctx())
    exp = expected(rel, "America/New_York")
    assert len(bars) == len(exp) == 100
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == exp
    assert bars[-1].t == int(datetime(2017, 12, 18, 19, 56, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert all(not b.forming for b in bars)


def test_fx_intraday_has_no_volume_and_utc():
    bars = parse_time_series(fixture("alphavantage/fx_intraday_EURUSD_5min_2020_trimmed.json"), 200,
                             ctx("5m", has_volume=False))
    assert len(bars) == 1
    b = bars[0]
    assert b.t == int(datetime(2020, 7, 24, 21, 0, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert (b.o, b.h, b.l, b.c, b.v) == (1.1655, 1.1656, 1.1655, 1.1656, None)


def test_legacy_digital_currency_uses_market_price():
    rel = "alphavantage/digital_currency_intraday_BTC_CNY_5min_2017.json"
    data = json.loads(fixture(rel))
    series = data["Time Series (Digital Currency Intraday)"]
    bars = parse_time_series(fixture(rel), 200, ctx("5m"))
    assert len(bars) == len(series) >= 900  # the recording repeats one key
    newest = series["2017-12-20 19:30:00"]
    assert bars[-1].c == float(newest["1a. price (CNY)"]) and bars[-1].v == float(newest["2. volume"])
    assert [b.t for b in bars] == sorted(b.t for b in bars)


def test_forming_bar_marked_when_open():
    rel = "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json"
    last = int(datetime(2017, 12, 18, 19, 56, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    bars = parse_time_series(fixture(rel), 200, ctx(now=last + 30_000))
    assert bars[-1].forming and not any(b.forming for b in bars[:-1])


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        (lambda: fixture("alphavantage/error_note_rate_limit_5_per_min_2019.json"), "rate_limited"),
        (lambda: fixture("alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json"), "unknown_symbol"),
        (lambda: b'{"Information": "Thank you for using Alpha Vantage! Our standard API rate limit is '
                 b'25 requests per day. Please subscribe to any of the premium plans"}', "rate_limited"),
        (lambda: b'{"Information": "Thank you for using Alpha Vantage! This is a premium endpoint."}',
         "not_entitled"),
        (lambda: b'{"Error Message": "the parameter apikey is invalid or missing."}', "auth"),
        (lambda: b'{"Meta Data": {"1. Information": "x"}, "Time Series (1m', "bad_response"),
        (lambda: b"<html>oops</html>", "bad_response"),
    ],
)
def test_error_bodies(body, cls):
    with pytest.raises(ProviderError) as info:
        parse_time_series(body(), 200, ctx())
    assert info.value.error_class == cls


def test_5xx_is_unavailable():
    with pytest.raises(ProviderError) as info:
        parse_time_series(b"bad gateway", 502, ctx())
    assert info.value.error_class == "unavailable"


THANKS = "Thank you for using Alpha Vantage! "


@pytest.mark.parametrize(
    ("key", "text", "cls"),
    [("Note", THANKS, "rate_limited"),
     *[("Information", THANKS + phrase, "rate_limited")
       for phrase in ("Our rate limit is 5", "Please consider call frequency", "25 requests per day",
                      "5 per minute", "5 calls per day", "Consider spreading out your calls")],
     ("Information", THANKS + "The apikey is invalid.", "auth"),
     ("Information", THANKS + "Claim your free API key.", "auth"),
     ("Information", THANKS + "This is a premium endpoint.", "not_entitled"),
     ("Error Message", "Invalid API call.", "unknown_symbol"),
     ("Information", THANKS + "We are upgrading.", "bad_response")],
)
def test_message_classes(key, text, cls):
    text += " " + "." * 200  # the first 200 characters are kept
    with pytest.raises(ProviderError) as info:
        parse_time_series(json.dumps({key: text}), 200, ctx())
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {key}: {text[:200]}", "alphavantage")


@pytest.mark.parametrize(
    ("body", "status", "cls", "message"),
    [(b"x" * 130 + b"  tail", 502, "unavailable", "HTTP 502 " + "x" * 120),
     ("  bad gateway  ", 503, "unavailable", "HTTP 503 bad gateway"),
     (b"<html>oops</html>", 200, "bad_response", "body is not JSON: '<html>oops</html>'"),
     (b"[1]", 200, "bad_response", "answer is not an object"),
     (json.dumps({"Time Series (5min)": {}, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}), 200, "bad_response",
      "no time series in keys ['Time Series (5min)', 'a', 'b', 'c', 'd']"),
     (json.dumps({"Meta Data": {}, "Time Series (5min)": []}), 200, "bad_response",
      "no time series in keys ['Meta Data', 'Time Series (5min)']"),
     (json.dumps({"Meta Data": {}}), 200, "bad_response", "no time series in keys ['Meta Data']")],
)
def test_answers_that_are_not_series(body, status, cls, message):
    with pytest.raises(ProviderError) as info:
        parse_time_series(body, status, ctx())
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "alphavantage")


def test_a_series_with_a_note_beside_it_is_parsed():
    data = json.loads(fixture("alphavantage/time_series_intraday_MSFT_1min_compact_2017.json"))
    data["Information"] = THANKS + "Our rate limit is 5 per minute."
    assert len(parse_time_series(json.dumps(data), 200, ctx())) == 100


def test_rows_without_numbered_keys_and_rows_that_are_not_prices():
    row = {"open": "1", "high": "2", "low": "0.5", "close": "1.5"}
    body = {"Meta Data": {"1. Information": "x"}, "Time Series (1min)": {
        "2020-07-24 20:59:00": "garbage",
        "2020-07-24 20:58:00": {**row, "close": None},
        "2020-07-24 20:57:00": {**row, "volume": "n/a"},
        "2020-07-24 20:56:00": {**row, "volume": "7"},
    }}
    bars = parse_time_series(json.dumps(body), 200, ctx())
    start = int(datetime(2020, 7, 24, 20, 56, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)  # no zone given: UTC
    assert [(b.t, b.c, b.v) for b in bars] == [(start, 1.5, 7.0), (start + 60_000, 1.5, None)]


@pytest.mark.parametrize(("market", "price"), [("CNY", 110_000.0), ("EUR", 17_000.0)])
def test_legacy_digital_currency_price_of_the_market_asked(market, price):
    body = {"Meta Data": {"1. Information": "Intraday Prices", "4. Market Code": market,
                          "7. Time Zone": "UTC"},
            "Time Series (Digital Currency Intraday)": {"2017-12-20 19:30:00": {
                "1b. price (USD)": "17000", "1a. price (CNY)": "110000", "2. volume": "5",
                "3. market cap (USD)": "85000"}}}
    bars = parse_time_series(json.dumps(body), 200, ctx("5m"))
    assert [(b.o, b.h, b.l, b.c, b.v) for b in bars] == [(price, price, price, price, 5.0)]


def make_source(fake: FakeProviders, budget: RateBudget | None = None) -> AlphaVantageSource:
    provider = ProviderSettings.from_env({"ALPHAVANTAGE_API_KEY": KEY,
                                          "SIDECAR_ALPHAVANTAGE_BASE_URL": fake.base_url})
    return AlphaVantageSource(provider, load_symbol_map(), budget or RateBudget("alphavantage", per_day=25))


@pytest.mark.asyncio
async def test_fetch_through_fake_server(fake: FakeProviders):
    fake.default["av"] = Reply.fixture("alphavantage/time_series_intraday_MSFT_1min_compact_2017.json")
    src = make_source(fake)
    try:
        start = int(datetime(2017, 12, 18, 19, 0, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
        bars = await src.fetch_history("MSFT", Timeframe.parse("1m"), start, start + 10 * 60_000)
        assert [b.t for b in bars] == [start + i * 60_000 for i in range(10)]
        seen = fake.requests_to("av")
        assert seen[0].query["function"] == "TIME_SERIES_INTRADAY" and seen[0].query["symbol"] == "MSFT"
        # FX goes out as FX_INTRADAY from/to
        fake.push("av", Reply.fixture("alphavantage/fx_intraday_EURUSD_5min_2020_trimmed.json"))
        res = await src.fetch_latest(["EURUSD"], Timeframe.parse("5m"), NOW)
        assert fake.requests_to("av")[-1].query["from_symbol"] == "EUR"
        assert isinstance(res["EURUSD"], list) and res["EURUSD"][0].v is None
        assert KEY not in json.dumps(src.status())
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_budget_refusal_sends_nothing(fake: FakeProviders):
    fake.default["av"] = Reply.fixture("alphavantage/time_series_intraday_MSFT_1min_compact_2017.json")
    t = Clock(0.0)
    budget = RateBudget("alphavantage", per_second=1, per_day=25, clock=t,
                        wall_clock=lambda: 1_700_000_000.0)
    src = make_source(fake, budget)
    try:
        res = await src.fetch_latest(["MSFT", "AAPL"], Timeframe.parse("1m"), NOW)
        assert isinstance(res["MSFT"], list)
        assert isinstance(res["AAPL"], BudgetExhausted) and res["AAPL"].error_class == "rate_limited"
        assert len(fake.requests_to("av")) == 1
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_rate_limit_note_backs_off_and_timeouts_are_unavailable(fake: FakeProviders):
    t = Clock(0.0)
    budget = RateBudget("alphavantage", per_day=25, clock=t)
    provider = ProviderSettings.from_env({"ALPHAVANTAGE_API_KEY": KEY, "SIDECAR_HTTP_TIMEOUT_S": "0.3",
                                          "SIDECAR_ALPHAVANTAGE_BASE_URL": fake.base_url})
    src = AlphaVantageSource(provider, load_symbol_map(), budget)
    try:
        fake.push("av", Reply.fixture("alphavantage/error_note_rate_limit_5_per_min_2019.json"))
        with pytest.raises(ProviderError) as info:
            await src.fetch_latest(["MSFT"], Timeframe.parse("1m"), NOW)
        assert info.value.error_class == "rate_limited"
        assert budget.remaining() == 0  # backing off: the next call sends nothing
        res = await src.fetch_latest(["MSFT"], Timeframe.parse("1m"), NOW)
        assert isinstance(res["MSFT"], BudgetExhausted) and len(fake.requests_to("av")) == 1
        t.advance(61)
        fake.push("av", Reply(delay_s=2.0))
        with pytest.raises(ProviderError) as info:
            await src.fetch_latest(["MSFT"], Timeframe.parse("1m"), NOW)
        assert info.value.error_class == "unavailable" and KEY not in str(info.value)
    finally:
        await src.close()


def test_build_without_key_is_disabled():
    from sidecar.settings import Settings
    from sidecar.sources import SourceDisabled
    from sidecar.sources._http import Providers
    from sidecar.sources.alphavantage import build

    with pytest.raises(SourceDisabled, match="ALPHAVANTAGE_API_KEY missing"):
        build(Settings(), Providers.from_env({}))
