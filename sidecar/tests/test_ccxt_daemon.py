"""The daemon as a user runs it with two ccxt exchanges, pointed at the local fake
exchange only through ``SIDECAR_CCXT_BASE_URL_<ID>`` / ``SIDECAR_CCXT_WS_URL_<ID>`` and
markets files (``SIDECAR_CCXT_MARKETS_<ID>``).

Binance answers minute klines up to now and streams them; Kraken is the fallback.
``/health`` shows both sources and Binance's stream; ``scan`` rows come from Binance;
a stream the exchange drops is reported, polled around (every second) and reconnected;
when Binance answers 503 Kraken serves the symbols in the same cycle and Binance's
circuit opens; SIGTERM ends the daemon cleanly with the exchanges closed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.tests.fake_exchange import FakeExchange, exchange  # noqa: F401
from sidecar.tests.fake_providers import Reply, Seen
from sidecar.tests.helpers import Daemon, eventually, free_port, http_get, scan

pytest.importorskip("ccxt")

MIN = 60_000
BASE = {"BTC": 50_000.0, "ETH": 3_000.0}
BINANCE_IDS = {"BTCUSDT": "BTC", "ETHUSDT": "ETH"}
KRAKEN_IDS = {"XXBTZUSD": "BTC", "XETHZUSD": "ETH"}
KLINES, OHLC = "/api/v3/klines", "/0/public/OHLC"
STREAM_PATH = "/stream"  # Binance tells spot streams by it


def price(coin: str, t_ms: int) -> float:
    return BASE[coin] + (t_ms // MIN) % 50


def minutes(since_ms: int, limit: int) -> list[int]:
    """Open times from ``since_ms`` (rounded up to a minute) up to the current minute."""
    now = int(time.time() * 1000)
    return list(range(-(-since_ms // MIN) * MIN, now + 1, MIN))[:limit]


def binance_klines(seen: Seen) -> Reply:
    coin = BINANCE_IDS[seen.query["symbol"]]
    stamps = minutes(int(seen.query.get("startTime", 0)), int(seen.query.get("limit", 500)))
    return Reply.json([[t, str(price(coin, t)), str(price(coin, t) + 1), str(price(coin, t) - 1),
                        str(price(coin, t)), "1.25", t + MIN - 1, "0", 1, "0", "0", "0"] for t in stamps])


def kraken_ohlc(seen: Seen) -> Reply:
    pair = seen.query["pair"]
    coin = KRAKEN_IDS[pair]
    stamps = minutes(int(seen.query.get("since", 0)) * 1000, 720)
    rows = [[t // 1000, str(price(coin, t)), str(price(coin, t) + 1), str(price(coin, t) - 1),
             str(price(coin, t)), str(price(coin, t)), "0.75", 3] for t in stamps]
    return Reply.json({"error": [], "result": {pair: rows, "last": stamps[-1] // 1000 if stamps else 0}})


def spot(market_id: str, symbol: str, **extra: Any) -> dict[str, Any]:
    base, quote = symbol.split("/")
    return {"id": market_id, "symbol": symbol, "base": base, "quote": quote, "baseId": base,
            "quoteId": quote, "type": "spot", "spot": True, "margin": False, "swap": False,
            "future": False, "option": False, "contract": False, "active": True,
            "precision": {"amount": 1e-08, "price": 1e-08}, "limits": {}, "info": {}, **extra}


def write_markets(tmp_path: Path) -> dict[str, str]:
    binance = [spot(i, f"{c}/USDT", lowercaseId=i.lower()) for i, c in BINANCE_IDS.items()]
    kraken = [spot(i, f"{c}/USD", altname=f"{'XBT' if c == 'BTC' else c}USD",
                   wsId=f"{'XBT' if c == 'BTC' else c}/USD") for i, c in KRAKEN_IDS.items()]
    out = {}
    for name, markets in (("BINANCE", binance), ("KRAKEN", kraken)):
        path = tmp_path / f"{name.lower()}.markets.json"
        path.write_text(json.dumps(markets))
        out[f"SIDECAR_CCXT_MARKETS_{name}"] = str(path)
    return out


def kline(symbol: str, t: int, close: float) -> dict[str, Any]:
    c = str(close)
    return {"e": "kline", "E": t + 1, "s": symbol,
            "k": {"t": t, "T": t + MIN - 1, "s": symbol, "i": "1m", "o": c, "c": c, "h": c, "l": c,
                  "v": "2.5", "x": False}}


@pytest.mark.asyncio
async def test_daemon_on_two_exchanges_stream_drop_fallback_and_clean_exit(
        exchange: FakeExchange, clean_env: dict[str, str], tmp_path: Path,
        daemons: Callable[..., Daemon]) -> None:
    exchange.responders_by_path[KLINES] = binance_klines
    exchange.responders_by_path[OHLC] = kraken_ohlc
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="ccxt:binance,ccxt:kraken", SIDECAR_SYMBOLS="BTCUSD,ETHUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="300",
               SIDECAR_CCXT_BASE_URL_BINANCE=exchange.base_url,
               SIDECAR_CCXT_WS_URL_BINANCE=exchange.ws_url + STREAM_PATH,
               SIDECAR_CCXT_BASE_URL_KRAKEN=exchange.base_url,
               # Kraken streams too: on the fake, never the real exchange.
               SIDECAR_CCXT_WS_URL_KRAKEN=exchange.ws_url,
               SIDECAR_CCXT_POLL_S="30", SIDECAR_HTTP_TIMEOUT_S="5",
               SIDECAR_BREAKER_FAIL_MAX="2", SIDECAR_BREAKER_RESET_S="600",
               SIDECAR_FETCH_TIMEOUT_S="10", SIDECAR_OUTLIER_K="0", **write_markets(tmp_path))
    daemon = await asyncio.to_thread(daemons, env)
    proc = daemon.proc

    async def health() -> dict[str, Any]:
        return (await asyncio.to_thread(http_get, port, "/health"))[1]

    def binance_subs() -> list[Any]:
        return [s for s in exchange.subscriptions if isinstance(s, dict) and s.get("method") == "SUBSCRIBE"]

    try:
        await asyncio.to_thread(daemon.wait_ready, 60)

        async def fresh_from(src: str) -> Any:
            rows = await asyncio.to_thread(scan, env)
            return rows if len(rows) == 2 and all(r.get("src") == src and not r.get("stale") for r in rows) else None

        async def warm_from(src: str) -> Any:
            rows = await fresh_from(src)
            return rows if rows and not any(r.get("warming") for r in rows) else None

        # Live first: rows are fresh at once, their handles open once the history is in.
        rows = await eventually(lambda: warm_from("ccxt:binance"), 60, "warm fresh rows from ccxt:binance")
        assert {r["symbol"] for r in rows} == {"BTCUSD", "ETHUSD"}
        assert all(r["rsi"] is not None for r in rows)  # warmed on the bootstrap's history
        h = await health()
        assert set(h["sources"]) == {"ccxt:binance", "ccxt:kraken"}
        binance = h["sources"]["ccxt:binance"]
        assert (binance["exchange"], binance["markets"], binance["circuit"]) == ("binance", "file", "closed")
        assert binance["stream"]["mode"] == "ohlcv"
        assert set(binance["stream"]["markets"]) == {"BTC/USDT", "ETH/USDT"}

        # The stream: a kline moves the forming bar between polls.
        await eventually(lambda: asyncio.sleep(0, len(binance_subs()) >= 2), 20, "binance's subscriptions")
        assert sorted(p for s in binance_subs() for p in s["params"]) == ["btcusdt@kline_1m",
                                                                         "ethusdt@kline_1m"]

        async def streamed() -> Any:
            t = int(time.time() * 1000) // MIN * MIN
            await exchange.send(kline("BTCUSDT", t, 51_234.5), path=STREAM_PATH)
            s = (await health())["symbols"]["BTCUSD"]
            return s["last_price"] == 51_234.5 and s["via"] == "stream"

        await eventually(streamed, 20, "the streamed kline in the forming bar")
        h = await health()
        assert h["sources"]["ccxt:binance"]["stream"]["connected"] is True
        assert h["sources"]["ccxt:binance"]["stream"]["markets"]["BTC/USDT"] is True  # it answered

        # The exchange drops the stream and refuses it for a while: /health says so, the
        # symbols are polled every second meanwhile (not every SIDECAR_CCXT_POLL_S), and
        # they stay fresh.
        exchange.refuse_streams = True
        await exchange.drop(path=STREAM_PATH)

        async def dropped() -> Any:
            h = await health()
            stream = h["sources"]["ccxt:binance"]["stream"]
            return h if stream["connected"] is False and stream["errors"] >= 1 else None

        h = await eventually(dropped, 20, "the drop in /health")
        assert h["sources"]["ccxt:binance"]["stream"]["last_error"]
        polls_at_drop = len(exchange.requests_to(KLINES))

        async def polled_meanwhile() -> Any:
            polls = exchange.requests_to(KLINES)[polls_at_drop:]
            return len({p.query["symbol"] for p in polls}) == 2 and len(polls) >= 6

        await eventually(polled_meanwhile, 30, "polls every second while the stream is down")
        # Each asks back over the bars before the forming one (what the stream missed).
        assert all(int(p.query["limit"]) >= 3 for p in exchange.requests_to(KLINES)[polls_at_drop:])
        h = await health()
        assert h["sources"]["ccxt:binance"]["stream"]["connected"] is False
        assert not any(s["stale"] for s in h["symbols"].values())
        assert {s["src"] for s in h["symbols"].values()} == {"ccxt:binance"}

        # The stream comes back: it reconnects and resubscribes.
        subs_before = len(binance_subs())
        exchange.refuse_streams = False

        async def reconnected() -> Any:
            if len(binance_subs()) < subs_before + 2:  # both markets subscribed again
                return False
            t = int(time.time() * 1000) // MIN * MIN
            await exchange.send(kline("BTCUSDT", t, 51_300.0), kline("ETHUSDT", t, 3_030.0), path=STREAM_PATH)
            h = await health()
            stream = h["sources"]["ccxt:binance"]["stream"]
            return stream["connected"] and stream["reconnects"] >= 1 and \
                h["symbols"]["BTCUSD"]["last_price"] == 51_300.0

        await eventually(reconnected, 90, "the stream back")

        # Binance fails: Kraken serves the symbols in the same cycle, Binance's circuit opens.
        first_failure = len(exchange.seen)
        exchange.responders_by_path[KLINES] = lambda seen: Reply(status=503, body=b"", content_type="text/plain")
        await eventually(lambda: fresh_from("ccxt:kraken"), 60, "fallback to ccxt:kraken")
        later = exchange.seen[first_failure:]
        failed = next(i for i, s in enumerate(later) if s.path == KLINES)
        to_kraken = next(i for i, s in enumerate(later) if s.path == OHLC)
        # Between the first 503 and Kraken's answer no symbol was asked of Binance twice:
        # Kraken was asked in the cycle Binance failed, not a later one.
        asked = [s.query["symbol"] for s in later[failed:to_kraken] if s.path == KLINES]
        assert failed < to_kraken and len(asked) == len(set(asked))

        async def circuit_open() -> Any:
            h = await health()
            return h if h["sources"]["ccxt:binance"]["circuit"] == "open" else None

        h = await eventually(circuit_open, 60, "binance's circuit open")
        assert h["sources"]["ccxt:binance"]["last_error_class"] == "unavailable"
        assert h["sources"]["ccxt:kraken"]["circuit"] == "closed"
        assert not any(s["stale"] for s in h["symbols"].values())
        assert {s["src"] for s in h["symbols"].values()} == {"ccxt:kraken"}

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        output = daemon.log_text() + daemon.out_path.read_text(errors="replace")
        for warning in ("Unclosed client session", "Unclosed connector", "requires to release all resources"):
            assert warning not in output
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
