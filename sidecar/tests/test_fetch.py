"""``run_fetch``: validated JSON lines on stdout, error class and exit code on stderr."""

from __future__ import annotations

import io
import json

import pytest

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
