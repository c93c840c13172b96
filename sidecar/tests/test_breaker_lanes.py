"""One asset class of a source fails: its circuit opens, the other class keeps that source.

Twelve Data through the fake provider server, in the cycle (real Redis and SQLite):
its stock requests answer the real AAPL minute fixture re-stamped to the test's
clock, its forex requests fail with real HTTP 500s. The ``twelvedata/fx`` breaker
opens after the configured failures while AAPL goes on being polled from Twelve
Data; after the reset timeout it admits exactly one probe (a failed one re-opens
it), and a successful probe closes it; ``/health`` and ``/metrics`` show each breaker.
A probe carries one symbol; the class's other symbols fall through to the next
source in the same cycle. The clock is driven: no sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app.health import health_report
from sidecar.app.http import DaemonView, make_app
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.bar import Bar
from sidecar.breaker import SourceCircuits
from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources.base import LatestResult, Source
from sidecar.sources.twelvedata import TwelveDataSource
from sidecar.sqlite_store import BarStore
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, Seen, fake, fixture  # noqa: F401
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

T0 = 1_763_802_000  # 2025-11-22 09:00 UTC, epoch seconds
AAPL_1M = "twelvedata/time_series_AAPL_1min_2023-08-24.json"
FAIL_MAX, RESET_S = 3, 60


def restamped(now_s: float, tz: str) -> bytes:
    """The real AAPL minute answer, its rows moved so the newest opens in the current minute."""
    doc = json.loads(fixture(AAPL_1M))
    zone = ZoneInfo(tz)
    newest = int(now_s // 60 * 60)
    for i, row in enumerate(doc["values"]):  # newest first
        row["datetime"] = datetime.fromtimestamp(newest - 60 * i, UTC).astimezone(zone).strftime(
            "%Y-%m-%d %H:%M:%S")
    if tz == "UTC":
        del doc["meta"]["exchange_timezone"]  # Twelve Data's forex answers state no zone: UTC
    return json.dumps(doc).encode()


async def scrape(pipe: Pipeline) -> str:
    """``/metrics`` over HTTP on 127.0.0.1."""
    async with TestClient(TestServer(make_app(DaemonView(pipe, SecondTicker())))) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        return await resp.text()


@pytest.mark.asyncio
async def test_failing_asset_class_opens_its_breaker_while_the_other_is_served(
    fake: FakeProviders, redis_store: RedisStore, bar_store: BarStore
) -> None:
    now = Clock(float(T0))

    fx_fails = [True]

    def answer(seen: Seen) -> Reply:
        if seen.query["symbol"] == "AAPL":
            return Reply(body=restamped(now.t, "America/New_York"))
        if fx_fails[0]:
            return Reply.json({"code": 500, "message": "Internal server error", "status": "error"},
                              status=500)
        return Reply(body=restamped(now.t, "UTC"))

    fake.responders["td"] = answer
    provider = ProviderSettings.from_env({"TWELVEDATA_API_KEY": "TDKEY0123456789",
                                          "SIDECAR_TWELVEDATA_BASE_URL": fake.base_url})
    source = TwelveDataSource(provider, load_symbol_map(),
                              RateBudget("twelvedata", per_minute=8, clock=now, wall_clock=now))
    settings = Settings(symbols=("AAPL", "EURUSD"), sources=("twelvedata",),
                        timeframe=Timeframe.parse("1m"), outlier_k=0.0, fetch_timeout_s=5.0,
                        market_hours=False)  # T0 is a Saturday: the lanes, not the calendar, are tested
    circuits = SourceCircuits.for_source(source, settings.symbols, fail_max=FAIL_MAX,
                                         reset_timeout_s=RESET_S, clock=now)
    assert [b.name for b in circuits] == ["twelvedata/fx", "twelvedata/stock"]
    pipe = Pipeline(settings, [source], redis_store, bar_store, {"twelvedata": circuits}, clock=now)
    fx, stock = circuits.lane("fx"), circuits.lane("stock")

    def asked(symbol: str) -> list[Seen]:
        return [s for s in fake.requests_to("td") if s.query["symbol"] == symbol]

    async def run_until(done: object, limit_s: int) -> None:
        for _ in range(limit_s):
            await pipe.run_cycle(int(now.t * 1000))
            if callable(done) and done():
                return
            now.advance(1)
        raise AssertionError("condition not reached within the driven time")

    await source.start()
    try:
        # The forex requests fail until the fx circuit opens; stocks go on meanwhile.
        await run_until(lambda: fx.state == "open", 300)
        assert len(asked("EUR/USD")) == FAIL_MAX
        assert stock.state == "closed" and circuits.state == "open"
        assert all(len(s.query["symbol"].split(",")) == 1 for s in fake.requests_to("td"))
        opened_at, aapl_before = now.t, len(asked("AAPL"))

        # While it is open: no forex request at all, AAPL still polled from Twelve Data.
        await run_until(lambda: now.t >= opened_at + RESET_S - 2, RESET_S)
        assert fx.state == "open" and len(asked("EUR/USD")) == FAIL_MAX
        assert len(asked("AAPL")) > aapl_before
        assert pipe.planner.holder("AAPL") == "twelvedata"
        assert pipe.symbols["AAPL"].base.last is not None or pipe.symbols["AAPL"].base.forming is not None
        feats = (await redis_store.read_features(["AAPL"], "1m"))[0]
        assert feats is not None and feats["src"] == "twelvedata"

        report = health_report(pipe, SecondTicker(), ready=True)
        breakers = {b["asset_class"]: b for b in report["sources"]["twelvedata"]["breakers"]}
        assert breakers["fx"]["state"] == "open" and breakers["fx"]["last_error_class"] == "unavailable"
        assert breakers["fx"]["last_success_ms"] is None
        assert breakers["stock"]["state"] == "closed"
        assert breakers["stock"]["last_success_ms"] is not None
        assert any("twelvedata/fx" in r for r in report["reasons"])
        metrics = await scrape(pipe)
        assert 'sidecar_circuit_state{asset_class="fx",source="twelvedata",state="open"} 1.0' in metrics
        assert 'sidecar_circuit_state{asset_class="stock",source="twelvedata",state="closed"} 1.0' in metrics
        assert 'sidecar_circuit_opens_total{asset_class="fx",source="twelvedata"} 1.0' in metrics
        # Labels range over the configured classes only.
        assert {line.split('asset_class="')[1].split('"')[0]
                for line in metrics.splitlines() if line.startswith("sidecar_circuit")} == {"fx", "stock"}

        # After the timeout exactly one probe; it fails: open again, for another timeout.
        await run_until(lambda: len(asked("EUR/USD")) > FAIL_MAX, 10)
        assert len(asked("EUR/USD")) == FAIL_MAX + 1 and fx.state == "open"
        reopened_at = now.t
        assert reopened_at >= opened_at + RESET_S
        now.advance(1)
        await run_until(lambda: now.t >= reopened_at + RESET_S - 1, RESET_S)
        assert len(asked("EUR/USD")) == FAIL_MAX + 1

        # The provider is back: the next probe succeeds and closes the circuit.
        fx_fails[0] = False
        await run_until(lambda: fx.state == "closed", 10)
        assert len(asked("EUR/USD")) == FAIL_MAX + 2
        assert pipe.planner.holder("EURUSD") == "twelvedata"
        assert fx.status()["last_success_ms"] == int(now.t * 1000)
        feats = (await redis_store.read_features(["EURUSD"], "1m"))[0]
        assert feats is not None and feats["src"] == "twelvedata" and feats["via"] == "poll"
        assert stock.status()["opens"] == 0 and fx.status()["opens"] == 2
    finally:
        await source.close()


class LanedSource(Source):
    """Serves ``*USD`` symbols as forex and the rest as stocks, one breaker per class."""

    def __init__(self, name: str, *, fx_down: bool = False) -> None:
        self.name = name
        self.fx_down = fx_down
        self.asked: list[list[str]] = []

    def breaker_lane(self, symbol: str) -> str | None:
        return "fx" if symbol.endswith("USD") else "stock"

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        self.asked.append(list(symbols))
        if self.fx_down and self.breaker_lane(symbols[0]) == "fx":
            raise ProviderError("unavailable", "fx feed down", source=self.name)
        t = tf.floor(now_ms)
        return {s: [Bar(s, tf.name, t, 1.0, 1.0, 1.0, 1.0, None, self.name, forming=True)]
                for s in symbols}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


@pytest.mark.asyncio
async def test_an_open_class_probes_with_one_symbol_the_rest_fall_through(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    now = Clock(float(T0))
    primary, backup = LanedSource("primary", fx_down=True), LanedSource("backup")
    symbols = ("AAA", "EURUSD", "GBPUSD", "AUDUSD")
    settings = Settings(symbols=symbols, sources=("primary", "backup"), timeframe=Timeframe.parse("1m"),
                        market_hours=False)
    circuits = SourceCircuits.for_source(primary, symbols, fail_max=1, reset_timeout_s=RESET_S,
                                         clock=now)
    pipe = Pipeline(settings, [primary, backup], redis_store, bar_store, {"primary": circuits},
                    clock=now)
    out = await pipe.router.fetch(int(now.t * 1000))
    # One request per class: the fx batch failed (circuit open), its symbols went to the backup.
    assert sorted(map(sorted, primary.asked)) == [["AAA"], ["AUDUSD", "EURUSD", "GBPUSD"]]
    assert circuits.lane("fx").state == "open" and circuits.lane("stock").state == "closed"
    assert {s: out[s][0].src for s in symbols} == {"AAA": "primary", "EURUSD": "backup",
                                                   "GBPUSD": "backup", "AUDUSD": "backup"}
    primary.asked.clear()
    now.advance(RESET_S)
    out = await pipe.router.fetch(int(now.t * 1000))
    # The probe carries one symbol; the failure re-opens; every fx symbol is served by the backup.
    assert [batch for batch in primary.asked if batch != ["AAA"]] == [["EURUSD"]]
    assert circuits.lane("fx").state == "open"
    assert all(out[s][0].src == "backup" for s in ("EURUSD", "GBPUSD", "AUDUSD"))
