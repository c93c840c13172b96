"""Store write paths vs the raw libraries: SQLite flush, and one cycle's Redis writes.

SQLite: ``BarStore.flush`` (aiosqlite, one upsert transaction) vs ``sqlite3.executemany``
of the same rows with the same statement, pragmas and schema, into a fresh file each
round. The rows have the live daemon's shape: one bar per symbol per cycle, buffered for
10 cycles.

Redis: one cycle's payload (a forming-bar revision for each symbol, each symbol's
feature map, the heartbeat) written three ways against the same real redis-server:

* ``lua`` — what the daemon does: ``RedisStore.write_cycle``, one ``EVALSHA``;
* ``lua_per_arg`` — the daemon's first script, one Redis argument per key and value;
* ``pipeline`` — the same commands (ZREMRANGEBYSCORE + ZADD + ZREMRANGEBYRANK per bar,
  SET PX per feature, the heartbeat) in one non-transactional pipeline;
* ``mset`` — the fewest-commands bound: one ``MSET`` of the same bytes (no cap, no TTL,
  no sorted sets: not a usable layout, the floor under any).

    .venv/bin/python -m bench.store [--smoke]
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from bench._common import PrivateRedis, cli, table
from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS, features_map
from sidecar.redis_store import RedisStore, connect
from sidecar.sqlite_store import _UPSERT, SCHEMA, BarStore, _row

NAME = "store"
T0 = 1_767_225_600_000


def cycle_bars(symbols: int, cycles: int, forming: bool = False) -> list[Bar]:
    """``cycles`` bars for each of ``symbols`` symbols, cycle by cycle (the buffer's shape)."""
    out = []
    for k in range(cycles):
        for i in range(symbols):
            p = 100.0 + i % 97 + k * 0.01
            out.append(Bar(f"S{i:05d}", "1m", T0 + k * 60_000, p, p + 0.5, p - 0.5, p + 0.1,
                           1_000.0 + k, "bench", forming=forming))
    return out


# -- SQLite -------------------------------------------------------------------------------
async def _flush_barstore(path: Path, bars: Sequence[Bar]) -> float:
    store = BarStore(path, flush_max_rows=10**9, buffer_max_rows=10**9)
    await store.open()
    store.add(bars)
    t0 = time.perf_counter()
    await store.flush()
    elapsed = time.perf_counter() - t0
    await store.close()
    return elapsed


def _flush_raw(path: Path, rows: list[tuple[object, ...]]) -> float:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    db.commit()
    t0 = time.perf_counter()
    db.executemany(_UPSERT, rows)
    db.commit()
    elapsed = time.perf_counter() - t0
    db.close()
    return elapsed


async def sqlite_bench(symbols: int, cycles: int, repeats: int) -> dict[str, Any]:
    bars = cycle_bars(symbols, cycles)
    rows = [_row(b) for b in bars]
    store_s: list[float] = []
    raw_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        for r in range(repeats + 1):
            # Alternating which goes first, and a discarded first round (cold page cache,
            # file creation): single flushes of this size move by up to 2x on this disk.
            if r % 2:
                s = await _flush_barstore(Path(tmp) / f"store{r}.sqlite3", bars)
                w = _flush_raw(Path(tmp) / f"raw{r}.sqlite3", rows)
            else:
                w = _flush_raw(Path(tmp) / f"raw{r}.sqlite3", rows)
                s = await _flush_barstore(Path(tmp) / f"store{r}.sqlite3", bars)
            if r:
                store_s.append(s)
                raw_s.append(w)
    store_med = sorted(store_s)[len(store_s) // 2]
    raw_med = sorted(raw_s)[len(raw_s) // 2]
    return {
        "rows": len(rows), "symbols": symbols, "cycles": cycles, "repeats": repeats,
        "barstore_rows_per_s": len(rows) / store_med, "raw_rows_per_s": len(rows) / raw_med,
        "ratio_vs_raw": raw_med / store_med, "target_ratio_min": 0.7,
        "barstore_ms": store_med * 1000, "raw_ms": raw_med * 1000,
    }


# -- Redis --------------------------------------------------------------------------------
Payload = tuple[list[Bar], list[tuple[str, str, bytes]], dict[str, Any]]


def cycle_payload(symbols: int, now_ms: int) -> Payload:
    """One cycle's writes: a forming revision per symbol, its features, the heartbeat."""
    bars = cycle_bars(symbols, 1, forming=True)
    for b in bars:
        b.t = now_ms - now_ms % 60_000
    values = [float(i) + 0.123456789 for i in range(len(FEATURE_FIELDS))]
    features = [("1m", b.symbol, msgpack.packb({**features_map(b, values, now_ms), "updated_at": now_ms}))
                for b in bars]
    heartbeat = {"pid": 1, "t": now_ms, "tick": now_ms, "cycle": 1, "tf": "1m", "symbols": symbols}
    return bars, features, heartbeat


#: The daemon's first script: one Redis argument per key and value (redis-py packs each
#: in Python), and an unconditional ZREMRANGEBYRANK. Kept to show what the blobs bought.
_PER_ARG_LUA = """
-- KEYS: nb bar keys, nf feature keys, heartbeat key
-- ARGV: nb, nf, cap, feat_ttl_ms, hb_ttl_ms, hb_payload, (t, bar)*nb, feat*nf
local nb = tonumber(ARGV[1])
local nf = tonumber(ARGV[2])
local keep = -tonumber(ARGV[3]) - 1
local a = 7
for i = 1, nb do
  local k = KEYS[i]
  local t = ARGV[a]
  redis.call('ZREMRANGEBYSCORE', k, t, t)
  redis.call('ZADD', k, t, ARGV[a + 1])
  redis.call('ZREMRANGEBYRANK', k, 0, keep)
  a = a + 2
end
for i = 1, nf do
  redis.call('SET', KEYS[nb + i], ARGV[a], 'PX', ARGV[4])
  a = a + 1
end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[nb + nf + 1], ARGV[6], 'PX', ARGV[5])
end
return nb
"""


async def write_lua_per_arg(store: RedisStore, script: Any, bars: Sequence[Bar],
                            features: Sequence[tuple[str, str, bytes]], heartbeat: dict[str, Any]) -> None:
    keys = [store.keys.bars(b.tf, b.symbol) for b in bars]
    keys.extend(store.keys.features(tf, sym) for tf, sym, _ in features)
    keys.append(store.keys.heartbeat)
    args: list[Any] = [len(bars), len(features), store.bars_cap, 2_000, 3_000, msgpack.packb(heartbeat)]
    for b in bars:
        args.append(b.t)
        args.append(b.pack())
    args.extend(payload for _, _, payload in features)
    await script(keys=keys, args=args)


async def write_pipeline(store: RedisStore, bars: Sequence[Bar], features: Sequence[tuple[str, str, bytes]],
                         heartbeat: dict[str, Any]) -> None:
    """The Lua script's commands, one by one in a single pipeline."""
    keys = store.keys
    keep = -store.bars_cap - 1
    pipe = store.redis.pipeline(transaction=False)
    for b in bars:
        k = keys.bars(b.tf, b.symbol)
        pipe.zremrangebyscore(k, b.t, b.t)
        pipe.zadd(k, {b.pack(): b.t})
        pipe.zremrangebyrank(k, 0, keep)
    for tf, sym, payload in features:
        pipe.set(keys.features(tf, sym), payload, px=2_000)
    pipe.set(keys.heartbeat, msgpack.packb(heartbeat), px=3_000)
    await pipe.execute()


async def write_mset(store: RedisStore, bars: Sequence[Bar], features: Sequence[tuple[str, str, bytes]],
                     heartbeat: dict[str, Any]) -> None:
    """The same bytes in one MSET: the fewest-commands bound."""
    keys = store.keys
    mapping: dict[str, bytes] = {keys.bars(b.tf, b.symbol): b.pack() for b in bars}
    mapping.update((keys.features(tf, sym), payload) for tf, sym, payload in features)
    mapping[keys.heartbeat] = msgpack.packb(heartbeat)
    await store.redis.mset(mapping)


async def redis_bench(sizes: Sequence[int], repeats: int, history: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with PrivateRedis() as server:
        client = connect(server.url)
        store = RedisStore(client, "bench")
        mstore = RedisStore(client, "benchm")  # MSET writes strings: its own key space
        per_arg = client.register_script(_PER_ARG_LUA)
        try:
            for n in sizes:
                await client.flushall()
                now = int(time.time() * 1000)
                # Sorted sets with history, as in a running daemon.
                await store.write_history(b for k in range(1, history + 1)
                                          for b in _shift(cycle_bars(n, 1), now - k * 60_000))
                bars, features, hb = cycle_payload(n, now)
                timings: dict[str, list[float]] = {"lua": [], "lua_per_arg": [], "pipeline": [], "mset": []}
                for _ in range(repeats):
                    for name in timings:
                        t0 = time.perf_counter()
                        if name == "lua":
                            await store.write_cycle(bars, features, hb)
                        elif name == "lua_per_arg":
                            await write_lua_per_arg(store, per_arg, bars, features, hb)
                        elif name == "pipeline":
                            await write_pipeline(store, bars, features, hb)
                        else:
                            await write_mset(mstore, bars, features, hb)
                        timings[name].append((time.perf_counter() - t0) * 1000)
                med = {name: sorted(v)[len(v) // 2] for name, v in timings.items()}
                # All three leave the same bars and features behind.
                got = await store.recent_bars(bars[0].symbol, "1m", 1)
                assert got and got[0].pack() == bars[0].pack(), "lua/pipeline write lost the bar"
                out[str(n)] = {"symbols": n, "ms": med,
                               "lua_vs_mset": med["lua"] / med["mset"],
                               "pipeline_vs_lua": med["pipeline"] / med["lua"],
                               "bars_per_key_before": history}
        finally:
            await store.close()
    return out


def _shift(bars: list[Bar], t: int) -> list[Bar]:
    for b in bars:
        b.t = t - t % 60_000
    return bars


def run(smoke: bool) -> dict[str, Any]:
    if smoke:
        sql = asyncio.run(sqlite_bench(50, 4, 2))
        red = asyncio.run(redis_bench([20], 3, 3))
    else:
        sql = asyncio.run(sqlite_bench(2_000, 10, 21))
        red = asyncio.run(redis_bench([500, 1_000, 5_000], 25, 50))
    verdict = min(("lua", "pipeline"), key=lambda k: max(v["ms"][k] for v in red.values()))
    return {"sqlite": sql, "redis": red, "redis_verdict": verdict}


def render(r: dict[str, Any]) -> str:
    s = r["sqlite"]
    out = table(["SQLite flush", "rows", "rows/s", "× raw"], [
        ["raw sqlite3.executemany", s["rows"], s["raw_rows_per_s"], 1.0],
        ["BarStore.flush (aiosqlite)", s["rows"], s["barstore_rows_per_s"], s["ratio_vs_raw"]],
    ])
    rows = []
    for v in r["redis"].values():
        m = v["ms"]
        rows.append([v["symbols"], m["mset"], m["lua"], m["lua_per_arg"], m["pipeline"], v["lua_vs_mset"],
                     v["pipeline_vs_lua"]])
    out += "\n\n" + table(["Redis cycle: symbols", "MSET bound ms", "Lua (daemon) ms", "Lua per-arg ms",
                           "pipeline ms",
                           "Lua × MSET", "pipeline × Lua"], rows)
    return out + f"\n\nfastest usable write path: {r['redis_verdict']}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv)


if __name__ == "__main__":
    main()
