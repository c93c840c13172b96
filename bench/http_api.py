"""The HTTP read API for 500 symbols (``/v1/features``, ``/v1/signals``) vs the raw MGET.

500 feature maps as the daemon writes them (the ``scanner_read`` payloads) on a real
redis-server; the daemon's aiohttp app with the ``/v1`` routes (:mod:`sidecar.app.api`)
served on 127.0.0.1 by a real ``TCPSite``; a keep-alive aiohttp client. Timed,
interleaved request by request:

* ``raw`` — redis-py ``MGET`` of the same keys + ``msgpack.unpackb`` of each: the floor;
* ``scanner`` — ``Scanner.read`` (what ``/v1/features`` reads with);
* ``http_features`` — ``GET /v1/features?symbols=<500>`` until the last body byte;
* ``http_signals`` — ``GET /v1/signals?symbols=<500>`` (all rules on) until the last byte.

Client and server share one process and one event loop, so the HTTP figures include
the client's own request and response handling: an upper bound of what the daemon
adds. The CPU time of each call (this process: client and server; not redis-server) is
reported beside the wall-clock times: it moves far less with the machine's load. As in
``scanner_read``, ``settle_gc()`` runs first.

    .venv/bin/python -m bench.http_api [--smoke]
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from bench._common import PrivateRedis, cli, summary, timed_reads, timing_table
from bench.scanner_read import bench_scanner, seed
from sidecar.app.api import ReadApi, add_api_routes
from sidecar.app.http import SERVER_ARGS
from sidecar.redis_store import connect
from sidecar.signals import SignalRules

NAME = "http_api"


async def bench(n: int, reads: int) -> dict[str, Any]:
    with PrivateRedis() as server:
        writer, symbols, keys, _ = await seed(server.url, n)
        scanner = bench_scanner(server.url)
        api = ReadApi(bench_scanner(server.url, pool_size=8), symbols, SignalRules())
        app = web.Application()
        add_api_routes(app, api)
        runner = web.AppRunner(app, access_log=None, **SERVER_ARGS)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        raw_client = connect(server.url, pool_size=4)
        unpackb = msgpack.unpackb
        query = {"symbols": ",".join(symbols)}
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        sizes: dict[str, int] = {}

        async def raw() -> None:
            values = await raw_client.mget(keys)
            [None if v is None else unpackb(v) for v in values]

        async def read() -> None:
            await scanner.read(symbols)

        def over_http(path: str) -> Any:
            url = f"http://127.0.0.1:{port}{path}"

            async def get() -> None:
                async with http.get(url, params=query) as resp:
                    body = await resp.read()
                    assert resp.status == 200, body[:200]
                    sizes[path] = len(body)

            return get

        cpu: dict[str, list[float]] = {}
        timings = await timed_reads({"raw": raw, "scanner": read, "http_features": over_http("/v1/features"),
                                      "http_signals": over_http("/v1/signals")}, reads, cpu)
        await http.close()
        await runner.cleanup()
        await api.close()
        await scanner.close()
        await raw_client.aclose()
        await writer.close()
    stats = {k: summary(v) for k, v in timings.items()}
    return {"symbols": n, "reads": reads, "ms": stats, "body_bytes": sizes,
            "cpu_ms_p50": {k: statistics.median(v) for k, v in cpu.items()},
            "ratio_p50": {k: stats[k]["p50"] / stats["raw"]["p50"] for k in stats},
            "targets": {"p99_ms_max": 15}}


def run(smoke: bool) -> dict[str, Any]:
    return asyncio.run(bench(20, 30) if smoke else bench(500, 1_500))


def render(r: dict[str, Any]) -> str:
    sizes = ", ".join(f"{path} {size:,} bytes" for path, size in r["body_bytes"].items())
    cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in r["cpu_ms_p50"].items())
    return (timing_table(f"{r['symbols']} symbols ({r['reads']} requests each)", r)
            + f"\n\nCPU ms per call (p50, client and server together): {cpu}\n\nbodies: {sizes}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv)


if __name__ == "__main__":
    main()
