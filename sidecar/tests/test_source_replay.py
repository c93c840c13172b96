"""The ``replay`` source: reads JSON lines and CSV, paces bars by an injected clock."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sidecar.bar import Bar
from sidecar.clock import ReplayClock
from sidecar.errors import ConfigError, ProviderError
from sidecar.sources.replay import ReplaySource, read_bars
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

TF = Timeframe.parse("1m")
M = TF.ms
R0 = 1_700_000_040_000  # recorded first bar (a whole minute)
START_MS = 1_727_827_200_000 + 20_000  # the daemon starts 20 s into a minute
START_FLOOR = START_MS - 20_000




def recorded(symbol: str = "AAPL", n: int = 6, *, base: float = 100.0, tf: str = "1m") -> list[Bar]:
    step = Timeframe.parse(tf).ms
    return [
        Bar(symbol, tf, R0 + i * step, base + i, base + i + 1.0, base + i - 1.0, base + i + 0.5,
            10.0 * (i + 1), "yahoo")
        for i in range(n)
    ]


def write_jsonl(path: Path, bars: list[Bar]) -> Path:
    path.write_text("".join(json.dumps(b.to_json_dict()) + "\n" for b in bars))
    return path


def write_csv(path: Path, bars: list[Bar], *, blank_volume: bool = False) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["symbol", "tf", "t", "o", "h", "l", "c", "v", "src"])
        w.writeheader()
        for b in bars:
            row = b.to_json_dict()
            if blank_volume:
                row["v"] = ""
            w.writerow(row)
    return path


# -- reading --------------------------------------------------------------------


def test_reads_json_lines(tmp_path: Path) -> None:
    bars = recorded("AAPL") + recorded("MSFT", base=300.0)
    path = write_jsonl(tmp_path / "rec.jsonl", bars)
    path.write_text(path.read_text() + "\n  \n")  # trailing blank lines are fine
    assert read_bars(path) == bars


def test_reads_csv(tmp_path: Path) -> None:
    bars = recorded("EURUSD", 3)
    assert read_bars(write_csv(tmp_path / "rec.csv", bars)) == bars
    no_vol = read_bars(write_csv(tmp_path / "fx.csv", bars, blank_volume=True))
    assert [b.v for b in no_vol] == [None, None, None]
    assert [b.c for b in no_vol] == [b.c for b in bars]


def test_malformed_json_line_names_setting_and_line(tmp_path: Path) -> None:
    bars = recorded(n=3)
    path = tmp_path / "rec.jsonl"
    lines = [json.dumps(b.to_json_dict()) for b in bars]
    lines.insert(2, '{"symbol": "AAPL", "tf": "1m", "t": 1')  # line 3: truncated JSON
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        read_bars(path)
    assert info.value.setting == "SIDECAR_REPLAY_FILE"
    assert f"{path}:3" in str(info.value)
    assert "SIDECAR_REPLAY_FILE" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        '{"symbol": "AAPL", "tf": "1m", "t": 1}',  # missing prices
        '{"symbol": "AAPL", "tf": "1m", "t": 1, "o": "x", "h": 1, "l": 1, "c": 1}',  # not a number
        '{"symbol": "AAPL", "tf": "1m", "t": null, "o": 1, "h": 1, "l": 1, "c": 1}',
        "[1, 2, 3]",
        "null",
    ],
)
def test_malformed_json_values_name_the_line(tmp_path: Path, bad: str) -> None:
    good = json.dumps(recorded(n=1)[0].to_json_dict())
    path = tmp_path / "rec.jsonl"
    path.write_text(f"{good}\n{bad}\n")
    with pytest.raises(ConfigError) as info:
        read_bars(path)
    assert info.value.setting == "SIDECAR_REPLAY_FILE"
    assert f"{path}:2" in str(info.value)


def test_malformed_csv_row_names_setting_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "rec.csv", recorded(n=3))
    text = path.read_text().splitlines()
    text[2] = text[2].replace(str(R0 + M), "soon")  # file line 3 (the header is line 1)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ConfigError) as info:
        read_bars(path)
    assert info.value.setting == "SIDECAR_REPLAY_FILE"
    assert f"{path}:3" in str(info.value)


def test_csv_missing_column_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "rec.csv"
    path.write_text("symbol,tf,t,o,h,l\nAAPL,1m,0,1,1,1\n")
    with pytest.raises(ConfigError) as info:
        read_bars(path)
    assert f"{path}:2" in str(info.value)


def test_csv_boolean_columns(tmp_path: Path) -> None:
    path = tmp_path / "rec.csv"
    path.write_text(
        "symbol,tf,t,o,h,l,c,v,src,forming,synthetic\n"
        f"AAPL,1m,{R0},1,2,0.5,1.5,3,x,false,False\n"
        f"AAPL,1m,{R0 + M},1,2,0.5,1.5,3,x,0,\n"
        f"AAPL,1m,{R0 + 2 * M},1,2,0.5,1.5,3,x,true,True\n"
    )
    bars = read_bars(path)
    assert [b.synthetic for b in bars] == [False, False, True]
    assert [b.forming for b in bars] == [False, False, True]


# -- pacing ---------------------------------------------------------------------------


def make_source(tmp_path: Path, bars: list[Bar], clock: Clock, speed: float = 1.0) -> ReplaySource:
    return ReplaySource(write_jsonl(tmp_path / "rec.jsonl", bars), speed=speed, clock=clock)


async def test_speed_one_shifts_by_whole_bars_and_paces_by_clock(tmp_path: Path) -> None:
    bars = recorded("AAPL", 6)
    clock = Clock.from_ms(START_MS)
    src = make_source(tmp_path, bars, clock)
    shift = START_FLOOR - R0
    assert shift % M == 0

    async def latest(now_ms: int) -> list[Bar]:
        clock.t_ms = now_ms
        res = await src.fetch_latest(["AAPL"], TF, now_ms)
        out = res["AAPL"]
        assert isinstance(out, list)
        return out

    assert await latest(START_MS) == []
    # The first bar opens when the daemon starts and is released once its period closes.
    assert await latest(START_FLOOR + M - 1) == []
    first = await latest(START_FLOOR + M)
    assert [b.t for b in first] == [START_FLOOR]
    b0 = first[0]
    assert (b0.o, b0.h, b0.l, b0.c, b0.v) == (bars[0].o, bars[0].h, bars[0].l, bars[0].c, bars[0].v)
    assert b0.src == "replay" and b0.forming is False and b0.synthetic is False
    # Every bar released since the last answer, each shifted by the same whole number of bars.
    later = await latest(START_FLOOR + 4 * M + 30_000)
    assert [b.t for b in later] == [START_FLOOR + i * M for i in (1, 2, 3)]
    assert all(b.t - orig.t == shift for b, orig in zip(later, bars[1:4], strict=True))
    assert [b.c for b in later] == [bars[1].c, bars[2].c, bars[3].c]
    # Nothing new: the newest two again.
    again = await latest(START_FLOOR + 4 * M + 40_000)
    assert [b.t for b in again] == [START_FLOOR + 2 * M, START_FLOOR + 3 * M]
    # Past the end of the recording: the last two bars stay the answer.
    end = await latest(START_FLOOR + 100 * M)
    assert [b.t for b in end] == [START_FLOOR + 4 * M, START_FLOOR + 5 * M]


async def test_history_is_released_and_shifted(tmp_path: Path) -> None:
    bars = recorded("AAPL", 6)
    clock = Clock.from_ms(START_MS)
    src = make_source(tmp_path, bars, clock)
    await src.fetch_latest(["AAPL"], TF, START_MS)
    clock.t_ms = START_FLOOR + 3 * M + 1
    hist = await src.fetch_history("AAPL", TF, 0, 2**62)
    assert [b.t for b in hist] == [START_FLOOR + i * M for i in range(3)]
    assert [b.c for b in hist] == [b.c for b in bars[:3]]
    part = await src.fetch_history("AAPL", TF, START_FLOOR + M, START_FLOOR + 2 * M)
    assert [b.t for b in part] == [START_FLOOR + M]


async def test_other_speed_runs_on_the_recordings_clock(tmp_path: Path) -> None:
    bars = recorded("AAPL", 6)
    wall = Clock.from_ms(START_FLOOR)
    src = make_source(tmp_path, bars, wall, speed=60.0)
    clock = src.clock
    assert isinstance(clock, ReplayClock)
    # It reads the first recorded bar's open until the daemon begins it, then runs 60x.
    assert clock() * 1000 == R0
    wall.advance(5)
    assert clock() * 1000 == R0
    clock.begin()
    wall.advance(1.5)
    now = int(clock() * 1000)
    assert now == R0 + 90_000  # 90 s of recording
    res = await src.fetch_latest(["AAPL"], TF, now)
    out = res["AAPL"]
    assert isinstance(out, list)
    assert [b.t for b in out] == [R0]  # recorded stamps, released once closed
    wall.advance(1.5)
    res = await src.fetch_latest(["AAPL"], TF, int(clock() * 1000))  # 3 min of recording
    out = res["AAPL"]
    assert isinstance(out, list)
    assert [b.t for b in out] == [R0 + M, R0 + 2 * M]
    hist = await src.fetch_history("AAPL", TF, 0, 2**62)
    assert [b.t for b in hist] == [R0, R0 + M, R0 + 2 * M]


async def test_fast_replay_hands_out_every_bar_once_in_order(tmp_path: Path) -> None:
    bars = recorded("AAPL", 500) + recorded("MSFT", 500, base=300.0)
    src = make_source(tmp_path, bars, Clock.from_ms(START_FLOOR), speed=10_000.0)
    seen: dict[str, list[int]] = {"AAPL": [], "MSFT": []}
    now = R0
    while not src.exhausted(now):
        now += 37 * M + 11_000  # many bars a cycle, at no bar boundary
        res = await src.fetch_latest(["AAPL", "MSFT"], TF, now)
        for sym, got in res.items():
            assert isinstance(got, list)
            assert all(b.t + M <= now for b in got)  # only closed periods
            seen[sym] += [b.t for b in got if not seen[sym] or b.t > seen[sym][-1]]
    for sym in seen:
        assert seen[sym] == [R0 + i * M for i in range(500)]
    assert src.next_release_ms(now) is None


async def test_next_release_and_exhaustion(tmp_path: Path) -> None:
    src = make_source(tmp_path, recorded("AAPL", 3), Clock.from_ms(START_FLOOR), speed=100.0)
    assert src.next_release_ms(R0) == R0 + M
    assert src.next_release_ms(R0 + M) == R0 + 2 * M
    assert not src.exhausted(R0 + 2 * M)
    # Every bar released, but the daemon has not been handed them yet.
    assert src.next_release_ms(R0 + 3 * M) is None
    assert src.exhausted(R0 + 3 * M)  # nobody asked for AAPL: nothing owed
    await src.fetch_latest(["AAPL"], TF, R0 + 2 * M)
    assert not src.exhausted(R0 + 3 * M)
    await src.fetch_latest(["AAPL"], TF, R0 + 3 * M)
    assert src.exhausted(R0 + 3 * M)


async def test_last_revision_wins(tmp_path: Path) -> None:
    bars = recorded("AAPL", 3)
    revised = Bar("AAPL", "1m", R0 + M, 200.0, 201.0, 199.0, 200.5, 1.0, "yahoo")
    clock = Clock.from_ms(START_MS)
    src = make_source(tmp_path, [*bars, revised], clock)
    res = await src.fetch_latest(["AAPL"], TF, START_FLOOR + 10 * M)
    out = res["AAPL"]
    assert isinstance(out, list)
    assert [b.c for b in out] == [bars[0].c, 200.5, bars[2].c]


async def test_unknown_symbol_in_result_dict(tmp_path: Path) -> None:
    clock = Clock.from_ms(START_MS)
    src = make_source(tmp_path, recorded("AAPL", 3), clock)
    res = await src.fetch_latest(["AAPL", "ZZZZ"], TF, START_FLOOR + 2 * M)
    assert isinstance(res["AAPL"], list) and len(res["AAPL"]) == 2
    err = res["ZZZZ"]
    assert isinstance(err, ProviderError)
    assert err.error_class == "unknown_symbol"
    assert err.source == "replay"
    assert not err.counts_as_failure
    # A known symbol in another timeframe is unknown too.
    res5 = await src.fetch_latest(["AAPL"], Timeframe.parse("5m"), START_FLOOR + 20 * M)
    assert isinstance(res5["AAPL"], ProviderError) and res5["AAPL"].error_class == "unknown_symbol"
    with pytest.raises(ProviderError) as info:
        await src.fetch_history("ZZZZ", TF, 0, 2**62)
    assert info.value.error_class == "unknown_symbol"
    assert src.can_serve("AAPL") and not src.can_serve("ZZZZ")


async def test_symbols_share_one_origin(tmp_path: Path) -> None:
    late = [Bar("MSFT", "1m", R0 + 2 * M, 5.0, 6.0, 4.0, 5.5, 1.0, "x")]
    clock = Clock.from_ms(START_MS)
    src = make_source(tmp_path, recorded("AAPL", 3) + late, clock)
    res = await src.fetch_latest(["AAPL", "MSFT"], TF, START_FLOOR + 3 * M)
    msft = res["MSFT"]
    assert isinstance(msft, list)
    assert [b.t for b in msft] == [START_FLOOR + 2 * M]  # relative timing kept
    assert src.status() == {"file": str(tmp_path / "rec.jsonl"), "speed": 1.0}
