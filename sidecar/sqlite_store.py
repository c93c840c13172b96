"""Where bars are kept for 90 days: SQLite (WAL) through aiosqlite.

Bars are buffered in memory (a revision overwrites its buffered bar) and written
as one upsert transaction when the flush interval passes or the buffer reaches
its size limit, whichever comes first. A failed flush keeps the bars buffered and
retries; past ``buffer_max_rows`` the oldest buffered bars are dropped *and
counted* (``dropped``) — never silently (while a flush is writing, its batch is
not counted: those are the oldest bars, and they come back if the flush fails). A database
file deleted underneath the open connection is restored from that connection at
the next flush. Old rows are deleted in small slices in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np

from sidecar import foreground
from sidecar.bar import Bar
from sidecar.features import Columns

log = logging.getLogger("sidecar.sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS bars (
    symbol    TEXT    NOT NULL,
    tf        TEXT    NOT NULL,
    t         INTEGER NOT NULL,   -- open time, epoch ms UTC
    o         REAL    NOT NULL,
    h         REAL    NOT NULL,
    l         REAL    NOT NULL,
    c         REAL    NOT NULL,
    v         REAL,               -- NULL where the source has no volume
    src       TEXT    NOT NULL,
    forming   INTEGER NOT NULL DEFAULT 0,
    synthetic INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (symbol, tf, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    symbol  TEXT    NOT NULL,
    tf      TEXT    NOT NULL,
    start   INTEGER NOT NULL,
    "end"   INTEGER NOT NULL,
    missing INTEGER NOT NULL,
    filled  INTEGER NOT NULL,
    PRIMARY KEY (symbol, tf, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

_UPSERT = """
INSERT INTO bars (symbol, tf, t, o, h, l, c, v, src, forming, synthetic)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (symbol, tf, t) DO UPDATE SET
    o = excluded.o, h = excluded.h, l = excluded.l, c = excluded.c, v = excluded.v,
    src = excluded.src, forming = excluded.forming, synthetic = excluded.synthetic
"""

_COLUMNS = "symbol, tf, t, o, h, l, c, v, src, forming, synthetic"

#: While bars are being dropped, the error is logged at most this often (with totals).
DROP_LOG_EVERY_S = 10.0
#: History rows made and inserted between two looks at whether a cycle runs.
HISTORY_SLICE = 1_000


def _row(b: Bar) -> tuple[object, ...]:
    return (b.symbol, b.tf, b.t, b.o, b.h, b.l, b.c, b.v, b.src, int(b.forming), int(b.synthetic))


def _bar(r: sqlite3.Row | tuple[object, ...]) -> Bar:
    sym, tf, t, o, h, l, c, v, src, forming, synthetic = r
    return Bar(str(sym), str(tf), int(t), float(o), float(h), float(l), float(c),  # type: ignore[arg-type]
               None if v is None else float(v), str(src), bool(forming), bool(synthetic))  # type: ignore[arg-type]


class BarStore:
    """The 90-day bar store with its write buffer."""

    __slots__ = (
        "_buffer", "_db", "_drop_logged", "_drop_logged_mono", "_file_id", "_flush_lock",
        "_inflight", "_last_flush_mono", "buffer_max_rows", "dropped", "flush_interval_s",
        "flush_max_rows", "flushed_rows", "last_error", "last_flush_ms", "last_flush_s", "path",
        "pending_gaps", "series_rows",
    )

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 10.0,
        flush_max_rows: int = 20_000,
        buffer_max_rows: int = 2_000_000,
    ) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self.buffer_max_rows = buffer_max_rows
        self._db: aiosqlite.Connection | None = None
        # Insertion-ordered: the first keys are the oldest bars (bars arrive in time order).
        self._buffer: dict[tuple[str, str, int], Bar] = {}
        self._inflight = 0  # rows of the batch a flush is writing right now
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._drop_logged = 0
        self._drop_logged_mono: float | None = None
        self._flush_lock = asyncio.Lock()
        self._last_flush_mono = time.monotonic()
        self.pending_gaps: list[tuple[str, str, int, int, int, int]] = []
        self.flushed_rows = 0
        self.dropped = 0
        self.last_flush_ms: int | None = None
        self.last_flush_s: float | None = None
        self.last_error: str | None = None
        #: Rows the buffer holds in steady state (each symbol's forming bar, revised in
        #: place every cycle): the ``flush_max_rows`` bound counts past them.
        self.series_rows = 0

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, timeout=5.0)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        await self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1')"
        )
        await self._db.commit()
        st = os.stat(self.path)
        self._file_id = (st.st_dev, st.st_ino)

    async def _restore_if_deleted(self) -> None:
        """Put the database file back if it was deleted (or replaced) underneath us.

        The open connection still reads the deleted file, so everything is copied
        from it (SQLite's backup API) into a new file at the same path. A foreign
        file found at the path is kept beside it, never overwritten.
        """
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._file_id:
                return
            aside = self.path.with_name(f"{self.path.name}.replaced-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("sqlite file was replaced underneath the daemon; moved the new one aside",
                      extra={"path": str(self.path), "moved_to": str(aside)})
        except FileNotFoundError:
            log.error("sqlite file was deleted underneath the daemon; restoring it from the "
                      "open connection", extra={"path": str(self.path)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".restoring")
        tmp.unlink(missing_ok=True)
        target = sqlite3.connect(tmp, check_same_thread=False)
        try:
            await self.db.backup(target)
        finally:
            target.close()
        # Closing the old connection removes its own -wal/-shm names: do it before the
        # new file (and its WAL) takes the path.
        await self.db.close()
        self._db = None
        os.replace(tmp, self.path)
        await self.open()
        log.info("sqlite file restored", extra={"path": str(self.path)})

    async def close(self) -> None:
        """Flush everything buffered, then close."""
        try:
            await self.flush()
        finally:
            if self._buffer:
                log.error("sqlite unavailable at shutdown: bars not written (Redis keeps the "
                          "newest; they are reconciled at the next start)",
                          extra={"bars": len(self._buffer), "error": self.last_error})
            if self._db is not None:
                await self._db.close()
                self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("BarStore is not open")
        return self._db

    def status(self) -> dict[str, Any]:
        """Bars waiting for the next flush, rows flushed, bars dropped from a full buffer,
        the last flush and the last error (``/health``'s ``sqlite``)."""
        return {
            "buffered": self.buffered,
            "flushed_rows": self.flushed_rows,
            "dropped": self.dropped,
            "last_flush_ms": self.last_flush_ms,
            "last_error": self.last_error,
        }

    # -- the buffer -------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def add(self, bars: Iterable[Bar]) -> None:
        """Buffer bars for the next flush; a revision replaces the buffered bar."""
        buf = self._buffer
        for b in bars:
            buf[(b.symbol, b.tf, b.t)] = b
        self._enforce_bound()

    def _enforce_bound(self) -> None:
        if self._inflight:
            return  # the oldest bars are being written; the bound applies if that fails
        excess = len(self._buffer) - self.buffer_max_rows
        if excess > 0:
            self._drop_oldest(excess)

    def _drop_oldest(self, n: int) -> None:
        """Drop the ``n`` bars buffered first (the oldest), count them, log now and then."""
        for key in list(itertools.islice(self._buffer, n)):
            del self._buffer[key]
        self.dropped += n
        now = time.monotonic()
        if self._drop_logged_mono is None or now - self._drop_logged_mono >= DROP_LOG_EVERY_S:
            log.error(
                "sqlite buffer full: dropped oldest bars",
                extra={"dropped": self.dropped - self._drop_logged, "dropped_total": self.dropped,
                       "limit": self.buffer_max_rows, "error": self.last_error},
            )
            self._drop_logged, self._drop_logged_mono = self.dropped, now

    def add_gap(self, symbol: str, tf: str, start: int, end: int, missing: int, filled: bool) -> None:
        self.pending_gaps.append((symbol, tf, start, end, missing, int(filled)))

    def flush_due(self) -> bool:
        if not self._buffer:
            return False
        return (
            len(self._buffer) >= self.flush_max_rows + self.series_rows
            or time.monotonic() - self._last_flush_mono >= self.flush_interval_s
        )

    async def flush(self) -> int:
        """Write the whole buffer in one transaction; returns rows written.

        On failure the bars go back into the buffer (unless a newer revision
        arrived meanwhile) and the error is kept in ``last_error``.
        """
        async with self._flush_lock:
            self._last_flush_mono = time.monotonic()
            if not self._buffer and not self.pending_gaps:
                return 0
            batch, self._buffer = self._buffer, {}
            self._inflight = len(batch)
            gaps, self.pending_gaps = self.pending_gaps, []
            started = time.perf_counter()
            try:
                if self._db is None:  # a restore failed half-way: reopen the path
                    await self.open()
                await self._restore_if_deleted()
                await self.db.executemany(_UPSERT, [_row(b) for b in batch.values()])
                if gaps:
                    await self.db.executemany(
                        "INSERT OR REPLACE INTO gaps VALUES (?, ?, ?, ?, ?, ?)", gaps
                    )
                await self.db.commit()
            except (sqlite3.Error, OSError) as exc:
                if self._db is not None:
                    with contextlib.suppress(sqlite3.Error, OSError):
                        await self._db.rollback()
                # Back in front of what arrived meanwhile (oldest first); newer revisions win.
                self._buffer = {**batch, **self._buffer}
                self._inflight = 0
                self.pending_gaps[:0] = gaps
                self._enforce_bound()
                if self.last_error != str(exc):
                    log.error("sqlite flush failed; bars kept in memory",
                              extra={"error": str(exc), "buffered": len(self._buffer)})
                self.last_error = str(exc)
                return 0
            finally:
                self._inflight = 0
            if self.last_error is not None:
                log.info("sqlite flush recovered", extra={"rows": len(batch), "dropped_total": self.dropped})
            self.last_error = None
            self.flushed_rows += len(batch)
            self.last_flush_ms = int(time.time() * 1000)
            self.last_flush_s = time.perf_counter() - started
            return len(batch)

    # -- reads ------------------------------------------------------------------
    async def is_empty(self) -> bool:
        async with self.db.execute("SELECT 1 FROM bars LIMIT 1") as cur:
            return await cur.fetchone() is None

    async def last_bars(self, symbol: str, tf: str, n: int, before: int | None = None) -> list[Bar]:
        """The newest ``n`` stored bars of a symbol (``t < before`` if given), oldest first."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t < ? ORDER BY t DESC LIMIT ?"
        async with self.db.execute(sql, (symbol, tf, before if before is not None else 2**62, n)) as cur:
            rows = await cur.fetchall()
        return [_bar(r) for r in reversed(list(rows))]

    async def tails(self, symbols: Iterable[str], tf: str, n: int) -> dict[str, list[Bar]]:
        """The newest ``n`` stored bars of each symbol, oldest first (``[]``: none stored).

        One thread call on its own read connection, so thousands of symbols cost one
        hop rather than one per symbol (the daemon reads them at start, before any write).
        """
        names = list(symbols)
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? ORDER BY t DESC LIMIT ?"

        def read() -> dict[str, list[Bar]]:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
            try:
                return {sym: [_bar(r) for r in reversed(con.execute(sql, (sym, tf, n)).fetchall())]
                        for sym in names}
            finally:
                con.close()

        return await asyncio.to_thread(read)

    def reader(self) -> StoreReader:
        """A read-only connection for a worker thread (close it there when done)."""
        return StoreReader.open(str(self.path))

    async def bars_between(self, symbol: str, tf: str, start: int, end: int) -> list[Bar]:
        """Stored bars with ``start <= t < end``, oldest first."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t >= ? AND t < ? ORDER BY t"
        async with self.db.execute(sql, (symbol, tf, start, end)) as cur:
            return [_bar(r) for r in await cur.fetchall()]

    async def packed_between(self, symbol: str, tf: str, start: int, end: int) -> dict[int, bytes]:
        """Stored bars with ``start <= t < end`` as ``{t: Bar.pack()}`` (the Redis member form)."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t >= ? AND t < ?"
        async with self.db.execute(sql, (symbol, tf, start, end)) as cur:
            return {int(r[2]): _bar(r).pack() for r in await cur.fetchall()}

    async def newest_time(self, symbol: str, tf: str) -> int | None:
        async with self.db.execute(
            "SELECT MAX(t) FROM bars WHERE symbol = ? AND tf = ?", (symbol, tf)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def count(self, symbol: str | None = None) -> int:
        params: tuple[str, ...] = ()
        if symbol is None:
            sql = "SELECT COUNT(*) FROM bars"
        else:
            sql, params = "SELECT COUNT(*) FROM bars WHERE symbol = ?", (symbol,)
        async with self.db.execute(sql, params) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def span(self, symbol: str, tf: str, start: int, end: int) -> tuple[int | None, int | None, int]:
        """``(first t, last t, count)`` of the stored bars with ``start <= t < end``."""
        async with self.db.execute(
            "SELECT MIN(t), MAX(t), COUNT(*) FROM bars WHERE symbol = ? AND tf = ? AND t >= ? AND t < ?",
            (symbol, tf, start, end),
        ) as cur:
            row = await cur.fetchone()
        if row is None or row[2] == 0:
            return None, None, 0
        return int(row[0]), int(row[1]), int(row[2])

    async def gaps(self, symbol: str, tf: str) -> list[tuple[int, int, int, bool]]:
        async with self.db.execute(
            'SELECT start, "end", missing, filled FROM gaps WHERE symbol = ? AND tf = ? ORDER BY start',
            (symbol, tf),
        ) as cur:
            return [(int(a), int(b), int(c), bool(d)) for a, b, c, d in await cur.fetchall()]

    async def write_history(self, bars: Iterable[Bar]) -> int:
        """Upsert history bars directly (backfill), bypassing the live buffer.

        The rows are made in the writer thread as SQLite consumes them, a slice at a
        time, pausing while a cycle runs (:mod:`sidecar.foreground`): a large insert
        costs the event loop nothing and does not compete with a cycle.
        """
        todo = list(bars)

        def rows() -> Iterator[tuple[object, ...]]:
            for i in range(0, len(todo), HISTORY_SLICE):
                foreground.wait_idle_blocking()
                yield from map(_row, todo[i:i + HISTORY_SLICE])

        async with self._flush_lock:
            await self.db.executemany(_UPSERT, rows())
            await self.db.commit()
        return len(todo)

    async def get_meta(self, key: str) -> str | None:
        async with self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        await self.db.commit()

    # -- retention ----------------------------------------------------------------
    async def delete_older_than(self, cutoff_ms: int, by_tf: Mapping[str, int] | None = None) -> int:
        """Delete bars with ``t < cutoff_ms`` (``by_tf[tf]`` for a timeframe it names), one
        symbol and timeframe per transaction."""
        async with self.db.execute("SELECT DISTINCT symbol, tf FROM bars") as cur:
            series = [(str(s), str(tf)) for s, tf in await cur.fetchall()]
        deleted = 0
        cutoffs = by_tf or {}
        for symbol, tf in series:
            async with self._flush_lock:
                cur = await self.db.execute(
                    "DELETE FROM bars WHERE symbol = ? AND tf = ? AND t < ?",
                    (symbol, tf, cutoffs.get(tf, cutoff_ms)),
                )
                deleted += cur.rowcount if cur.rowcount > 0 else 0
                await self.db.commit()
            await asyncio.sleep(0)  # let the loop breathe between slices
        if deleted:
            log.info("retention removed old bars", extra={"rows": deleted, "cutoff": cutoff_ms})
        return deleted


class StoreReader:
    """Synchronous reads of the bar store on a connection of their own, for a worker
    thread (the rows are made into bars, or packed, off the event loop)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    @classmethod
    def open(cls, path: str) -> StoreReader:
        """A read-only connection to the store at ``path`` (any thread or process)."""
        return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False))

    def close(self) -> None:
        self.con.close()

    def bars_between(self, symbol: str, tf: str, start: int, end: int) -> list[Bar]:
        """Stored bars with ``start <= t < end``, oldest first."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t >= ? AND t < ? ORDER BY t"
        return [_bar(r) for r in self.con.execute(sql, (symbol, tf, start, end)).fetchall()]

    def packed_between(self, symbol: str, tf: str, start: int, end: int) -> dict[int, bytes]:
        """Stored bars with ``start <= t < end`` as ``{t: Bar.pack()}`` (the Redis member form)."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t >= ? AND t < ?"
        return {int(r[2]): _bar(r).pack() for r in self.con.execute(sql, (symbol, tf, start, end)).fetchall()}

    def last_bars(self, symbol: str, tf: str, n: int, before: int | None = None) -> list[Bar]:
        """The newest ``n`` stored bars of a symbol (``t < before`` if given), oldest first."""
        sql = f"SELECT {_COLUMNS} FROM bars WHERE symbol = ? AND tf = ? AND t < ? ORDER BY t DESC LIMIT ?"
        rows = self.con.execute(sql, (symbol, tf, before if before is not None else 2**62, n)).fetchall()
        return [_bar(r) for r in reversed(rows)]

    def span(self, symbol: str, tf: str, start: int, end: int) -> tuple[int, int | None]:
        """``(count, first t)`` of the stored bars with ``start <= t < end``."""
        row = self.con.execute("SELECT COUNT(*), MIN(t) FROM bars WHERE symbol = ? AND tf = ? "
                               "AND t >= ? AND t < ?", (symbol, tf, start, end)).fetchone()
        return int(row[0]), None if row[1] is None else int(row[1])

    def closed_columns(self, symbol: str, tf: str, n: int, before: int) -> Columns:
        """The newest ``n`` stored closed bars with ``t < before`` as columns, oldest
        first (the values as stored, no :class:`Bar` made)."""
        rows = self.con.execute("SELECT t, h, l, c, v FROM bars WHERE symbol = ? AND tf = ? AND t < ? "
                                "AND forming = 0 ORDER BY t DESC LIMIT ?", (symbol, tf, before, n)).fetchall()
        if not rows:
            return Columns.empty()
        rows.reverse()
        # One float64 matrix (a NULL volume becomes NaN); open times in ms are exact in a double.
        m = np.array(rows, dtype=np.float64).T.copy()
        return Columns(m[0].astype(np.int64), m[1], m[2], m[3], m[4])
