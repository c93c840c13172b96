"""The ccxt source against a fake exchange on 127.0.0.1 (``fake_exchange.py``).

Every captured OHLCV case (``fixtures/ccxt``) goes through the real ccxt over real
HTTP: the bars are exactly the body's rows, as ccxt's own expected parse says.
Error bodies and statuses end in the daemon's classes; markets come from a file,
the day-old cache, or the exchange; history pages with since/limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from sidecar.errors import ConfigError, ProviderError
from sidecar.rate_budget import BudgetExhausted
from sidecar.settings import Settings
from sidecar.sources import build_source
from sidecar.sources.ccxt_exchange import CcxtSource
from sidecar.sources.ccxt_stream import ExchangeStream
from sidecar.sources.ccxt_support import rebase_url, rebase_urls
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_exchange import FakeExchange, case, exchange, markets_file, path_of  # noqa: F401
from sidecar.tests.fake_providers import Reply
from sidecar.tests.helpers import REPO
from sidecar.timeframe import Timeframe

pytest.importorskip("ccxt")

OHLCV_CASES = [("binance", "fetchOHLCV_1"), ("binance", "fetchOHLCV_2"), ("binance", "fetchOHLCV_3"),
               ("bybit", "fetchOHLCV_1"), ("kraken", "fetchOHLCV_1"), ("kucoin", "fetchOHLCV_1"),
               ("okx", "fetchOHLCV_1")]
H1 = Timeframe.parse("1h")


def env_for(fake: FakeExchange, exchange_id: str, **extra: str) -> dict[str, str]:
    suffix = exchange_id.upper()
    return {f"SIDECAR_CCXT_BASE_URL_{suffix}": fake.base_url, f"SIDECAR_CCXT_WS_URL_{suffix}": fake.ws_url,
            f"SIDECAR_CCXT_MARKETS_{suffix}": str(markets_file(exchange_id)),
            "SIDECAR_CCXT_STREAM": "off", "SIDECAR_HTTP_TIMEOUT_S": "2", **extra}


def make(fake: FakeExchange, exchange_id: str, tmp_path: Path, **extra: str) -> CcxtSource:
    settings = Settings(symbols=("BTCUSD",), sources=(f"ccxt:{exchange_id}",), data_dir=tmp_path)
    source = build_source(f"ccxt:{exchange_id}", settings, env_for(fake, exchange_id, **extra))
    assert isinstance(source, CcxtSource)
    source.exchange.enableRateLimit = False  # the tests' exchange answers at once
    return source


def body_rows(exchange_id: str, body: Any) -> list[list[float]]:
    """The candles as the exchange wrote them (strings and numbers as floats), oldest first."""
    if exchange_id == "binance":
        rows = [r[:6] for r in body]
    elif exchange_id == "bybit":
        rows = [r[:6] for r in body["result"]["list"]]
    elif exchange_id == "kraken":
        rows = [[r[0] * 1000, *r[1:5], r[6]] for r in next(iter(body["result"].values()))]
    elif exchange_id == "kucoin":  # [t_s, open, close, high, low, volume, turnover]
        rows = [[int(r[0]) * 1000, r[1], r[3], r[4], r[2], r[5]] for r in body["data"]]
    else:  # okx: [ts, o, h, l, c, vol, ...]
        rows = [r[:6] for r in body["data"]]
    return sorted([[int(r[0]), *(float(x) for x in r[1:6])] for r in rows])


@pytest.mark.parametrize(("exchange_id", "name"), OHLCV_CASES)
async def test_every_captured_case_gives_exactly_the_bars_in_the_body(
        exchange: FakeExchange, tmp_path: Path, exchange_id: str, name: str) -> None:
    c = case(exchange_id, name)
    exchange.default_by_path[path_of(c["url"])] = Reply(body=c["body"])
    source = make(exchange, exchange_id, tmp_path)
    await source.start()
    try:
        symbol, tf, since, limit, *params = c["input"]
        rows = await source.exchange.fetch_ohlcv(symbol, tf, since, limit, *params)
        assert rows == c["expected"]  # ccxt parses as ccxt's own tests say
        seen = exchange.seen[-1]
        assert seen.path == path_of(c["url"])
        sent, captured = dict(seen.query), dict(parse_qsl(urlsplit(c["url"]).query))
        if exchange_id == "bybit":
            # The captures are ccxt 4.5.90's, which rounds bybit's `since` up to the next
            # candle; the locked 4.5.64 sends it as given (the answer is the same body).
            assert int(sent.pop("start")) <= int(captured.pop("start"))
        assert sent == captured  # the URL ccxt builds
        raw = body_rows(exchange_id, json.loads(c["body"]))
        assert all(row in raw for row in c["expected"])  # nothing rounded or made up
        if params or since is None:
            return
        # The same range through the source's own history path: the same bars, exactly.
        tfo = Timeframe.parse(tf)
        start, end = c["expected"][0][0], c["expected"][-1][0] + tfo.ms
        bars = await source.fetch_history(symbol, tfo, start, end)
        assert [[b.t, b.o, b.h, b.l, b.c, b.v] for b in bars] == c["expected"]
        assert all(type(b.v) is float for b in bars) and {b.src for b in bars} == {f"ccxt:{exchange_id}"}
        assert all(b.t % tfo.ms == 0 for b in bars)
    finally:
        await source.close()


def klines(t0: int, n: int, tf_ms: int = 60_000, v: str = "1.23456789") -> bytes:
    return json.dumps([[t0 + i * tf_ms, "100.0", "101.5", "99.5", "100.25", v, t0 + (i + 1) * tf_ms - 1,
                        "0", 1, "0", "0", "0"] for i in range(n)]).encode()


ERRORS = [
    (Reply(status=429, body=b'{"code":-1003,"msg":"Too many requests; current limit is 1200."}'),
     "rate_limited", True),
    (Reply(status=418, body=b'{"code":-1003,"msg":"Way too many requests; IP banned until 1."}'),
     "rate_limited", True),
    (Reply(status=400, body=b'{"code":-1121,"msg":"Invalid symbol."}'), "unknown_symbol", False),
    (Reply(status=401, body=b'{"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}'),
     "auth", True),
    (Reply(status=503, body=b"<html>Service Unavailable</html>", content_type="text/html"),
     "unavailable", True),
    (Reply(status=504, body=b""), "unavailable", True),
    (Reply(status=500, body=b'{"code":-1001,"msg":"Internal error; unable to process your request."}'),
     "unavailable", True),
    (Reply(status=200, body=b'[[1706630400000, "435'), "bad_response", True),
    (Reply(status=200, body=b"<html>down for maintenance</html>", content_type="text/html"),
     "bad_response", True),
    (Reply(status=200, body=b"[]", delay_s=3.0), "unavailable", True),  # past the 2 s timeout
]


@pytest.mark.parametrize(("reply", "error_class", "counts"), ERRORS)
async def test_error_bodies_and_statuses_give_the_right_class(
        exchange: FakeExchange, tmp_path: Path, reply: Reply, error_class: str, counts: bool) -> None:
    exchange.route("/api/v3/klines", reply)
    source = make(exchange, "binance", tmp_path)
    try:
        with pytest.raises(ProviderError) as info:
            await source.fetch_history("BTCUSD", Timeframe.parse("1m"), 1706630400000, 1706630400000 + 180_000)
        assert info.value.error_class == error_class, str(info.value)
        assert info.value.counts_as_failure is counts
        assert info.value.source == "ccxt:binance"
        if error_class == "rate_limited":  # the budget backs off: nothing is sent meanwhile
            assert source.budget.remaining() == 0
    finally:
        await source.close()


KLINES = {"binance": "/api/v3/klines", "kraken": "/0/public/OHLC"}


@pytest.mark.parametrize(("exchange_id", "body", "empty_ok"), [
    ("binance", {"foo": 1}, False),
    ("binance", [[1706630400000, "1.0"]], False),  # rows, but not candles
    ("binance", {"code": 0, "data": None}, False),
    ("binance", [], True),
    ("kraken", {"foo": 1}, False),
    ("kraken", {"error": [], "result": {}}, False),  # an empty error list is no place for candles
    ("kraken", {"error": [], "result": {"XBTUSDT": [], "last": 1706630400}}, True),
])
async def test_a_well_formed_answer_of_the_wrong_shape_is_a_bad_response(
        exchange: FakeExchange, tmp_path: Path, exchange_id: str, body: Any, empty_ok: bool) -> None:
    exchange.default_by_path[KLINES[exchange_id]] = Reply.json(body)
    tf, start = Timeframe.parse("1m"), 1706630400000
    for way in ("history", "poll"):  # a source each: kraken's budget is one request a second
        source = make(exchange, exchange_id, tmp_path)
        try:
            if way == "history":
                call: Any = source.fetch_history("BTC/USDT", tf, start, start + 180_000)
            else:  # a poll whose every symbol failed so raises, for the circuit to count
                call = source.fetch_latest(["BTC/USDT"], tf, int(time.time() * 1000))
            if empty_ok:  # an empty candle list is no candles, not an error
                assert await call in ([], {"BTC/USDT": []})
                continue
            with pytest.raises(ProviderError) as info:
                await call
            assert info.value.error_class == "bad_response" and info.value.counts_as_failure
            assert f"{exchange_id} answered no candles: {json.dumps(body)[:40]}" in str(info.value)
            assert "answered no candles" in source.status()["last_error"]
        finally:
            await source.close()


async def test_unknown_market_fails_locally_without_a_request(exchange: FakeExchange, tmp_path: Path) -> None:
    source = make(exchange, "binance", tmp_path)
    try:
        out = await source.fetch_latest(["DOGE/EUR", "AAPL"], Timeframe.parse("1m"), int(time.time() * 1000))
        assert {k: v.error_class for k, v in out.items() if isinstance(v, ProviderError)} == {
            "DOGE/EUR": "unknown_symbol", "AAPL": "unknown_symbol"}
        assert not any(v.counts_as_failure for v in out.values() if isinstance(v, ProviderError))
        assert exchange.seen == []
        with pytest.raises(ProviderError) as info:  # binance has no 7m candles
            await source.fetch_history("BTCUSD", Timeframe.parse("7m"), 0, 420_000)
        assert info.value.error_class == "not_entitled"
    finally:
        await source.close()


async def test_latest_polls_and_history_pages_within_the_exchange_limits(
        exchange: FakeExchange, tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    tf = Timeframe.parse("1m")
    floor = tf.floor(now)

    def answer(seen: Any) -> Reply:
        since, limit = int(seen.query["startTime"]), int(seen.query["limit"])
        n = max(0, min(limit, (floor - since) // tf.ms + 1))
        return Reply(body=klines(since, n))

    exchange.responders_by_path["/api/v3/klines"] = answer
    source = make(exchange, "binance", tmp_path)
    try:
        out = await source.fetch_latest(["BTCUSD"], tf, now)
        bars = out["BTCUSD"]
        assert isinstance(bars, list) and [b.t for b in bars] == [floor - 120_000, floor - 60_000, floor]
        assert bars[-1].forming and not bars[0].forming and bars[0].v == 1.23456789
        assert exchange.seen[-1].query["symbol"] == "BTCUSDT"
        # History: pages of the exchange's largest limit (binance spot: 1000), since = last + 1 bar.
        exchange.seen.clear()
        start = floor - 2_500 * tf.ms
        got = await source.fetch_history("BTCUSD", tf, start, floor)
        assert [b.t for b in got] == list(range(start, floor, tf.ms))
        asked = [(int(s.query["startTime"]), int(s.query["limit"])) for s in exchange.seen]
        assert asked == [(start, 1000), (start + 1000 * tf.ms, 1000), (start + 2000 * tf.ms, 500)]
        limits = source.history_limits(tf)
        assert limits.span_ms == 5 * 1000 * tf.ms and limits.lookback_ms is None
    finally:
        await source.close()


async def test_history_stops_at_a_spent_budget_with_what_it_has(exchange: FakeExchange, tmp_path: Path) -> None:
    tf = Timeframe.parse("1m")
    exchange.responders_by_path["/api/v3/klines"] = lambda s: Reply(
        body=klines(int(s.query["startTime"]), int(s.query["limit"])))
    source = make(exchange, "binance", tmp_path)
    try:
        start = tf.floor(int(time.time() * 1000)) - 3_000 * tf.ms
        assert source.budget.try_acquire(source.budget.remaining() - 1)
        got = await source.fetch_history("BTCUSD", tf, start, start + 3_000 * tf.ms)
        assert len(got) == 1000 and len(exchange.seen) == 1  # resumable from there
        with pytest.raises(BudgetExhausted):
            await source.fetch_history("BTCUSD", tf, start, start + 3_000 * tf.ms)
    finally:
        await source.close()


async def test_markets_loaded_once_then_from_the_day_old_cache(
        exchange: FakeExchange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    markets = json.loads(markets_file("binance").read_text())
    env = {k: v for k, v in env_for(exchange, "binance").items() if "MARKETS" not in k}
    settings = Settings(symbols=("BTCUSD",), sources=("ccxt:binance",), data_dir=tmp_path)
    loads: list[str] = []

    async def load_markets(self: Any, reload: bool = False, params: Any = None) -> Any:
        loads.append(self.id)  # what the exchange answers, without its several endpoints
        return self.set_markets(markets)

    import ccxt.async_support

    monkeypatch.setattr(ccxt.async_support.Exchange, "load_markets", load_markets)
    for expected_from in ("exchange", "cache"):
        source = build_source("ccxt:binance", settings, env)
        assert isinstance(source, CcxtSource)
        try:
            await source.markets_ready()
            assert source.status()["markets"] == expected_from
            assert source.exchange.market("BTC/USDT")["id"] == "BTCUSDT"
        finally:
            await source.close()
    assert loads == ["binance"]
    cache = tmp_path / "ccxt" / "binance.markets.json"
    assert [m["symbol"] for m in json.loads(cache.read_text())] == [m["symbol"] for m in markets]
    old = time.time() - 86_401
    os.utime(cache, (old, old))
    source = build_source("ccxt:binance", settings, env)
    try:
        await source.markets_ready()  # type: ignore[attr-defined]
    finally:
        await source.close()
    assert loads == ["binance", "binance"]


@pytest.mark.parametrize(("variable", "value", "problem"), [
    ("SIDECAR_CCXT_BASE_URL_BINANCE", "ftp://x", "expected a http or https URL"),
    ("SIDECAR_CCXT_WS_URL_BINANCE", "http://127.0.0.1:1", "expected a ws or wss URL"),
    ("SIDECAR_CCXT_MARKETS_BINANCE", "/nonexistent/markets.json", "cannot read"),
    ("SIDECAR_CCXT_STREAM", "sometimes", "is not one of"),
    ("SIDECAR_CCXT_POLL_S", "-1", "out of range"),
])
def test_bad_settings_name_the_variable(tmp_path: Path, variable: str, value: str, problem: str) -> None:
    settings = Settings(symbols=("BTCUSD",), sources=("ccxt:binance",), data_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        build_source("ccxt:binance", settings, {variable: value})
    assert info.value.setting == variable and problem in info.value.problem


def test_bad_markets_file_and_unknown_exchange(tmp_path: Path) -> None:
    settings = Settings(symbols=("BTCUSD",), sources=("ccxt:binance",), data_dir=tmp_path)
    bad = tmp_path / "m.json"
    bad.write_text('{"BTC/USDT": {}}')
    with pytest.raises(ConfigError) as info:
        build_source("ccxt:binance", settings, {"SIDECAR_CCXT_MARKETS_BINANCE": str(bad)})
    assert info.value.setting == "SIDECAR_CCXT_MARKETS_BINANCE"
    with pytest.raises(ConfigError) as info:
        build_source("ccxt:nosuchexchange", settings, {})
    assert info.value.setting == "SIDECAR_SOURCES" and "nosuchexchange" in info.value.problem
    assert Settings.from_env({"SIDECAR_SOURCES": "ccxt:binance,ccxt:kraken,yahoo"}).sources == (
        "ccxt:binance", "ccxt:kraken", "yahoo")


@pytest.mark.parametrize(("exchange_id", "drop", "stream", "missing"), [
    ("binance", ("lowercaseId",), "ohlcv", "'lowercaseId'"),  # its streams are named by it
    ("binance", ("lowercaseId",), "trades", "'lowercaseId'"),
    ("binance", ("lowercaseId",), "off", None),  # polls do not need it
    ("binance", ("linear",), "off", "'linear'"),  # a contract market's endpoints follow it
    ("binance", ("linear", "inverse"), "ohlcv", "'linear', 'inverse'"),
    ("kraken", ("lowercaseId",), "ohlcv", None),  # kraken names its streams otherwise
])
def test_a_hand_built_markets_file_has_what_polls_and_streams_need(
        tmp_path: Path, exchange_id: str, drop: tuple[str, ...], stream: str, missing: str | None) -> None:
    markets = json.loads(markets_file(exchange_id).read_text())
    for market in markets:
        for name in drop:
            market.pop(name, None)
    path = tmp_path / "markets.json"
    path.write_text(json.dumps(markets))
    variable = f"SIDECAR_CCXT_MARKETS_{exchange_id.upper()}"
    settings = Settings(symbols=("BTCUSD",), sources=(f"ccxt:{exchange_id}",), data_dir=tmp_path)
    env = {variable: str(path), "SIDECAR_CCXT_STREAM": stream}
    if missing is None:
        source = build_source(f"ccxt:{exchange_id}", settings, env)
        assert isinstance(source, CcxtSource) and source.status()["exchange"] == exchange_id
        return
    with pytest.raises(ConfigError) as info:
        build_source(f"ccxt:{exchange_id}", settings, env)
    assert info.value.setting == variable
    assert f"lacks {missing}" in info.value.problem and str(path) in info.value.problem


def test_urls_rebased_scheme_and_host_path_and_query_kept() -> None:
    assert rebase_url("https://api.binance.com/api/v3?x=1", "http://127.0.0.1:9000") == \
        "http://127.0.0.1:9000/api/v3?x=1"
    api = {"public": "https://api.{hostname}/v5", "ws": {"spot": "wss://stream.x.com:9443/ws"},
           "list": ["https://a.b/c"], "n": 1}
    assert rebase_urls(api, "http://h:1", "ws://h:2") == {
        "public": "http://h:1/v5", "ws": {"spot": "ws://h:2/ws"}, "list": ["http://h:1/c"], "n": 1}
    assert rebase_urls(api, None, None) == api


def test_streamed_candles_without_a_usable_time_are_skipped_not_raised() -> None:
    """A candle whose time is NaN or infinity is no candle; the others of the same update stay."""
    async def ready() -> None:
        return None

    stream = ExchangeStream(None, "ohlcv", ["BTC/USDT"], "1h", ready, "ccxt:binance")
    good = [1_706_634_000_000, 2.0, 3.0, 1.0, 2.5, 10.0]
    stream.on_candles("BTC/USDT", [[float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0],
                                   [float("inf"), 1.0, 1.0, 1.0, 1.0, 1.0], good])
    assert stream.news["BTC/USDT"].candles == {good[0]: (good, 1)}


def test_mapping_spells_each_exchange() -> None:
    symbols = load_symbol_map()
    spell = {ex: getattr(symbols.for_source(f"ccxt:{ex}", "BTCUSD"), "ticker", None)
             for ex in ("binance", "kraken", "coinbase", "okx")}
    assert spell == {"binance": "BTC/USDT", "kraken": "BTC/USD", "coinbase": "BTC/USD", "okx": "BTC/USDT"}
    assert symbols.for_source("ccxt:binance", "AAPL") is None  # no exchange serves a US stock
    assert symbols.for_source("ccxt:binance", "EURUSD") is None  # no ccxt key: not served
    passed = symbols.for_source("ccxt:binance", "ETH/BTC")
    assert passed is not None and (passed.ticker, passed.asset_class) == ("ETH/BTC", "crypto")


async def test_fetch_command_line(exchange: FakeExchange, clean_env: dict[str, str], tmp_path: Path) -> None:
    c = case("binance", "fetchOHLCV_1")
    exchange.route("/api/v3/klines", Reply(body=c["body"]),
                   Reply(status=429, body=b'{"code":-1003,"msg":"Too many requests."}'))
    env = {**clean_env, **env_for(exchange, "binance"), "SIDECAR_DATA_DIR": str(tmp_path)}
    args = ["fetch", "ccxt:binance", "BTCUSD", "--timeframe", "1h",
            "--start", "2024-01-30T16:00:00Z", "--end", "2024-01-30T19:00:00Z"]
    for expected_code in (0, 10):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", *args, cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == expected_code, stderr.decode()
        if expected_code:
            assert stderr.decode().startswith("rate_limited: ccxt:binance:") and stdout == b""
            continue
        lines = [json.loads(line) for line in stdout.decode().splitlines()]
        assert [[r["t"], r["o"], r["h"], r["l"], r["c"], r["v"]] for r in lines] == c["expected"]
        assert {(r["symbol"], r["tf"], r["src"]) for r in lines} == {("BTCUSD", "1h", "ccxt:binance")}


def test_ccxt_is_imported_only_when_a_ccxt_source_is_configured(tmp_path: Path) -> None:
    code = ("import sys; from sidecar.settings import Settings; from sidecar.sources import build_source; "
            "import sidecar.app.daemon, sidecar.cli; "
            "build_source('sim', Settings(data_dir=__import__('pathlib').Path(sys.argv[1]))); "
            "assert 'ccxt' not in sys.modules, 'ccxt imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True, timeout=60)


async def test_the_circuit_counts_only_what_should_count(exchange: FakeExchange, tmp_path: Path) -> None:
    from sidecar.breaker import SourceCircuits

    tf = Timeframe.parse("1m")
    source = make(exchange, "binance", tmp_path)
    breaker = SourceCircuits.for_source(source, ["BTCUSD"], fail_max=3).lane(None)
    now = int(time.time() * 1000)
    try:
        # Unknown markets (local BadSymbol, the exchange's -1121) and a spent budget: still closed.
        exchange.default_by_path["/api/v3/klines"] = Reply(status=400, body=b'{"code":-1121,"msg":"Invalid symbol."}')
        for symbols in (["DOGE/EUR"], ["BTCUSD"], ["BTCUSD"], ["BTCUSD"]):
            await breaker.call(lambda s=symbols: source.fetch_latest(s, tf, now))
        assert source.budget.try_acquire(source.budget.remaining())
        await breaker.call(lambda: source.fetch_latest(["BTCUSD"], tf, now))
        assert breaker.state == "closed"
        # Three outages in a row open it.
        await source.close()
        source = make(exchange, "binance", tmp_path)
        exchange.default_by_path["/api/v3/klines"] = Reply(status=503, body=b"")
        for _ in range(3):
            with pytest.raises(ProviderError):
                await breaker.call(lambda: source.fetch_latest(["BTCUSD"], tf, now))
        assert breaker.state == "open"
    finally:
        await source.close()
