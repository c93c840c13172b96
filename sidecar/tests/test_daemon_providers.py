"""The daemon as a user runs it, on the real provider code, pointed at the fake providers
only through the ``SIDECAR_*_BASE_URL`` settings and the stream URL.

Yahoo answers minute bars up to now and streams prices; Polygon is the fallback.
Features come from Yahoo, move with the stream between polls, and when Yahoo fails
the symbol is served by Polygon while Yahoo's circuit opens.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.tests.fake_providers import FakeProviders, Reply, Seen, fake  # noqa: F401
from sidecar.tests.helpers import Daemon, eventually, free_port, http_get, scan

MIN = 60_000


def price(t_ms: int) -> float:
    return 50_000.0 + (t_ms // MIN) % 50


def yahoo_chart(seen: Seen) -> Reply:
    now = int(time.time() * 1000)
    p1 = int(seen.query["period1"]) * 1000
    end = min(int(seen.query["period2"]) * 1000, now + 1)
    stamps = list(range(-(-p1 // MIN) * MIN, end, MIN))
    closes = [price(t) for t in stamps]
    quote = {"open": closes, "high": [c + 1 for c in closes], "low": [c - 1 for c in closes],
             "close": closes, "volume": [10.0] * len(closes)}
    return Reply.json({"chart": {"result": [{
        "meta": {"symbol": "BTC-USD", "instrumentType": "CRYPTOCURRENCY",
                 "exchangeTimezoneName": "UTC", "regularMarketTime": now // 1000},
        "timestamp": [t // 1000 for t in stamps], "indicators": {"quote": [quote]}}],
        "error": None}})


def polygon_aggs(seen: Seen) -> Reply:
    parts = seen.path.split("/")  # /v2/aggs/ticker/X:BTCUSD/range/1/minute/{from}/{to}
    start, end = int(parts[-2]), min(int(parts[-1]) + 1, int(time.time() * 1000) + 1)
    results = [{"t": t, "o": price(t), "h": price(t) + 1, "l": price(t) - 1, "c": price(t), "v": 3}
               for t in range(-(-start // MIN) * MIN, end, MIN)]
    return Reply.json({"status": "OK", "results": results, "resultsCount": len(results)})


@pytest.mark.asyncio
async def test_daemon_on_fake_providers_stream_and_fallback(
    fake: FakeProviders, clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]
) -> None:
    fake.responders["yahoo"] = yahoo_chart
    fake.responders["polygon"] = polygon_aggs
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="yahoo,polygon", SIDECAR_SYMBOLS="BTCUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="300",
               SIDECAR_YAHOO_BASE_URL=fake.base_url, SIDECAR_YAHOO_STREAM_URL=fake.stream_url,
               SIDECAR_YAHOO_POLL_S="2", SIDECAR_POLYGON_BASE_URL=fake.base_url,
               POLYGON_API_KEY="PGKEY123", SIDECAR_POLYGON_PER_MINUTE="1000",
               SIDECAR_BREAKER_FAIL_MAX="2", SIDECAR_BREAKER_RESET_S="600",
               SIDECAR_FETCH_TIMEOUT_S="3", SIDECAR_OUTLIER_K="0")
    daemon = await asyncio.to_thread(daemons, env)
    proc = daemon.proc
    try:
        await asyncio.to_thread(daemon.wait_ready, 60)

        async def fresh_from(src: str) -> Any:
            rows = await asyncio.to_thread(scan, env)
            return rows if rows and rows[0]["src"] == src and not rows[0]["stale"] else None

        async def warm_from(src: str) -> Any:
            rows = await fresh_from(src)
            return rows if rows and not rows[0].get("warming") else None

        # Live first: fresh at once, the handles open once the history is in.
        rows = await eventually(lambda: warm_from("yahoo"), 60, "warm fresh features from yahoo")
        assert rows[0]["rsi"] is not None  # warmed on the bootstrap's history
        _, health = await asyncio.to_thread(http_get, port, "/health")
        assert set(health["sources"]) == {"yahoo", "polygon"}
        assert health["sources"]["yahoo"]["circuit"] == "closed"

        # A streamed price moves the forming bar between polls.
        await fake.wait_subscribed()
        assert fake.stream_subscriptions[0] == {"subscribe": ["BTC-USD"]}

        async def streamed() -> Any:
            await fake.send_stream({"id": "BTC-USD", "price": 51_234.5, "time": int(time.time() * 1000)})
            _, h = await asyncio.to_thread(http_get, port, "/health")
            sym = h["symbols"]["BTCUSD"]
            return sym["last_price"] == 51_234.5 and sym["via"] == "stream"

        await eventually(streamed, 20, "the streamed price in the forming bar")

        # Yahoo fails: the symbol is served by Polygon, and Yahoo's circuit opens.
        fake.responders["yahoo"] = lambda seen: Reply(status=500, body=b"<html>down</html>",
                                                      content_type="text/html")
        await eventually(lambda: fresh_from("polygon"), 30, "fallback to polygon")

        async def yahoo_open() -> Any:
            _, h = await asyncio.to_thread(http_get, port, "/health")
            return h if h["sources"]["yahoo"]["circuit"] == "open" else None

        health = await eventually(yahoo_open, 30, "yahoo's circuit open")
        assert health["sources"]["yahoo"]["last_error_class"] == "unavailable"
        assert not health["symbols"]["BTCUSD"]["stale"]
        assert "PGKEY123" not in str(health)
        assert all("PGKEY123" not in s.url for s in fake.seen)  # the key travels in a header
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
