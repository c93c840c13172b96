"""A recorded holiday week replayed at 10,000x by a real daemon, on the recording's clock.

The recording is Thanksgiving week 2024 on the real NYSE calendar (Thursday closed,
Friday's early close at 13:00), one AAPL bar a minute, in the JSON lines ``fetch``
writes. Every bar is stored and its features computed as if live; no gap is recorded
across the nights, the holiday or the early close; ``/health`` says it is replaying
and at which recorded time; the log says when the recording is exhausted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import talib

from sidecar.calendars import get_calendar
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Daemon, scan, write_recording

NEW_YORK = ZoneInfo("America/New_York")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_holiday_week_replays_at_10000x(
    tmp_path: Path, clean_env: dict[str, str], daemons: Callable[..., Daemon],
) -> None:
    nyse = get_calendar("XNYS")
    path = tmp_path / "aapl-thanksgiving.jsonl"
    bars = write_recording(path, "AAPL", nyse, ms("2024-11-25T00:00:00-05:00"),
                           ms("2024-11-30T00:00:00-05:00"))
    days = {datetime.fromtimestamp(b.t / 1000, NEW_YORK).strftime("%a") for b in bars}
    assert days == {"Mon", "Tue", "Wed", "Fri"}  # Thanksgiving: closed
    assert len(bars) == 3 * 390 + 210  # Friday closes at 13:00
    assert bars[-1].t == ms("2024-11-29T12:59:00-05:00")

    env = dict(clean_env, SIDECAR_SOURCES="replay", SIDECAR_REPLAY_FILE=str(path),
               SIDECAR_REPLAY_SPEED="10000", SIDECAR_SYMBOLS="AAPL", SIDECAR_TIMEFRAME="1m",
               SIDECAR_MARKET_HOURS="on")
    daemon = daemons(env)
    daemon.wait_ready(timeout=120)
    daemon.wait_log("replay finished: the recording is exhausted", timeout=180)

    health = daemon.health()
    clock = health["clock"]
    assert clock["replaying"] is True and clock["speed"] == 10_000.0 and clock["exhausted"] is True
    # The recorded time: past Friday's last bar, and the times /health shows are on it.
    assert clock["now_ms"] >= bars[-1].t + 60_000
    assert clock["now"].startswith("2024-11-29T")
    assert health["now_ms"] == clock["now_ms"]
    aapl = health["symbols"]["AAPL"]
    assert aapl["newest_bar_t"] == bars[-1].t and aapl["last_price"] == bars[-1].c
    assert aapl["market_open"] is False and aapl["next_open"] == ms("2024-12-02T09:30:00-05:00")
    assert health["bars"]["gaps"] == 0 and health["bars"]["rejected"] == {}
    assert health["status"] == "ok", health["reasons"]

    # Features as if live: the last bar's, equal to TA-Lib's batch over the whole week.
    (row,) = scan(daemon.env)
    assert row["symbol"] == "AAPL" and row["t"] == bars[-1].t and row["forming"] is False
    closes = np.array([b.c for b in bars])
    assert row["rsi"] == talib.RSI(closes, 14)[-1]
    assert row["ema"] == talib.EMA(closes, 20)[-1]
    assert row["market_open"] is False

    messages = daemon.messages()
    assert "replaying" in messages
    assert daemon.stop() == 0

    async def stored() -> tuple[list[tuple[int, float]], list[tuple[int, int, int, bool]]]:
        store = BarStore(Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3")
        await store.open()
        try:
            rows = await store.bars_between("AAPL", "1m", 0, 2**62)
            return [(b.t, b.c) for b in rows if not b.synthetic], await store.gaps("AAPL", "1m")
        finally:
            await store.close()

    rows, gaps = asyncio.run(stored())
    assert rows == [(b.t, b.c) for b in bars]  # every recorded bar, once, as recorded
    assert gaps == []  # none across the nights, the holiday or the weekend
