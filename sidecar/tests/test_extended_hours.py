"""Extended hours: per asset class or symbol (symbols.toml), bars outside the regular
session are rejected (the default) or accepted, stored and flagged; the higher
timeframes stay on the regular session; the choice shows in the features and /health.
Driven clock, real Redis and SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

import msgpack
import numpy as np
import pytest

from sidecar.app.health import health_report
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.bar import Bar
from sidecar.calendars import extended_calendar, get_calendar
from sidecar.errors import ConfigError
from sidecar.redis_store import RedisStore
from sidecar.series import aggregate
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.symbols import parse_symbol_map
from sidecar.tests.helpers import Clock, cycle_at, driven_pipeline, lasting_store, ny, settings
from sidecar.timeframe import Timeframe

MIN = 60_000
NEW_YORK = ZoneInfo("America/New_York")
TFS = tuple(Timeframe.parse(x) for x in ("1m", "1h"))



class AllHoursFeed(Source):
    """A feed that trades from 04:00 to 20:00 New York (as Polygon's with extended
    hours): the last two minutes closed and the current one forming, while the extended
    session is open; every symbol asked is logged with the time."""

    name = "feed"

    def __init__(self) -> None:
        self.ext = extended_calendar("XNYS")
        self.asked: list[tuple[str, int]] = []
        self.rng = np.random.default_rng(3)
        self.bars: dict[tuple[str, int], Bar] = {}

    def at(self, sym: str, t: int, forming: bool = False) -> Bar:
        key = (sym, t)
        if key not in self.bars:
            c = float(100 + self.rng.normal())
            self.bars[key] = Bar(sym, "1m", t, c, c + 0.5, c - 0.5, c + 0.1, float(self.rng.integers(1, 900)),
                                 self.name)
        b = self.bars[key]
        return Bar(b.symbol, b.tf, b.t, b.o, b.h, b.l, b.c, b.v, b.src, forming)

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        current = now_ms - now_ms % MIN
        out: LatestResult = {}
        for sym in symbols:
            self.asked.append((sym, now_ms))
            out[sym] = [self.at(sym, t, t == current) for t in (current - 2 * MIN, current - MIN, current)
                        if self.ext.is_open(t)]
        return out

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


def test_mapping_chooses_per_asset_class_and_symbol() -> None:
    smap = parse_symbol_map({
        "asset_classes": {"stock": {"extended_hours": "include"}},
        "MSFT": {"extended_hours": "exclude"},
        "VOD": {"calendar": "XLON"},
        "SPY": {"asset_class": "etf"},
        "QQQ": {"asset_class": "etf", "extended_hours": "include"},
    })
    assert smap.extended_hours("AAPL") is True  # not listed: a US stock, the class's choice
    assert smap.extended_hours("MSFT") is False
    assert smap.extended_hours("VOD") is False  # the class's choice needs known extended hours
    assert smap.extended_hours("SPY") is False
    assert smap.extended_hours("QQQ") is True
    # A bad value leaves the entry out, naming it; a bad class table stops the daemon.
    bad = parse_symbol_map({"AAPL": {"extended_hours": "yes"},
                            "VOD": {"calendar": "XLON", "extended_hours": "include"}})
    assert "AAPL" in bad.rejected and "extended_hours" in bad.rejected["AAPL"]
    assert "no extended hours known for calendar XLON" in bad.rejected["VOD"]
    with pytest.raises(ConfigError, match=r"\[asset_classes\]\.bond"):
        parse_symbol_map({"asset_classes": {"bond": {"extended_hours": "include"}}})
    with pytest.raises(ConfigError, match=r"\[asset_classes\]\.stock\.extended_hours"):
        parse_symbol_map({"asset_classes": {"stock": {"extended_hours": True}}})


def test_extended_calendar_bounds_follow_the_exchange() -> None:
    """XNYS: 04:00 to 09:30 and 16:00 to 20:00 New York; after a 13:00 early close until
    17:00; nothing on a holiday; across the DST switch the wall times hold."""
    ext = extended_calendar("NYSE")
    for t, is_open in (("2024-12-02T03:59", False), ("2024-12-02T04:00", True), ("2024-12-02T19:59", True),
                       ("2024-12-02T20:00", False), ("2024-11-29T16:59", True), ("2024-11-29T17:00", False),
                       ("2024-11-28T10:00", False), ("2024-03-11T04:00", True), ("2024-11-04T03:59", False)):
        assert ext.is_open(ny(t)) is is_open, t
    assert ext.session_open(ny("2024-12-02T09:00")) == ny("2024-12-02T04:00")
    with pytest.raises(ValueError, match="no extended hours"):
        extended_calendar("XLON")


async def test_extended_bars_included_and_flagged_higher_timeframes_regular(
    redis_store: RedisStore, bar_store: BarStore,
) -> None:
    """AAPL includes extended hours (its asset class), MSFT excludes them (its entry)."""
    smap = parse_symbol_map({"asset_classes": {"stock": {"extended_hours": "include"}},
                             "MSFT": {"extended_hours": "exclude"}})
    feed = AllHoursFeed()
    clock = Clock.from_ms(ny("2024-12-02T09:20"))
    store = lasting_store(redis_store, "ext")
    pipe = await driven_pipeline(store, bar_store, feed, clock, TFS, symbol_map=smap, symbols=("AAPL", "MSFT"),
                                 sources=("feed",))
    assert set(pipe.extended) == {"AAPL"}

    async def fmap(sym: str, tf: str = "1m") -> dict[str, object]:
        raw = await store.redis.get(store.keys.features(tf, sym))
        assert raw is not None
        return dict(msgpack.unpackb(raw))

    seen: dict[str, dict[str, object]] = {}
    for start, end in (("2024-12-02T09:20", "2024-12-02T10:35"), ("2024-12-02T15:50", "2024-12-02T16:20")):
        t = ny(start)
        while t <= ny(end):
            await cycle_at(pipe, clock, t)
            if t in (ny("2024-12-02T09:25"), ny("2024-12-02T10:00"), ny("2024-12-02T16:10")):
                seen[datetime.fromtimestamp(t / 1000, NEW_YORK).strftime("%H:%M")] = await fmap("AAPL")
            t += MIN
    # Pre-market and post-market: AAPL's base bar is flagged, its market counts as open.
    for when, extended in (("09:25", True), ("10:00", False), ("16:10", True)):
        assert seen[when]["extended_hours"] is True and seen[when]["extended"] is extended, when
        assert seen[when]["market_open"] is True
    msft = await fmap("MSFT")
    assert msft["extended_hours"] is False and msft["extended"] is False
    assert (await fmap("AAPL", "1h"))["extended"] is False

    # MSFT is not asked before 09:30 (nor after the close's grace); AAPL is.
    msft_asks = [t for sym, t in feed.asked if sym == "MSFT"]
    assert min(msft_asks) == ny("2024-12-02T09:30")
    assert min(t for sym, t in feed.asked if sym == "AAPL") == ny("2024-12-02T09:20")
    assert max(msft_asks) <= ny("2024-12-02T16:01")
    # MSFT's only extended bars are those a request at 09:30 and in the close's grace returned.
    assert pipe.validator.rejected["outside_session"] == 4

    await pipe.drain()
    await bar_store.flush()
    regular = get_calendar("XNYS")
    aapl = await bar_store.bars_between("AAPL", "1m", 0, 2**62)
    pre = [b for b in aapl if b.t < ny("2024-12-02T09:30")]
    post = [b for b in aapl if b.t >= ny("2024-12-02T16:00")]
    assert [b.t for b in pre] == list(range(ny("2024-12-02T09:18"), ny("2024-12-02T09:30"), MIN))
    assert post and all(not regular.is_open(b.t) for b in post)
    msft = [b for b in await bar_store.bars_between("MSFT", "1m", 0, 2**62)]
    assert msft and all(regular.is_open(b.t) for b in msft)
    # One gap: the regular minutes the clock jumped over (no pre- or post-market minute is expected).
    assert [(g[0], g[1]) for g in await bar_store.gaps("AAPL", "1m")] == [
        (ny("2024-12-02T10:36"), ny("2024-12-02T15:47"))]
    # The hourly bars are the regular session's only: 09:30-10:30 from 09:30..10:29, none
    # from the pre-market, and the last one 15:30-16:00 without the post-market's bars.
    hourly = {b.t: b for b in await bar_store.bars_between("AAPL", "1h", 0, 2**62) if not b.forming}
    assert ny("2024-12-02T09:30") in hourly and ny("2024-12-02T16:00") not in hourly
    assert all(regular.is_open(t) for t in hourly)
    base = {b.t: b for b in aapl}
    first = [base[t] for t in range(ny("2024-12-02T09:30"), ny("2024-12-02T10:30"), MIN)]
    assert hourly[ny("2024-12-02T09:30")] == aggregate("AAPL", "1h", ny("2024-12-02T09:30"), first)
    last = [base[t] for t in range(ny("2024-12-02T15:48"), ny("2024-12-02T16:00"), MIN)]
    assert hourly[ny("2024-12-02T15:30")] == aggregate("AAPL", "1h", ny("2024-12-02T15:30"), last)

    # Completeness: the regular session's minutes only, expected and received (the pre-
    # and post-market bars AAPL keeps are neither).
    clock.t_ms = ny("2024-12-02T16:20")
    counts = pipe.completeness.report("AAPL", int(clock.t_ms))
    assert counts is not None
    assert counts["1m"]["current"]["expected"] == 390
    assert counts["1m"]["current"]["received"] == sum(1 for b in aapl if regular.is_open(b.t)) == 66 + 12
    assert counts["1m"]["prev"]["received"] == 0  # the pre-market lies in Friday's span, not counted

    # /health: the choice per symbol and per asset class.
    report = health_report(pipe, SecondTicker(), ready=True)
    assert report["symbols"]["AAPL"]["extended_hours"] == "include"
    assert report["symbols"]["MSFT"]["extended_hours"] == "exclude"
    assert report["market"]["extended_hours"] == {"stock": {"include": 1, "exclude": 1}}
    assert report["symbols"]["AAPL"]["market_open"] is True  # post-market
    assert report["symbols"]["MSFT"]["market_open"] is False


async def test_extended_bars_rejected_by_default(redis_store: RedisStore, bar_store: BarStore) -> None:
    """Without the choice, a feed's pre-market bars are rejected as ``outside_session``
    (counted), and nothing is asked before the open."""
    feed = AllHoursFeed()
    clock = Clock.from_ms(ny("2024-12-02T09:29"))
    s = settings(symbols=("AAPL",), sources=("feed",), timeframe=TFS[0], market_hours=True)
    pipe = Pipeline(s, [feed], redis_store, bar_store, clock=clock, symbol_map=parse_symbol_map({}))
    assert pipe.extended == {}
    for t in range(ny("2024-12-02T09:30"), ny("2024-12-02T09:33"), MIN):
        await cycle_at(pipe, clock, t)
    assert pipe.validator.rejected["outside_session"] == 3  # 09:28 and 09:29 at 09:30, 09:29 again at 09:31
    await bar_store.flush()
    assert all(b.t >= ny("2024-12-02T09:30") for b in await bar_store.bars_between("AAPL", "1m", 0, 2**62))
