"""The error tables (:mod:`sidecar.sources.errors`): each provider's recorded error
answers, at the statuses they come with, become the right class through its table
and through its parser; the table's rules and the HTTP status ladder on their own;
ccxt's exception classes through the same place."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ccxt
import pytest

from sidecar.errors import ProviderError
from sidecar.sources import alphavantage, ccxt_support, polygon, twelvedata, yahoo
from sidecar.sources._parsing import ParseContext
from sidecar.sources.errors import (
    ErrorBody,
    ErrorTable,
    Rule,
    exception_class,
    http_status_error,
    status_class,
)
from sidecar.tests.fake_providers import fixture
from sidecar.timeframe import Timeframe

NOW = 1_900_000_000_000
MODULES = {"alphavantage": alphavantage, "twelvedata": twelvedata, "polygon": polygon, "yahoo": yahoo}


def ctx(src: str) -> ParseContext:
    return ParseContext("X", Timeframe.parse("1d"), src, NOW, True)


def parse(src: str, body: bytes, status: int) -> None:
    """Run ``src``'s parser on an answer that must fail."""
    if src == "alphavantage":
        alphavantage.parse_time_series(body, status, ctx(src))
    elif src == "twelvedata":
        twelvedata.parse_time_series(body, status, ctx(src), retry_after=5.0)
    elif src == "polygon":
        polygon.parse_aggs(body, status, ctx(src), retry_after=5.0)
    else:
        yahoo.parse_chart(body, status, ctx(src), retry_after=5.0)


#: (source, recorded body, HTTP status it comes with, class): every error answer in
#: sidecar/tests/fixtures (PROVENANCE.tsv), at its recorded status and, where the
#: provider sends errors with HTTP 200, at 200 too.
RECORDED = [
    ("alphavantage", "alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json", 200, "unknown_symbol"),
    ("alphavantage", "alphavantage/error_note_rate_limit_5_per_min_2019.json", 200, "rate_limited"),
    ("twelvedata", "twelvedata/error_401_invalid_apikey.json", 401, "auth"),
    ("twelvedata", "twelvedata/error_401_invalid_apikey.json", 200, "auth"),
    ("twelvedata", "twelvedata/error_429_out_of_credits_minute.json", 429, "rate_limited"),
    ("twelvedata", "twelvedata/error_429_out_of_credits_minute.json", 200, "rate_limited"),
    ("twelvedata", "twelvedata/error_404_page_not_found_unknown_path.json", 404, "bad_response"),
    ("polygon", "polygon/error_403_NOT_AUTHORIZED_timeframe.json", 403, "not_entitled"),
    ("polygon", "polygon/error_403_NOT_AUTHORIZED_timeframe.json", 200, "not_entitled"),
    ("yahoo", "yahoo/chart_error_SI_404_not_found.json", 404, "unknown_symbol"),
    ("yahoo", "yahoo/chart_error_SI_404_not_found.json", 200, "unknown_symbol"),
    ("yahoo", "yahoo/error_429_edge_too_many_requests.txt", 429, "rate_limited"),
    ("yahoo", "yahoo/error_429_edge_too_many_requests.txt", 200, "rate_limited"),
]


@pytest.mark.parametrize(("src", "rel", "status", "error_class"), RECORDED)
def test_recorded_error_answers_through_the_parser(src: str, rel: str, status: int, error_class: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse(src, fixture(rel), status)
    err = info.value
    assert (err.error_class, err.source) == (error_class, src), str(err)
    waits = error_class in ("rate_limited", "unavailable") and src != "alphavantage"
    assert err.retry_after == (5.0 if waits else None)


def error_object(src: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The part of a recorded body the provider's table reads."""
    if src == "yahoo":
        return doc["chart"]["error"]
    return doc


@pytest.mark.parametrize(("src", "rel", "status", "error_class"),
                         [case for case in RECORDED if case[1].endswith(".json") and case[0] != "alphavantage"])
def test_recorded_error_objects_through_the_table(src: str, rel: str, status: int, error_class: str) -> None:
    table: ErrorTable = MODULES[src].ERRORS
    err = table.classify(status, error_object(src, json.loads(fixture(rel))), retry_after=2.0)
    assert (err.error_class, err.source) == (error_class, src)


@pytest.mark.parametrize(("rel", "error_class"), [
    ("alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json", "unknown_symbol"),
    ("alphavantage/error_note_rate_limit_5_per_min_2019.json", "rate_limited"),
])
def test_alpha_vantage_reads_the_key_that_carries_the_message(rel: str, error_class: str) -> None:
    ((key, text),) = json.loads(fixture(rel)).items()
    err = alphavantage.ERRORS.error(alphavantage.ERRORS.said(200, key, text))
    assert (err.error_class, str(err)) == (error_class, f"{error_class}: {key}: {text[:200]}")


def test_every_provider_declares_its_table_under_its_name() -> None:
    for name, module in MODULES.items():
        assert isinstance(module.ERRORS, ErrorTable) and module.ERRORS.source == name


# -- the rules on their own ------------------------------------------------------------

TABLE = ErrorTable(
    "p",
    rules=(
        Rule("rate_limited", when=(429, "SLOW")),
        Rule("auth", phrases=(("key", "wrong"),), unless=("plan",)),
        Rule("unknown_symbol", when=(404,), label="error", http=False),
        Rule("not_entitled", phrases=("upgrade",)),
    ),
    detail=lambda body: f"{body.label}|{body.text}",
    code_field="code", label_field="status", text_fields=("message", "error"), text_limit=16,
    http=True,
)


@pytest.mark.parametrize(("status", "obj", "error_class", "message"), [
    (200, {"code": 429}, "rate_limited", "HTTP 200 |"),  # the body's code decides
    (200, {"status": "SLOW"}, "rate_limited", "HTTP 200 SLOW|"),  # or its label
    (400, {"message": "KEY is WRONG, really"}, "auth", "HTTP 400 |KEY is WRONG, re"),  # all parts, any case
    (400, {"message": "plan: key wrong"}, "bad_response", "HTTP 400 |plan: key wrong"),  # unless
    (400, {"message": "key"}, "bad_response", "HTTP 400 |key"),
    (404, {"status": "error"}, "unknown_symbol", "error|"),  # code and label; no HTTP in it
    (404, {"status": "other"}, "unknown_symbol", "HTTP 404 other|"),  # the status decides
    (500, {"error": "upgrade"}, "not_entitled", "HTTP 500 |upgrade"),  # first non-empty text field
    (502, {"code": "abc", "message": ""}, "unavailable", "HTTP 502 |"),  # a code that is not one
    (401, None, "auth", "HTTP 401 |"),
])
def test_rules_then_the_status(status: int, obj: dict[str, Any] | None, error_class: str, message: str) -> None:
    err = TABLE.classify(status, obj, retry_after=4.0)
    assert (err.error_class, str(err), err.source) == (error_class, f"{error_class}: {message}", "p")
    assert err.retry_after == (4.0 if error_class in ("rate_limited", "unavailable") else None)


def test_decided_is_none_when_no_rule_says() -> None:
    assert TABLE.decided(ErrorBody(500, 500, "", "boom")) is None
    decided = TABLE.decided(ErrorBody(500, 500, "", "upgrade"))
    assert decided is not None and decided.error_class == "not_entitled"


def test_the_status_ladder() -> None:
    special = {429: "rate_limited", 401: "auth", 403: "not_entitled", 404: "unknown_symbol",
               408: "unavailable", 425: "unavailable"}
    for status in range(100, 600):
        expected = special.get(status, "unavailable" if status >= 500 else "bad_response")
        assert status_class(status) == expected, status
        err = http_status_error(status, "x", "s", retry_after=1.0)
        assert (err.error_class, str(err)) == (expected, f"{expected}: HTTP {status} x")


# -- ccxt's exception classes ------------------------------------------------------------

@pytest.mark.parametrize(("exc", "error_class"), [
    (ccxt.RateLimitExceeded("x"), "rate_limited"),
    (ccxt.DDoSProtection("x"), "rate_limited"),
    (ccxt.BadSymbol("x"), "unknown_symbol"),
    (ccxt.AccountNotEnabled("x"), "not_entitled"),
    (ccxt.RestrictedLocation("x"), "not_entitled"),
    (ccxt.NotSupported("x"), "not_entitled"),
    (ccxt.AuthenticationError("x"), "auth"),
    (ccxt.PermissionDenied("x"), "auth"),
    (ccxt.AccountSuspended("x"), "auth"),
    (ccxt.ExchangeNotAvailable("x"), "unavailable"),
    (ccxt.OnMaintenance("x"), "unavailable"),
    (ccxt.RequestTimeout("x"), "unavailable"),
    (ccxt.NetworkError("x"), "unavailable"),
    (ccxt.NullResponse("x"), "bad_response"),
    (ccxt.BadRequest("x"), "bad_response"),
    (ccxt.InsufficientFunds("x"), "bad_response"),
    (ccxt.ExchangeError("x"), "bad_response"),
    (ValueError("x"), "bad_response"),
])
def test_ccxt_exceptions(exc: BaseException, error_class: str) -> None:
    err = ccxt_support.classify(exc, "ccxt:kraken")
    assert (err.error_class, err.source) == (error_class, "ccxt:kraken")
    assert str(err) == f"{error_class}: {type(exc).__name__}: x"


def test_exception_table_takes_the_first_row_an_exception_is() -> None:
    table: list[tuple[type[BaseException], Any]] = [(KeyError, "unknown_symbol"), (LookupError, "auth")]
    classify: Callable[[BaseException], str] = lambda exc: exception_class(exc, table)  # noqa: E731
    assert [classify(KeyError()), classify(IndexError()), classify(OSError())] == [
        "unknown_symbol", "auth", "bad_response"]
