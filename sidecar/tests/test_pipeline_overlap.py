"""The overlapped cycle on a real Redis: each answered request is taken and written as it
arrives; the announcement goes out only after every write of the cycle completed."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.app import writer
from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.redis_store import RedisStore
from sidecar.settings import Settings
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import Clock
from sidecar.timeframe import Timeframe

TF = Timeframe.parse("1s")
T0 = 1_700_000_000_000
SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE", "FFF")  # three requests of two


class ChunkedSource(Source):
    """Answers two symbols per request with the bar that just closed.

    ``gates``: a request whose first symbol is a key waits for that event.
    ``slow``: a request whose first symbol is a key answers so many seconds late.
    ``fail``: a request carrying one of these symbols fails as a whole.
    """

    max_batch = 2

    def __init__(self, name: str, *, fail: Sequence[str] = (),
                 gates: dict[str, asyncio.Event] | None = None,
                 slow: dict[str, float] | None = None) -> None:
        self.name = name
        self.fail = set(fail)
        self.gates = gates or {}
        self.slow = slow or {}
        self.asked: list[list[str]] = []

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        self.asked.append(list(symbols))
        gate = self.gates.get(symbols[0])
        if gate is not None:
            await gate.wait()
        await asyncio.sleep(self.slow.get(symbols[0], 0.0))
        if self.fail & set(symbols):
            raise ProviderError("unavailable", "this request failed", source=self.name)
        t = tf.floor(now_ms) - tf.ms
        price = 50.0 + (t - T0) / 1e6
        return {s: [Bar(s, tf.name, t, price, price + 0.5, price - 0.5, price + 0.1, 100.0, self.name)]
                for s in symbols}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


class RecordingStore(RedisStore):
    """The real store, recording each write; it can delay or refuse some of them."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__(store.redis, "test")
        self.events: list[tuple[str, str, list[str], list[tuple[str, int]]]] = []
        self.delay: dict[str, float] = {}  # a chunk write with this symbol waits so long
        self.refuse_chunk: set[str] = set()  # a chunk write with this symbol fails once
        self.refuse_final = 0  # so many final writes fail
        self.hang_chunk: set[str] = set()  # a chunk write with this symbol times out once

    async def write_cycle(self, bars: Sequence[Bar], features: Sequence[tuple[str, str, bytes]],
                          heartbeat: dict[str, Any] | None = None,
                          publish: dict[str, Any] | None = None) -> bool:
        kind = "final" if publish is not None else "chunk"
        symbols = sorted({row[1] for row in features})
        written = [(b.symbol, b.t) for b in bars]
        self.events.append(("start", kind, symbols, written))
        if kind == "chunk":
            await asyncio.sleep(max((self.delay.get(s, 0.0) for s in symbols), default=0.0))
            if self.hang_chunk & set(symbols):
                self.hang_chunk -= set(symbols)
                self.events.append(("failed", kind, symbols, written))
                raise RedisTimeout("Timeout reading from socket (test)")
            if self.refuse_chunk & set(symbols):
                self.refuse_chunk -= set(symbols)
                self.events.append(("failed", kind, symbols, written))
                raise RedisError("chunk write refused (test)")
        elif self.refuse_final:
            self.refuse_final -= 1
            self.events.append(("failed", kind, symbols, written))
            raise RedisError("final write refused (test)")
        has_meta = await super().write_cycle(bars, features, heartbeat, publish)
        self.events.append(("done", kind, symbols, written))
        return has_meta


def settings() -> Settings:
    return Settings(symbols=SYMBOLS, sources=("primary", "backup"), timeframe=TF, outlier_k=0.0,
                    clock_skew_ms=10**12, market_hours=False)


def pipeline(sources: list[Source], store: RedisStore, bar_store: BarStore,
             now: Clock) -> Pipeline:
    return Pipeline(settings(), sources, store, bar_store, clock=now)


async def test_an_answer_is_written_while_other_requests_are_in_flight(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    gate = asyncio.Event()
    source = ChunkedSource("primary", gates={"EEE": gate})
    now = Clock(T0 / 1000)
    pipe = pipeline([source], redis_store, bar_store, now)
    cycle = asyncio.ensure_future(pipe.run_cycle(T0))
    seen_early: list[dict[str, Any] | None] = []
    try:
        async with asyncio.timeout(10):
            while True:
                first, last = await redis_store.read_features(["AAA", "EEE"], TF.name)
                if first is not None:
                    seen_early = [first, last]
                    break
                await asyncio.sleep(0.01)
    finally:
        gate.set()  # the held request answers; the cycle completes
    await asyncio.wait_for(cycle, 10)
    # AAA's features were readable while EEE's request was still unanswered.
    assert seen_early[0] is not None and seen_early[0]["t"] == T0 - 1000
    assert seen_early[1] is None
    assert [f is not None for f in await redis_store.read_features(list(SYMBOLS), TF.name)] == [True] * 6


async def test_the_announcement_waits_for_every_write_of_the_cycle(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    store = RecordingStore(redis_store)
    store.delay["AAA"] = 0.3  # the first answer's write completes after the others
    now = Clock(T0 / 1000)
    pipe = pipeline([ChunkedSource("primary", slow={"EEE": 0.05})], store, bar_store, now)
    pubsub = redis_store.redis.pubsub()
    await pubsub.subscribe(store.keys.cycles_channel)
    read_on_announce: list[list[dict[str, Any] | None]] = []

    async def reader() -> dict[str, Any]:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            if msg is not None:
                announced: dict[str, Any] = msgpack.unpackb(msg["data"])
                read_on_announce.append(await redis_store.read_features(announced["updated"], TF.name))
                return announced

    listening = asyncio.ensure_future(reader())
    await pipe.run_cycle(T0)
    announced = await asyncio.wait_for(listening, 10)
    await pubsub.aclose()

    kinds = [(event, kind) for event, kind, _, _ in store.events]
    # The first two answers were written as they came; the last one goes with the final write,
    # which (heartbeat + announcement) starts only after both chunk writes completed.
    assert kinds.count(("done", "chunk")) == 2
    assert kinds.index(("start", "final")) > max(i for i, k in enumerate(kinds) if k == ("done", "chunk"))
    assert [w for e, k, _, w in store.events if (e, k) == ("done", "final")] == [
        [("EEE", T0 - 1000), ("FFF", T0 - 1000)]]
    assert sorted(announced["updated"]) == list(SYMBOLS) and announced["features"] == 6
    assert all(f is not None and f["t"] == T0 - 1000 and f["via"] == "poll" for f in read_on_announce[0])
    assert await store.read_heartbeat() is not None


async def test_a_failed_chunk_write_is_buffered_and_rewritten_exactly_once(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    store = RecordingStore(redis_store)
    store.refuse_chunk = {"CCC"}  # cycle 1: one of the two chunk writes fails
    now = Clock(T0 / 1000)
    pipe = pipeline([ChunkedSource("primary", slow={"EEE": 0.05})], store, bar_store, now)
    await pipe.run_cycle(T0)
    assert not store.refuse_chunk  # it was refused
    # The final write carried the refused chunk's bars and features (and the last answer's).
    assert pipe.stats.redis_ok and not pipe.writer.backlog
    final = [w for e, k, _, w in store.events if (e, k) == ("done", "final")]
    assert sorted(final[0]) == [(s, T0 - 1000) for s in ("CCC", "DDD", "EEE", "FFF")]
    assert [f is not None for f in await store.read_features(list(SYMBOLS), TF.name)] == [True] * 6

    store.refuse_final = 1  # cycle 2: the chunks are written, the final write fails
    now.advance(1)
    await pipe.run_cycle(T0 + 1000)
    assert not pipe.stats.redis_ok and sorted(pipe.writer.backlog) == [("EEE", "1s", T0), ("FFF", "1s", T0)]
    now.advance(1)
    await pipe.run_cycle(T0 + 2000)  # Redis failing: this cycle's bars go out with the final write
    assert pipe.stats.redis_ok and not pipe.writer.backlog
    assert [k for e, k, _, _ in store.events[-2:]] == ["final", "final"]

    # Every accepted bar reached Redis in exactly one successful write; none is doubled.
    written: dict[tuple[str, int], int] = {}
    for event, _, _, bars in store.events:
        if event == "done":
            for key in bars:
                written[key] = written.get(key, 0) + 1
    expected = {(s, T0 + k * 1000 - 1000) for s in SYMBOLS for k in range(3)}
    assert written == dict.fromkeys(expected, 1)
    assert pipe.stats.bars_stored == pipe.stats.bars_accepted == 18
    for sym in SYMBOLS:
        assert [b.t for b in await store.recent_bars(sym, TF.name, 10)] == [T0 - 1000, T0, T0 + 1000]


async def test_a_timed_out_chunk_write_skips_the_final_write_of_that_cycle(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    # A hung Redis: the chunk write waited out the timeout. The final write would wait
    # as long again on the same server, so the cycle leaves its bars in the backlog.
    store = RecordingStore(redis_store)
    store.hang_chunk = {"CCC"}
    now = Clock(T0 / 1000)
    pipe = pipeline([ChunkedSource("primary", slow={"EEE": 0.05})], store, bar_store, now)
    await pipe.run_cycle(T0)
    assert not store.hang_chunk  # it timed out
    assert [k for e, k, _, _ in store.events if e == "start"] == ["chunk", "chunk"]  # no final
    assert not pipe.stats.redis_ok and "Timeout" in (pipe.stats.redis_last_error or "")
    assert sorted(pipe.writer.backlog) == [(s, "1s", T0 - 1000) for s in ("CCC", "DDD", "EEE", "FFF")]

    now.advance(1)
    await pipe.run_cycle(T0 + 1000)  # Redis answers again: one final write carries the backlog
    assert pipe.stats.redis_ok and not pipe.writer.backlog
    written: dict[tuple[str, int], int] = {}
    for event, _, _, bars in store.events:
        if event == "done":
            for key in bars:
                written[key] = written.get(key, 0) + 1
    assert written == dict.fromkeys({(s, T0 + k * 1000 - 1000) for s in SYMBOLS for k in range(2)}, 1)
    assert [f is not None and f["t"] == T0 for f in await store.read_features(list(SYMBOLS), TF.name)] \
        == [True] * 6
    assert await store.read_heartbeat() is not None


async def test_a_failed_request_falls_through_to_the_next_source_in_the_cycle(
    redis_store: RedisStore, bar_store: BarStore
) -> None:
    primary = ChunkedSource("primary", fail=("CCC",), slow={"EEE": 0.05})
    backup = ChunkedSource("backup")
    store = RecordingStore(redis_store)
    now = Clock(T0 / 1000)
    pipe = pipeline([primary, backup], store, bar_store, now)
    await pipe.run_cycle(T0)
    assert sorted(primary.asked) == [["AAA", "BBB"], ["CCC", "DDD"], ["EEE", "FFF"]]
    assert backup.asked == [["CCC", "DDD"]]  # in the same cycle, after the primary's answers
    feats = dict(zip(SYMBOLS, await store.read_features(list(SYMBOLS), TF.name), strict=True))
    assert {s: f["src"] for s, f in feats.items() if f is not None} == {
        "AAA": "primary", "BBB": "primary", "CCC": "backup", "DDD": "backup",
        "EEE": "primary", "FFF": "primary"}
    assert all(f is not None and f["via"] == "poll" for f in feats.values())
    assert pipe.sources[0].last_error_class == "unavailable" and pipe.sources[0].requests == 3
    assert pipe.planner.holder("CCC") == "backup" and pipe.planner.holder("AAA") == "primary"
    # The first answer was written as it came; each source's last one went with the final write.
    assert [(e, k, s) for e, k, s, _ in store.events if e == "done"] == [
        ("done", "chunk", ["AAA", "BBB"]), ("done", "final", ["CCC", "DDD", "EEE", "FFF"])]
    final = next(w for e, k, _, w in store.events if (e, k) == ("done", "final"))
    assert sorted(final) == [(s, T0 - 1000) for s in ("CCC", "DDD", "EEE", "FFF")]


async def test_an_answer_larger_than_a_piece_is_written_in_pieces_before_the_announcement(
    redis_store: RedisStore, bar_store: BarStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each answer's maps go out in script calls of at most ``WRITE_PIECE_FEATURES``
    (its bars with the first), the last answer's too when it is more than a piece;
    the final write, with the announcement, starts once every piece is stored."""
    monkeypatch.setattr(writer, "WRITE_PIECE_FEATURES", 1)
    store = RecordingStore(redis_store)
    now = Clock(T0 / 1000)
    pipe = pipeline([ChunkedSource("primary", slow={"EEE": 0.05})], store, bar_store, now)
    await pipe.run_cycle(T0)

    chunks = [(symbols, written) for event, kind, symbols, written in store.events if (event, kind) == ("done", "chunk")]
    assert sorted(s for symbols, _ in chunks for s in symbols) == list(SYMBOLS)
    assert all(len(symbols) == 1 for symbols, _ in chunks)
    # The bars of each answer (two symbols) ride with its first piece.
    assert sorted(b for _, written in chunks for b in written) == [(s, T0 - 1000) for s in SYMBOLS]
    assert [len(written) for _, written in chunks].count(2) == 3
    final = [i for i, (event, kind, _, _) in enumerate(store.events) if kind == "final"]
    last_chunk = max(i for i, (event, kind, _, _) in enumerate(store.events) if (event, kind) == ("done", "chunk"))
    assert final and min(final) > last_chunk
    assert [w for e, k, _, w in store.events if (e, k) == ("done", "final")] == [[]]
    assert all(f is not None and f["t"] == T0 - 1000 for f in await redis_store.read_features(list(SYMBOLS), TF.name))


async def test_the_cyclic_gc_waits_for_the_cycle_to_end(redis_store: RedisStore, bar_store: BarStore) -> None:
    seen: list[bool] = []

    class Watching(ChunkedSource):
        async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
            seen.append(gc.isenabled())
            return await super().fetch_latest(symbols, tf, now_ms)

    pipe = pipeline([Watching("primary")], redis_store, bar_store, Clock(T0 / 1000))
    assert gc.isenabled()
    await pipe.run_cycle(T0)
    assert seen == [False, False, False]
    assert gc.isenabled()
