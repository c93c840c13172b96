"""BarStore against a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from sidecar import sqlite_store
from sidecar.bar import Bar
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock, bar

DAY = 86_400_000




async def test_schema_is_wal_without_rowid_with_primary_key(bar_store: BarStore) -> None:
    async with bar_store.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    async with bar_store.db.execute("SELECT sql FROM sqlite_master WHERE name='bars'") as cur:
        sql = (await cur.fetchone())[0]
    assert "PRIMARY KEY (symbol, tf, t)" in sql and "WITHOUT ROWID" in sql


async def test_empty_store_is_detected(bar_store: BarStore) -> None:
    assert await bar_store.is_empty()
    bar_store.add([bar(0)])
    await bar_store.flush()
    assert not await bar_store.is_empty()


async def test_flush_happens_after_ten_seconds_or_at_size_limit(
    bar_store: BarStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = Clock(1_000.0)
    monkeypatch.setattr(sqlite_store.time, "monotonic", now)
    bar_store._last_flush_mono = now.t
    bar_store.flush_max_rows = 100
    bar_store.add([bar(i * 60_000) for i in range(10)])
    now.advance(9.9)
    assert not bar_store.flush_due()
    now.advance(0.1)
    assert bar_store.flush_due()  # 10 s passed
    assert await bar_store.flush() == 10
    assert not bar_store.flush_due()
    bar_store.add([bar(i * 60_000, symbol="MSFT") for i in range(99)])
    assert not bar_store.flush_due()
    bar_store.add([bar(99 * 60_000, symbol="MSFT")])
    assert bar_store.flush_due()  # size limit, long before 10 s
    assert await bar_store.flush() == 100
    assert await bar_store.count() == 110


async def test_revision_overwrites_buffer_and_row(bar_store: BarStore) -> None:
    bar_store.add([bar(0, 100.0, forming=True), bar(0, 101.0, forming=True)])
    assert bar_store.buffered == 1
    await bar_store.flush()
    bar_store.add([bar(0, 102.0)])
    await bar_store.flush()
    rows = await bar_store.last_bars("AAPL", "1m", 10)
    assert [(b.t, b.c, b.forming) for b in rows] == [(0, 102.0, False)]


async def test_reads_last_n_and_time_range_and_volume_none(bar_store: BarStore) -> None:
    await bar_store.write_history([bar(i * 60_000) for i in range(100)])
    await bar_store.write_history([bar(i * 60_000, symbol="EURUSD", v=None) for i in range(3)])
    last = await bar_store.last_bars("AAPL", "1m", 5)
    assert [b.t for b in last] == [i * 60_000 for i in range(95, 100)]
    rng = await bar_store.bars_between("AAPL", "1m", 10 * 60_000, 13 * 60_000)
    assert [b.t for b in rng] == [600_000, 660_000, 720_000]
    fx = await bar_store.last_bars("EURUSD", "1m", 5)
    assert all(b.v is None for b in fx) and len(fx) == 3


async def test_retention_removes_only_rows_older_than_90_days(bar_store: BarStore) -> None:
    now = int(time.time() * 1000) // 60_000 * 60_000
    cutoff = now - 90 * DAY
    times = [cutoff - 2 * 60_000, cutoff - 60_000, cutoff, cutoff + 60_000, now]
    await bar_store.write_history([bar(t) for t in times])
    await bar_store.write_history([bar(t, symbol="MSFT") for t in times])
    assert await bar_store.delete_older_than(cutoff) == 4
    for sym in ("AAPL", "MSFT"):
        kept = await bar_store.last_bars(sym, "1m", 100)
        assert [b.t for b in kept] == [cutoff, cutoff + 60_000, now]


async def test_failed_flush_keeps_bars_and_retries(tmp_path: Path) -> None:
    store = BarStore(tmp_path / "b.sqlite3", buffer_max_rows=1_000)
    await store.open()
    try:
        store.add([bar(i * 60_000) for i in range(5)])
        # Another process holds the write lock: the flush must fail, not lose bars.
        other = sqlite3.connect(tmp_path / "b.sqlite3", timeout=0.1)
        other.execute("BEGIN IMMEDIATE")
        await store.db.execute("PRAGMA busy_timeout = 100")
        assert await store.flush() == 0
        assert store.buffered == 5 and store.last_error is not None
        other.rollback()
        other.close()
        assert await store.flush() == 5
        assert store.last_error is None and await store.count() == 5
    finally:
        await store.close()


async def test_buffer_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    store = BarStore(tmp_path / "b.sqlite3", buffer_max_rows=10)
    await store.open()
    try:
        store.add([bar(i * 60_000) for i in range(15)])
        assert store.buffered == 10 and store.dropped == 5
        await store.flush()
        kept = await store.last_bars("AAPL", "1m", 100)
        assert kept[0].t == 5 * 60_000  # the oldest five were the ones dropped
    finally:
        await store.close()


async def test_close_flushes_everything(tmp_path: Path) -> None:
    store = BarStore(tmp_path / "b.sqlite3")
    await store.open()
    store.add([bar(i * 60_000) for i in range(42)])
    await store.close()
    with sqlite3.connect(tmp_path / "b.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM bars").fetchone()[0] == 42


async def test_fractional_volumes_round_trip_exactly(tmp_path: Path) -> None:
    """Volumes are real numbers everywhere: SQLite REAL, the msgpack member, the JSON line."""
    store = BarStore(tmp_path / "v.sqlite3")
    await store.open()
    try:
        volumes = [0.53412345, 1.5e-07, 20.55495, 123456789.00000001, 0.1 + 0.2]
        bars = [Bar("BTCUSD", "1m", 60_000 * (i + 1), 1.0, 1.0, 1.0, 1.0, v, "ccxt:binance")
                for i, v in enumerate(volumes)]
        await store.write_history(bars)
        assert [b.v for b in await store.bars_between("BTCUSD", "1m", 0, 10**9)] == volumes
        assert [Bar.unpack("BTCUSD", "1m", b.pack()).v for b in bars] == volumes
        assert [Bar.from_json_dict(json.loads(json.dumps(b.to_json_dict()))).v for b in bars] == volumes
    finally:
        await store.close()
