"""The seeded ``sim`` source: deterministic, valid, synthetic, and history that joins live bars."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sidecar.bar import Bar
from sidecar.sources.sim import SimSource, guess_asset_class
from sidecar.timeframe import Timeframe
from sidecar.validation import check_bar

TF = Timeframe.parse("1m")
M = TF.ms
T0 = 1_727_827_200_000 + 14 * 3_600_000  # a whole minute, epoch ms
SYMS = ["AAPL", "MSFT", "EURUSD"]


def at(t_ms: int) -> float:
    return t_ms / 1000


async def run(source: SimSource, times: list[int], tf: Timeframe = TF) -> list[dict[str, list[Bar]]]:
    out = []
    for now in times:
        res = await source.fetch_latest(SYMS, tf, now)
        bars_by_sym: dict[str, list[Bar]] = {}
        for sym, bars in res.items():
            assert isinstance(bars, list), bars
            bars_by_sym[sym] = bars
        out.append(bars_by_sym)
    return out


def assert_valid(bars: list[Bar], now_ms: int, tf: Timeframe = TF) -> None:
    for b in bars:
        assert check_bar(b, tf, now_ms, 0) is None, b
        assert b.synthetic is True
        assert b.src == "sim"
        assert b.tf == tf.name


SECONDS = [T0 + 1000 * i for i in range(0, 185, 1)]


async def test_deterministic_for_a_seed() -> None:
    a = await run(SimSource(seed=7, clock=lambda: at(T0)), SECONDS)
    b = await run(SimSource(seed=7, clock=lambda: at(T0)), SECONDS)
    c = await run(SimSource(seed=8, clock=lambda: at(T0)), SECONDS)
    assert a == b
    assert a != c
    # Different symbols walk differently.
    last = a[-1]
    assert last["AAPL"][-1].c != last["MSFT"][-1].c


async def test_history_deterministic_for_a_seed() -> None:
    h1 = await SimSource(seed=3, clock=lambda: at(T0)).fetch_history("AAPL", TF, T0 - 500 * M, T0)
    h2 = await SimSource(seed=3, clock=lambda: at(T0)).fetch_history("AAPL", TF, T0 - 500 * M, T0)
    h3 = await SimSource(seed=4, clock=lambda: at(T0)).fetch_history("AAPL", TF, T0 - 500 * M, T0)
    assert h1 == h2
    assert [b.c for b in h1] != [b.c for b in h3]


async def test_live_bars_valid_and_synthetic() -> None:
    results = await run(SimSource(seed=1), SECONDS)
    for now, res in zip(SECONDS, results, strict=True):
        assert set(res) == set(SYMS)
        for bars in res.values():
            assert_valid(bars, now)
            assert bars[-1].forming is True
            assert all(not b.forming for b in bars[:-1])
            assert len(bars) <= 3
            assert [b.t for b in bars] == sorted({b.t for b in bars})


async def test_forming_bar_revised_within_period() -> None:
    results = await run(SimSource(seed=5), [T0 + 1000 * i for i in range(60)])
    forming = [r["AAPL"] for r in results]
    assert all(len(bars) == 1 for bars in forming)  # nothing closed yet
    bars = [bs[0] for bs in forming]
    assert {b.t for b in bars} == {T0}
    assert len({b.o for b in bars}) == 1  # the open never changes
    assert len({b.c for b in bars}) > 30  # the close is revised every second
    for prev, cur in itertools.pairwise(bars):
        assert cur.h >= prev.h
        assert cur.l <= prev.l
        assert cur.v is not None and prev.v is not None and cur.v >= prev.v
    assert bars[0].v == 0.0 and bars[-1].v is not None and bars[-1].v > 0


async def test_closed_bar_emitted_when_period_rolls() -> None:
    src = SimSource(seed=5)
    before = await run(src, [T0 + 1000 * i for i in range(60)])
    last_forming = before[-1]["AAPL"][-1]
    (rolled,) = await run(src, [T0 + M])
    bars = rolled["AAPL"]
    assert [b.t for b in bars] == [T0, T0 + M]
    closed, forming = bars
    assert closed.forming is False and forming.forming is True
    # The closed bar is the last forming state, frozen.
    assert closed.same_values(Bar(**{**_fields(last_forming), "forming": False}))
    assert forming.o == closed.c  # the walk is continuous across bars
    assert_valid(bars, T0 + M)
    # A closed bar is emitted once, at the roll; later calls carry only the forming bar.
    (later,) = await run(src, [T0 + M + 5000])
    assert [b.t for b in later["AAPL"]] == [T0 + M]
    assert later["AAPL"][0].o == forming.o


async def test_skipping_over_two_periods_returns_both_closed_bars() -> None:
    src = SimSource(seed=9)
    await run(src, [T0, T0 + 30_000])
    (res,) = await run(src, [T0 + 2 * M + 10_000])
    bars = res["MSFT"]
    assert [b.t for b in bars] == [T0, T0 + M, T0 + 2 * M]
    assert [b.forming for b in bars] == [False, False, True]
    assert bars[1].o == bars[0].c and bars[2].o == bars[1].c
    assert_valid(bars, T0 + 2 * M + 10_000)


async def test_same_second_twice_does_not_step() -> None:
    src = SimSource(seed=2)
    a, b = await run(src, [T0 + 7000, T0 + 7400])
    assert a == b


def _fields(bar: Bar) -> dict[str, object]:
    return {name: getattr(bar, name) for name in Bar.__slots__}  # type: ignore[attr-defined]


async def test_history_valid_contiguous_and_continuous() -> None:
    src = SimSource(seed=11, clock=lambda: at(T0 + 12_345))
    hist = await src.fetch_history("AAPL", TF, T0 - 300 * M, T0 + 10 * M)
    assert len(hist) == 300
    assert [b.t for b in hist] == [T0 - (300 - i) * M for i in range(300)]
    assert_valid(hist, T0)
    assert all(not b.forming for b in hist)
    for prev, cur in itertools.pairwise(hist):
        assert cur.o == pytest.approx(prev.c, rel=1e-12)


@pytest.mark.parametrize(("a", "b", "c"), [(-400, -250, -1), (-1000, -999, -10), (-60, -7, 0)])
async def test_history_chunks_agree_and_join(a: int, b: int, c: int) -> None:
    src = SimSource(seed=13, clock=lambda: at(T0))
    whole = await src.fetch_history("NVDA", TF, T0 + a * M, T0 + c * M)
    left = await src.fetch_history("NVDA", TF, T0 + a * M, T0 + b * M)
    right = await src.fetch_history("NVDA", TF, T0 + b * M, T0 + c * M)
    assert whole == left + right
    assert len(whole) == c - a
    # Overlapping ranges agree on the bars they share, from a fresh source too.
    other = SimSource(seed=13, clock=lambda: at(T0))
    overlap = await other.fetch_history("NVDA", TF, T0 + (a - 50) * M, T0 + ((a + c) // 2) * M)
    shared = {bar.t: bar for bar in overlap}
    common = [bar for bar in whole if bar.t in shared]
    assert common and all(shared[bar.t] == bar for bar in common)


async def test_unaligned_range_bounds() -> None:
    src = SimSource(seed=13, clock=lambda: at(T0))
    hist = await src.fetch_history("NVDA", TF, T0 - 10 * M + 1, T0 - 2 * M + 1)
    # start rounds up to the next bar; the bar opening before the end is included.
    assert [b.t for b in hist] == [T0 - i * M for i in range(9, 1, -1)]


async def test_history_ends_just_before_live_anchor() -> None:
    now = T0 + 25_000
    src = SimSource(seed=21, clock=lambda: at(10**10))  # the clock must not matter once live
    (live,) = await run(src, [now])
    first_live = live["AAPL"][0]
    assert first_live.t == T0 and first_live.forming
    hist = await src.fetch_history("AAPL", TF, T0 - 100 * M, T0 + 100 * M)
    assert hist[-1].t == T0 - M  # never overlaps the live bar
    assert len(hist) == 100
    assert hist[-1].c == pytest.approx(first_live.o, rel=1e-12)
    assert await src.fetch_history("AAPL", TF, T0, T0 + 10 * M) == []


async def test_history_before_live_uses_clock_anchor() -> None:
    src = SimSource(seed=21, clock=lambda: at(T0 + 30_000))
    hist = await src.fetch_history("MSFT", TF, T0 - 5 * M, T0 + 5 * M)
    assert [b.t for b in hist] == [T0 - i * M for i in range(5, 0, -1)]
    (live,) = await run(src, [T0 + 31_000])
    assert live["MSFT"][-1].t == T0
    assert hist[-1].c == pytest.approx(live["MSFT"][-1].o, rel=1e-12)


async def test_empty_and_pre_epoch_history() -> None:
    src = SimSource(seed=1, clock=lambda: at(T0))
    assert await src.fetch_history("AAPL", TF, T0 - 5 * M, T0 - 5 * M) == []
    assert await src.fetch_history("AAPL", TF, -10 * M, 0) == []


async def test_one_second_timeframe() -> None:
    tf = Timeframe.parse("1s")
    src = SimSource(seed=4)
    res = await run(src, [T0 + 1000 * i for i in range(5)], tf)
    bars = res[-1]["AAPL"]
    assert [b.t for b in bars] == [T0 + 3000, T0 + 4000]
    assert [b.forming for b in bars] == [False, True]
    assert_valid(bars, T0 + 4000, tf)


# -- a market that looks like one --------------------------------------------------------

REAL_RANGES = {"EURUSD": (1.0, 1.2), "USDJPY": (130.0, 170.0), "BTCUSD": (20_000.0, 100_000.0),
               "ETHUSD": (1_000.0, 6_000.0), "XAUUSD": (1_500.0, 3_000.0), "AAPL": (150.0, 250.0),
               "NAS100": (10_000.0, 25_000.0)}


async def history_closes(source: SimSource, symbol: str, days: int = 5) -> np.ndarray:
    bars = await source.fetch_history(symbol, TF, T0 - days * 86_400_000, T0)
    return np.array([b.c for b in bars])


@pytest.mark.parametrize("seed", [1, 42, 2024])
async def test_prices_start_near_real_levels(seed: int) -> None:
    source = SimSource(seed=seed, clock=lambda: at(T0))
    for symbol, (low, high) in REAL_RANGES.items():
        closes = await history_closes(source, symbol, days=1)
        assert low <= closes[-1] <= high, (symbol, closes[-1])
        assert low * 0.8 <= closes.min() and closes.max() <= high * 1.2, symbol


async def test_unknown_symbols_get_plausible_levels_for_their_class() -> None:
    source = SimSource(clock=lambda: at(T0), asset_classes={"ZZCOIN": "crypto", "BIGIDX": "index"})
    assert guess_asset_class("SEKNOK") == "fx" and guess_asset_class("XAGUSD") == "metal"
    assert guess_asset_class("SOLUSDT") == "crypto" and guess_asset_class("ZZZZ") == "stock"
    for symbol, (low, high) in {"ZZZZ": (19.0, 525.0), "SEKNOK": (0.47, 2.1),
                                "BIGIDX": (950.0, 31_500.0), "ZZCOIN": (0.09, 525.0)}.items():
        closes = await history_closes(source, symbol, days=1)
        assert low <= closes[-1] <= high, (symbol, closes[-1])


def realised_per_bar(closes: np.ndarray) -> float:
    return float(np.std(np.diff(np.log(closes))))


async def test_volatility_per_asset_class() -> None:
    """Per-bar log-return spread matches each class's annual volatility: FX quiet, crypto wild."""
    source = SimSource(clock=lambda: at(T0), asset_classes={"EURUSD": "fx", "BTCUSD": "crypto",
                                                            "AAPL": "stock"})
    fx, crypto, stock = [realised_per_bar(await history_closes(source, s))
                         for s in ("EURUSD", "BTCUSD", "AAPL")]
    minute = 60.0
    expected = {"fx": 0.07 / (260 * 86_400) ** 0.5, "crypto": 0.55 / (365 * 86_400) ** 0.5,
                "stock": 0.30 / (252 * 6.5 * 3_600) ** 0.5}
    for got, cls in ((fx, "fx"), (crypto, "crypto"), (stock, "stock")):
        assert got == pytest.approx(expected[cls] * minute ** 0.5, rel=0.1), cls
    assert crypto > 5 * fx and stock > 5 * fx
    # EURUSD's daily range is tens of pips, not dollars.
    closes = await history_closes(source, "EURUSD", days=1)
    assert 0.001 < closes.max() - closes.min() < 0.05


async def test_live_walk_keeps_the_class_volatility() -> None:
    source = SimSource(clock=lambda: at(T0))
    closes: dict[str, list[float]] = {"EURUSD": [], "BTCUSD": []}
    for now in range(T0, T0 + 600_000, 1_000):
        res = await source.fetch_latest(list(closes), TF, now)
        for symbol, series in closes.items():
            bars = res[symbol]
            assert isinstance(bars, list)
            series.append(bars[-1].c)
    fx, crypto = (realised_per_bar(np.array(closes[s])) for s in ("EURUSD", "BTCUSD"))
    assert fx == pytest.approx(0.07 / (260 * 86_400) ** 0.5, rel=0.25)
    assert crypto == pytest.approx(0.55 / (365 * 86_400) ** 0.5, rel=0.25)
