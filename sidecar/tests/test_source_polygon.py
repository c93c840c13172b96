"""Polygon: aggregates fixtures, exponent volumes, null results, NOT_AUTHORIZED, next_url."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import BudgetExhausted, RateBudget
from sidecar.sources._parsing import ParseContext
from sidecar.sources.polygon import PolygonSource, parse_aggs, rebase_url
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

NOW = 1_900_000_000_000
KEY = "POLYSECRET42"


def ctx(tf, hv=True):
    return ParseContext("AAPL", Timeframe.parse(tf), "polygon", NOW, hv)


def test_daily_exponent_volume_and_dates():
    rel = "polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json"
    raw = json.loads(fixture(rel))["results"]
    bars, nxt = parse_aggs(fixture(rel), 200, ctx("1d"))
    assert nxt is None and len(bars) == len(raw) == 6
    # 05:00 UTC (= 00:00 New York) stamps become 00:00 UTC of the same date
    assert [b.t for b in bars] == [r["t"] - 5 * 3_600_000 for r in raw]
    assert bars[0].t == int(datetime(2023, 1, 3, tzinfo=UTC).timestamp() * 1000)
    assert bars[0].v == 112_117_471.0
    assert [(b.o, b.h, b.l, b.c) for b in bars] == [(r["o"], r["h"], r["l"], r["c"]) for r in raw]


def test_hourly_delayed_status_is_not_an_error():
    rel = "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json"
    raw = json.loads(fixture(rel))["results"]
    bars, _ = parse_aggs(fixture(rel), 200, ctx("1h"))
    assert len(bars) == len(raw) == 16
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == [
        (r["t"], r["o"], r["h"], r["l"], r["c"], float(r["v"])) for r in raw]


def test_spec_example_next_url_and_null_results():
    bars, nxt = parse_aggs(fixture("polygon/spec_aggs_range_AAPL_1day_next_url.json"), 200, ctx("1d"))
    assert len(bars) == 2 and nxt is not None and nxt.startswith("https://api.massive.com/")
    assert rebase_url(nxt, "http://127.0.0.1:9/base").startswith("http://127.0.0.1:9/base/v2/aggs/")
    assert parse_aggs(fixture("polygon/aggs_empty_results_null.json"), 200, ctx("1d")) == ([], None)


def test_crypto_fractional_volume_is_kept_as_given():
    body = b'{"status": "OK", "results": [{"o": 64000.5, "h": 64010, "l": 63990.25, "c": 64001, ' \
           b'"v": 0.53412345, "t": 1700000040000}, {"o": 1, "h": 1, "l": 1, "c": 1, "v": 1.5e-07, ' \
           b'"t": 1700000100000}]}'
    bars, _ = parse_aggs(body, 200, ctx("1m"), asset_class="crypto")
    assert [b.v for b in bars] == [0.53412345, 1.5e-07]


def test_daily_dates_are_new_york_dates_for_stocks_utc_dates_for_fx():
    t = int(datetime(2024, 1, 3, 2, tzinfo=UTC).timestamp() * 1000)  # 2024-01-02 21:00 in New York
    body = json.dumps({"status": "OK", "results": [{"o": 1.1, "h": 1.2, "l": 1.0, "c": 1.15, "v": 1, "t": t}]})
    day = 86_400_000
    assert [b.t for b in parse_aggs(body, 200, ctx("1d"))[0]] == [t - 2 * 3_600_000 - day]  # a stock unless told
    assert [b.t for b in parse_aggs(body, 200, ctx("1d"), asset_class="fx")[0]] == [t - 2 * 3_600_000]


def test_forming_from_the_open_until_the_next_bar_opens():
    t = 1_700_000_040_000
    body = json.dumps({"status": "OK", "results": [{"o": 1.1, "h": 1.2, "l": 1.0, "c": 1.15, "v": 1, "t": t}]})
    for now, forming in ((t - 1, False), (t, True), (t + 59_999, True), (t + 60_000, False)):
        c = ParseContext("AAPL", Timeframe.parse("1m"), "polygon", now, True)
        assert parse_aggs(body, 200, c)[0][0].forming is forming, now


ROW = {"o": 1.1, "h": 1.2, "l": 1.0, "c": 1.15, "v": 1, "t": 1_700_000_040_000}


@pytest.mark.parametrize(
    ("body", "cls", "message"),
    [([1], "bad_response", "answer is not an object"),
     ({"status": "ERROR", "error": "Internal"}, "unavailable", "HTTP 502 ERROR Internal"),
     ({"status": "error", "error": "Internal"}, "unavailable", "HTTP 502 error Internal"),
     ({"status": "OK", "results": {"a": 1}}, "bad_response", "results is not a list")],
)
def test_error_answers_on_200(body, cls, message):
    with pytest.raises(ProviderError) as info:
        parse_aggs(json.dumps(body), 200, ctx("1m"), retry_after=3.0)
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "polygon")
    assert err.retry_after == (3.0 if cls == "unavailable" else None)


def test_rows_are_kept_whatever_the_status_says_and_bad_rows_dropped():
    body = {"status": "ERROR", "next_url": "", "results": [1, {**ROW, "c": None}, {**ROW, "v": "n/a"}]}
    bars, nxt = parse_aggs(json.dumps(body), 200, ctx("1m"))
    assert [(b.t, b.c, b.v) for b in bars] == [(ROW["t"], 1.15, None)] and nxt is None
    assert parse_aggs(json.dumps({"results": [ROW], "next_url": 5}), 200, ctx("1m"))[1] is None


@pytest.mark.parametrize("asset_class", ["stock", "etf", "index"])
def test_daily_dates_of_us_listings_are_new_york_dates(asset_class):
    t = int(datetime(2024, 1, 3, 2, tzinfo=UTC).timestamp() * 1000)  # 2024-01-02 21:00 in New York
    body = json.dumps({"status": "OK", "results": [{**ROW, "t": t}]})
    assert [b.t for b in parse_aggs(body, 200, ctx("1d"), asset_class=asset_class)[0]] == [
        int(datetime(2024, 1, 2, tzinfo=UTC).timestamp() * 1000)]


def test_fx_volume_is_none():
    body = {"status": "OK", "results": [{"o": 1.1, "h": 1.2, "l": 1.0, "c": 1.15, "v": 345, "t": 1_700_000_040_000}]}
    bars, _ = parse_aggs(json.dumps(body), 200, ctx("1m", hv=False), asset_class="fx")
    assert bars[0].v is None


PLAN = "Your plan doesn't include this data timeframe. Please upgrade your plan at https://polygon.io/pricing"


@pytest.mark.parametrize(
    ("body", "status", "cls", "message"),
    [(lambda: fixture("polygon/error_403_NOT_AUTHORIZED_timeframe.json"), 403, "not_entitled",
      f"HTTP 403 NOT_AUTHORIZED {PLAN}"),
     # A NOT_AUTHORIZED body is read as such whatever the HTTP status.
     (lambda: json.dumps({"status": "NOT_AUTHORIZED", "message": PLAN}), 400, "not_entitled",
      f"HTTP 400 NOT_AUTHORIZED {PLAN}"),
     (lambda: json.dumps({"status": "NOT_AUTHORIZED", "message": PLAN}), 200, "not_entitled",
      f"HTTP 403 NOT_AUTHORIZED {PLAN}"),
     (lambda: b'{"status":"ERROR","request_id":"x","error":"Unknown API Key"}', 401, "auth",
      "HTTP 401 ERROR Unknown API Key"),
     (lambda: b'{"status":"NOT_AUTHORIZED","message":"Unknown API Key"}', 403, "auth",
      "HTTP 403 NOT_AUTHORIZED Unknown API Key"),
     (lambda: b'{"status":"ERROR","message":"API Key was not provided"}', 403, "auth",
      "HTTP 403 ERROR API Key was not provided"),
     (lambda: b'{"status":"ERROR","message":"Invalid apikey"}', 403, "auth", "HTTP 403 ERROR Invalid apikey"),
     (lambda: b'{"status":"ERROR","message":"Not authorized."}', 403, "auth", "HTTP 403 ERROR Not authorized."),
     (lambda: b'{"status":"ERROR","message":"Not authorized for this plan"}', 403, "not_entitled",
      "HTTP 403 ERROR Not authorized for this plan"),
     (lambda: b'{"status":"ERROR","message":"Not authorized for this plan"}', 401, "auth",
      "HTTP 401 ERROR Not authorized for this plan"),
     (lambda: b'{"status":"ERROR","message":"You are not entitled to this data"}', 403, "not_entitled",
      "HTTP 403 ERROR You are not entitled to this data"),
     (lambda: json.dumps({"status": "ERROR", "message": "x" * 300}), 403, "not_entitled",
      "HTTP 403 ERROR " + "x" * 240),
     (lambda: b'{"status":"ERROR","error":"You\'ve exceeded the maximum requests per minute"}', 429,
      "rate_limited", "HTTP 429 ERROR You've exceeded the maximum requests per minute"),
     (lambda: b'{"status":"NOT_FOUND","message":"Unknown ticker"}', 404, "unknown_symbol",
      "HTTP 404 NOT_FOUND Unknown ticker"),
     (lambda: b'{"status":"ERROR"}', 500, "unavailable", "HTTP 500 ERROR"),
     (lambda: b'{"status":"OK","results":[{"o":1', 200, "bad_response", "body is not JSON: '{\"status\":\"OK\",\"results\":[{\"o\":1'"),
     (lambda: b"<html>502</html>", 502, "unavailable", "HTTP 502 ")],
)
def test_errors(body, status, cls, message):
    with pytest.raises(ProviderError) as info:
        parse_aggs(body(), status, ctx("1d"), retry_after=3.0)
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "polygon")
    assert err.retry_after == (3.0 if cls in ("rate_limited", "unavailable") else None)


def make(fake, budget):
    provider = ProviderSettings.from_env({"POLYGON_API_KEY": KEY, "SIDECAR_POLYGON_BASE_URL": fake.base_url})
    return PolygonSource(provider, load_symbol_map(), budget)


@pytest.mark.asyncio
async def test_history_follows_next_url_with_bearer(fake: FakeProviders):
    page1 = json.loads(fixture("polygon/spec_aggs_range_AAPL_1day_next_url.json"))
    page2 = json.loads(fixture("polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json"))
    fake.push("polygon", Reply.json(page1), Reply.json(page2))
    c = Clock(0.0)
    src = make(fake, RateBudget("polygon", per_minute=5, clock=c))
    try:
        bars = await src.fetch_history("AAPL", Timeframe.parse("1d"), 0, NOW)
        assert len(bars) == 8
        seen = fake.requests_to("polygon")
        assert len(seen) == 2
        assert seen[0].path.startswith("/v2/aggs/ticker/AAPL/range/1/day/0/")
        assert seen[1].query.get("cursor") == "bGltaXQ9MiZzb3J0PWFzYw"
        assert all(s.headers["Authorization"] == f"Bearer {KEY}" and KEY not in s.url for s in seen)
    finally:
        await src.close()


@pytest.mark.asyncio
async def test_budget_and_symbol_spelling(fake: FakeProviders):
    fake.default["polygon"] = Reply.fixture("polygon/aggs_empty_results_null.json")
    c = Clock(0.0)
    src = make(fake, RateBudget("polygon", per_minute=2, clock=c))
    try:
        res = await src.fetch_latest(["EURUSD", "BTCUSD", "AAPL"], Timeframe.parse("1m"), NOW)
        assert res["EURUSD"] == [] and res["BTCUSD"] == []
        assert isinstance(res["AAPL"], BudgetExhausted)
        paths = [s.path for s in fake.requests_to("polygon")]
        assert paths[0].startswith("/v2/aggs/ticker/C:EURUSD/") and paths[1].startswith("/v2/aggs/ticker/X:BTCUSD/")
        assert len(paths) == 2
        fake.push("polygon", Reply(status=500, body=b"oops"))
        c.advance(60)
        with pytest.raises(ProviderError) as info:
            await src.fetch_latest(["AAPL"], Timeframe.parse("1m"), NOW)
        assert info.value.error_class == "unavailable"
    finally:
        await src.close()
