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
from sidecar.sources.twelvedata import (
    ClosedRows,
    TwelveDataSource,
    classify_error,
    parse_batch,
    parse_time_series,
)
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


CREDITS = "You have run out of API credits for the current minute."
KEY_WRONG = "**apikey** parameter is incorrect or not specified."


@pytest.mark.parametrize(
    ("obj", "http", "cls", "message"),
    [({"code": 429, "message": "Too many"}, 200, "rate_limited", "429 Too many"),
     ({"code": 400, "message": CREDITS}, 200, "rate_limited", f"400 {CREDITS}"),
     ({"code": 401, "message": "who are you"}, 200, "auth", "401 who are you"),
     ({"code": 400, "message": "**apikey** parameter is incorrect"}, 200, "auth",
      "400 **apikey** parameter is incorrect"),
     ({"code": 400, "message": "**apikey** not specified"}, 200, "auth", "400 **apikey** not specified"),
     ({"code": 400, "message": "the apikey is fine"}, 200, "bad_response", "400 the apikey is fine"),
     ({"code": 400, "message": "incorrect interval"}, 200, "bad_response", "400 incorrect interval"),
     ({"code": 403, "message": "no"}, 200, "not_entitled", "403 no"),
     ({"code": 400, "message": "Please upgrade"}, 200, "not_entitled", "400 Please upgrade"),
     ({"code": 400, "message": "**symbol** is available starting with Grow plan"}, 200, "not_entitled",
      "400 **symbol** is available starting with Grow plan"),
     ({"code": 400, "message": "pick a plan"}, 200, "bad_response", "400 pick a plan"),
     ({"code": 400, "message": "not available"}, 200, "bad_response", "400 not available"),
     ({"code": 404, "message": "page not found"}, 200, "bad_response", "404 page not found"),
     ({"code": 404, "message": "not found", "status": "error"}, 200, "unknown_symbol", "404 not found"),
     ({"code": 400, "message": "**symbol** not found", "status": "error"}, 200, "unknown_symbol",
      "400 **symbol** not found"),
     ({"code": 405, "message": "**symbol** wrong method", "status": "error"}, 200, "bad_response",
      "405 **symbol** wrong method"),
     ({"code": 409, "message": "conflict", "status": "error"}, 200, "bad_response", "409 conflict"),
     ({"code": 500, "message": "internal"}, 200, "unavailable", "500 internal"),
     ({"code": 503}, 200, "unavailable", "503 "),
     ({"message": "gateway"}, 502, "unavailable", "502 gateway"),
     ({"code": None, "message": "gateway"}, 502, "unavailable", "502 gateway"),
     ({"code": "abc", "message": "gateway"}, 502, "unavailable", "502 gateway"),
     ({"code": 1e400, "message": "gateway"}, 502, "unavailable", "502 gateway"),
     ({"code": 499, "message": "x" * 300}, 200, "bad_response", "499 " + "x" * 240)],
)
def test_error_classes(obj, http, cls, message):
    err = classify_error(obj, http, retry_after=3.0)
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "twelvedata")
    assert err.retry_after == (3.0 if cls in ("rate_limited", "unavailable") else None)


@pytest.mark.parametrize(
    ("body", "status", "cls", "message"),
    [(b'{"code":429,"message":"Too many","status":"error"}', 200, "rate_limited", "429 Too many"),
     (b'{"code":"abc","message":"gateway","status":"error"}', 502, "unavailable", "502 gateway"),
     (b'{"message":"bad gateway"}', 502, "unavailable", "HTTP 502 "),
     (b'{"code":500,"meta":{},"values":[]}', 500, "unavailable", "HTTP 500 "),
     (b'{"meta":{},"values":[]}', 503, "unavailable", "HTTP 503 "),
     (b"upstream down", 503, "unavailable", "HTTP 503 (non-JSON body)"),
     (b"[1, 2]", 200, "bad_response", "answer is not an object"),
     (b'{"status":"error","message":"**symbol** XYZ not found"}', 200, "bad_response",
      "200 **symbol** XYZ not found"),
     (b'{"status":"error","code":"abc","message":"x"}', 200, "bad_response", "200 x"),
     (b'{"meta":{"symbol":"X"},"status":"ok"}', 200, "bad_response", "series without values"),
     (b'{"meta":["America/New_York"],"values":[],"status":"ok"}', 200, "bad_response",
      "series meta is not an object")],
)
def test_error_answers_keep_message_source_and_back_off(body, status, cls, message):
    with pytest.raises(ProviderError) as info:
        parse_time_series(body, status, ctx(), retry_after=3.0)
    err = info.value
    assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "twelvedata")
    assert err.retry_after == (3.0 if cls in ("rate_limited", "unavailable") else None)


def test_one_symbol_answer_without_values_is_refused_whole():
    with pytest.raises(ProviderError) as info:
        parse_batch(b'{"meta":{"symbol":"X"},"status":"ok"}', 200, {"X": ctx()})
    assert str(info.value) == "bad_response: series without values"


def test_a_whole_batch_refused_keeps_the_back_off():
    with pytest.raises(ProviderError) as info:
        parse_batch(b'{"code":429,"message":"Too many","status":"error"}', 429, {"X": ctx(), "Y": ctx()},
                    retry_after=3.0)
    assert (info.value.error_class, info.value.retry_after) == ("rate_limited", 3.0)


def test_errors_inside_a_batch_are_per_symbol():
    good = json.loads(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"))
    body = json.dumps({"A": good, "B": {"code": 400, "message": "**symbol** not found"},
                       "C": {"status": "error", "message": "nope"}, "D": {"meta": {}, "status": "ok"}})
    ctxs = {k: ParseContext(k, Timeframe.parse("1m"), "twelvedata", NOW, True) for k in "ABCDE"}
    out = parse_batch(body, 200, ctxs)
    assert isinstance(out["A"], list) and len(out["A"]) == 30 and {b.symbol for b in out["A"]} == {"A"}
    for k, cls, message in (("B", "unknown_symbol", "400 **symbol** not found"), ("C", "bad_response", "200 nope"),
                            ("D", "bad_response", "series without values"),
                            ("E", "bad_response", "E missing from batch answer")):
        err = out[k]
        assert isinstance(err, ProviderError), k
        assert (err.error_class, str(err), err.source) == (cls, f"{cls}: {message}", "twelvedata")


def test_one_symbol_answer_without_meta_and_with_a_code():
    raw = json.loads(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"))
    for body in ({"values": raw["values"]}, {**raw, "code": 200}):
        out = parse_batch(json.dumps(body), 200, {"AAPL": ctx()})["AAPL"]
        assert isinstance(out, list) and len(out) == 30


def test_rows_that_are_not_prices_are_dropped_the_rest_kept():
    good = {"datetime": "2024-01-02 10:00:00", "open": "1", "high": "2", "low": "0.5", "close": "1.5"}

    def row(minute: int, **prices) -> dict:
        return {**good, "datetime": f"2024-01-02 10:{minute:02d}:00", **prices}

    values = [
        row(9, open="NaN"), row(8, high="NaN"), row(7, close="inf"),
        row(6, open=True), row(5, high=True), row(4, low=True), row(3, close=True),
        7, row(2, open=1, high=2, low=0.5, close=1.5, volume=10), row(1, volume=""), row(0),
    ]
    body = {"meta": {"exchange_timezone": "UTC"}, "status": "ok", "values": values}
    bars = parse_time_series(json.dumps(body), 200, ctx())
    start = int(datetime(2024, 1, 2, 10, tzinfo=UTC).timestamp() * 1000)
    assert [(b.t, b.o, b.h, b.l, b.c, b.v) for b in bars] == [
        (start, 1.0, 2.0, 0.5, 1.5, None), (start + 60_000, 1.0, 2.0, 0.5, 1.5, None),
        (start + 120_000, 1.0, 2.0, 0.5, 1.5, 10.0)]


def test_forming_from_the_open_until_the_next_bar_opens():
    body = fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json")
    newest = parse_time_series(body, 200, ctx())[-1].t
    for now, forming in ((newest - 1, False), (newest, True), (newest + 59_999, True), (newest + 60_000, False)):
        c = ParseContext("X", Timeframe.parse("1m"), "twelvedata", now, True)
        bars = parse_time_series(body, 200, c)
        assert bars[-1].t == newest and bars[-1].forming is forming, now
        assert bars[-2].forming is (now == newest - 1)
        assert not any(b.forming for b in bars[:-2])


def test_closed_rows_of_every_symbol_of_a_batch_are_remembered_under_their_own_name():
    raw = json.loads(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"))
    body = json.dumps({"A": raw, "B": raw})
    newest = parse_time_series(json.dumps(raw), 200, ctx())[-1].t
    # The newest bar closed exactly now: it is remembered too.
    ctxs = {k: ParseContext(k, Timeframe.parse("1m"), "twelvedata", newest + 60_000, True) for k in "AB"}
    memo = ClosedRows()
    first = parse_batch(body, 200, ctxs, memo=memo)
    again = parse_batch(body, 200, ctxs, memo=memo)
    for k in "AB":
        bars, repeat = first[k], again[k]
        assert isinstance(bars, list) and isinstance(repeat, list)
        assert {b.symbol for b in repeat} == {k} and not repeat[-1].forming
        kept = ClosedRows.PER_SERIES  # the newest closed rows of each series
        assert all(a is b for a, b in zip(repeat[-kept:], bars[-kept:], strict=True))
    assert len(memo) == len(memo.bars) == 2 * ClosedRows.PER_SERIES  # one bar kept per remembered row


def test_remembered_bars_follow_corrections_and_the_bound():
    raw = json.loads(fixture("twelvedata/time_series_AAPL_1min_2023-08-24.json"))
    c = ParseContext("X", Timeframe.parse("1m"), "twelvedata", NOW, True)
    memo = ClosedRows()
    for k in range(3):  # the newest closed bar corrected twice
        raw["values"][0]["close"] = str(180.0 + k)
        parse_batch(json.dumps(raw), 200, {"X": c}, memo=memo)
        assert len(memo.bars) == len(memo) == ClosedRows.PER_SERIES
    ids = set(memo.bars)
    raw["values"] = [{**row, "datetime": row["datetime"].replace("2023-08-24", "2023-08-25")} for row in raw["values"]]
    parse_batch(json.dumps(raw), 200, {"X": c}, memo=memo)  # a later day: the older rows leave
    assert len(memo.bars) == len(memo) == ClosedRows.PER_SERIES
    assert not ids & set(memo.bars)


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
