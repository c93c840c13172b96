"""Provider garbage: every parser over random and mutated real bodies (hypothesis).

The property: a parser returns well-typed bars labelled as asked, or raises a
classified :class:`ProviderError` — never anything else. Replay files are
configuration, so their classified error is a :class:`ConfigError` naming
``SIDECAR_REPLAY_FILE``. The shared helpers that classify an HTTP status and stamp
a daily bar are checked on their own at the end. Real bodies come from ``sidecar/tests/fixtures`` (read in
place); mutations replace, delete or duplicate nodes at any depth, then
optionally cut or splice the serialized bytes.

Example counts come from the hypothesis profile in conftest (``HYPOTHESIS_PROFILE``).
"""

from __future__ import annotations

import base64
import copy
import json
import math
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.bar import MAX_EPOCH_MS, Bar
from sidecar.errors import ConfigError, ProviderError
from sidecar.settings import SYMBOL_RE
from sidecar.sources import alphavantage, polygon, twelvedata, yahoo
from sidecar.sources._parsing import (
    ParseContext,
    day_ms,
    decode_json,
    epoch_to_daily_ms,
    http_status_error,
    to_epoch_ms,
    zone,
)
from sidecar.sources.base import Source
from sidecar.sources.replay import read_bars
from sidecar.sources.yahoo_stream import YahooStream, tick_from_message
from sidecar.tests.fake_providers import fixture, message_b64
from sidecar.timeframe import Timeframe

NOW = 1_727_900_000_000
ERROR_CLASSES = {"rate_limited", "auth", "unknown_symbol", "unavailable", "bad_response", "not_entitled"}

FIXTURES = {
    "alphavantage": [
        "alphavantage/digital_currency_intraday_BTC_CNY_5min_2017.json",
        "alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json",
        "alphavantage/error_note_rate_limit_5_per_min_2019.json",
        "alphavantage/fx_intraday_EURUSD_5min_2020_trimmed.json",
        "alphavantage/global_quote_MSFT_2018.json",
        "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json",
    ],
    "twelvedata": [
        "twelvedata/error_401_invalid_apikey.json",
        "twelvedata/error_404_page_not_found_unknown_path.json",
        "twelvedata/error_429_out_of_credits_minute.json",
        "twelvedata/quote_SPY_intraday_market_open_2026.json",
        "twelvedata/time_series_AAPL_1min_2023-08-24.json",
        "twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json",
    ],
    "polygon": [
        "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json",
        "polygon/aggs_empty_results_null.json",
        "polygon/error_403_NOT_AUTHORIZED_timeframe.json",
        "polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json",
        "polygon/spec_aggs_range_AAPL_1day_next_url.json",
    ],
    "yahoo": [
        "yahoo/chart_AAPL_1d_2020-01-01_2020-01-03.json",
        "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json",
        "yahoo/chart_EURUSD=X_1d_2020-01-01_2020-01-03.json",
        "yahoo/chart_NVDA_1d_1y_events_split.json",
        "yahoo/chart_^VXAPL_index_1d_2020-01-01.json",
        "yahoo/chart_error_SI_404_not_found.json",
    ],
}
_DOCS: dict[str, Any] = {}


def doc(rel: str) -> Any:
    """A fixture's decoded JSON (cached; skips the test when the folder is missing)."""
    if rel not in _DOCS:
        _DOCS[rel] = json.loads(fixture(rel))
    return copy.deepcopy(_DOCS[rel])


# -- strategies -------------------------------------------------------------------
NASTY_TEXT = st.sampled_from([
    "", " ", "null", "NaN", "nan", "Infinity", "-Infinity", "1e999", "-1e999", "-1", "0", "0.0",
    "1,5", "1.2.3", "0x10", "١٢٣", "9" * 400, "2024-13-45", "2020-01-01 25:00:00", "9999-12-31",
    "0001-01-01 00:00:00", "0001-01-01", "2024-10-02T13:30:00+99:00", "../../etc/passwd",
    "US/Eastern", "Asia/Tokyo", "Not/AZone", "\x00", "A" * 300, "AAPL", "{}", "[]",
])
LEAF = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), NASTY_TEXT,
)
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | NASTY_TEXT, inner,
                                                                max_size=4),
    max_leaves=12,
)
STATUS = st.sampled_from([200, 200, 200, 400, 401, 403, 404, 408, 429, 500, 502, 503]) | st.integers(0, 999)


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with 1-4 nodes replaced, deleted or duplicated at a drawn depth."""
    root: Any = {"_": copy.deepcopy(original)}
    for _ in range(draw(st.integers(1, 4))):
        parent: Any = root
        key: Any = "_"
        # Walk down: each level either stops here or descends into a drawn child.
        while True:
            node = parent[key]
            children = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(
                node, list) else []
            if not children or draw(st.integers(0, 3)) == 0:
                break
            parent, key = node, children[draw(st.integers(0, len(children) - 1))]
        op = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "retype"]))
        if op == "replace" or parent is root:
            parent[key] = draw(JSON)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]]
        else:  # the same value as another JSON type
            value = parent[key]
            parent[key] = str(value) if not isinstance(value, str) else draw(LEAF)
    return root["_"]


@st.composite
def body_bytes(draw: st.DrawFn, original: Any) -> bytes:
    """A mutated body, serialized, sometimes cut short or spliced with random bytes."""
    data = json.dumps(draw(mutated(original))).encode()
    tail = draw(st.sampled_from(["keep", "keep", "truncate", "splice"]))
    if tail == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif tail == "splice" and data:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    return data


RANDOM_BODY = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"", b"<html>502 Bad Gateway</html>", b"Edge: Too Many Requests", b"[" * 5000,
                     b"{\"a\":" * 3000, b"\xff\xfe{}", b"null", b"[]", b"1e999"]),
)


def ctx(symbol: str, tf: str, src: str, has_volume: bool = True) -> ParseContext:
    return ParseContext(symbol, Timeframe.parse(tf), src, NOW, has_volume)


def assert_bars(bars: Any, c: ParseContext) -> None:
    """Well-typed bars, labelled as asked, finite numbers, oldest first, one per time."""
    assert isinstance(bars, list)
    for b in bars:
        assert isinstance(b, Bar)
        assert (b.symbol, b.tf, b.src) == (c.symbol, c.tf.name, c.src)
        assert type(b.t) is int
        for x in (b.o, b.h, b.l, b.c):
            assert type(x) is float and math.isfinite(x)
        assert b.v is None or (type(b.v) is float and math.isfinite(b.v))
        if not c.has_volume:
            assert b.v is None
    assert [b.t for b in bars] == sorted({b.t for b in bars})


def classified(exc: ProviderError) -> None:
    assert exc.error_class in ERROR_CLASSES, exc


def run_parser(name: str, body: bytes, status: int, tf: str, has_volume: bool) -> None:
    c = ctx("X", tf, name, has_volume)
    try:
        if name == "alphavantage":
            assert_bars(alphavantage.parse_time_series(body, status, c), c)
        elif name == "twelvedata":
            assert_bars(twelvedata.parse_time_series(body, status, c), c)
            contexts = {"EUR/USD": ctx("EURUSD", tf, name, False), "USD/CZK": ctx("USDCZK", tf, name, False)}
            out = twelvedata.parse_batch(body, status, contexts)
            assert set(out) == set(contexts)
            for ticker, value in out.items():
                if isinstance(value, ProviderError):
                    classified(value)
                else:
                    assert_bars(value, contexts[ticker])
        elif name == "polygon":
            bars, next_url = polygon.parse_aggs(body, status, c, asset_class="stock" if has_volume else "fx")
            assert_bars(bars, c)
            assert next_url is None or isinstance(next_url, str)
        else:
            assert_bars(yahoo.parse_chart(body, status, c, end_ms=NOW), c)
    except ProviderError as exc:
        classified(exc)


TFS = st.sampled_from(["1m", "5m", "1h", "1d"])


@pytest.mark.parametrize("name", sorted(FIXTURES))
@given(data=st.data(), status=STATUS, tf=TFS, has_volume=st.booleans())
def test_mutated_real_bodies_only_raise_classified_errors(name: str, data: st.DataObject, status: int,
                                                          tf: str, has_volume: bool) -> None:
    rel = data.draw(st.sampled_from(FIXTURES[name]))
    body = data.draw(body_bytes(doc(rel)))
    run_parser(name, body, status, tf, has_volume)


@pytest.mark.parametrize("name", sorted(FIXTURES))
@given(body=RANDOM_BODY, status=STATUS, tf=TFS, has_volume=st.booleans())
def test_random_bodies_only_raise_classified_errors(name: str, body: bytes, status: int, tf: str,
                                                    has_volume: bool) -> None:
    run_parser(name, body, status, tf, has_volume)


#: What each real body gives at its own timeframe: how many bars, or its error class.
#: Two hold no bars (an empty result; an index chart without quotes): 0.
UNMUTATED: dict[str, tuple[str, int | str]] = {
    "alphavantage/digital_currency_intraday_BTC_CNY_5min_2017.json": ("5m", 923),
    "alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json": ("1d", "unknown_symbol"),
    "alphavantage/error_note_rate_limit_5_per_min_2019.json": ("1m", "rate_limited"),
    "alphavantage/fx_intraday_EURUSD_5min_2020_trimmed.json": ("5m", 1),
    "alphavantage/global_quote_MSFT_2018.json": ("1d", "bad_response"),
    "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json": ("1m", 100),
    "twelvedata/error_401_invalid_apikey.json": ("1m", "auth"),
    "twelvedata/error_404_page_not_found_unknown_path.json": ("1m", "bad_response"),
    "twelvedata/error_429_out_of_credits_minute.json": ("1m", "rate_limited"),
    "twelvedata/quote_SPY_intraday_market_open_2026.json": ("1m", "bad_response"),
    "twelvedata/time_series_AAPL_1min_2023-08-24.json": ("1m", 30),
    # A batch body is no single time series; parse_batch reads it (below).
    "twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json": ("1d", "bad_response"),
    "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json": ("1h", 16),
    "polygon/aggs_empty_results_null.json": ("1d", 0),
    "polygon/error_403_NOT_AUTHORIZED_timeframe.json": ("1d", "not_entitled"),
    "polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json": ("1d", 6),
    "polygon/spec_aggs_range_AAPL_1day_next_url.json": ("1d", 2),
    "yahoo/chart_AAPL_1d_2020-01-01_2020-01-03.json": ("1d", 1),
    "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json": ("1m", 389),
    "yahoo/chart_EURUSD=X_1d_2020-01-01_2020-01-03.json": ("1d", 3),
    "yahoo/chart_NVDA_1d_1y_events_split.json": ("1d", 252),
    "yahoo/chart_^VXAPL_index_1d_2020-01-01.json": ("1d", 0),
    "yahoo/chart_error_SI_404_not_found.json": ("1d", "unknown_symbol"),
}


def parse_one(name: str, body: bytes, c: ParseContext) -> list[Bar]:
    """The parser of a single series for ``name``."""
    if name == "alphavantage":
        return alphavantage.parse_time_series(body, 200, c)
    if name == "twelvedata":
        return twelvedata.parse_time_series(body, 200, c)
    if name == "polygon":
        return polygon.parse_aggs(body, 200, c, asset_class="stock")[0]
    return yahoo.parse_chart(body, 200, c, end_ms=NOW)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_unmutated_fixtures_pass_the_property(name: str) -> None:
    """The real bodies themselves: each gives its bars (well-typed, as many as it holds)
    or its own classified error, and the property holds at every timeframe."""
    assert set(FIXTURES[name]) == {rel for rel in UNMUTATED if rel.startswith(f"{name}/")}
    for rel in FIXTURES[name]:
        body = json.dumps(doc(rel)).encode()
        tf, expected = UNMUTATED[rel]
        c = ctx("X", tf, name)
        if isinstance(expected, str):
            with pytest.raises(ProviderError) as info:
                parse_one(name, body, c)
            assert info.value.error_class == expected, (rel, info.value)
        else:
            bars = parse_one(name, body, c)
            assert_bars(bars, c)
            assert len(bars) == expected, rel
        for any_tf in ("1m", "5m", "1h", "1d"):
            run_parser(name, body, 200, any_tf, True)


def test_unmutated_batch_body_gives_every_ticker_its_bars() -> None:
    rel = "twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json"
    contexts = {ticker: ctx(ticker.replace("/", ""), "1d", "twelvedata", False) for ticker in doc(rel)}
    assert set(contexts) == {"USD/CZK", "USD/EUR", "USD/GBP", "USD/CHF"}
    out = twelvedata.parse_batch(json.dumps(doc(rel)).encode(), 200, contexts)
    assert set(out) == set(contexts)
    for ticker, bars in out.items():
        assert not isinstance(bars, ProviderError), (ticker, bars)
        assert_bars(bars, contexts[ticker])
        assert len(bars) == 4, ticker


# -- the Yahoo stream ----------------------------------------------------------------
PRICING_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=12) | NASTY_TEXT,
        "price": st.floats(allow_nan=True, allow_infinity=True, width=32),
        "time": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "change": st.floats(width=32),
        "day_volume": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    },
)


def _feed(stream: YahooStream, msg: Any) -> None:
    stream.on_message(msg)
    for ticker, tick in stream.ticks.items():
        assert isinstance(ticker, str)
        assert math.isfinite(tick.price) and tick.price > 0 and tick.t_ms > 0


@given(msg=st.dictionaries(st.sampled_from(["id", "price", "time", "x"]) | st.text(max_size=5), JSON,
                           max_size=5) | JSON)
def test_stream_decoded_messages_never_raise(msg: Any) -> None:
    stream = YahooStream("ws://127.0.0.1:9/", ["AAPL"], clock=lambda: NOW / 1000)
    parsed = tick_from_message(msg) if isinstance(msg, dict) else None
    if parsed is not None:
        assert math.isfinite(parsed[1].price)
    _feed(stream, msg)


@given(fields=PRICING_FIELDS, cut=st.integers(0, 64), junk=st.binary(max_size=16))
def test_stream_wire_messages_decode_to_usable_ticks_or_nothing(fields: dict[str, Any], cut: int,
                                                                junk: bytes) -> None:
    """Protobuf messages as the streamer sends them, whole, cut or with junk, through
    the same decoder the stream uses (yfinance's)."""
    import yfinance as yf

    ws = yf.AsyncWebSocket(url="ws://127.0.0.1:9/", verbose=False)
    stream = YahooStream("ws://127.0.0.1:9/", ["AAPL"], clock=lambda: NOW / 1000)
    wire = base64.b64decode(message_b64(fields))
    for payload in (wire, wire[:cut], wire + junk, junk):
        _feed(stream, ws._decode_message(base64.b64encode(payload).decode()))
    _feed(stream, ws._decode_message("not base64 !"))


# -- replay files ----------------------------------------------------------------------
GOOD_LINE = {"symbol": "AAPL", "tf": "1m", "t": 1_727_875_800_000, "o": 226.2, "h": 226.5,
             "l": 226.1, "c": 226.4, "v": 1023.0, "src": "yahoo"}


@given(rows=st.lists(mutated(GOOD_LINE) | st.text(max_size=40), min_size=1, max_size=6),
       raw=st.binary(max_size=40), as_csv=st.booleans())
def test_replay_lines_load_or_name_the_setting(tmp_path_factory: pytest.TempPathFactory, rows: list[Any],
                                               raw: bytes, as_csv: bool) -> None:
    path: Path = tmp_path_factory.mktemp("replay") / "rec"
    if as_csv:
        lines = ["symbol,tf,t,o,h,l,c,v,src"] + [
            ",".join(str(x) for x in row.values()) if isinstance(row, dict) else str(row) for row in rows]
    else:
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    try:
        bars = read_bars(path)
    except ConfigError as exc:
        assert exc.setting == "SIDECAR_REPLAY_FILE"
        return
    for b in bars:
        assert isinstance(b, Bar) and type(b.t) is int
        assert all(type(x) is float for x in (b.o, b.h, b.l, b.c))
        assert SYMBOL_RE.match(b.symbol) and Timeframe.parse(b.tf).name == b.tf


def test_replay_refuses_hostile_symbols_and_non_utf8(tmp_path: Path) -> None:
    for symbol in ("A:B", "*", "../x", "x' OR 1=1", "{x}", "A B", "AAPL\n", "Ä", "A" * 30):
        path = tmp_path / "rec.jsonl"
        path.write_text(json.dumps(dict(GOOD_LINE, symbol=symbol)) + "\n")
        with pytest.raises(ConfigError, match="not a canonical symbol") as info:
            read_bars(path)
        assert info.value.setting == "SIDECAR_REPLAY_FILE"
    path.write_bytes(json.dumps(GOOD_LINE).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_bars(path)


# -- nothing invalid is ever stored ---------------------------------------------------
STORE_TF = Timeframe.parse("1m")
SYMBOLS = ("AAA", "BBB")
PRICE = st.one_of(
    st.floats(min_value=90.0, max_value=110.0),  # plausible: most of these pass
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e308, float("nan"), float("inf")]),
)
VOLUME = st.one_of(st.none(), st.floats(min_value=0, max_value=1e6),
                   st.floats(allow_nan=True, allow_infinity=True))
EXTREME_T = st.sampled_from([-(2**63), -(2**70), -STORE_TF.ms, 0, 2**63, 2**70, 10**17]).flatmap(
    lambda t: st.sampled_from([t, t - t % STORE_TF.ms]))  # as given, and aligned to the timeframe


@st.composite
def incoming_bar(draw: st.DrawFn) -> tuple[int | None, Any]:
    """(offset in bars from the current period, or None for an absolute extreme time),
    then the bar's other fields; the time is fixed when the cycle runs."""
    o, c = draw(PRICE), draw(PRICE)
    if draw(st.booleans()):  # a consistent high/low, or not
        h, l = max(o, c) + abs(draw(PRICE)) * 0.01, min(o, c) - abs(draw(PRICE)) * 0.01
    else:
        h, l = draw(PRICE), draw(PRICE)
    fields = dict(o=o, h=h, l=l, c=c, v=draw(VOLUME), forming=draw(st.booleans()),
                  tf=draw(st.sampled_from(["1m", "1m", "1m", "5m", "1s"])),
                  skew=draw(st.sampled_from([0, 0, 0, 1, -1, 30_000])))
    if draw(st.integers(0, 9)) == 0:
        return None, dict(fields, t=draw(EXTREME_T))
    return draw(st.integers(-15, 3)), fields


class _GarbageSource(Source):
    """A source answering each cycle with the drawn bars (times relative to that cycle)."""

    name = "garbage"
    synthetic = False
    max_batch = 100

    def __init__(self, cycles: list[dict[str, list[tuple[int | None, Any]]]]) -> None:
        self.cycles = cycles

    def can_serve(self, symbol: str) -> bool:
        return True

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return {}

    async def fetch_latest(self, symbols: Any, tf: Timeframe, now_ms: int) -> dict[str, Any]:
        step = self.cycles.pop(0) if self.cycles else {}
        out: dict[str, Any] = {}
        for sym in symbols:
            bars = []
            for offset, f in step.get(sym, []):
                t = f["t"] if offset is None else tf.floor(now_ms) + offset * tf.ms + f["skew"]
                bars.append(Bar(sym, f["tf"], t, f["o"], f["h"], f["l"], f["c"], f["v"], self.name,
                                forming=f["forming"]))
            out[sym] = bars
        return out

    async def fetch_history(self, *args: Any) -> list[Bar]:
        return []


def assert_valid_stored(bar: Bar, now_ms: int, skew_ms: int) -> None:
    from sidecar.validation import check_bar

    assert bar.symbol in SYMBOLS and bar.tf == STORE_TF.name
    assert check_bar(bar, STORE_TF, now_ms, skew_ms) is None, bar
    assert bar.t >= 0, bar


@given(cycles=st.lists(st.fixed_dictionaries({s: st.lists(incoming_bar(), max_size=5) for s in SYMBOLS}),
                       min_size=1, max_size=5),
       outlier_k=st.sampled_from([0.0, 15.0]), fill_gaps=st.booleans())
def test_no_invalid_bar_is_ever_stored(redis_server: Any, tmp_path_factory: pytest.TempPathFactory,
                                       cycles: list[Any], outlier_k: float, fill_gaps: bool) -> None:
    """Garbage through the real cycle (Validator → Redis + SQLite): every stored bar passes
    the rules, the cycle never raises, and Redis and SQLite hold the same bars."""
    import asyncio
    import dataclasses
    import time
    import uuid

    from sidecar.app.pipeline import Pipeline
    from sidecar.redis_store import RedisStore, connect
    from sidecar.settings import Settings
    from sidecar.sqlite_store import BarStore

    skew = 2_000
    settings = dataclasses.replace(
        Settings(), symbols=SYMBOLS, sources=("garbage",), timeframe=STORE_TF, outlier_k=outlier_k,
        fill_gaps=fill_gaps, clock_skew_ms=skew, market_hours=False)  # on the wall clock, any hour

    async def run() -> None:
        redis = RedisStore(connect(redis_server.url), f"g{uuid.uuid4().hex[:8]}")
        store = BarStore(tmp_path_factory.mktemp("garbage") / "bars.sqlite3")
        await store.open()
        try:
            pipeline = Pipeline(settings, [_GarbageSource(list(cycles))], redis, store)
            for _ in cycles:
                await pipeline.run_cycle(int(time.time() * 1000))
            await pipeline.drain()
            await store.flush()
            assert store.last_error is None and store.dropped == 0
            assert pipeline.stats.redis_ok, pipeline.stats.redis_last_error
            now_ms = int(time.time() * 1000)
            for sym in SYMBOLS:
                in_redis = await redis.recent_bars(sym, STORE_TF.name, 100_000)
                in_sqlite = await store.bars_between(sym, STORE_TF.name, -(2**62), 2**62)
                for bar in in_redis + in_sqlite:
                    assert_valid_stored(bar, now_ms, skew)
                assert ([(b.t, b.o, b.h, b.l, b.c, b.v, b.forming) for b in in_redis]
                        == [(b.t, b.o, b.h, b.l, b.c, b.v, b.forming) for b in in_sqlite])
        finally:
            await store.close()
            await redis.close()

    asyncio.run(run())


# -- the shared helpers ---------------------------------------------------------------


@pytest.mark.parametrize(("status", "error_class"), [
    (400, "bad_response"), (401, "auth"), (402, "bad_response"), (403, "not_entitled"),
    (404, "unknown_symbol"), (405, "bad_response"), (408, "unavailable"), (409, "bad_response"),
    (425, "unavailable"), (426, "bad_response"), (429, "rate_limited"), (430, "bad_response"),
    (499, "bad_response"), (500, "unavailable"), (503, "unavailable"),
])
def test_http_status_classes(status: int, error_class: str) -> None:
    err = http_status_error(status, "(non-JSON body)", "polygon", retry_after=7.0)
    assert err.error_class == error_class
    assert err.source == "polygon"
    assert str(err) == f"{error_class}: HTTP {status} (non-JSON body)"
    # The provider's back-off is kept where waiting helps.
    assert err.retry_after == (7.0 if error_class in ("rate_limited", "unavailable") else None)


def test_daily_stamp_is_the_date_where_the_market_is() -> None:
    # 2024-10-03 02:00 UTC is still 2024-10-02 in New York.
    t = day_ms(date(2024, 10, 3)) + 2 * 3_600_000
    assert epoch_to_daily_ms(t, ZoneInfo("America/New_York")) == day_ms(date(2024, 10, 2))
    assert epoch_to_daily_ms(t, ZoneInfo("Asia/Tokyo")) == day_ms(date(2024, 10, 3))
    with pytest.raises(ValueError, match="time out of range: 100000000000000000000"):
        epoch_to_daily_ms(10**20, ZoneInfo("UTC"))


def test_provider_times_a_store_cannot_hold_are_refused() -> None:
    assert to_epoch_ms("1727985600", 1000) == 1_727_985_600_000
    assert to_epoch_ms(MAX_EPOCH_MS) == MAX_EPOCH_MS and to_epoch_ms(-MAX_EPOCH_MS) == -MAX_EPOCH_MS
    for beyond in (MAX_EPOCH_MS + 1, -MAX_EPOCH_MS - 1):
        with pytest.raises(ValueError, match="time out of range"):
            to_epoch_ms(beyond)


def test_zone_falls_back_on_anything_that_is_not_a_zone() -> None:
    assert zone("America/New_York").key == "America/New_York"
    for name in (None, "", 123, "Mars/Olympus", "Europe/" + "x" * 60):
        assert zone(name).key == "UTC", name
        assert zone(name, "America/New_York").key == "America/New_York", name


def test_a_body_that_is_not_json_is_quoted_in_80_characters() -> None:
    for body in ("<html>" + "x" * 100, b"<html>" + b"x" * 100):
        with pytest.raises(ProviderError) as info:
            decode_json(body, "yahoo")
        assert str(info.value) == "bad_response: body is not JSON: '<html>" + "x" * 74 + "'"
        assert info.value.source == "yahoo"
