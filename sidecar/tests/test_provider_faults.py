"""Provider faults through the local fake server (real HTTP) and the cycle on real Redis
and SQLite: a body cut mid-transfer, a ``Retry-After`` given as an HTTP date, and a
source that raises something other than :class:`ProviderError`."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sidecar.app.pipeline import Pipeline
from sidecar.errors import ProviderError
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.redis_store import RedisStore
from sidecar.sources._http import ProviderSource
from sidecar.sources.alphavantage import AlphaVantageSource
from sidecar.sources.base import LatestResult
from sidecar.sources.polygon import PolygonSource
from sidecar.sources.twelvedata import TwelveDataSource
from sidecar.sources.yahoo import YahooSource
from sidecar.sqlite_store import BarStore
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import ScriptedSource, series, settings
from sidecar.timeframe import Timeframe

M1 = Timeframe.parse("1m")
NOW = 1_900_000_000_000

#: source name -> (fake endpoint, a recorded body it answers with)
PROVIDERS = {
    "twelvedata": ("td", "twelvedata/time_series_AAPL_1min_2023-08-24.json"),
    "polygon": ("polygon", "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json"),
    "alphavantage": ("av", "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json"),
    "yahoo": ("yahoo", "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json"),
}


def make(name: str, fake: FakeProviders, budget: RateBudget, tmp_path: Path) -> ProviderSource:
    """The ``name`` source pointed at the fake server, with ``budget``."""
    provider = ProviderSettings.from_env({
        "TWELVEDATA_API_KEY": "k1", "POLYGON_API_KEY": "k2", "ALPHAVANTAGE_API_KEY": "k3",
        "SIDECAR_TWELVEDATA_BASE_URL": fake.base_url, "SIDECAR_POLYGON_BASE_URL": fake.base_url,
        "SIDECAR_ALPHAVANTAGE_BASE_URL": fake.base_url, "SIDECAR_YAHOO_BASE_URL": fake.base_url,
        "SIDECAR_YAHOO_STREAM": "0", "SIDECAR_HTTP_TIMEOUT_S": "10"})
    symbols = load_symbol_map()
    if name == "yahoo":
        return YahooSource(provider, symbols, budget, cache_dir=tmp_path / "yf")
    cls = {"twelvedata": TwelveDataSource, "polygon": PolygonSource,
           "alphavantage": AlphaVantageSource}[name]
    source: ProviderSource = cls(provider, symbols, budget)
    return source


async def failure(source: ProviderSource, symbol: str = "MSFT") -> ProviderError:
    """The error one latest-bars request for ``symbol`` ends with (raised or returned)."""
    await source.start()
    try:
        result = await source.fetch_latest([symbol], M1, NOW)
    except ProviderError as exc:
        return exc
    finally:
        await source.close()
    answer = result[symbol]
    assert isinstance(answer, ProviderError), answer
    return answer


@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_a_body_cut_mid_transfer_is_a_bad_response(
        name: str, fake: FakeProviders, tmp_path: Path) -> None:
    endpoint, body = PROVIDERS[name]
    fake.push(endpoint, Reply.fixture(body, cut=200))
    err = await failure(make(name, fake, RateBudget(name, per_minute=60), tmp_path))
    assert err.error_class == "bad_response", err
    assert "incomplete body" in str(err)


def http_date_in(seconds: int) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize("name", ["twelvedata", "polygon", "yahoo"])
async def test_retry_after_as_an_http_date_is_honoured(
        name: str, fake: FakeProviders, tmp_path: Path) -> None:
    """A 429 whose ``Retry-After`` is a date two minutes ahead: the budget refuses for
    those two minutes (the configured 60 s cooldown would be shorter), then admits."""
    endpoint, _ = PROVIDERS[name]
    clock = [0.0]
    budget = RateBudget(name, per_minute=60, clock=lambda: clock[0])
    # Yahoo's client asks a second time after an error status: both answers are 429s.
    reply = Reply(status=429, body=b"Too Many Requests", content_type="text/plain",
                  headers={"Retry-After": http_date_in(120)})
    fake.push(endpoint, reply, reply)
    err = await failure(make(name, fake, budget, tmp_path))
    assert err.error_class == "rate_limited", err
    assert err.retry_after is not None and 100 < err.retry_after <= 120
    clock[0] = 90.0
    assert budget.remaining() == 0
    clock[0] = 121.0
    assert budget.remaining() > 0


class Raising(ScriptedSource):
    """A source with a bug: it raises ``KeyError`` instead of a :class:`ProviderError`."""

    name = "buggy"

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        self.calls += 1
        raise KeyError("close")


async def test_a_source_raising_something_else_is_a_bad_response_and_the_next_source_serves(
        redis_store: RedisStore, bar_store: BarStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.pipeline")
    t0 = 1_700_000_000_000
    bars = {sym: series(sym, 3, t0, seed) for seed, sym in enumerate(("AAA", "BBB"))}
    buggy = Raising([])
    backup = ScriptedSource([{sym: [b[i]] for sym, b in bars.items()} for i in range(3)])
    pipe = Pipeline(settings(), [buggy, backup], redis_store, bar_store)
    for k in range(3):
        await pipe.run_cycle(t0 + k * 1000)
    assert (buggy.calls, backup.calls) == (3, 3)
    state = pipe.sources[0]
    assert (state.last_error_class, state.errors) == ("bad_response", 3)
    logged: list[Any] = [r for r in caplog.records if r.getMessage() == "source raised an unexpected error"]
    assert len(logged) == 3 and all(r.exc_info and r.exc_info[0] is KeyError for r in logged)
    assert pipe.stats.cycles == 3
    for sym, want in bars.items():
        assert [b.t for b in await redis_store.recent_bars(sym, "1s", 10)] == [b.t for b in want]
