"""Completeness: per symbol and timeframe, the share of the bars its calendar expects that
were received in the current and the previous session, and how many were synthetic or
late; in the features, /health and /metrics, counted as bars close and from the store at
start. Driven clock over an early-close Friday and a Monday, real Redis and SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgpack
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app.http import DaemonView, metrics_registry
from sidecar.app.ticker import SecondTicker
from sidecar.bar import Bar
from sidecar.calendars import get_calendar
from sidecar.completeness import Completeness, session_at
from sidecar.redis_store import RedisStore
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock, drive, driven_pipeline, lasting_store, ny, recounted_completeness
from sidecar.timeframe import Timeframe

MIN = 60_000
TFS = tuple(Timeframe.parse(x) for x in ("1m", "1h", "1d"))



class LookbackFeed(Source):
    """The last five minutes of regular hours, the current one forming."""

    name = "feed"

    def __init__(self) -> None:
        self.nyse = get_calendar("XNYS")
        self.rng = np.random.default_rng(9)
        self.closes: dict[int, float] = {}

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        current = now_ms - now_ms % MIN
        rows = []
        for t in range(current - 4 * MIN, current + MIN, MIN):
            if not self.nyse.is_open(t):
                continue
            c = self.closes.setdefault(t, float(100 + self.rng.normal()))
            rows.append(Bar("AAPL", "1m", t, c, c + 0.2, c - 0.2, c + 0.1, 50.0, self.name, t == current))
        return {sym: rows for sym in symbols}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


def test_expected_bars_follow_the_calendar() -> None:
    """Early close, lunch break, 24/7 and the daily bar."""
    nyse, hk, crypto = get_calendar("XNYS"), get_calendar("XHKG"), get_calendar("24/7")
    m1, h1, d1 = TFS
    friday = session_at(nyse, ny("2024-11-29T12:00"))
    assert friday.expected(m1, ny("2024-11-29T18:00")) == 210
    assert friday.expected(h1, ny("2024-11-29T18:00")) == 4  # 09:30, 10:30, 11:30, 12:30-13:00
    assert friday.expected(m1, ny("2024-11-29T09:35")) == 5
    assert friday.expected(d1, ny("2024-11-29T12:59")) == 0 and friday.expected(d1, ny("2024-11-29T13:00")) == 1
    hk_day = session_at(hk, int(datetime(2024, 12, 2, 3, 0).timestamp() * 1000))
    assert hk_day.expected(m1, hk_day.close) == 330  # 09:30-12:00 and 13:00-16:00
    assert hk_day.expected(h1, hk_day.close) == 3 + 3  # 09:30, 10:30, 11:30-12:00; 13:00, 14:00, 15:00
    day = session_at(crypto, ny("2024-12-02T12:00"))
    assert day.expected(m1, day.hi) == 1440 and day.expected(h1, day.hi) == 24


async def test_completeness_over_a_session_roll_and_a_restart(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    feed = LookbackFeed()
    clock = Clock.from_ms(ny("2024-11-29T09:30"))
    store = lasting_store(redis_store, "compl")
    pipe = await driven_pipeline(store, bar_store, feed, clock, TFS, symbols=("AAPL",), sources=("feed",),
                                 fill_gaps=True)

    await drive(pipe, clock, ny("2024-11-29T09:59"))
    # The clock jumps 09:59 -> 10:06: 10:00 and 10:01 never come (filled); 09:59 (closed by
    # the later bars), 10:02 and 10:03 close more than a minute after they ended (late).
    clock.t_ms = ny("2024-11-29T10:06")
    await drive(pipe, clock, ny("2024-11-29T13:02"))
    c = pipe.completeness.report("AAPL", int(clock.t_ms))
    assert c is not None
    assert c["1m"]["current"] == {"from": ny("2024-11-29T09:30"), "expected": 210, "received": 208,
                                  "synthetic": 2, "late": 3}
    assert c["1m"]["session"] == round(208 / 210, 4)
    # The 09:30 hourly bar holds the filled minutes: it is synthetic, the other three received.
    assert (c["1h"]["current"]["received"], c["1h"]["current"]["synthetic"]) == (3, 1)

    # Monday: the roll makes Friday the previous session.
    clock.t_ms = ny("2024-12-02T09:30")
    await drive(pipe, clock, ny("2024-12-02T10:00"))
    now = int(clock.t_ms) - MIN
    raw = await store.redis.get(store.keys.features("1m", "AAPL"))
    assert raw is not None
    fmap = msgpack.unpackb(raw)
    assert fmap["completeness"] == {"session": 1.0, "previous": round(208 / 210, 4), "synthetic": 0, "late": 0}
    daily = msgpack.unpackb(await store.redis.get(store.keys.features("1d", "AAPL")))
    # Friday's daily bar holds the filled minutes: synthetic, not received; none expected yet today.
    assert daily["completeness"]["previous"] == 0.0 and daily["completeness"]["session"] is None
    c = pipe.completeness.report("AAPL", now)
    assert c is not None
    assert c["1m"]["prev"]["received"] == 208 and c["1m"]["prev"]["expected"] == 210

    # /metrics: counts over symbols, per timeframe.
    text = generate_latest(metrics_registry(DaemonView(pipe, SecondTicker(), ready=True))).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("sidecar_completeness")}
    assert samples[("sidecar_completeness_symbols_below",
                    (("session", "previous"), ("tf", "1m"), ("threshold", "0.99")))] == 0  # 0.9905
    assert samples[("sidecar_completeness_symbols_below",
                    (("session", "previous"), ("tf", "1d"), ("threshold", "0.5")))] == 1
    assert samples[("sidecar_completeness_symbols_below",
                    (("session", "current"), ("tf", "1m"), ("threshold", "0.9")))] == 0
    assert samples[("sidecar_completeness_ratio_count", (("tf", "1m"),))] == 1

    # A restart counts both sessions again from the store (late bars are not known then).
    await pipe.drain()
    await bar_store.flush()
    c = await recounted_completeness(pipe, feed, "AAPL", now)
    assert c is not None
    assert c["1m"]["prev"] == {"from": ny("2024-11-29T09:30"), "expected": 210, "received": 208,
                               "synthetic": 2, "late": 0}
    assert (c["1d"]["prev"]["received"], c["1d"]["prev"]["synthetic"]) == (0, 1)
    assert c["1m"]["session"] == 1.0


class HoldingFeed(LookbackFeed):
    """:class:`LookbackFeed` that withholds the minutes in ``held`` (until removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[int] = set()

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        out = await super().fetch_latest(symbols, tf, now_ms)
        return {sym: [b for b in rows if b.t not in self.held] for sym, rows in out.items()}


@pytest.mark.parametrize("fill_gaps", [True, False])
async def test_corrections_late_and_replaced_bars_are_counted_once(
    redis_store: RedisStore, bar_store: BarStore, fill_gaps: bool,
) -> None:
    """A correction of a counted bar is not counted again; a bar that comes after newer
    ones (inside the correction window) is counted once, as late, and with gap filling
    it moves its minute and the 5m bar holding it from synthetic to received. The counts
    equal a recount from SQLite."""
    feed = HoldingFeed()
    tfs = (Timeframe.parse("1m"), Timeframe.parse("5m"))
    clock = Clock.from_ms(ny("2024-12-02T09:30"))
    store = lasting_store(redis_store, f"compl-edges-{fill_gaps}")
    pipe = await driven_pipeline(store, bar_store, feed, clock, tfs, symbols=("AAPL",), sources=("feed",),
                                 fill_gaps=fill_gaps)

    feed.held = {ny("2024-12-02T09:38")}
    await drive(pipe, clock, ny("2024-12-02T09:41"))
    c = pipe.completeness.report("AAPL", int(clock.t_ms))
    assert c is not None
    assert (c["1m"]["current"]["received"], c["1m"]["current"]["synthetic"]) == (10, int(fill_gaps))
    assert (c["5m"]["current"]["received"], c["5m"]["current"]["synthetic"]) == (2 - fill_gaps, int(fill_gaps))

    feed.held = set()  # 09:38 comes after 09:41
    feed.closes[ny("2024-12-02T09:39")] += 0.5  # a correction of a counted bar
    await drive(pipe, clock, ny("2024-12-02T09:45"))
    now = int(clock.t_ms)
    c = pipe.completeness.report("AAPL", now)
    assert c is not None
    assert c["1m"]["current"] == {"from": ny("2024-12-02T09:30"), "expected": 15, "received": 15,
                                  "synthetic": 0, "late": 1}
    assert c["5m"]["current"] == {"from": ny("2024-12-02T09:30"), "expected": 3, "received": 3,
                                  "synthetic": 0, "late": 0}

    await pipe.drain()
    await bar_store.flush()
    recounted = await recounted_completeness(pipe, feed, "AAPL", now)
    assert recounted is not None
    for tf in ("1m", "5m"):
        assert {k: c[tf]["current"][k] for k in ("expected", "received", "synthetic")} == {
            k: recounted[tf]["current"][k] for k in ("expected", "received", "synthetic")}, tf


def test_a_store_read_adds_to_the_counts_and_loses_none() -> None:
    """Bars the cycles count while the store is read (so missing from the read) stay
    counted; a read of bars already counted changes nothing; late marks stay."""
    nyse = get_calendar("XNYS")
    m1 = Timeframe.parse("1m")
    t0 = ny("2024-12-02T09:30")
    tracker = Completeness({"AAPL": nyse}, (m1,), t0)

    def one(t: int, synthetic: bool = False) -> Bar:
        return Bar("AAPL", "1m", t, 1.0, 1.0, 1.0, 1.0, 1.0, "feed", synthetic=synthetic)

    stored = [one(t0 + k * MIN) for k in range(10)]
    for k in range(8):
        tracker.observe([stored[k]], t0 + (k + 1) * MIN)
    tracker.observe([stored[8]], t0 + 12 * MIN)  # late
    tracker.observe([stored[9]], t0 + 12 * MIN)  # late
    tracker.observe([one(t0 + 10 * MIN)], t0 + 12 * MIN)  # counted while the store was read
    tracker.load("AAPL", "1m", stored, t0 + 12 * MIN)
    tracker.load("AAPL", "1m", stored, t0 + 12 * MIN)
    report = tracker.report("AAPL", t0 + 12 * MIN)
    assert report is not None
    assert report["1m"]["current"] == {"from": t0, "expected": 11, "received": 11, "synthetic": 0, "late": 2}
    views = tracker.views("AAPL", t0 + 12 * MIN + 1000)
    assert views is not None and views[0] == {"session": 1.0, "previous": 0.0, "synthetic": 0, "late": 2}
