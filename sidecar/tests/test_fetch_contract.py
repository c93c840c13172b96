"""``fetch`` for all four sources against the fake server, as CONTRACT.md says.

For every fixture with bars: ``fetch`` prints exactly the bars in the body (count,
UTC times, values), minus nulls; for every error fixture: the right class on
stderr and its exit code. Expected rows are read from the raw bodies here,
independently of the parsers. One run per source goes through the real command
line (``python -m sidecar fetch``).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sidecar.errors import EXIT_CODES
from sidecar.fetch import run_fetch
from sidecar.settings import Settings
from sidecar.tests.fake_providers import ENDPOINTS, FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import REPO
from sidecar.timeframe import Timeframe

Row = tuple[int, float, float, float, float, float | None]
DAY = 86_400_000
ENDPOINT = {"yahoo": "yahoo", "alphavantage": "av", "twelvedata": "td", "polygon": "polygon"}


def local_ms(text: str, zone: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def day_ms(when: datetime) -> int:
    return int(datetime(when.year, when.month, when.day, tzinfo=UTC).timestamp() * 1000)


def yahoo_rows(rel: str, daily: bool) -> list[Row]:
    result = json.loads(fixture(rel))["chart"]["result"][0]
    meta, q = result["meta"], result["indicators"]["quote"][0]
    volume = meta.get("instrumentType") not in ("CURRENCY", "INDEX")
    stamps = result.get("timestamp") or []
    rows = []
    for i, t in enumerate(stamps if daily else stamps[:-1]):  # intraday: the trailing live entry
        if q["close"][i] is None:
            continue
        t_ms = t * 1000
        if daily:
            t_ms = day_ms(datetime.fromtimestamp(t, ZoneInfo(meta["exchangeTimezoneName"])))
        rows.append((t_ms, q["open"][i], q["high"][i], q["low"][i], q["close"][i],
                     float(q["volume"][i]) if volume else None))
    return sorted(rows)


def av_rows(rel: str) -> list[Row]:
    data = json.loads(fixture(rel))
    zone = next(v for k, v in data["Meta Data"].items() if k.endswith("Time Zone"))
    market = next((v for k, v in data["Meta Data"].items() if k.endswith("Market Code")), None)
    series = next(v for k, v in data.items() if k.startswith("Time Series"))
    rows = []
    for stamp, row in series.items():
        f = {k.split(". ", 1)[1]: v for k, v in row.items()}
        if "open" in f:
            o, h, l, c = (float(f[k]) for k in ("open", "high", "low", "close"))
        else:
            o = h = l = c = float(f[f"price ({market})"])
        v = float(f["volume"]) if "volume" in f and "From Symbol" not in str(data["Meta Data"]) else None
        rows.append((local_ms(stamp, zone), o, h, l, c, v))
    return sorted(rows)


def td_rows(rel: str, key: str | None = None) -> list[Row]:
    data = json.loads(fixture(rel))
    if key is not None:
        data = data[key]
    zone = data["meta"].get("exchange_timezone", "UTC")
    rows = []
    for r in data["values"]:
        text = r["datetime"]
        t = local_ms(text, zone) if len(text) > 10 else day_ms(datetime.fromisoformat(text))
        v = float(r["volume"]) if "volume" in r else None
        rows.append((t, float(r["open"]), float(r["high"]), float(r["low"]), float(r["close"]), v))
    return sorted(rows)


def polygon_rows(rel: str, daily: bool) -> list[Row]:
    rows = []
    for r in json.loads(fixture(rel))["results"] or []:
        t = r["t"]
        if daily:
            t = day_ms(datetime.fromtimestamp(t / 1000, ZoneInfo("America/New_York")))
        rows.append((t, float(r["o"]), float(r["h"]), float(r["l"]), float(r["c"]), float(r["v"])))
    return sorted(rows)


# source, symbol, timeframe, fixture, expected rows
BAR_CASES: list[tuple[str, str, str, str, Any]] = [
    ("yahoo", "AAPL", "1m", "yahoo/chart_AAPL_1m_2024-10-02_regular_only_with_nulls.json",
     lambda rel: yahoo_rows(rel, False)),
    ("yahoo", "AAPL", "1d", "yahoo/chart_AAPL_1d_2020-01-01_2020-01-03.json",
     lambda rel: yahoo_rows(rel, True)),
    ("yahoo", "EURUSD", "1d", "yahoo/chart_EURUSD=X_1d_2020-01-01_2020-01-03.json",
     lambda rel: yahoo_rows(rel, True)),
    ("yahoo", "NVDA", "1d", "yahoo/chart_NVDA_1d_1y_events_split.json", lambda rel: yahoo_rows(rel, True)),
    ("yahoo", "^VXAPL", "1d", "yahoo/chart_^VXAPL_index_1d_2020-01-01.json", lambda rel: []),
    ("alphavantage", "MSFT", "1m", "alphavantage/time_series_intraday_MSFT_1min_compact_2017.json", av_rows),
    ("alphavantage", "EURUSD", "5m", "alphavantage/fx_intraday_EURUSD_5min_2020_trimmed.json", av_rows),
    ("alphavantage", "BTC/CNY", "5m", "alphavantage/digital_currency_intraday_BTC_CNY_5min_2017.json",
     av_rows),
    ("twelvedata", "AAPL", "1m", "twelvedata/time_series_AAPL_1min_2023-08-24.json", td_rows),
    ("twelvedata", "USD/CZK", "1d", "twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json",
     lambda rel: td_rows(rel, "USD/CZK")),
    ("polygon", "AAPL", "1d", "polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json",
     lambda rel: polygon_rows(rel, True)),
    ("polygon", "AAPL", "1h", "polygon/aggs_AAPL_1hour_2024-04-29_DELAYED_extended_hours.json",
     lambda rel: polygon_rows(rel, False)),
    ("polygon", "AAPL", "1d", "polygon/spec_aggs_range_AAPL_1day_next_url.json",
     lambda rel: polygon_rows(rel, True)),
    ("polygon", "AAPL", "1d", "polygon/aggs_empty_results_null.json", lambda rel: []),
]

ERROR_CASES = [
    ("yahoo", "SI", "yahoo/chart_error_SI_404_not_found.json", 404, "unknown_symbol"),
    ("yahoo", "AAPL", "yahoo/error_429_edge_too_many_requests.txt", 429, "rate_limited"),
    ("alphavantage", "EURUSD", "alphavantage/error_message_invalid_api_call_FX_DAILY_2021.json", 200,
     "unknown_symbol"),
    ("alphavantage", "MSFT", "alphavantage/error_note_rate_limit_5_per_min_2019.json", 200, "rate_limited"),
    ("twelvedata", "AAPL", "twelvedata/error_401_invalid_apikey.json", 401, "auth"),
    ("twelvedata", "AAPL", "twelvedata/error_404_page_not_found_unknown_path.json", 404, "bad_response"),
    ("twelvedata", "AAPL", "twelvedata/error_429_out_of_credits_minute.json", 429, "rate_limited"),
    ("polygon", "SPY", "polygon/error_403_NOT_AUTHORIZED_timeframe.json", 403, "not_entitled"),
]


def env_for(fake: FakeProviders) -> dict[str, str]:
    return {"SIDECAR_YAHOO_BASE_URL": fake.base_url, "SIDECAR_YAHOO_STREAM": "0",
            "SIDECAR_ALPHAVANTAGE_BASE_URL": fake.base_url, "ALPHAVANTAGE_API_KEY": "AVKEY123",
            "SIDECAR_TWELVEDATA_BASE_URL": fake.base_url, "TWELVEDATA_API_KEY": "TDKEY123",
            "SIDECAR_POLYGON_BASE_URL": fake.base_url, "POLYGON_API_KEY": "PGKEY123",
            "SIDECAR_429_COOLDOWN_S": "0"}


def printed(text: str) -> list[Row]:
    return [(x["t"], x["o"], x["h"], x["l"], x["c"], x["v"]) for x in map(json.loads, text.splitlines())]


@pytest.mark.asyncio
@pytest.mark.parametrize(("source", "symbol", "tf", "rel", "rows"), BAR_CASES,
                         ids=[c[3].split("/")[1] for c in BAR_CASES])
async def test_fetch_prints_exactly_the_bars_of_the_body(
    fake: FakeProviders, tmp_path: Path, source: str, symbol: str, tf: str, rel: str, rows: Any
) -> None:
    fake.default[ENDPOINT[source]] = Reply.fixture(rel)
    expected = rows(rel)
    start = expected[0][0] if expected else 0
    end = expected[-1][0] + DAY if expected else 2 * DAY
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch(source, symbol, Timeframe.parse(tf), start, end,
                           Settings(data_dir=tmp_path), env_for(fake), out=out, err=err)
    assert code == 0, err.getvalue()
    assert "rejected" not in err.getvalue()
    assert printed(out.getvalue()) == expected
    for line in out.getvalue().splitlines():
        assert set(json.loads(line)) >= {"symbol", "tf", "t", "o", "h", "l", "c", "v", "src"}
        assert json.loads(line)["src"] == source and json.loads(line)["tf"] == tf


@pytest.mark.asyncio
@pytest.mark.parametrize(("source", "symbol", "rel", "status", "error_class"), ERROR_CASES,
                         ids=[c[2].split("/")[1] for c in ERROR_CASES])
async def test_fetch_error_class_and_exit_code(
    fake: FakeProviders, tmp_path: Path, source: str, symbol: str, rel: str, status: int,
    error_class: str
) -> None:
    fake.default[ENDPOINT[source]] = Reply.fixture(rel, status)
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch(source, symbol, Timeframe.parse("1d"), 0, 10 * DAY,
                           Settings(data_dir=tmp_path), env_for(fake), out=out, err=err)
    assert code == EXIT_CODES[error_class]
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{error_class}: {source}:")
    assert out.getvalue() == "" and "KEY123" not in err.getvalue()


@pytest.mark.asyncio
async def test_fetch_command_line_for_every_source(fake: FakeProviders, tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(env_for(fake), SIDECAR_DATA_DIR=str(tmp_path))
    calls = [("yahoo", "AAPL", "1d", BAR_CASES[1][3], 200),
             ("alphavantage", "MSFT", "1m", BAR_CASES[5][3], 200),
             ("twelvedata", "AAPL", "1m", BAR_CASES[8][3], 200),
             ("polygon", "AAPL", "1d", BAR_CASES[10][3], 200),
             ("polygon", "SPY", "1d", "polygon/error_403_NOT_AUTHORIZED_timeframe.json", 403)]
    for source, symbol, tf, rel, status in calls:
        fake.default[ENDPOINT[source]] = Reply.fixture(rel, status)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "fetch", source, symbol, "--timeframe", tf,
            "--start", "2000-01-01T00:00:00Z", "--end", "2030-01-01T00:00:00Z",
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        if status != 200:
            assert proc.returncode == EXIT_CODES["not_entitled"]
            assert stderr.decode().startswith("not_entitled: polygon:") and stdout == b""
            continue
        assert proc.returncode == 0, stderr.decode()
        case = next(c for c in BAR_CASES if c[3] == rel)
        assert printed(stdout.decode()) == case[4](rel), source
    assert all(s.path.split("/")[1] in {"v8", "query", "time_series", "v2", "", "v1"}
               for s in fake.seen)
    assert ENDPOINTS  # the fake served every provider at its real path
