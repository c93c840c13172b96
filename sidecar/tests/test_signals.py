"""Signal rules on scanner rows read from a real Redis; the daemon's pub/sub announcement;
the MACD histogram of the previous bar; and no signal from stale or missing features."""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import talib

from sidecar.errors import ConfigError
from sidecar.features import FeatureEngine
from sidecar.redis_store import RedisStore
from sidecar.scanner import Scanner
from sidecar.settings import IndicatorPeriods, Settings
from sidecar.shards import shard_of
from sidecar.signals import RULES, SignalRules, evaluate
from sidecar.tests.helpers import (
    FEATURES_BAR_T,
    REPO,
    Daemon,
    RedisServer,
    ScriptedSource,
    features,
    free_port,
    make_series,
    series,
    settings,
)

BAR_T = FEATURES_BAR_T


async def write(store: RedisStore, rows: list[dict[str, Any]], heartbeat: bool = True) -> None:
    await store.write_cycle([], [("1m", r["symbol"], msgpack.packb(r)) for r in rows],
                            {"pid": 1} if heartbeat else None)


def scanner_on(store: RedisStore, **kw: Any) -> Scanner:
    return Scanner(store.redis, "test", "1m", 2_000, brokers={"XAUUSD": "GOLD"}, **kw)


CASES = [
    ("rsi_below", {"rsi": 25.0}, {"rsi": 25.0, "threshold": 30.0}),
    ("rsi_above", {"rsi": 75.5}, {"rsi": 75.5, "threshold": 70.0}),
    ("close_above_bb", {"close": 105.5, "vwap": 105.5}, {"close": 105.5, "bb_upper": 105.0}),
    ("close_below_bb", {"close": 94.0, "vwap": 94.0}, {"close": 94.0, "bb_lower": 95.0}),
    ("macd_cross_up", {"macd_hist": 0.2, "macd_hist_prev": -0.1},
     {"macd_hist": 0.2, "macd_hist_prev": -0.1}),
    ("macd_cross_down", {"macd_hist": -0.2, "macd_hist_prev": 0.0},
     {"macd_hist": -0.2, "macd_hist_prev": 0.0}),
    ("close_above_vwap", {"close": 101.0, "bb_upper": 110.0}, {"close": 101.0, "vwap": 100.0, "pct": 0.5}),
    ("close_below_vwap", {"close": 99.0, "bb_lower": 90.0}, {"close": 99.0, "vwap": 100.0, "pct": 0.5}),
]


@pytest.mark.parametrize(("rule", "values", "reported"), CASES, ids=[c[0] for c in CASES])
async def test_each_rule_fires_with_its_values(redis_store: RedisStore, rule: str,
                                               values: dict[str, Any], reported: dict[str, float]) -> None:
    await write(redis_store, [features("XAUUSD", **values), features("AAPL")])
    scanner = scanner_on(redis_store)
    rows = await scanner.read(["XAUUSD", "AAPL"])
    assert [r["broker"] for r in rows] == ["GOLD", "AAPL"]
    signals = evaluate(rows, SignalRules())
    assert [(s.symbol, s.broker, s.rule, s.t, s.values) for s in signals] == [
        ("XAUUSD", "GOLD", rule, BAR_T, reported)]
    # Switched off, the rule is silent.
    assert evaluate(rows, SignalRules(enabled=frozenset(RULES) - {rule})) == []


async def test_neutral_values_and_warm_up_give_no_signal(redis_store: RedisStore) -> None:
    warming = {k: None for k in ("rsi", "bb_upper", "bb_lower", "macd_hist", "macd_hist_prev", "vwap")}
    await write(redis_store, [features("AAPL"), features("MSFT", close=50.0, **warming),
                              features("NVDA", macd_hist=0.3, macd_hist_prev=None)])
    rows = await scanner_on(redis_store).read(["AAPL", "MSFT", "NVDA"])
    assert evaluate(rows, SignalRules()) == []


async def test_thresholds_and_closed_only(redis_store: RedisStore) -> None:
    await write(redis_store, [features("AAPL", rsi=35.0), features("MSFT", rsi=35.0, forming=False)])
    rows = await scanner_on(redis_store).read(["AAPL", "MSFT"])
    rules = SignalRules.from_env({"SIDECAR_SIGNAL_RULES": "rsi_below", "SIDECAR_SIGNAL_RSI_BELOW": "40"})
    assert [s.symbol for s in evaluate(rows, rules)] == ["AAPL", "MSFT"]
    closed = SignalRules.from_env({"SIDECAR_SIGNAL_RSI_BELOW": "40", "SIDECAR_SIGNAL_CLOSED_ONLY": "1"})
    assert [(s.symbol, s.forming) for s in evaluate(rows, closed)] == [("MSFT", False)]


async def test_never_a_signal_from_stale_or_missing_features(redis_store: RedisStore) -> None:
    oversold = {"rsi": 10.0}
    old = int(time.time() * 1000) - 5_000
    await write(redis_store, [features("AAPL", **oversold),
                              features("MSFT", stale=True, **oversold),  # the daemon says stale
                              features("NVDA", computed_at=old, **oversold)])  # too old
    scanner = scanner_on(redis_store)
    rows = await scanner.read(["AAPL", "MSFT", "NVDA", "TSLA"])  # TSLA: no key at all
    assert [r["stale"] for r in rows] == [False, True, True, True]
    assert rows[3]["missing"] and rows[3]["broker"] == "TSLA"
    assert [s.symbol for s in evaluate(rows, SignalRules())] == ["AAPL"]
    # The heartbeat is gone (daemon dead): everything is stale, no signal.
    await redis_store.redis.delete(redis_store.keys.heartbeat)
    rows = await scanner.read(["AAPL"])
    assert rows[0]["stale"] and evaluate(rows, SignalRules()) == []


def test_bad_signal_settings_name_the_variable() -> None:
    for env, name in [({"SIDECAR_SIGNAL_RULES": "rsi_below,moon"}, "SIDECAR_SIGNAL_RULES"),
                      ({"SIDECAR_SIGNAL_RSI_BELOW": "abc"}, "SIDECAR_SIGNAL_RSI_BELOW"),
                      ({"SIDECAR_SIGNAL_RSI_ABOVE": "101"}, "SIDECAR_SIGNAL_RSI_ABOVE"),
                      ({"SIDECAR_SIGNAL_VWAP_PCT": "-1"}, "SIDECAR_SIGNAL_VWAP_PCT"),
                      ({"SIDECAR_SIGNAL_CLOSED_ONLY": "maybe"}, "SIDECAR_SIGNAL_CLOSED_ONLY")]:
        with pytest.raises(ConfigError) as err:
            SignalRules.from_env(env)
        assert name in str(err.value)
    assert SignalRules.from_env({"SIDECAR_SIGNAL_RULES": "all"}).enabled == frozenset(RULES)


def test_previous_macd_histogram_equals_batch() -> None:
    bars = make_series(300)
    closes = np.array([b.c for b in bars])
    engine = FeatureEngine("TEST", "1m", IndicatorPeriods())
    engine.load(bars[:200])
    assert engine.prev_macd_hist == talib.MACD(closes[:200], 12, 26, 9)[2][-2]
    for i in range(200, 300):
        engine.update(bars[i])
        assert engine.prev_macd_hist == talib.MACD(closes[:i + 1], 12, 26, 9)[2][-2]
    short = FeatureEngine("TEST", "1m", IndicatorPeriods())
    short.load(bars[:10])
    assert short.prev_macd_hist is None  # warm-up: batch gives NaN


async def test_cycle_is_announced_inside_the_one_script(redis_store: RedisStore) -> None:
    scanner = scanner_on(redis_store)
    received: list[dict[str, Any]] = []

    async def listen() -> None:
        async for message in scanner.cycles():
            received.append(message)
            return

    task = asyncio.create_task(listen())
    for _ in range(100):  # until the subscription is in place
        if (await redis_store.redis.pubsub_numsub(redis_store.keys.cycles_channel))[0][1]:
            break
        await asyncio.sleep(0.02)
    before = await redis_store.redis.info("commandstats")
    await redis_store.write_cycle([], [("1m", "AAPL", msgpack.packb(features("AAPL")))], {"pid": 1},
                                  {"cycle": 7, "t": 1, "updated": ["AAPL"]})
    await asyncio.wait_for(task, 10)
    after = await redis_store.redis.info("commandstats")
    assert received == [{"cycle": 7, "t": 1, "updated": ["AAPL"]}]
    assert after["cmdstat_evalsha"]["calls"] - before.get("cmdstat_evalsha", {"calls": 0})["calls"] == 1
    assert "cmdstat_publish" not in before or (
        after["cmdstat_publish"]["calls"] - before["cmdstat_publish"]["calls"] == 1)


def scan_json(env: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "sidecar", "scan", "--json", *extra], cwd=REPO,
                         env=env, capture_output=True, timeout=30, check=True)
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


async def first_update(env: dict[str, str]) -> list[dict[str, Any]]:
    scanner = Scanner.from_settings(Settings.from_env(env), env=env)
    try:
        async for rows in scanner.updates(["AAPL", "XAUUSD"]):
            return rows
    finally:
        await scanner.close()
    raise AssertionError("the subscription ended")


def test_daemon_stopped_means_no_signals(clean_env: dict[str, str], redis_server: RedisServer,
                                         daemons: Callable[..., Daemon]) -> None:
    """The real daemon, the real 2 s TTL: signals while it runs, none once it is gone."""
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL,XAUUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_REDIS_URL=redis_server.url,
               SIDECAR_REDIS_PREFIX=f"sig{time.time_ns()}", SIDECAR_BOOTSTRAP_DAYS="1",
               # rsi < 100 holds for any defined RSI: every fresh symbol must signal.
               SIDECAR_SIGNAL_RULES="rsi_below", SIDECAR_SIGNAL_RSI_BELOW="100")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready(30)
        signals: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(signals) < 2:
            signals = scan_json(env, "--signals")
            time.sleep(0.3)
        assert sorted((s["symbol"], s["broker"], s["rule"]) for s in signals) == [
            ("AAPL", "AAPL", "rsi_below"), ("XAUUSD", "XAUUSD", "rsi_below")]
        rows = scan_json(env)
        assert all(r["macd_hist_prev"] is not None for r in rows)
        text = subprocess.run([sys.executable, "-m", "sidecar", "scan", "--signals"], cwd=REPO, env=env,
                              capture_output=True, timeout=30, check=True).stdout.decode().splitlines()
        assert "signal(s) over 2 fresh of 2 symbols" in text[0]
        assert sorted(line.split()[:3] for line in text[1:]) == [
            ["AAPL", "AAPL", "rsi_below"], ["XAUUSD", "XAUUSD", "rsi_below"]]
        # Push instead of polling: rows right after each of the daemon's cycles.
        pushed = asyncio.run(asyncio.wait_for(first_update(env), 10))
        assert [r["symbol"] for r in pushed] == ["AAPL", "XAUUSD"] and not any(r["stale"] for r in pushed)
        # --watch prints a fresh batch every second until Ctrl-C.
        watch = subprocess.Popen([sys.executable, "-m", "sidecar", "scan", "--json", "--watch"], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Ctrl-C once two batches are out (not after a fixed sleep: a loaded machine
        # may still be importing, and a Ctrl-C there is not what this checks).
        assert watch.stdout is not None
        head = [watch.stdout.readline() for _ in range(4)]
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=20)
        assert watch.returncode == 0, err.decode()[-2000:]
        batches = [json.loads(line)["symbol"] for line in b"".join([*head, out]).decode().splitlines()]
        assert len(batches) >= 4 and batches[:2] == ["AAPL", "XAUUSD"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # No signal right after the stop, nor at any point until the keys expire.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert scan_json(env, "--signals") == []
    rows = scan_json(env)
    assert all(r["stale"] and r.get("missing") for r in rows), rows


async def test_scanner_survives_a_redis_restart_and_reports_it_down(tmp_path: Any) -> None:
    from sidecar.redis_store import connect

    server = RedisServer(tmp_path / "r")
    server.start()
    scanner = Scanner(connect(server.url, timeout_s=1.0), "test", owns=True)
    try:
        store = RedisStore(scanner.redis, "test")
        await write(store, [features("AAPL")])
        assert not (await scanner.read(["AAPL"]))[0]["stale"]
        server.stop()
        server.start()  # empty, same socket: the pooled connection is dead
        rows = await scanner.read(["AAPL"])
        assert rows[0]["missing"] and rows[0]["stale"]
        server.stop()
        with pytest.raises(Exception) as err:
            await scanner.read(["AAPL"])
        assert "redis" in type(err.value).__module__ or isinstance(err.value, OSError)
    finally:
        await scanner.close()
        server.stop()


def test_scan_says_when_redis_is_unreachable(clean_env: dict[str, str], tmp_path: Any) -> None:
    env = dict(clean_env, SIDECAR_REDIS_URL=f"unix://{tmp_path}/nothing.sock")
    out = subprocess.run([sys.executable, "-m", "sidecar", "scan"], cwd=REPO, env=env,
                         capture_output=True, timeout=30)
    assert out.returncode == 1 and "cannot reach Redis" in out.stderr.decode()


async def test_pipeline_writes_the_previous_histogram_for_forming_and_closed_bars(
        redis_store: RedisStore, bar_store: Any) -> None:
    import dataclasses

    from sidecar.app.pipeline import Pipeline

    t0 = 1_700_000_000_000
    bars = series("AAA", 80, t0, 3)
    forming = dataclasses.replace(bars[60], forming=True)
    steps = [{"AAA": bars[:60]}, {"AAA": [forming]}, {"AAA": [bars[60]]}]
    pipe = Pipeline(settings(symbols=("AAA",)), [ScriptedSource(steps)], redis_store, bar_store)
    closes = np.array([b.c for b in bars[:61]])
    hist = talib.MACD(closes, 12, 26, 9)[2]
    for k, expect_t in enumerate((bars[59].t, forming.t, bars[60].t)):
        await pipe.run_cycle(t0 + k * 1000)
        feats = (await redis_store.read_features(["AAA"], "1s"))[0]
        assert feats["t"] == expect_t
        i = (expect_t - t0) // 1000
        assert (feats["macd_hist"], feats["macd_hist_prev"]) == (hist[i], hist[i - 1])


async def test_concurrent_reads_of_different_lists_get_their_own_rows(redis_store: RedisStore) -> None:
    await write(redis_store, [features(s, rsi=float(i)) for i, s in enumerate(("AAPL", "MSFT", "NVDA"))])
    scanner = scanner_on(redis_store)
    lists = [["AAPL", "MSFT"], ["NVDA"], ["MSFT", "NVDA", "AAPL"]] * 20
    results = await asyncio.gather(*(scanner.read(symbols) for symbols in lists))
    for symbols, rows in zip(lists, results, strict=True):
        assert [r["symbol"] for r in rows] == symbols


async def test_rows_hold_the_values_msgpack_decodes(redis_store: RedisStore) -> None:
    """The batch decode gives each stored map exactly as ``msgpack.unpackb`` does (types,
    float bits, a nested map), and a missing key between two present ones its own row."""
    maps = [features("AAPL", completeness={"session": 0.98, "previous": None, "synthetic": 0, "late": 2},
                     close=-0.0, v=None, atr=float("inf"), rsi=1e-310, next_open=2**63 + 5, via="poll",
                     market_open=False),
            features("XAUUSD", close=1 / 3, vol_ma=float("nan"), src="")]
    await write(redis_store, maps)
    stored = {m["symbol"]: msgpack.packb(m) for m in maps}
    rows = await scanner_on(redis_store).read(["AAPL", "TSLA", "XAUUSD"], timeframes=["1m"])
    assert [(r["symbol"], r["broker"], r["stale"]) for r in rows] == [
        ("AAPL", "AAPL", False), ("TSLA", "TSLA", True), ("XAUUSD", "GOLD", False)]
    assert rows[1] == {"symbol": "TSLA", "broker": "TSLA", "tf": "1m", "age_ms": None, "stale": True,
                       "missing": True}
    for row in (rows[0], rows[2]):
        want = msgpack.unpackb(stored[row["symbol"]])
        got = {k: row[k] for k in want}
        assert list(got) == list(want)
        assert [repr(v) for v in got.values()] == [repr(v) for v in want.values()]  # nan, -0.0, types
        assert [struct.pack("<d", v) for v in got.values() if type(v) is float] == \
            [struct.pack("<d", v) for v in want.values() if type(v) is float]


async def test_concurrent_reads_of_different_lists_stale_by_their_own_shards(redis_store: RedisStore) -> None:
    symbols = [f"S{i:02d}" for i in range(16)]
    shard0 = RedisStore(redis_store.redis, "test", shard=0)
    await shard0.write_cycle([], [("1m", s, msgpack.packb(features(s))) for s in symbols], {"pid": 1})
    scanner = scanner_on(redis_store, shards=2)
    lists = [symbols[:5], symbols[5:], symbols[::-3]] * 10
    results = await asyncio.gather(*(scanner.read(wanted) for wanted in lists))
    for wanted, rows in zip(lists, results, strict=True):
        assert [(r["symbol"], r["stale"]) for r in rows] == [(s, shard_of(s, 2) == 1) for s in wanted]
    assert {shard_of(s, 2) for s in symbols} == {0, 1}


async def test_a_reader_finds_the_shards_that_run(redis_store: RedisStore) -> None:
    """A reader whose heartbeats are all gone (told no shards, or more than run) reads
    by the ones that answer, found in the shard registry; with no heartbeat at all,
    every row is stale."""
    symbols = [f"S{i:02d}" for i in range(12)]
    scanner = scanner_on(redis_store)
    rows = await scanner.read(symbols)
    assert all(r["stale"] and r["missing"] for r in rows) and scanner.shards == 1  # nothing runs yet
    for i in range(3):  # three shards run, each writing its own symbols
        shard = RedisStore(redis_store.redis, "test", shard=i)
        await shard.write_meta({"shard": i, "shards": 3, "owned": []})
        mine = [s for s in symbols if shard_of(s, 3) == i]
        await shard.write_cycle([], [("1m", s, msgpack.packb(features(s))) for s in mine], {"pid": i})
    await redis_store.redis.hset(redis_store.keys.shards, "0/2", b"")  # an earlier run's entry
    scanner = scanner_on(redis_store)
    rows = await scanner.read(symbols)
    assert scanner.shards == 3 and not any(r["stale"] for r in rows)
    # Back to one unsharded daemon: a reader told 3 shards follows it.
    await redis_store.redis.delete(*[redis_store.keys.heartbeat_of(i) for i in range(3)])
    await RedisStore(redis_store.redis, "test").write_cycle([], [], {"pid": 9})
    told_three = scanner_on(redis_store, shards=3)
    assert not any(r["stale"] for r in await told_three.read(symbols)) and told_three.shards == 1
