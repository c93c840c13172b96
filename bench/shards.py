"""Symbols per second per shard with 1, 2 and 4 shards, and the scanner on a cluster vs one node.

Real daemons (``python -m sidecar run``, ``sim`` source, 1-second bars) write to a local
Redis Cluster (3 masters + 3 replicas, ``sidecar.tests.helpers.LocalCluster``): the same
total of symbols served by one unsharded daemon, then by 2 and by 4 shards
(``SIDECAR_SHARD=i/N``), one after the other on the same cluster. After a warm-up, each
daemon's ``/metrics`` and ``/proc`` are read at the start and the end of the window:

* ``cycle_ms`` — mean cycle time over the window (``sidecar_cycle_duration_seconds``);
* ``capacity`` — symbols per second the shard could keep up with: its symbols / mean
  cycle time (what one shard handles at 1 s while cycles stay under a second);
* ``per_cpu_s`` — symbol updates per CPU-second of the daemon (cycles × symbols / CPU):
  the figure that carries over to a machine with more cores, since on this one the
  shards share 2 cores with the six Redis nodes;
* ``redis_cpu`` — CPU-seconds per second of the busiest master, and the masters' CPU
  per 1,000 symbol updates above what the idle cluster spends (INFO ``used_cpu_*``,
  the idle rate measured for a few seconds before the runs).

Then the scanner's read of 500 symbols, interleaved, from the cluster (one round trip per
master) and from one redis-server on TCP (one ``MGET``): p50/p99.

    .venv/bin/python -m bench.shards [--smoke] [--symbols 2000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from bench._common import cli, summary, table, timed_reads
from bench.scanner_read import feature_payloads
from sidecar.redis_store import RedisStore, close_client, connect, connect_cluster
from sidecar.scanner import Scanner
from sidecar.shards import owned
from sidecar.tests.helpers import (
    SYSTEM_REDIS_SERVER,
    Daemon,
    LocalCluster,
    free_port,
    free_ports_below_ephemeral,
)

NAME = "shards"
SHARD_COUNTS = (1, 2, 4)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cycles(daemon: Daemon) -> tuple[float, float]:
    """(cycles, seconds spent in cycles) from the daemon's ``/metrics``."""
    count = total = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith("sidecar_cycle_duration_seconds_count"):
            count = float(line.split()[-1])
        elif line.startswith("sidecar_cycle_duration_seconds_sum"):
            total = float(line.split()[-1])
    return count, total


def _redis_cpu(cluster: LocalCluster) -> dict[int, float]:
    """CPU seconds each master has used."""
    out: dict[int, float] = {}
    for port in cluster.master_ports():
        info = dict(line.split(":", 1) for line in cluster.cli(port, "INFO", "cpu").split()
                    if ":" in line)
        out[port] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return out


def idle_redis_cpu(cluster: LocalCluster, seconds: float) -> float:
    """CPU-seconds per second all masters spend with no daemon writing (cluster bus, cron)."""
    before = _redis_cpu(cluster)
    started = time.monotonic()
    time.sleep(seconds)
    after = _redis_cpu(cluster)
    return sum(after[p] - before.get(p, 0.0) for p in after) / (time.monotonic() - started)


def measure(cluster: LocalCluster, work: Path, symbols: list[str], shards: int, warm_up_s: float,
            seconds: float, idle: float) -> dict[str, Any]:
    """Run ``shards`` daemons (one unsharded for 1) over ``symbols``; sample the window."""
    base = free_ports_below_ephemeral(shards)
    prefix = f"bench{shards}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
    env.update(SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=",".join(symbols), SIDECAR_TIMEFRAME="1s",
               SIDECAR_REDIS_URL=cluster.url, SIDECAR_REDIS_PREFIX=prefix, SIDECAR_BOOTSTRAP_DAYS="0",
               SIDECAR_WARM_BARS="60", SIDECAR_HTTP_PORT=str(base), SIDECAR_LOG_FORMAT="json",
               SIDECAR_MARKET_HOURS="off", SIDECAR_DATA_DIR=str(work / prefix))
    env.pop("PYTHONPATH", None)
    daemons = []
    for i in range(shards):
        shard_env = dict(env, SIDECAR_SHARD=f"{i}/{shards}") if shards > 1 else env
        daemons.append(Daemon(shard_env, work / f"{prefix}-{i}.log"))
    try:
        for d in daemons:
            d.wait_ready(timeout=180)
        time.sleep(warm_up_s)
        before = [(_cycles(d), _cpu_s(d.pid)) for d in daemons]
        redis_before = _redis_cpu(cluster)
        started = time.monotonic()
        time.sleep(seconds)
        after = [(_cycles(d), _cpu_s(d.pid)) for d in daemons]
        redis_after = _redis_cpu(cluster)
        elapsed = time.monotonic() - started
    finally:
        for d in daemons:
            d.stop(60)
    counts = [len(owned(symbols, i, shards)) for i in range(shards)]
    rows = []
    for n, ((c0, s0), cpu0), ((c1, s1), cpu1) in zip(counts, before, after, strict=True):
        cycles, busy = c1 - c0, s1 - s0
        mean = busy / cycles if cycles else float("nan")
        rows.append({"symbols": n, "cycles": cycles, "cycle_ms": mean * 1000,
                     "capacity": n / mean if mean else float("nan"),
                     "done_per_s": n * cycles / elapsed,
                     "cpu": (cpu1 - cpu0) / elapsed,
                     "per_cpu_s": n * cycles / (cpu1 - cpu0) if cpu1 > cpu0 else float("nan")})
    updates = sum(r["symbols"] * r["cycles"] for r in rows)
    redis = {port: (redis_after[port] - redis_before.get(port, 0.0)) / elapsed for port in redis_after}
    spent_ms = 1000 * max(0.0, sum(redis.values()) - idle) * elapsed  # over the idle cluster's own
    return {"shards": shards, "total": len(symbols), "seconds": elapsed, "per_shard": rows,
            "capacity_sum": sum(r["capacity"] for r in rows),
            "redis_cpu_busiest": max(redis.values()),
            "redis_cpu_all": sum(redis.values()),
            "redis_cpu_ms_per_1k_updates": 1000 * spent_ms / updates if updates else float("nan")}


class SingleNode:
    """One plain redis-server on a TCP port of 127.0.0.1 (as the cluster's nodes are)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [SYSTEM_REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def scanner_latency(cluster: LocalCluster, single_url: str, n: int, reads: int) -> dict[str, Any]:
    """``Scanner.read`` of ``n`` symbols from the cluster and from one node, interleaved."""
    now = int(time.time() * 1000)
    payloads = feature_payloads(n, now)
    symbols = [sym for _, sym, _ in payloads]
    cluster_client = connect_cluster(cluster.url)
    await cluster_client.initialize()
    single_client = connect(single_url)
    deadline = time.monotonic() + 10
    while True:
        try:
            await single_client.ping()
            break
        except (RedisError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    readers = {}
    for name, client in (("cluster", cluster_client), ("single", single_client)):
        writer = RedisStore(client, "scan", features_ttl_ms=3_600_000, heartbeat_ttl_ms=3_600_000)
        await writer.write_cycle([], payloads, {"pid": 1, "t": now})
        readers[name] = Scanner(client, "scan", "1m", stale_after_ms=10**9)
    timings = await timed_reads({name: functools.partial(scanner.read, symbols)
                                 for name, scanner in readers.items()}, reads)
    await close_client(cluster_client)
    await close_client(single_client)
    return {"symbols": n, "reads": reads, "ms": {k: summary(v) for k, v in timings.items()}}


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    total = 40 if smoke else args.symbols
    seconds = 3.0 if smoke else args.seconds
    warm_up = 2.0 if smoke else args.warm_up
    symbols = [f"S{i:05d}" for i in range(total)]
    with tempfile.TemporaryDirectory(prefix="sidecar-shards-") as tmp:
        work = Path(tmp)
        cluster = LocalCluster(work / "cluster")
        single = None
        cluster.start()
        try:
            idle = idle_redis_cpu(cluster, min(seconds, 5.0))
            runs = [measure(cluster, work, symbols, n, warm_up, seconds, idle) for n in SHARD_COUNTS]
            cluster.flush()
            (work / "single").mkdir()
            single = SingleNode(work / "single")
            scan = asyncio.run(scanner_latency(cluster, single.url, 20 if smoke else 500,
                                               30 if smoke else 1_000))
        finally:
            if single is not None:
                single.stop()
            cluster.stop()
    return {"total_symbols": total, "timeframe": "1s", "masters": 3, "idle_redis_cpu": idle, "runs": runs,
            "scanner": scan}


def render(r: dict[str, Any]) -> str:
    rows = []
    for run_ in r["runs"]:
        per = run_["per_shard"]
        rows.append([run_["shards"], per[0]["symbols"], sum(x["cycle_ms"] for x in per) / len(per),
                     sum(x["capacity"] for x in per) / len(per), run_["capacity_sum"],
                     sum(x["per_cpu_s"] for x in per) / len(per), sum(x["cpu"] for x in per),
                     run_["redis_cpu_busiest"], run_["redis_cpu_ms_per_1k_updates"]])
    out = table([f"shards ({r['total_symbols']} symbols, 1 s bars)", "symbols per shard", "cycle ms (mean)",
                 "symbols/s per shard (capacity)", "symbols/s all shards", "updates per daemon CPU-s",
                 "daemon CPU (cores)", "busiest master CPU (cores)", "Redis CPU ms per 1k updates"], rows)
    scan = r["scanner"]
    out += "\n\n" + table([f"scanner read of {scan['symbols']} symbols ({scan['reads']} reads)",
                           "p50 ms", "p99 ms", "max ms"],
                          [[name, s["p50"], s["p99"], s["max"]] for name, s in scan["ms"].items()])
    return out


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", type=int, default=2_000, help="total over all shards")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per case")
    parser.add_argument("--warm-up", type=float, default=8.0, help="seconds before the window")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
