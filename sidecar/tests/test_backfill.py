"""Backfill within each provider's range limits, resumable, and gap repair.

The fake Yahoo chart endpoint answers minute bars for exactly the asked range and
refuses, like Yahoo, a 1m request longer than 8 days or older than 30 days (HTTP
422). Its request log shows what the backfill asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from sidecar.app.bootstrap import DAY_MS, backfill_symbol, repair_gaps
from sidecar.bar import Bar
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.sources.base import LOOKBACK_MARGIN_MS, LatestResult, Source
from sidecar.sources.yahoo import YahooSource
from sidecar.sqlite_store import BarStore
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, Seen, fake  # noqa: F401
from sidecar.timeframe import Timeframe

TF = Timeframe.parse("1m")
MIN = 60_000


def price(t_ms: int) -> float:
    return 100.0 + (t_ms // MIN) % 97 / 10


class YahooMinutes:
    """Yahoo's chart endpoint for BTC-USD minutes (24/7), with Yahoo's 1m range limits."""

    def __init__(self, holes: tuple[int, int] | None = None) -> None:
        self.holes = holes  # [start, end) served without bars (to make a gap)
        self.refused: list[str] = []
        self.slow_after: int | None = None
        self.calls = 0
        self.hanging = asyncio.Event()  # set when a request is made to hang

    def __call__(self, seen: Seen) -> Reply:
        self.calls += 1
        p1, p2 = int(seen.query["period1"]), int(seen.query["period2"])
        now_s = time.time()
        if p2 - p1 > 8 * 86_400:
            msg = "Only 8 days worth of 1m granularity data are allowed to be fetched per request."
        elif p1 < now_s - 30 * 86_400:
            msg = (f"1m data not available for startTime={p1}. "
                   "The requested range must be within the last 30 days.")
        else:
            msg = ""
        if msg:
            self.refused.append(msg)
            return Reply.json({"chart": {"result": None, "error": {
                "code": "Unprocessable Entity", "description": msg}}}, status=422)
        first = -(-p1 * 1000 // MIN) * MIN
        stamps = [t for t in range(first, p2 * 1000, MIN)
                  if not (self.holes and self.holes[0] <= t < self.holes[1])]
        closes = [price(t) for t in stamps]
        body = {"chart": {"result": [{
            "meta": {"symbol": "BTC-USD", "instrumentType": "CRYPTOCURRENCY",
                     "exchangeTimezoneName": "UTC", "regularMarketTime": int(now_s)},
            "timestamp": [t // 1000 for t in stamps],
            "indicators": {"quote": [{"open": closes, "high": [c + 0.05 for c in closes],
                                      "low": [c - 0.05 for c in closes], "close": closes,
                                      "volume": [1.0] * len(closes)}]}}], "error": None}}
        delay = 3.0 if self.slow_after is not None and self.calls > self.slow_after else 0.0
        if delay:
            self.hanging.set()
        return Reply.json(body, delay_s=delay)


def source(fake: FakeProviders, tmp_path: Path) -> YahooSource:
    provider = ProviderSettings.from_env({"SIDECAR_YAHOO_BASE_URL": fake.base_url,
                                          "SIDECAR_YAHOO_STREAM": "0", "SIDECAR_HTTP_TIMEOUT_S": "5"})
    return YahooSource(provider, load_symbol_map(), RateBudget("yahoo", per_minute=1_000),
                       cache_dir=tmp_path / "yf")


def asked(fake: FakeProviders) -> list[tuple[int, int]]:
    return [(int(s.query["period1"]) * 1000, int(s.query["period2"]) * 1000)
            for s in fake.requests_to("yahoo")]


@pytest.mark.asyncio
async def test_interrupted_backfill_resumes_within_yahoo_limits(
    fake: FakeProviders, bar_store: BarStore, tmp_path: Path
) -> None:
    chart = YahooMinutes()
    chart.slow_after = 2  # the third request hangs: the run is interrupted there
    fake.responders["yahoo"] = chart
    src = source(fake, tmp_path)
    await src.start()
    now = int(time.time() * 1000)
    end = TF.floor(now)
    start = end - 40 * DAY_MS  # more than Yahoo keeps for 1m
    try:
        run = asyncio.ensure_future(backfill_symbol("BTCUSD", TF, [src], bar_store, start_ms=start,
                                                    end_ms=end, now_ms=now))
        await asyncio.wait_for(chart.hanging.wait(), 30)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        first_run = asked(fake)
        progress = json.loads(await bar_store.get_meta("backfill:BTCUSD:1m") or "{}")
        assert progress == {"low": first_run[1][0], "high": end}  # two chunks done, newest first

        chart.slow_after = None
        result = await backfill_symbol("BTCUSD", TF, [src], bar_store, start_ms=start, end_ms=end,
                                       now_ms=now)
    finally:
        await src.close()
    second_run = asked(fake)[3:]
    earliest = -(-(now - 30 * DAY_MS + LOOKBACK_MARGIN_MS) // MIN) * MIN  # on the minute grid
    assert chart.refused == []  # never asked Yahoo for what it refuses
    for p1, p2 in first_run + second_run:
        assert p2 - p1 <= 8 * DAY_MS and p1 >= earliest
    # The second run starts where the interruption left: nothing done is asked again.
    assert second_run[0][1] == first_run[1][0]
    assert all(p2 <= first_run[1][0] for _, p2 in second_run)
    # Together they cover Yahoo's 30 days exactly once; 8-day requests: 4 in all (+1 interrupted).
    done = first_run[:2] + second_run
    assert sorted(done)[0][0] == earliest and max(p2 for _, p2 in done) == end
    assert len(done) == 4
    assert result.error is None and result.limited == ["yahoo: history reaches back 30 days"]
    assert result.as_dict()["asked"] == [start, end]
    stored = await bar_store.bars_between("BTCUSD", "1m", start, end)
    expected = range(earliest, end, MIN)
    assert [b.t for b in stored] == list(expected)  # every minute once, no duplicates
    assert result.got_first == expected[0] and result.got_last == expected[-1]
    assert all(b.c == price(b.t) for b in stored[:: 1000])


@pytest.mark.asyncio
async def test_recorded_gaps_are_backfilled_once(
    fake: FakeProviders, bar_store: BarStore, tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    end = TF.floor(now)
    gap = (end - 120 * MIN, end - 100 * MIN)  # 20 minutes the live cycle missed
    fake.responders["yahoo"] = YahooMinutes()
    await bar_store.write_history([Bar("BTCUSD", "1m", t, price(t), price(t) + 0.05, price(t) - 0.05,
                                       price(t), 1.0, "yahoo")
                                   for t in range(end - 200 * MIN, end, MIN)
                                   if not gap[0] <= t < gap[1]])
    bar_store.add_gap("BTCUSD", "1m", gap[0], gap[1] - MIN, 20, False)
    await bar_store.flush()
    src = source(fake, tmp_path)
    await src.start()
    try:
        result = await repair_gaps("BTCUSD", TF, [src], bar_store, now_ms=now)
        again = await repair_gaps("BTCUSD", TF, [src], bar_store, now_ms=now)
    finally:
        await src.close()
    assert result.bars == 20 and result.source == "yahoo"
    assert asked(fake) == [(gap[0], gap[1])]  # one request, exactly the gap; none the second time
    assert again.bars == 0
    stored = await bar_store.bars_between("BTCUSD", "1m", end - 200 * MIN, end)
    assert [b.t for b in stored] == list(range(end - 200 * MIN, end, MIN))


class OlderHistory(Source):
    """A second source without range limits: records what it is asked."""

    name = "older"

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        return {}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        self.asked.append((start_ms, end_ms))
        return [Bar(symbol, tf.name, t, price(t), price(t), price(t), price(t), 1.0, self.name)
                for t in range(start_ms, end_ms, MIN)]


@pytest.mark.asyncio
async def test_range_beyond_yahoo_goes_to_the_next_source(
    fake: FakeProviders, bar_store: BarStore, tmp_path: Path
) -> None:
    fake.responders["yahoo"] = YahooMinutes()
    src, older = source(fake, tmp_path), OlderHistory()
    now = int(time.time() * 1000)
    end = TF.floor(now)
    start = end - 40 * DAY_MS
    await src.start()
    try:
        result = await backfill_symbol("BTCUSD", TF, [src, older], bar_store, start_ms=start,
                                       end_ms=end, now_ms=now)
    finally:
        await src.close()
    yahoo_from = min(p1 for p1, _ in asked(fake))
    assert older.asked[0][1] == yahoo_from and min(p1 for p1, _ in older.asked) == start
    assert all(p2 - p1 <= 7 * DAY_MS for p1, p2 in older.asked)
    assert result.got_first == start and result.got_last == end - MIN
    assert result.stored == (end - start) // MIN
