"""The parse worker: real child processes. Answers parsed through it equal the in-process
parse (every Twelve Data fixture and fault body, memo hits and revisions included); a
worker killed or hung mid-job falls back to the in-process parse and is restarted; it
never outlives its parent; a real daemon keeps cycling when its worker is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.bar import Bar
from sidecar.errors import ProviderError
from sidecar.http_session import HttpReply
from sidecar.parse_worker import (
    CHANNEL_BYTES,
    ParseWorker,
    error_from_wire,
    error_to_wire,
    process_cpu_s,
    wanted,
    widen,
)
from sidecar.provider_settings import ProviderSettings
from sidecar.rate_budget import RateBudget
from sidecar.sources._parsing import ParseContext
from sidecar.sources.twelvedata import ClosedRows, TwelveDataSource, parse_batch
from sidecar.symbols import load_symbol_map
from sidecar.tests.fake_providers import FakeProviders, Reply, Seen, fake, fixture, fixtures_dir  # noqa: F401
from sidecar.tests.helpers import REPO, Daemon, free_port, http_get
from sidecar.timeframe import Timeframe

MIN = 60_000
AAPL = "twelvedata/time_series_AAPL_1min_2023-08-24.json"
FX = "twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json"


def source() -> TwelveDataSource:
    provider = ProviderSettings(twelvedata_api_key="TDKEY12345")
    return TwelveDataSource(provider, load_symbol_map(None), RateBudget("twelvedata", per_minute=10**6, per_day=10**9))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone in all but name
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def worker() -> AsyncIterator[ParseWorker]:
    w = ParseWorker(backoff_s=(0.01,))
    assert await w.start() and w.pid is not None
    yield w
    await w.close()


def outcome(value: Any) -> Any:
    """What the pipeline can observe of a parse: bars' values, error class/message/retry."""
    if isinstance(value, ProviderError):
        return ("error", value.error_class, str(value), value.retry_after, value.source)
    return [(b.symbol, b.tf, b.t, b.o, b.h, b.l, b.c, b.v, b.src, b.forming, b.synthetic) for b in value]


async def both(src: TwelveDataSource, w: ParseWorker, memo: ClosedRows, body: bytes, status: int,
               contexts: dict[str, ParseContext], retry_after: float | None = None) -> tuple[Any, Any]:
    """The same answer parsed in-process (``memo``) and through the worker (its own memo)."""
    def run_here() -> Any:
        try:
            return {k: outcome(v) for k, v in parse_batch(body, status, contexts, retry_after, memo).items()}
        except ProviderError as err:
            return outcome(err)

    async def run_there() -> Any:
        reply = HttpReply(status, body, retry_after, "application/json", "http://x/time_series")
        try:
            bars = await src._parse_in_worker(w, reply, contexts, None)
        except ProviderError as err:
            return outcome(err)
        return {k: outcome(v) for k, v in bars.items()}

    fallbacks = w.fallbacks
    there = await run_there()
    assert w.fallbacks == fallbacks, "the worker answered (no in-process fallback)"
    return run_here(), there


def ctx(symbol: str, tf: str, now_ms: int, has_volume: bool = True) -> ParseContext:
    return ParseContext(symbol, Timeframe.parse(tf), "twelvedata", now_ms, has_volume)


FAULT_BODIES: list[tuple[bytes, int, float | None]] = [
    (b'{"values": [{"datetime": "2023-08-24 09:30:00", "open": "1"', 200, None),  # truncated
    (b"<html>502 Bad Gateway</html>", 502, 7.0),
    (b"not json at all", 200, None),
    (fixture("twelvedata/error_429_out_of_credits_minute.json"), 429, 17.0),
    (fixture("twelvedata/error_429_out_of_credits_minute.json"), 200, None),
    (fixture("twelvedata/error_401_invalid_apikey.json"), 401, None),
    (fixture("twelvedata/error_404_page_not_found_unknown_path.json"), 404, None),
    (b'{"code": 500, "message": "internal error", "status": "error"}', 200, 3.0),
    (b'{"AAPL": {"values": [{"datetime": "2023-08-24 09:30:00", "open": NaN, "high": "2",'
     b' "low": "1", "close": "1.5"}], "meta": {}}, "MSFT": {"code": 404, "status": "error",'
     b' "message": "symbol not found"}}', 200, None),
    (b'{"AAPL": {"status": "ok", "values": "nope"}, "MSFT": [1, 2]}', 200, None),
    (b"[]", 200, None),
    (b'{"AAPL": {"values": [{"datetime": "2023-08-24 09:30:00", "open": "1", "high": "2",'
     b' "low": "0.5", "close": "1.5", "volume": [1, 2]}], "meta": {"exchange_timezone": "Nowhere/X"}},'
     b' "MSFT": {"values": [], "meta": {"exchange_timezone": "America/New_York"}}}', 200, None),
]


async def test_every_fixture_and_fault_body_parses_the_same_in_the_worker(worker: ParseWorker) -> None:
    src = source()
    memo = ClosedRows()
    aapl = json.loads(fixture(AAPL))
    newest = max(v["datetime"] for v in aapl["values"])
    now = int(time.mktime(time.strptime(newest, "%Y-%m-%d %H:%M:%S"))) * 1000  # any "now" inside
    aapl_ctx = {"AAPL": ctx("AAPL", "1m", now + 4 * 3_600_000 + 30_000)}  # New York: the newest forms
    fx_ctx = {t: ctx(t.replace("/", ""), "1d", 1_693_000_000_000, False)
              for t in ("USD/CZK", "EUR/USD", "GBP/USD", "CHF/USD", "JPY/USD")}
    for rel in sorted(f"twelvedata/{p.name}" for p in (fixtures_dir() / "twelvedata").glob("*.json")):
        for contexts in (aapl_ctx, fx_ctx):
            here, there = await both(src, worker, memo, fixture(rel), 200, contexts)
            assert here == there, rel
    # Memo hits, a correction of a closed row, a shifted zone: still the same.
    for _ in range(2):
        here, there = await both(src, worker, memo, fixture(AAPL), 200, aapl_ctx)
        assert here == there and isinstance(here, dict) and here["AAPL"]
    assert worker.book("twelvedata"), "closed rows travel as ids"
    aapl["values"][1]["close"] = "999.5"
    here, there = await both(src, worker, memo, json.dumps(aapl).encode(), 200, aapl_ctx)
    assert here == there and here["AAPL"][-2][6] == 999.5
    aapl["meta"]["exchange_timezone"] = "UTC"
    here, there = await both(src, worker, memo, json.dumps(aapl).encode(), 200, aapl_ctx)
    assert here == there
    two = {"AAPL": ctx("AAPL", "1m", 1_692_900_000_000), "MSFT": ctx("MSFT", "1m", 1_692_900_000_000)}
    for body, status, retry_after in FAULT_BODIES:
        here, there = await both(src, worker, memo, body, status, two, retry_after)
        assert here == there, body[:60]


async def test_closed_bars_come_back_as_the_same_objects_and_the_book_stays_bounded(
        worker: ParseWorker) -> None:
    src = source()
    c = {"AAPL": ctx("AAPL", "1m", 1_692_900_000_000 + 10 * 86_400_000)}  # every row closed
    reply = HttpReply(200, fixture(AAPL), None, "application/json", "u")
    first = (await src._parse_in_worker(worker, reply, c, None))["AAPL"]
    again = (await src._parse_in_worker(worker, reply, c, None))["AAPL"]
    assert isinstance(first, list) and isinstance(again, list) and len(first) == 30
    kept = ClosedRows.PER_SERIES
    assert all(a is b for a, b in zip(first[-kept:], again[-kept:], strict=True))
    assert len(worker.book("twelvedata")) == kept


async def test_protocol_round_trip_concurrent_jobs_and_errors(worker: ParseWorker) -> None:
    src = source()
    bodies = [json.dumps({"values": [{"datetime": f"2023-08-24 09:{m:02d}:00", "open": str(m),
                                      "high": str(m + 1), "low": str(m - 0.5), "close": str(m + 0.5),
                                      "volume": "7"}], "meta": {"exchange_timezone": "UTC"}}).encode()
              for m in range(10, 30)]
    c = {"X": ctx("X", "1m", 1_692_900_000_000)}
    replies = [HttpReply(200, b, None, "application/json", "u") for b in bodies]
    answers = await asyncio.gather(*(src._parse_in_worker(worker, r, c, None) for r in replies))
    for m, answer in zip(range(10, 30), answers, strict=True):
        bar = answer["X"][0]
        assert isinstance(bar, Bar) and bar.o == m and bar.c == m + 0.5 and bar.v == 7
    with pytest.raises(ProviderError) as info:
        await src._parse_in_worker(worker, HttpReply(503, b"<html/>", 12.5, "text/html", "u"), c, None)
    assert (info.value.error_class, info.value.retry_after) == ("unavailable", 12.5)
    err = ProviderError("rate_limited", "429 slow down", source="twelvedata", retry_after=3.0)
    back = error_from_wire(error_to_wire(err))
    assert (back.error_class, str(back), back.retry_after, back.source) == (
        "rate_limited", str(err), 3.0, "twelvedata")
    assert worker.jobs == 21 and worker.fallbacks == 0 and worker.status()["in_flight"] == 0
    cpu = process_cpu_s(worker.pid or 0)
    assert cpu is not None and cpu > 0


async def test_worker_killed_mid_job_falls_back_then_restarts(worker: ParseWorker) -> None:
    src = source()
    c = {"AAPL": ctx("AAPL", "1m", 1_692_900_000_000)}
    reply = HttpReply(200, fixture(AAPL), None, "application/json", "u")
    expected = outcome(parse_batch(reply.body, 200, c)["AAPL"])
    old = worker.pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)  # the job below stays in flight until the kill
    job = asyncio.ensure_future(src._parse_in_worker(worker, reply, c, None))
    await asyncio.sleep(0)  # the job is sent before run() first waits
    assert worker.status()["in_flight"] == 1
    os.kill(old, signal.SIGKILL)
    assert outcome((await job)["AAPL"]) == expected  # parsed in-process instead
    assert worker.fallbacks == 1 and worker.state == "down" and "exited" in (worker.last_error or "")
    assert worker._restart_task is not None
    await worker._restart_task
    assert worker.state == "alive" and worker.pid not in (None, old) and worker.restarts == 1
    assert not alive(old)
    assert outcome((await src._parse_in_worker(worker, reply, c, None))["AAPL"]) == expected
    assert worker.fallbacks == 1


async def test_hung_worker_is_replaced_and_its_job_parsed_here() -> None:
    w = ParseWorker(job_timeout_s=0.3, backoff_s=(0.01,))
    await w.start()
    try:
        src = source()
        c = {"AAPL": ctx("AAPL", "1m", 1_692_900_000_000)}
        reply = HttpReply(200, fixture(AAPL), None, "application/json", "u")
        old = w.pid
        assert old is not None
        os.kill(old, signal.SIGSTOP)
        out = await src._parse_in_worker(w, reply, c, None)
        assert outcome(out["AAPL"]) == outcome(parse_batch(reply.body, 200, c)["AAPL"])
        assert w.state == "down" and "hung" in (w.last_error or "") and w.fallbacks == 1
        assert w._restart_task is not None
        await w._restart_task
        assert w.state == "alive" and w.pid != old and not alive(old)
    finally:
        await w.close()


async def test_a_queue_longer_than_the_hang_window_is_not_a_hang() -> None:
    """Jobs queued behind others wait for them (ten a cycle at 5,000 symbols): while the
    worker answers one job after another, none is declared hung, however long the queue."""
    w = ParseWorker(job_timeout_s=1.0, backoff_s=(0.01,))
    await w.start()
    try:
        src = source()
        now = 1_692_900_000_000
        tickers = [f"S{i:04d}" for i in range(5_000)]
        c = {t: ctx(t, "1m", now) for t in tickers}
        row = {"datetime": "2023-08-24 17:59:00", "open": "1.5", "high": "2", "low": "1", "close": "1.25",
               "volume": "9"}
        body = json.dumps({t: {"values": [row], "meta": {"exchange_timezone": "UTC"}} for t in tickers}).encode()
        reply = HttpReply(200, body, None, "application/json", "u")

        async def parsed() -> bool:
            answer = await src._parse_in_worker(w, reply, c, None)
            return len(answer) == 5_000 and answer["S4999"][0].c == 1.25

        # Longer queues until one outlasts a window, however fast this machine parses.
        queue = 16
        while w.queued_windows == 0:
            assert queue <= 1_024, "no queue outlasted a window: nothing was tested"
            assert all(await asyncio.gather(*(parsed() for _ in range(queue))))
            assert w.fallbacks == 0 and w.restarts == 0 and w.state == "alive", w.last_error
            queue *= 2
    finally:
        await w.close()


async def test_close_leaves_no_child_and_later_jobs_parse_here(worker: ParseWorker) -> None:
    pid = worker.pid
    assert pid is not None and alive(pid)
    await worker.close()
    assert not alive(pid) and worker.state == "closed" and worker.status()["pid"] is None
    assert await worker.run("twelvedata", (), lambda answer: answer) is None


_ORPHAN = """
import asyncio, os, sys
from sidecar.parse_worker import ParseWorker
async def main():
    w = ParseWorker()
    assert await w.start()
    print(w.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_worker_exits_when_its_parent_is_sigkilled() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_auto_runs_the_worker_from_500_symbols() -> None:
    assert not wanted("auto", 499) and wanted("auto", 500) and wanted("on", 1) and not wanted("off", 10**6)


def time_series(seen: Seen) -> Reply:
    """The newest three minute bars of every asked symbol, prices moving with the clock."""
    now = int(time.time() * 1000)
    rows = [{"datetime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t / 1000)),
             "open": f"{100 + (t // MIN) % 7}", "high": f"{101 + (t // MIN) % 7}",
             "low": f"{99 + (t // MIN) % 7}", "close": f"{100.5 + (t // MIN) % 7 + (now // 1000) % 3 / 10}",
             "volume": "10"} for t in range(now // MIN * MIN, now // MIN * MIN - 3 * MIN, -MIN)]
    series = {"meta": {"exchange_timezone": "UTC"}, "values": rows, "status": "ok"}
    symbols = seen.query["symbol"].split(",")
    return Reply.json(series if len(symbols) == 1 else {s: series for s in symbols})


async def test_daemon_keeps_cycling_when_its_parse_worker_is_sigkilled(
        fake: FakeProviders, clean_env: dict[str, str], daemons: Callable[..., Daemon]) -> None:
    fake.responders["td"] = time_series
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="twelvedata", SIDECAR_SYMBOLS="BTCUSD,ETHUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_WARM_BARS="0",
               SIDECAR_TWELVEDATA_BASE_URL=fake.base_url, TWELVEDATA_API_KEY="TDKEY12345",
               SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE="100000", SIDECAR_TWELVEDATA_CREDITS_PER_DAY="10000000",
               SIDECAR_PARSE_PROCESS="on", SIDECAR_FETCH_TIMEOUT_S="3")
    daemon = await asyncio.to_thread(daemons, env)
    proc = daemon.proc
    try:
        await asyncio.to_thread(daemon.wait_ready, 60)

        async def health() -> dict[str, Any]:
            return (await asyncio.to_thread(http_get, port, "/health"))[1]

        async def until(check: Any, what: str) -> dict[str, Any]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                h = await health()
                if check(h):
                    return h
                await asyncio.sleep(0.2)
            raise AssertionError(f"not within 20 s: {what}")

        h = await until(lambda h: h["parse_worker"]["jobs"] >= 2, "jobs answered by the worker")
        first = h["parse_worker"]["pid"]
        assert h["parse_worker"]["alive"] and alive(first) and h["status"] == "ok"
        assert h["symbols"]["BTCUSD"]["src"] == "twelvedata"
        assert b"TDKEY12345" not in Path(f"/proc/{first}/environ").read_bytes()  # no keys there
        cycles = h["cycle"]["count"]
        os.kill(first, signal.SIGKILL)
        h = await until(lambda h: h["parse_worker"]["restarts"] == 1 and h["parse_worker"]["alive"]
                        and h["parse_worker"]["pid"] != first, "a restarted worker")
        h = await until(lambda h: h["cycle"]["count"] >= cycles + 3, "cycles after the kill")
        assert not h["symbols"]["BTCUSD"]["stale"] and h["sources"]["twelvedata"]["errors"] == 0
        second = h["parse_worker"]["pid"]
        metrics = await asyncio.to_thread(lambda: __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
        assert "sidecar_parse_worker_up 1.0" in metrics
        assert "sidecar_parse_worker_restarts_total 1.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert not alive(second)
        log = daemon.log_text()
        assert "parse worker lost" in log and log.count("parse worker started") == 2
        assert "parse worker stopped" in log and "TDKEY12345" not in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_channels_to_the_worker_hold_a_whole_batch() -> None:
    """Pipes (asyncio's subprocess) and Unix sockets (uvloop's) are widened to hold a
    batch's body at once, as far as the system allows."""
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    read_end, write_end = os.pipe()
    try:
        assert widen(write_end) >= min(CHANNEL_BYTES, limit)
    finally:
        os.close(read_end)
        os.close(write_end)
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    a, b = socket.socketpair()
    with a, b:
        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        after = widen(a.fileno())
        assert after >= min(CHANNEL_BYTES, wmem_max) and after >= before
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == after
    with open(os.devnull, "rb") as devnull:
        assert widen(devnull.fileno()) == 0
