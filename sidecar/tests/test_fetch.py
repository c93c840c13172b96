"""``run_fetch``: validated JSON lines on stdout, error class and exit code on stderr."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from sidecar.cli import _iso_ms, _parser
from sidecar.errors import EXIT_CODES
from sidecar.fetch import run_fetch
from sidecar.settings import Settings
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.timeframe import Timeframe


@pytest.mark.asyncio
async def test_fetch_prints_validated_bars(fake: FakeProviders):
    fake.default["polygon"] = Reply.fixture("polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json")
    env = {"POLYGON_API_KEY": "K", "SIDECAR_POLYGON_BASE_URL": fake.base_url}
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch("polygon", "AAPL", Timeframe.parse("1d"), 1672531200000, 1673395200000,
                           Settings(), env, out=out, err=err)
    assert code == 0, err.getvalue()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 6 and lines[0]["t"] == 1672704000000 and lines[0]["src"] == "polygon"
    assert [x["t"] for x in lines] == sorted(x["t"] for x in lines)


@pytest.mark.asyncio
async def test_fetch_passthrough_and_error_exit(fake: FakeProviders):
    fake.default["polygon"] = Reply.fixture("polygon/error_403_NOT_AUTHORIZED_timeframe.json", 403)
    env = {"POLYGON_API_KEY": "SECRETK", "SIDECAR_POLYGON_BASE_URL": fake.base_url}
    out, err = io.StringIO(), io.StringIO()
    code = await run_fetch("polygon", "C:EURUSD", Timeframe.parse("1m"), None, None, Settings(), env,
                           out=out, err=err)
    assert code == EXIT_CODES["not_entitled"]
    assert err.getvalue().startswith("not_entitled:") and "SECRETK" not in err.getvalue()
    assert fake.requests_to("polygon")[0].path.startswith("/v2/aggs/ticker/C:EURUSD/")
    assert out.getvalue() == ""


@pytest.mark.asyncio
async def test_fetch_without_key_is_reported():
    err = io.StringIO()
    code = await run_fetch("twelvedata", "AAPL", Timeframe.parse("1m"), None, None, Settings(), {},
                           out=io.StringIO(), err=err)
    assert code != 0 and "TWELVEDATA_API_KEY missing" in err.getvalue()


def test_date_only_end_includes_that_day(capsys: pytest.CaptureFixture[str]):
    day = 1710460800000  # 2024-03-15T00:00Z
    assert _iso_ms("2024-03-15", "--start") == day
    assert _iso_ms("2024-03-15", "--end", end=True) == day + 86_400_000
    assert _iso_ms("2024-03-15T12:00", "--end", end=True) == day + 43_200_000  # a time is as given
    assert _iso_ms("2024-03-15T00:00+01:00", "--end", end=True) == day - 3_600_000
    with pytest.raises(SystemExit):
        _parser().parse_args(["fetch", "--help"])
    assert "a date alone includes that day" in " ".join(capsys.readouterr().out.split())


@pytest.mark.asyncio
async def test_fetch_command_line_one_day(fake: FakeProviders, clean_env: dict[str, str], tmp_path: Path):
    """``fetch polygon AAPL --timeframe 1d --start D --end D``: the bar of day D, as the command line."""
    fake.default["polygon"] = Reply.fixture("polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json")
    env = {**clean_env, "POLYGON_API_KEY": "K", "SIDECAR_POLYGON_BASE_URL": fake.base_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "fetch", "polygon", "AAPL", "--timeframe", "1d",
        "--start", "2023-01-05", "--end", "2023-01-05", env=env, cwd=Path(__file__).resolve().parents[2],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [x["t"] for x in lines] == [1672876800000]  # 2023-01-05T00:00Z
    path = fake.requests_to("polygon")[0].path
    assert path.endswith("/range/1/day/1672876800000/1672963199999"), path
