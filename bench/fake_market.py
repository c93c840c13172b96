"""A local fake of Twelve Data's batched ``/time_series`` for the cycle benchmark.

Serves any number of symbols on 127.0.0.1 in Twelve Data's real batch shape (values
as strings, newest first, naive ``datetime`` in ``America/New_York``). Prices are a
deterministic function of (symbol, time), so the benchmark can pre-fill history that
continues exactly into what the server answers: closed bars re-delivered every second
are duplicates, the forming bar is revised every second, and a new bar closes each
minute — the daemon's steady state.

Run as a process of its own (so its CPU is not the daemon's)::

    python -m bench.fake_market   # prints "PORT <n>" when listening
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from aiohttp import web

from sidecar.bar import Bar

TF_MS = 60_000
OUTPUT = 5
NY = ZoneInfo("America/New_York")


def symbol_name(i: int) -> str:
    return f"S{i:05d}"


def symbol_index(name: str) -> int:
    return int(name[1:])


def _r(x: float) -> float:
    return float(f"{x:.5f}")  # what the provider's 5-decimal strings parse back to


def price(i: int, t_ms: int) -> float:
    """A smooth, seeded-by-index price path (changes every second, small steps)."""
    base = 20.0 + (i * 7_919) % 480
    return base * (1.0 + 0.004 * math.sin(t_ms / 1_380_000 + i) + 0.0006 * math.sin(t_ms / 7_000 + 2 * i))


def bar(i: int, t: int, now_ms: int) -> Bar:
    """The bar of symbol ``i`` opening at ``t`` as seen at ``now_ms`` (forming if still open)."""
    end = min(now_ms // 1000 * 1000, t + TF_MS)
    o = _r(price(i, t))
    c = _r(price(i, end))
    h = _r(max(o, c) * 1.0003)
    l = _r(min(o, c) * 0.9997)
    volume = float(1_000 + (i * 7_919 + t // TF_MS) % 5_000) * max(1, end - t) / TF_MS
    return Bar(symbol_name(i), "1m", t, o, h, l, c, float(int(volume)), "twelvedata",
               forming=end < t + TF_MS)


def history(i: int, end_ms: int, n: int) -> list[Bar]:
    """``n`` closed bars of symbol ``i`` ending before ``end_ms`` (floored to the minute)."""
    last = end_ms - end_ms % TF_MS
    return [bar(i, t, t + TF_MS) for t in range(last - n * TF_MS, last, TF_MS)]


@lru_cache(maxsize=4_096)
def _local_text(t: int) -> str:
    return datetime.fromtimestamp(t / 1000, NY).strftime("%Y-%m-%d %H:%M:%S")


def _row(i: int, t: int, now_ms: int) -> str:
    b = bar(i, t, now_ms)
    return (f'{{"datetime":"{_local_text(t)}","open":"{b.o:.5f}","high":"{b.h:.5f}",'
            f'"low":"{b.l:.5f}","close":"{b.c:.5f}","volume":"{int(b.v or 0)}"}}')


#: (symbol, minute) -> the closed rows and meta of that minute's answers: only the forming
#: row changes from second to second, so the server stays cheap beside the daemon.
_closed: dict[tuple[str, int, int], str] = {}


def _series(sym: str, now_ms: int, output: int = OUTPUT) -> str:
    current = now_ms - now_ms % TF_MS
    i = symbol_index(sym)
    tail = _closed.get((sym, current, output))
    if tail is None:
        if len(_closed) > 50_000:
            _closed.clear()
        rows = ",".join(_row(i, current - k * TF_MS, now_ms) for k in range(1, output))
        meta = (f'{{"symbol":"{sym}","interval":"1min","currency":"USD",'
                f'"exchange_timezone":"America/New_York","exchange":"NASDAQ","mic_code":"XNGS",'
                f'"type":"Common Stock"}}')
        tail = f'{"," if rows else ""}{rows}],"meta":{meta},"status":"ok"}}'
        _closed[(sym, current, output)] = tail
    return f'{{"values":[{_row(i, current, now_ms)}{tail}'


#: When, in each second, the next second's answers are rendered (past the daemon's cycle).
PRERENDER_AT_S = 0.6


class FakeMarket:
    """The aiohttp app; ``requests`` counts the batches served.

    A real provider renders its answers on its own machines. So that this one's CPU
    does not compete with the daemon inside the cycle it serves, each request asked
    in a second is rendered again for the next second, in the idle part of this one
    (:data:`PRERENDER_AT_S`): the same body a request in that second would get, since
    every price is a function of the whole second. A request no rendering covers is
    answered as it comes. ``prerendered`` counts the answers served ready-made.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.prerendered = 0
        #: Query string -> (second, body) of the answers rendered ahead.
        self._ready: dict[str, tuple[int, bytes]] = {}
        #: The requests asked in second ``_asked_second``: query string -> (symbols, outputsize).
        self._asked: dict[str, tuple[list[str], int]] = {}
        self._asked_second = -1
        self.app = web.Application()
        self.app.router.add_get("/time_series", self.time_series)
        self.app.on_startup.append(self._start_prerender)
        self.app.on_cleanup.append(self._stop_prerender)
        self._task: asyncio.Task[None] | None = None

    async def _start_prerender(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._prerender())

    async def _stop_prerender(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _prerender(self) -> None:
        while True:
            now = time.time()
            await asyncio.sleep(math.floor(now) + PRERENDER_AT_S - now if now % 1 < PRERENDER_AT_S
                                else math.floor(now) + 1 + PRERENDER_AT_S - now)
            second = int(time.time())
            if second != self._asked_second:
                continue  # nothing asked this second
            nxt = (second + 1) * 1000
            self._ready = {query: (second + 1, _body(symbols, nxt, output))
                           for query, (symbols, output) in self._asked.items()}

    async def time_series(self, request: web.Request) -> web.Response:
        self.requests += 1
        now_ms = int(time.time() * 1000)
        second = now_ms // 1000
        query = request.query_string
        symbols = request.query.get("symbol", "").split(",")
        output = max(1, min(OUTPUT, int(request.query.get("outputsize", OUTPUT))))
        if second != self._asked_second:
            self._asked, self._asked_second = {}, second
        self._asked[query] = (symbols, output)
        ready = self._ready.get(query)
        if ready is not None and ready[0] == second:
            self.prerendered += 1
            body = ready[1]
        else:
            body = _body(symbols, now_ms, output)
        return web.Response(body=body, content_type="application/json")


def _body(symbols: list[str], now_ms: int, output: int) -> bytes:
    if len(symbols) == 1:
        return _series(symbols[0], now_ms, output).encode()
    return ("{" + ",".join(f'"{s}":{_series(s, now_ms, output)}' for s in symbols) + "}").encode()


async def serve(port: int = 0) -> None:
    runner = web.AppRunner(FakeMarket().app, handle_signals=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    except KeyboardInterrupt:
        pass
