"""The scanner's read of 500 symbols from a 3-master Redis Cluster vs a raw cluster-aware
MGET + decode.

A real local cluster (3 masters + 3 replicas, ``sidecar.tests.helpers.LocalCluster``:
Debian's redis-server and redis-cli, scripts/system-deps); 500 feature maps written by
``RedisStore.write_cycle`` (one script call per bucket slot). Timed, interleaved read by read:

* ``raw`` — redis-py ``RedisCluster.mget_nonatomic`` of the same keys (features +
  heartbeat; it splits them per slot and pipelines per node) and ``msgpack.unpackb`` of
  each value: the floor a cluster-aware client gives;
* ``scanner`` — ``Scanner.read`` (one packed pipeline of per-slot ``MGET`` s per node,
  all nodes at once; decode; age/stale/broker per row);
* ``scanner_replicas`` — the same, reading from the replicas (``READONLY``).

    .venv/bin/python -m bench.cluster_read [--smoke]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from bench._common import cli, summary, table, timed_reads
from bench.scanner_read import feature_payloads
from sidecar.redis_store import RedisStore, close_client, connect_cluster
from sidecar.scanner import Scanner
from sidecar.tests.helpers import LocalCluster

NAME = "cluster_read"


async def bench(n: int, reads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(Path(tmp))
        cluster.start()
        try:
            return await _bench(cluster, n, reads)
        finally:
            cluster.stop()


async def _bench(cluster: LocalCluster, n: int, reads: int) -> dict[str, Any]:
    async def client(replicas: bool = False) -> Any:
        c = connect_cluster(cluster.url, read_from_replicas=replicas)
        await c.initialize()
        return c

    writer = RedisStore(await client(), "bench", features_ttl_ms=3_600_000, heartbeat_ttl_ms=3_600_000)
    now = int(time.time() * 1000)
    payloads = feature_payloads(n, now)
    await writer.write_cycle([], payloads, {"pid": 1, "t": now})
    symbols = [sym for _, sym, _ in payloads]
    scanner = Scanner(await client(), "bench", "1m", stale_after_ms=10**9, owns=True)
    replica_scanner = Scanner(await client(True), "bench", "1m", stale_after_ms=10**9, owns=True,
                              read_replicas=True)
    raw_client = await client()
    keys = [writer.keys.features("1m", s) for s in symbols] + [writer.keys.heartbeat]
    unpackb = msgpack.unpackb
    deadline = time.monotonic() + 30
    while any(r.get("missing") for r in await replica_scanner.read(symbols)):
        assert time.monotonic() < deadline, "replicas never caught up"
        await asyncio.sleep(0.05)

    async def raw() -> int:
        values = await raw_client.mget_nonatomic(keys)
        return len([None if v is None else unpackb(v) for v in values])

    async def read() -> int:
        return len(await scanner.read(symbols))

    async def read_replicas() -> int:
        return len(await replica_scanner.read(symbols))

    cases = {"raw": raw, "scanner": read, "scanner_replicas": read_replicas}
    timings = await timed_reads(cases, reads)
    await scanner.close()
    await replica_scanner.close()
    await close_client(raw_client)
    await writer.close()
    stats = {k: summary(v) for k, v in timings.items()}
    return {"symbols": n, "reads": reads, "masters": 3, "ms": stats,
            "ratio_p50": {k: stats[k]["p50"] / stats["raw"]["p50"] for k in stats},
            "ratio_p99": {k: stats[k]["p99"] / stats["raw"]["p99"] for k in stats},
            "targets": {"ratio_max": 1.5, "p99_ms_max": 10}}


def run(smoke: bool) -> dict[str, Any]:
    return asyncio.run(bench(20, 30) if smoke else bench(500, 1_500))


def render(r: dict[str, Any]) -> str:
    rows = [[name, s["p50"], s["p99"], s["max"], r["ratio_p50"][name], r["ratio_p99"][name]]
            for name, s in r["ms"].items()]
    return table([f"read of {r['symbols']} symbols, {r['masters']} masters ({r['reads']} reads)",
                  "p50 ms", "p99 ms", "max ms", "p50 × raw", "p99 × raw"], rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv)


if __name__ == "__main__":
    main()
