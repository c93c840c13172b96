"""The ccxt source: import cost, bars per second polled and streamed, and what ccxt adds
per symbol per cycle over another source (Polygon), in the same run.

The fake exchange and the fake Polygon (``sidecar/tests/fake_*.py``) run in their own
process, so the CPU time measured here is the client's alone: the source module, ccxt
(or aiohttp for Polygon), parsing. Polls: every symbol asked once per cycle for its
newest bars (3 per answer), cycles of both sources interleaved. Stream: Binance kline
messages over a local websocket through ccxt.pro into the source's ``peek_latest``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import cli, table

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "sidecar" / "tests"
M = 60_000


def _serve(ports: Any, n_markets: int) -> None:
    """The fake exchange and fake Polygon, in this (child) process, until killed."""
    sys.path.insert(0, str(TESTS))
    from aiohttp import web
    from fake_exchange import FakeExchange
    from fake_providers import FakeProviders, Reply

    class Blaster(FakeExchange):
        async def _handle(self, request: web.Request) -> web.StreamResponse:
            if request.path == "/blast":  # push n kline updates per market, as fast as it can
                n, t = int(request.query["n"]), int(request.query["t"])
                for i in range(n):  # the last round closes at 999: the client knows it has all
                    close = 999.0 if i == n - 1 else 100.0 + i % 50
                    await self.send(*(_kline(f"C{m}USDT", t, close) for m in range(n_markets)))
                return web.Response(text="ok")
            return await super()._handle(request)

    def klines(seen: Any) -> Reply:
        since = int(seen.query["startTime"])
        return Reply(body=json.dumps([[since + i * M, "100.1", "100.9", "99.8", "100.5", "1.23456789",
                                       since + (i + 1) * M - 1, "0", 1, "0", "0", "0"]
                                      for i in range(int(seen.query["limit"]))]).encode())

    def aggs(seen: Any) -> Reply:
        start = int(seen.path.split("/")[-2])
        return Reply(body=json.dumps({"status": "OK", "results": [
            {"t": start + i * M, "o": 100.1, "h": 100.9, "l": 99.8, "c": 100.5, "v": 1.23456789}
            for i in range(3, 6)]}).encode())

    async def main() -> None:
        exchange, polygon = Blaster(), FakeProviders()
        exchange.responders_by_path["/api/v3/klines"] = klines
        polygon.responders["polygon"] = aggs
        await exchange.start()
        await polygon.start()
        ports.put((exchange.port, polygon.port))
        await asyncio.Event().wait()

    asyncio.run(main())


def _kline(market_id: str, t: int, c: float) -> dict[str, Any]:
    return {"e": "kline", "E": t, "s": market_id, "k": {"t": t, "T": t + M - 1, "s": market_id, "i": "1m",
                                                         "o": "100", "c": str(c), "h": "1000", "l": "99",
                                                         "v": "1.5", "x": False}}


def import_cost(repeats: int) -> dict[str, float]:
    """Seconds and MiB RSS that ``import ccxt.pro`` adds to a process that imported the daemon."""
    code = ("import resource, time, sys; import sidecar.app.daemon, sidecar.sources.polygon;"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t0 = time.perf_counter();"
            "import ccxt.pro; t1 = time.perf_counter();"
            "print(t1 - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024)")
    runs = [tuple(map(float, subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                            capture_output=True, text=True).stdout.split()))
            for _ in range(repeats)]
    return {"import_s": statistics.median(r[0] for r in runs),
            "rss_mib": statistics.median(r[1] for r in runs)}


async def _bench(n: int, cycles: int, blasts: int, ex_port: int, poly_port: int) -> dict[str, Any]:
    from sidecar.rate_budget import RateBudget
    from sidecar.settings import Settings
    from sidecar.sources import build_source
    from sidecar.timeframe import Timeframe

    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-ccxt-"))
    markets = [{"id": f"C{i}USDT", "symbol": f"C{i}/USDT", "base": f"C{i}", "quote": "USDT",
                "baseId": f"C{i}", "quoteId": "USDT", "type": "spot", "spot": True, "active": True,
                "linear": None, "inverse": None, "lowercaseId": f"c{i}usdt", "precision": {},
                "limits": {}, "info": {}} for i in range(n)]
    (tmp / "markets.json").write_text(json.dumps(markets))
    crypto = [f"C{i}/USDT" for i in range(n)]
    env = {"SIDECAR_CCXT_BASE_URL_BINANCE": f"http://127.0.0.1:{ex_port}",
           "SIDECAR_CCXT_WS_URL_BINANCE": f"ws://127.0.0.1:{ex_port}/stream",
           "SIDECAR_CCXT_MARKETS_BINANCE": str(tmp / "markets.json"), "SIDECAR_CCXT_STREAM": "off",
           "SIDECAR_POLYGON_BASE_URL": f"http://127.0.0.1:{poly_port}", "POLYGON_API_KEY": "BENCHKEY"}
    settings = Settings(symbols=tuple(crypto), sources=("ccxt:binance",), data_dir=tmp)
    ccxt_src = build_source("ccxt:binance", settings, env)
    poly_src = build_source("polygon", settings, env)
    ccxt_src.exchange.enableRateLimit = False  # type: ignore[attr-defined]
    ccxt_src.budget = poly_src.budget = RateBudget("unbounded")
    tf = Timeframe.parse("1m")
    symbols = {"ccxt": crypto, "polygon": [f"X:C{i}USD" for i in range(n)]}
    sources = {"ccxt": ccxt_src, "polygon": poly_src}
    for src in sources.values():
        await src.start()

    async def cycle(name: str) -> tuple[float, float, int]:
        src, syms, now = sources[name], symbols[name], int(time.time() * 1000)
        chunks = [syms[i:i + src.max_batch] for i in range(0, len(syms), src.max_batch)]
        w0, c0 = time.perf_counter(), time.process_time()
        answers = await asyncio.gather(*(src.fetch_latest(c, tf, now) for c in chunks))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        bars = sum(len(v) for a in answers for v in a.values() if isinstance(v, list))
        return wall, cpu, bars

    seen: dict[str, list[tuple[float, float, int]]] = {"ccxt": [], "polygon": []}
    for name in seen:
        await cycle(name)  # warm: connections, markets
    for _ in range(cycles):
        for name in seen:
            seen[name].append(await cycle(name))
    out: dict[str, Any] = {"symbols": n, "cycles": cycles}
    for name, runs in seen.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        bars = runs[0][2]
        out[name] = {"cycle_ms": wall * 1000, "cpu_ms_per_symbol": cpu * 1000 / n,
                     "bars_per_s": bars / wall, "bars_per_cpu_s": bars / cpu if cpu else float("nan")}
    out["ccxt_adds_cpu_ms_per_symbol"] = (out["ccxt"]["cpu_ms_per_symbol"]
                                          - out["polygon"]["cpu_ms_per_symbol"])
    await ccxt_src.close()

    # Stream: kline updates through ccxt.pro into the source, then one peek of every symbol.
    env["SIDECAR_CCXT_STREAM"] = "ohlcv"
    streamer = build_source("ccxt:binance", settings, env)
    streamer.exchange.enableRateLimit = False  # type: ignore[attr-defined]
    streamer.budget = RateBudget("unbounded")
    await streamer.start()
    await cycle_once(streamer, crypto, tf)
    stream = streamer._stream  # type: ignore[attr-defined]
    for _ in range(400):  # every market subscribed and answered once
        if stream.seq >= n:
            break
        await _push(ex_port, 1)
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"the stream never came up: {stream.status()}")
    w0, c0 = time.perf_counter(), time.process_time()
    await _push(ex_port, blasts)
    while not all(news.candles and news.candles[max(news.candles)][0][4] == 999.0  # noqa: ASYNC110
                  for news in stream.news.values()):
        await asyncio.sleep(0.001)  # polled: the stream has no event to wait on
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    now = int(time.time() * 1000)
    p0 = time.perf_counter()
    peeked = streamer.peek_latest(crypto, tf, now)
    peek_s = time.perf_counter() - p0
    out["stream"] = {"updates": blasts * n, "updates_per_s": blasts * n / wall,
                     "cpu_us_per_update": cpu * 1e6 / (blasts * n), "peek_us_per_symbol": peek_s * 1e6 / n,
                     "peeked_symbols": len(peeked)}
    await streamer.close()
    await poly_src.close()
    return out


async def cycle_once(src: Any, symbols: Sequence[str], tf: Any) -> None:
    await asyncio.gather(*(src.fetch_latest(symbols[i:i + src.max_batch], tf, int(time.time() * 1000))
                           for i in range(0, len(symbols), src.max_batch)))


async def _push(port: int, n: int) -> None:
    import aiohttp

    t = int(time.time() * 1000) // M * M
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/blast", params={"n": str(n), "t": str(t)}) as resp:
        await resp.read()


def run(smoke: bool) -> dict[str, Any]:
    n, cycles, blasts = (3, 2, 5) if smoke else (50, 20, 200)
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports, n), daemon=True)
    server.start()
    try:
        ex_port, poly_port = ports.get(timeout=60)
        results = asyncio.run(_bench(n, cycles, blasts, ex_port, poly_port))
    finally:
        server.kill()
        server.join()
    results["import"] = import_cost(1 if smoke else 5)
    return results


def render(r: dict[str, Any]) -> str:
    rows = [(name, r[name]["cycle_ms"], r[name]["cpu_ms_per_symbol"], r[name]["bars_per_s"])
            for name in ("ccxt", "polygon")]
    s = r["stream"]
    return "\n\n".join([
        f"poll: {r['symbols']} symbols, 3 bars each, median of {r['cycles']} interleaved cycles",
        table(["source", "cycle ms", "client CPU ms / symbol", "bars / s"], rows),
        f"ccxt adds {r['ccxt_adds_cpu_ms_per_symbol']:.3f} ms of CPU per symbol per polled cycle "
        "over Polygon",
        table(["stream updates", "updates / s", "CPU µs / update", "peek µs / symbol"],
              [(s["updates"], s["updates_per_s"], s["cpu_us_per_update"], s["peek_us_per_symbol"])]),
        table(["import ccxt.pro", "seconds", "RSS MiB"], [("after the daemon's imports",
                                                         r["import"]["import_s"], r["import"]["rss_mib"])]),
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli("ccxt_source", run, render, argv)


if __name__ == "__main__":
    main()
