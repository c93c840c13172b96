"""/health, /ready and /metrics over real HTTP on a pipeline with real Redis and SQLite:
ok → degraded when a source's circuit opens → down when no symbol has a fresh bar; the
Redis backlog in /metrics; a symbol's row as its state builds it."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import writer as writer_module
from sidecar.app.http import DaemonView, make_app
from sidecar.app.pipeline import Pipeline
from sidecar.app.symbol_state import SymbolState
from sidecar.app.ticker import SecondTicker
from sidecar.breaker import SourceCircuits
from sidecar.features import FeatureEngine
from sidecar.redis_store import RedisStore, connect
from sidecar.series import Grid, Series
from sidecar.settings import IndicatorPeriods
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import TF_1S, RedisServer, ScriptedSource, Switchable, series, settings
from sidecar.timeframe import Timeframe
from sidecar.validation import Verdict

T0 = 1_700_000_000_000


async def get(client: TestClient, path: str) -> tuple[int, Any]:
    resp = await client.get(path)
    if path == "/metrics":
        return resp.status, await resp.text()
    return resp.status, await resp.json()


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health_ok_degraded_down_and_metrics(redis_store: RedisStore, bar_store: BarStore) -> None:
    bars = {s: series(s, 50, T0, i) for i, s in enumerate(("AAA", "BBB"))}
    cursor = [0]
    primary, backup = Switchable("primary", bars, cursor), Switchable("backup", bars, cursor)
    circuits = SourceCircuits("primary", fail_max=2, reset_timeout_s=3600)
    pipe = Pipeline(settings(stale_after_ms=300), [primary, backup], redis_store, bar_store,
                    {"primary": circuits})
    ticker = SecondTicker()
    view = DaemonView(pipe, ticker)
    async with TestClient(TestServer(make_app(view))) as client:
        status, body = await get(client, "/ready")
        assert status == 503 and body == {"ready": False}

        view.ready = True
        tick = int(time.time() * 1000)  # the health clock is the wall clock
        for _ in range(3):
            await pipe.run_cycle(tick)
            tick += 1000
        status, ready = await get(client, "/ready")
        assert status == 200 and ready == {"ready": True}
        status, health = await get(client, "/health")
        assert status == 200 and health["status"] == "ok", health
        assert health["sources"]["primary"]["circuit"] == "closed"
        assert health["sources"]["primary"]["last_success_ms"] is not None
        assert health["symbols"]["AAA"]["last_price"] == bars["AAA"][2].c
        assert health["symbols"]["AAA"]["rsi"] is None  # 3 bars: RSI still warming up
        assert health["cycle"]["count"] == 3 and len(health["cycle"]["recent_ms"]) == 3
        assert health["bars"]["accepted"] == 6

        # The primary fails until its circuit opens; the backup keeps the symbols fresh.
        primary.fail = True
        for _ in range(3):
            await pipe.run_cycle(tick)
            tick += 1000
        status, health = await get(client, "/health")
        assert status == 200 and health["status"] == "degraded", health
        assert health["sources"]["primary"]["circuit"] == "open"
        assert health["sources"]["primary"]["last_error_class"] == "unavailable"
        assert any("primary" in r and "open" in r for r in health["reasons"])
        assert not health["symbols"]["AAA"]["stale"]

        status, text = await get(client, "/metrics")
        m = metrics(text)
        assert m[("sidecar_status", (("status", "degraded"),))] == 1.0
        assert m[("sidecar_status", (("status", "ok"),))] == 0.0
        assert m[("sidecar_source_circuit", (("source", "primary"), ("state", "open")))] == 1.0
        assert m[("sidecar_source_circuit", (("source", "backup"), ("state", "closed")))] == 1.0
        assert m[("sidecar_circuit_state", (("asset_class", "all"), ("source", "primary"),
                                            ("state", "open")))] == 1.0
        assert m[("sidecar_circuit_opens_total", (("asset_class", "all"), ("source", "primary")))] == 1
        assert m[("sidecar_cycles_total", ())] == 6
        assert m[("sidecar_cycle_duration_seconds_count", ())] == 6
        assert m[("sidecar_cycle_duration_seconds_bucket", (("le", "+Inf"),))] == 6
        assert m[("sidecar_bars_accepted_total", ())] == 12
        assert m[("sidecar_symbol_last_price", (("symbol", "BBB"),))] == bars["BBB"][5].c
        assert m[("sidecar_source_errors_total", (("source", "primary"),))] == 2
        assert {labels for name, labels in m if name == "sidecar_symbol_stale"} == {
            (("symbol", "AAA"),), (("symbol", "BBB"),)}

        # Every source fails: no symbol stays fresh -> down, 503.
        backup.fail = True
        await pipe.run_cycle(tick)
        await asyncio.sleep(0.4)  # > stale_after_ms
        status, health = await get(client, "/health")
        assert status == 503 and health["status"] == "down", health
        assert health["reasons"][0] == "no symbol has a fresh bar"
        assert all(s["stale"] for s in health["symbols"].values())
        m = metrics((await get(client, "/metrics"))[1])
        assert m[("sidecar_status", (("status", "down"),))] == 1.0
        assert m[("sidecar_symbol_stale", (("symbol", "AAA"),))] == 1.0


async def test_nothing_collected_yet_is_down_and_metrics_still_parse(
        redis_store: RedisStore, bar_store: BarStore) -> None:
    pipe = Pipeline(dataclasses.replace(settings()), [ScriptedSource([])], redis_store, bar_store)
    async with TestClient(TestServer(make_app(DaemonView(pipe, SecondTicker())))) as client:
        status, health = await get(client, "/health")
        assert status == 503 and health["status"] == "down"
        assert health["reasons"][0].startswith("not collecting")
        m = metrics((await get(client, "/metrics"))[1])
        assert math.isnan(m[("sidecar_symbol_last_price", (("symbol", "AAA"),))])
        assert m[("sidecar_ready", ())] == 0.0
        # No endpoint changes state: other methods are refused.
        assert (await client.post("/health")).status == 405


async def test_budget_left_in_health_and_metrics(redis_store: RedisStore, bar_store: BarStore) -> None:
    from sidecar.rate_budget import RateBudget

    budget = RateBudget("metered", per_minute=10, per_day=100)
    assert budget.try_acquire(3)

    class Metered(ScriptedSource):
        name = "metered"

        def status(self) -> dict[str, Any]:
            return {"budget": budget.status()}

    pipe = Pipeline(settings(), [Metered([])], redis_store, bar_store)
    async with TestClient(TestServer(make_app(DaemonView(pipe, SecondTicker())))) as client:
        _, health = await get(client, "/health")
        info = health["sources"]["metered"]
        assert (info["budget_left"], info["budget_left_today"]) == (7, 97)
        m = metrics((await get(client, "/metrics"))[1])
        assert m[("sidecar_source_budget_remaining", (("source", "metered"),))] == 7
        assert m[("sidecar_source_budget_remaining_today", (("source", "metered"),))] == 97


async def test_redis_backlog_and_refill_pending_in_metrics(
        tmp_path: Path, bar_store: BarStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis killed: each cycle's bars wait in the backlog; past its bound (3 bars here)
    the oldest are left to SQLite and a refill is due. Redis back (empty): the backlog
    is written and the refill puts back the rest, both gauges back to 0."""
    monkeypatch.setattr(writer_module, "MAX_REDIS_BACKLOG", 3)
    bars = {s: series(s, 5, T0, i) for i, s in enumerate(("AAA", "BBB"))}
    steps = [{s: [b[k]] for s, b in bars.items()} for k in range(5)]
    server = RedisServer(tmp_path / "redis")
    server.start()
    store = RedisStore(connect(server.url, timeout_s=5.0), "backlog")
    pipe = Pipeline(settings(), [ScriptedSource(steps)], store, bar_store, clock=lambda: T0 / 1000)

    def redis_gauges(text: str) -> tuple[float, float, float]:
        m = metrics(text)
        return (m[("sidecar_redis_up", ())], m[("sidecar_redis_backlog_bars", ())],
                m[("sidecar_redis_refill_pending", ())])

    try:
        await pipe.write_meta()
        async with TestClient(TestServer(make_app(DaemonView(pipe, SecondTicker(), ready=True)))) as client:
            await pipe.run_cycle(T0)
            assert redis_gauges((await get(client, "/metrics"))[1]) == (1.0, 0.0, 0.0)

            server.kill()
            await pipe.run_cycle(T0 + 1000)
            _, health = await get(client, "/health")
            assert health["redis"]["backlog"] == 2 and not health["redis"]["refill_pending"]
            assert redis_gauges((await get(client, "/metrics"))[1]) == (0.0, 2.0, 0.0)
            await pipe.run_cycle(T0 + 2000)  # 4 bars owed, room for 3
            assert redis_gauges((await get(client, "/metrics"))[1]) == (0.0, 3.0, 1.0)

            server.start()
            await pipe.run_cycle(T0 + 3000)
            await pipe.drain(timeout_s=30)
            assert redis_gauges((await get(client, "/metrics"))[1]) == (1.0, 0.0, 0.0)
            assert await store.bar_count("AAA", "1s") == 4
    finally:
        await store.close()
        server.kill()


def test_a_symbols_row_is_built_by_its_state() -> None:
    """:meth:`SymbolState.status`: the newest base bar (forming) and its age, the base
    map's RSI to 3 decimals on the symbol and its base timeframe, the 1m bar folding two
    closed base bars and the forming one, completeness where given, keys in /health order."""
    tf_1m = Timeframe.parse("1m")
    base = Series("AAA", TF_1S, FeatureEngine("AAA", "1s", IndicatorPeriods()))
    minute = Series("AAA", tf_1m, FeatureEngine("AAA", "1m", IndicatorPeriods()), Grid(tf_1m, None),
                    TF_1S.ms)
    st = SymbolState([base, minute], updated_ms=T0 + 2_100, via="poll", expect_ms=1_000)
    bars = series("AAA", 3, T0, 0)
    forming = dataclasses.replace(bars[2], forming=True)
    for b in (*bars[:2], forming):
        st.apply(b, Verdict.NEW)
    st.advance(T0 + 2_500, [])
    base.packed = msgpack.packb({"rsi": 61.234567})
    shares = {"session": 0.5}
    now = T0 + 3_000
    minute_t = T0 - T0 % 60_000
    row = st.status(now, 500, calendar="XNYS", extended_hours="exclude", completeness={"1m": shares})
    assert row == {
        "newest_bar_t": forming.t, "newest_bar_age_ms": now - forming.t, "updated_age_ms": 900,
        "last_price": forming.c, "forming": True, "rsi": 61.235, "src": "scripted", "stale": False,
        "via": "poll", "refresh_interval_ms": 1_000, "calendar": "XNYS", "market_open": True,
        "next_open": None, "extended_hours": "exclude",
        "timeframes": {
            "1s": {"newest_bar_t": forming.t, "newest_bar_age_ms": now - forming.t, "last_price": forming.c,
                   "forming": True, "rsi": 61.235, "base_bars": None, "rebuilding": False},
            "1m": {"newest_bar_t": minute_t, "newest_bar_age_ms": now - minute_t, "last_price": forming.c,
                   "forming": True, "rsi": None, "base_bars": 2, "rebuilding": False,
                   "completeness": shares},
        },
        "warming": False,
    }
    assert list(row) == ["newest_bar_t", "newest_bar_age_ms", "updated_age_ms", "last_price", "forming",
                         "rsi", "src", "stale", "via", "refresh_interval_ms", "calendar", "market_open",
                         "next_open", "extended_hours", "timeframes", "warming"]

    # Past its interval and stale_after: stale; while its market is closed: never.
    assert st.status(T0 + 3_601, 500, calendar=None, extended_hours=None, completeness=None)["stale"]
    st.market_open, st.next_open = False, T0 + 60_000
    closed = st.status(T0 + 3_601, 500, calendar=None, extended_hours=None, completeness=None)
    assert (closed["stale"], closed["market_open"], closed["next_open"]) == (False, False, T0 + 60_000)
    assert "completeness" not in closed["timeframes"]["1m"]

    empty = SymbolState([Series("BBB", TF_1S, FeatureEngine("BBB", "1s", IndicatorPeriods()))])
    assert empty.status(now, 500, calendar=None, extended_hours=None, completeness=None) == {
        "newest_bar_t": None, "newest_bar_age_ms": None, "updated_age_ms": None, "last_price": None,
        "forming": None, "rsi": None, "src": None, "stale": True, "via": "last", "refresh_interval_ms": 0,
        "calendar": None, "market_open": True, "next_open": None, "extended_hours": None,
        "timeframes": {"1s": {"newest_bar_t": None, "newest_bar_age_ms": None, "last_price": None,
                              "forming": None, "rsi": None, "base_bars": None, "rebuilding": False}},
        "warming": False,
    }
