"""The scanner's read of 500 symbols (MGET, decode, signal rules) vs a raw MGET + decode,
on one timeframe and on two.

500 symbols' feature maps on ``1m`` and on ``1h`` as the daemon writes them
(``features_map`` + ``updated_at`` + ``macd_hist_prev``, msgpack, through
``RedisStore.write_cycle``) on a real redis-server. Timed, interleaved read by read on
the same kind of client:

* ``raw`` — redis-py ``MGET`` of the same keys (the 500 ``1m`` features + the heartbeat)
  and ``msgpack.unpackb`` of each value: the floor;
* ``scanner`` — ``Scanner.read`` (one MGET, decode, age/stale/broker per row);
* ``scanner_signals`` — ``Scanner.read`` then ``signals.evaluate`` with every rule on:
  what a trading process does each second;
* ``raw_2tf`` — the raw read of both timeframes' 1,000 keys (+ the heartbeat) in one
  ``MGET``: the floor of
* ``scanner_2tf`` — ``Scanner.read(symbols, timeframes=["1m", "1h"])``, one ``MGET``.

Each case's ``p50 × raw`` is over the raw read of the same keys.

All three run in one process after ``sidecar.gc_tuning.settle_gc()`` (as the README
asks of a trading process, and as the daemon does after warm-up): without it, full
collections walking the imported modules set the p99 of every case alike.

    .venv/bin/python -m bench.scanner_read [--smoke]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from bench._common import PrivateRedis, cli, summary, timed_reads, timing_table
from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS, features_map
from sidecar.redis_store import RedisStore, connect
from sidecar.scanner import Scanner
from sidecar.signals import SignalRules, evaluate

NAME = "scanner_read"


TIMEFRAMES = ("1m", "1h")


def feature_payloads(n: int, now_ms: int, tf: str = "1m") -> list[tuple[str, str, bytes]]:
    """``n`` symbols' feature maps on ``tf`` with plausible values: a few signals fire per read."""
    rng = np.random.default_rng(3 + TIMEFRAMES.index(tf) if tf in TIMEFRAMES else 3)
    tf_ms = 3_600_000 if tf == "1h" else 60_000
    out = []
    for i in range(n):
        mid = float(20 + rng.random() * 480)
        c = mid * (1 + float(rng.normal(0, 0.01)))  # ~5% close outside the bands
        bar = Bar(f"S{i:05d}", tf, now_ms - now_ms % tf_ms, mid, max(mid, c) * 1.001,
                  min(mid, c) * 0.999, c, 1e4, "bench", forming=True)
        hist = float(rng.normal(0, 0.1))
        values: dict[str, float] = {
            "rsi": float(rng.normal(50, 10)), "ema": mid, "bb_upper": mid * 1.02, "bb_middle": mid,
            "bb_lower": mid * 0.98, "atr": mid * 0.004, "vwap": c * (1 + float(rng.normal(0, 0.003))),
            "vol_ma": 1e4, "macd": hist * 2, "macd_signal": hist, "macd_hist": hist, "mom": mid * 0.001,
        }
        fmap = features_map(bar, [values[f] for f in FEATURE_FIELDS], now_ms)
        fmap["updated_at"] = now_ms
        # The histogram one bar back: the same sign but for ~5% (a crossing).
        fmap["macd_hist_prev"] = hist * (-1.0 if rng.random() < 0.05 else 1.0)
        out.append((tf, bar.symbol, msgpack.packb(fmap)))
    return out


async def seed(url: str, n: int) -> tuple[RedisStore, list[str], list[str], list[str]]:
    """``n`` symbols' features on each of :data:`TIMEFRAMES` and a heartbeat written
    (prefix ``bench``, no expiry in sight): the writer, the symbols, and the keys a read
    of ``1m`` and one of both timeframes ask for (heartbeat last)."""
    writer = RedisStore(connect(url), "bench", features_ttl_ms=3_600_000, heartbeat_ttl_ms=3_600_000)
    now = int(time.time() * 1000)
    payloads = [row for tf in TIMEFRAMES for row in feature_payloads(n, now, tf)]
    await writer.write_cycle([], payloads, {"pid": 1, "t": now})
    symbols = [sym for tf, sym, _ in payloads if tf == "1m"]
    features = writer.keys.features
    return (writer, symbols, [features("1m", s) for s in symbols] + [writer.keys.heartbeat],
            [features(tf, s) for s in symbols for tf in TIMEFRAMES] + [writer.keys.heartbeat])


def bench_scanner(url: str, pool_size: int = 4) -> Scanner:
    """A scanner of the seeded features that never calls them stale."""
    return Scanner(connect(url, pool_size=pool_size), "bench", "1m", stale_after_ms=10**9)


async def bench(n: int, reads: int) -> dict[str, Any]:
    with PrivateRedis() as server:
        writer, symbols, keys, keys_2tf = await seed(server.url, n)
        scanner = bench_scanner(server.url)
        raw_client = connect(server.url, pool_size=4)
        rules = SignalRules()
        unpackb = msgpack.unpackb

        async def raw() -> int:
            values = await raw_client.mget(keys)
            return len([None if v is None else unpackb(v) for v in values])

        async def raw_2tf() -> int:
            values = await raw_client.mget(keys_2tf)
            return len([None if v is None else unpackb(v) for v in values])

        async def read_2tf() -> int:
            return len(await scanner.read(symbols, timeframes=TIMEFRAMES))

        async def read() -> int:
            return len(await scanner.read(symbols))

        async def read_signals() -> int:
            return len(evaluate(await scanner.read(symbols), rules))

        signals = await read_signals()
        # Warm-up, then settle_gc() as a trading process does after start-up (docs/scanner.md).
        timings = await timed_reads({"raw": raw, "scanner": read, "scanner_signals": read_signals,
                                     "raw_2tf": raw_2tf, "scanner_2tf": read_2tf}, reads)
        await scanner.close()
        await raw_client.aclose()
        await writer.close()
    stats = {k: summary(v) for k, v in timings.items()}
    floor = {k: "raw_2tf" if k.endswith("_2tf") else "raw" for k in stats}  # the raw read of the same keys
    return {"symbols": n, "reads": reads, "signals_per_read": signals, "ms": stats,
            "timeframes_2tf": list(TIMEFRAMES),
            "ratio_p50": {k: stats[k]["p50"] / stats[floor[k]]["p50"] for k in stats},
            "ratio_p99": {k: stats[k]["p99"] / stats[floor[k]]["p99"] for k in stats},
            "targets": {"ratio_p50_max": 1.3, "p99_ms_max": 10}}


def run(smoke: bool) -> dict[str, Any]:
    return asyncio.run(bench(20, 30) if smoke else bench(500, 1_500))


def render(r: dict[str, Any]) -> str:
    out = timing_table(f"read of {r['symbols']} symbols ({r['reads']} reads)", r)
    if "timeframes_2tf" in r:
        out += (f"\n\n`_2tf`: {r['symbols']} symbols × {len(r['timeframes_2tf'])} timeframes "
                f"({', '.join(r['timeframes_2tf'])}) in one `MGET`; its `p50 × raw` is over `raw_2tf`")
    return out + f"\n\nsignals per read: {r['signals_per_read']}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv)


if __name__ == "__main__":
    main()
