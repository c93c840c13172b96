"""Faults caused for real against a running daemon: crashes, Redis and SQLite trouble,
clock jumps and load. Each test starts the daemon as a user does (``python -m sidecar
run``), with a real redis-server and a real SQLite file, and breaks something."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from sidecar.bar import Bar
from sidecar.features import FEATURE_FIELDS
from sidecar.tests.helpers import REPO, Daemon, RedisServer, assert_row_equal, batch_values

SYMBOLS = ("AAPL", "BTCUSD")


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``redis_servers(name, *options)`` starts a redis-server; all are killed at the end."""
    started: list[RedisServer] = []

    def start(name: str = "redis", *options: str) -> RedisServer:
        started.append(RedisServer(tmp_path / name, *options))
        started[-1].start()
        return started[-1]

    yield start
    for r in started:
        r.kill()


def daemon_env(clean_env: dict[str, str], server: RedisServer, **extra: str) -> dict[str, str]:
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=",".join(SYMBOLS),
               SIDECAR_TIMEFRAME="1s", SIDECAR_REDIS_URL=server.url, SIDECAR_REDIS_PREFIX="f",
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_FLUSH_INTERVAL_S="1")
    env.update(extra)
    return env


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_cycles(daemon: Daemon, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """``/health`` sampled until the daemon has run ``n`` more cycles; the samples, the
    first taken before. The timeout only bounds the wait (a loop that hangs)."""
    seen = [daemon.health()]

    def advanced() -> bool:
        assert daemon.proc.poll() is None, f"daemon exited:\n{daemon.log_text()}"
        seen.append(daemon.health())
        return bool(seen[-1]["cycle"]["count"] >= seen[0]["cycle"]["count"] + n)

    wait_for(f"{n} more cycles", advanced, timeout, every=0.1)
    return seen


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(server.socket), socket_timeout=5)


def redis_bars(r: redis.Redis, symbol: str, prefix: str = "f", tf: str = "1s") -> list[Bar]:
    members = r.zrange(f"{prefix}:v1:bars:{tf}:{symbol}", 0, -1, withscores=True)
    scores = [score for _, score in members]
    assert len(scores) == len(set(scores)), f"{symbol}: duplicate bars in Redis"
    return [Bar.unpack(symbol, tf, raw) for raw, _ in members]


def sqlite_bars(path: Path, symbol: str, tf: str = "1s") -> list[Bar]:
    db = sqlite3.connect(path, timeout=30)
    try:
        rows = db.execute("SELECT symbol, tf, t, o, h, l, c, v, src, forming, synthetic FROM bars "
                          "WHERE symbol = ? AND tf = ? ORDER BY t", (symbol, tf)).fetchall()
    finally:
        db.close()
    return [Bar(s, f, t, o, h, l, c, v, src, bool(fm), bool(sy)) for s, f, t, o, h, l, c, v, src, fm, sy in rows]


def ohlcv(b: Bar) -> tuple[Any, ...]:
    return (b.t, b.o, b.h, b.l, b.c, b.v)


def assert_redis_in_sqlite(r: redis.Redis, db_path: Path, symbols: tuple[str, ...] = SYMBOLS) -> int:
    """Every bar Redis holds is in SQLite with the same values; returns how many."""
    n = 0
    for sym in symbols:
        stored = {b.t: ohlcv(b) for b in sqlite_bars(db_path, sym)}
        in_redis = redis_bars(r, sym)
        missing = [b.t for b in in_redis if stored.get(b.t) != ohlcv(b)]
        assert not missing, f"{sym}: {len(missing)} bars in Redis are not in SQLite: {missing[:5]}"
        n += len(in_redis)
    return n


# -- 1. crash ---------------------------------------------------------------------------


def test_sigkill_with_a_full_buffer_then_restart_loses_nothing(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    r = redis_client(server)
    # A day of history (bootstrapped in line, all of it the warm-up window), then live
    # bars that only reach the SQLite buffer: the flush interval is an hour. The window
    # must hold the whole series (a day plus the live bars, > 86,400): TA-Lib's running
    # sums (BBANDS, SMA) start where their input starts, so a batch over a longer series
    # than the handles were opened on can differ in the last bit.
    env = daemon_env(clean_env, server, SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="200000",
                     SIDECAR_FLUSH_INTERVAL_S="3600")
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    first = daemons(env, "run1")
    first.wait_ready()
    # Warm-up reconciles the stores in the background: the bars lost are those buffered after it.
    first.wait_log("warm-up finished", timeout=120)
    before = first.health()["sqlite"]["buffered"]
    wait_for("live bars in the buffer", lambda: first.health()["sqlite"]["buffered"] >= before + 8)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    reached_redis = {sym: redis_bars(r, sym) for sym in SYMBOLS}
    lost = 0
    for sym in SYMBOLS:
        stored_t = {x.t for x in sqlite_bars(db_path, sym)}
        lost += sum(1 for b in reached_redis[sym] if b.t not in stored_t)
    assert lost >= 8, "the crash should have lost buffered bars from SQLite"

    # Restart; catch the first cycle whose features are no longer warming (the heartbeat and
    # the features are written by one script, so one MULTI reads a consistent cycle).
    second = daemons(dict(env, SIDECAR_FLUSH_INTERVAL_S="1"), "run2")
    first_cycle = wait_for("the first warm cycle of the restarted daemon",
                           lambda: _cycle_snapshot(r, second.proc.pid, warm=True), timeout=120, every=0.01)
    second.wait_ready()
    wait_for("a flush by the restarted daemon", lambda: second.health()["sqlite"]["flushed_rows"] > 0)

    for sym in SYMBOLS:
        stored = {b.t: ohlcv(b) for b in sqlite_bars(db_path, sym)}
        missing = [b.t for b in reached_redis[sym] if stored.get(b.t) != ohlcv(b)]
        assert not missing, f"{sym}: bars that reached Redis are missing in SQLite: {missing[:5]}"
    assert any(rec.get("msg") == "recovered bars from redis" for rec in second.logs())
    assert second.stop() == 0

    _heartbeat, features, newest = first_cycle
    for sym in SYMBOLS:
        feat, bar_now = features[sym], newest[sym]
        assert feat is not None and feat["t"] == bar_now.t
        series = [b for b in sqlite_bars(db_path, sym) if b.t < bar_now.t] + [bar_now]
        assert len(series) > 86_400
        assert [b.t for b in series] == sorted({b.t for b in series}), "duplicate or unordered bars"
        values = [feat[name] for name in FEATURE_FIELDS]
        assert_row_equal(values, batch_values(series), len(series) - 1)
        assert feat["macd_signal"] is not None and feat["vwap"] is not None
    assert_redis_in_sqlite(r, db_path)


def _cycle_snapshot(r: redis.Redis, pid: int, *, warm: bool = False,
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Bar]] | None:
    """A cycle of daemon ``pid``: heartbeat, features and newest bar of each symbol
    (``warm``: only a cycle where no symbol's features are flagged ``warming``)."""
    pipe = r.pipeline(transaction=True)
    pipe.get("f:v1:heartbeat")
    for sym in SYMBOLS:
        pipe.get(f"f:v1:feat:1s:{sym}")
        pipe.zrange(f"f:v1:bars:1s:{sym}", -1, -1)
    hb_raw, *rest = pipe.execute()
    if hb_raw is None:
        return None
    heartbeat = msgpack.unpackb(hb_raw)
    if heartbeat["pid"] != pid:
        return None
    features: dict[str, Any] = {}
    newest: dict[str, Bar] = {}
    for i, sym in enumerate(SYMBOLS):
        raw_feat, raw_bars = rest[2 * i], rest[2 * i + 1]
        features[sym] = None if raw_feat is None else msgpack.unpackb(raw_feat)
        newest[sym] = Bar.unpack(sym, "1s", raw_bars[0])
    if warm and any(f is None or f.get("warming") for f in features.values()):
        return None
    return heartbeat, features, newest


# -- 2. Redis outage --------------------------------------------------------------------

#: Cycles the daemon runs with Redis down.
OUTAGE_CYCLES = 30


#: redis-server options that keep its data through a SIGKILL (AOF, fsync always).
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def assert_stores_equal(r: redis.Redis, db_path: Path, symbols: tuple[str, ...] = SYMBOLS) -> None:
    """Redis holds exactly SQLite's newest bars (as many as Redis keeps)."""
    for sym in symbols:
        in_redis = [ohlcv(b) for b in redis_bars(r, sym)]
        stored = [ohlcv(b) for b in sqlite_bars(db_path, sym)][-len(in_redis):] if in_redis else []
        assert in_redis, f"{sym}: no bars in Redis"
        assert in_redis == stored, f"{sym}: Redis and SQLite differ"


def features_advance(r: redis.Redis, symbols: tuple[str, ...] = SYMBOLS, timeout: float = 30) -> None:
    """Wait until every symbol's features are computed again (a newer ``computed_at``):
    the loop is writing them. Keys expire after 2 s, so features that stopped never come."""
    def computed() -> list[Any]:
        raws = [r.get(f"f:v1:feat:1s:{sym}") for sym in symbols]
        return [None if raw is None else msgpack.unpackb(raw)["computed_at"] for raw in raws]

    before = computed()
    wait_for("features computed again", lambda: all(
        now is not None and (was is None or now > was) for was, now in zip(before, computed(), strict=True)),
        timeout)


def test_redis_killed_for_30_s_then_back_with_its_data(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers("redis", *DURABLE)
    env = daemon_env(clean_env, server)
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    wait_for("status ok", lambda: daemon.health()["status"] == "ok")

    server.kill()
    wait_for("degraded", lambda: not daemon.health()["redis"]["ok"])
    # The loop keeps going: the outage lasts as many cycles (a stalled loop times out).
    seen = wait_cycles(daemon, OUTAGE_CYCLES, timeout=10 * OUTAGE_CYCLES)
    assert all(h["status"] == "degraded" and not h["redis"]["ok"] for h in seen), seen[0]
    assert all(any("redis unreachable" in why for why in h["reasons"]) for h in seen)
    first, last = seen[0], seen[-1]
    assert last["sqlite"]["flushed_rows"] > first["sqlite"]["flushed_rows"], "SQLite stopped"
    assert last["sqlite"]["last_error"] is None

    server.start()  # same directory: the AOF brings the data back
    r = redis_client(server)
    wait_for("redis ok again", lambda: daemon.health()["redis"]["ok"])
    wait_for("status ok again", lambda: daemon.health()["status"] == "ok")
    features_advance(r)
    assert daemon.stop() == 0  # final flush: SQLite holds everything
    assert_stores_equal(r, db_path)
    # One bar a cycle: the outage's bars, made while Redis was down, were rewritten to it.
    outage_bars = [b for b in redis_bars(r, SYMBOLS[0]) if first["now_ms"] <= b.t <= last["now_ms"]]
    missed = last["cycle"]["missed_ticks"] - first["cycle"]["missed_ticks"]
    assert len(outage_bars) >= OUTAGE_CYCLES - missed - 2, "bars of the outage were not rewritten to Redis"
    messages = daemon.messages()
    assert "redis write failed; buffering" in messages and "redis is back" in messages
    assert "redis lost its data; refilling it from sqlite" not in messages


def test_redis_restarted_empty_is_warmed_from_sqlite(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers("redis", *DURABLE)
    env = daemon_env(clean_env, server, SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="86400")
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    daemon.wait_for("warm-up done", lambda: daemon.health()["warmup"]["done"], timeout=120)
    r = redis_client(server)
    assert len(redis_bars(r, SYMBOLS[0])) == 5_000
    wait_cycles(daemon, 2)

    server.kill()
    for leftover in server.directory.glob("append*"):
        if leftover.is_dir():
            for f in leftover.iterdir():
                f.unlink()
        else:
            leftover.unlink()
    wait_for("the daemon sees Redis gone", lambda: not daemon.health()["redis"]["ok"])
    server.start()
    r = redis_client(server)
    assert r.dbsize() == 0 or r.get("f:v1:meta") is None  # really empty
    wait_for("bars back in Redis", lambda: all(len(redis_bars(r, s)) == 5_000 for s in SYMBOLS))
    features_advance(r)
    assert r.get("f:v1:meta") is not None
    wait_for("status ok", lambda: daemon.health()["status"] == "ok")
    assert daemon.stop() == 0
    assert_stores_equal(r, db_path)
    assert "redis refilled from sqlite" in daemon.messages()


#: Cycles the daemon runs with Redis frozen.
FREEZE_CYCLES = 8
#: A small SIDECAR_REDIS_TIMEOUT_S for the frozen-Redis tests: every Redis call of a cycle
#: gives up after it, so a hung server costs a cycle well under its one second.
FROZEN_TIMEOUT_S = "0.25"


@pytest.fixture
def frozen() -> Iterator[list[RedisServer]]:
    """Servers a test SIGSTOPs; each is SIGCONTed at the end, whatever happened."""
    stopped: list[RedisServer] = []
    yield stopped
    for server in stopped:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)


def _freeze(server: RedisServer, frozen: list[RedisServer]) -> None:
    """SIGSTOP: the socket still accepts connections (the kernel queues them and the
    bytes sent), but nothing answers: a hung server or a partition dropping packets."""
    assert server.proc is not None
    frozen.append(server)
    server.proc.send_signal(signal.SIGSTOP)


def test_redis_frozen_for_8_s_neither_stalls_the_loop_nor_loses_a_bar(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer], frozen: list[RedisServer]) -> None:
    server = redis_servers()
    env = daemon_env(clean_env, server, SIDECAR_REDIS_TIMEOUT_S=FROZEN_TIMEOUT_S)
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    wait_for("status ok", lambda: daemon.health()["status"] == "ok")
    before = daemon.health()

    _freeze(server, frozen)
    # http_get gives up after 2 s: /health must not wait on Redis.
    wait_for("degraded", lambda: not daemon.health()["redis"]["ok"])
    # The loop keeps going while Redis hangs (a loop waiting on it times out here).
    seen = wait_cycles(daemon, FREEZE_CYCLES, timeout=10 * FREEZE_CYCLES)
    first, last = seen[0], seen[-1]
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)

    assert all(h["status"] == "degraded" and not h["redis"]["ok"] for h in seen), seen[0]
    assert all(any(why.startswith("redis unreachable") for why in h["reasons"]) for h in seen)
    assert "timeout" in (last["redis"]["last_error"] or "").lower(), last["redis"]
    # Each cycle waited at most one Redis timeout, well inside its second: not one tick
    # was skipped, by the daemon's own count.
    assert last["cycle"]["missed_ticks"] == before["cycle"]["missed_ticks"], (before["cycle"], last["cycle"])
    assert last["sqlite"]["flushed_rows"] > first["sqlite"]["flushed_rows"], "SQLite stopped"

    r = redis_client(server)
    wait_for("redis ok again", lambda: daemon.health()["redis"]["ok"])
    features_advance(r)
    wait_for("status ok again", lambda: daemon.health()["status"] == "ok")
    assert daemon.stop() == 0  # final flush: SQLite holds everything
    # Nothing lost, nothing doubled: Redis is exactly SQLite's newest bars, and every
    # bar of the frozen period is there once (redis_bars fails on a duplicate score).
    assert_stores_equal(r, db_path)
    for sym in SYMBOLS:
        # One bar a cycle (no tick missed): every cycle of the frozen period left its bar.
        frozen_bars = [b.t for b in redis_bars(r, sym) if first["now_ms"] <= b.t <= last["now_ms"] - 1_000]
        assert len(frozen_bars) >= FREEZE_CYCLES - 2, f"{sym}: bars of the frozen period missing from Redis"
        assert frozen_bars == sorted(set(frozen_bars))
    messages = daemon.messages()
    assert "redis write failed; buffering" in messages and "redis is back" in messages


@pytest.mark.parametrize("fault", ["refused", "frozen"])
def test_redis_down_past_its_bound_exits_non_zero_after_flushing(
        fault: str, clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer], frozen: list[RedisServer]) -> None:
    """Killed (connections refused) or frozen (they hang): past SIDECAR_REDIS_DOWN_EXIT_S
    the daemon flushes and exits 3, and SQLite holds the bars of the outage."""
    if fault == "refused":
        server = redis_servers("redis", *DURABLE)
        env = daemon_env(clean_env, server, SIDECAR_REDIS_DOWN_EXIT_S="4", SIDECAR_FLUSH_INTERVAL_S="3600")
    else:
        server = redis_servers()
        env = daemon_env(clean_env, server, SIDECAR_REDIS_TIMEOUT_S=FROZEN_TIMEOUT_S,
                         SIDECAR_REDIS_DOWN_EXIT_S="3", SIDECAR_FLUSH_INTERVAL_S="3600")
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    wait_cycles(daemon, 2)
    r = redis_client(server)
    reached = {sym: redis_bars(r, sym) for sym in SYMBOLS}
    if fault == "refused":
        server.kill()
    else:
        _freeze(server, frozen)
    assert daemon.proc.wait(30) == 3  # EXIT_REDIS_DOWN, for PM2 to restart it
    # Back (the AOF, or the frozen server resumed): what Redis got before the outage.
    if fault == "refused":
        server.start()
    else:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGCONT)
    r = redis_client(server)
    for sym in SYMBOLS:
        stored = sqlite_bars(db_path, sym)
        stored_by_t = {b.t: ohlcv(b) for b in stored}
        assert all(stored_by_t.get(b.t) == ohlcv(b) for b in reached[sym] if not b.forming)
        assert stored[-1].t > redis_bars(r, sym)[-1].t, "bars of the outage were not kept in SQLite"
    assert "redis unreachable for too long; exiting for a restart" in daemon.messages()


# -- 3. SQLite trouble ------------------------------------------------------------------

#: Bars each daemon makes while locked out (two symbols, one bar each a cycle).
LOCK_BARS = 20

_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"""


def _lock_database(path: Path) -> subprocess.Popen[bytes]:
    """Another process holding the database's write lock (``BEGIN EXCLUSIVE``) until
    its stdin is closed (:func:`_release`)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    return holder


def _release(holder: subprocess.Popen[bytes]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(30) == 0


def _missing_from_sqlite(r: redis.Redis, db_path: Path) -> int:
    """Bars (final values) Redis has and SQLite lacks; a dropped final revision counts too."""
    missing = 0
    for sym in SYMBOLS:
        stored = {b.t: (*ohlcv(b), b.forming) for b in sqlite_bars(db_path, sym)}
        missing += sum(1 for b in redis_bars(r, sym) if stored.get(b.t) != (*ohlcv(b), b.forming))
    return missing


def test_sqlite_locked_by_another_process_for_20_bars(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    # Two daemons side by side, both locked out while they make 20 bars: one with room in
    # memory (nothing lost), one whose buffer bound is small (the oldest dropped, counted).
    runs = []
    for name, bound in (("roomy", "1000000"), ("tight", "12")):
        server = redis_servers(f"redis-{name}")
        env = daemon_env(dict(clean_env, SIDECAR_DATA_DIR=str(tmp_path / name)), server,
                         SIDECAR_BUFFER_MAX_ROWS=bound)
        daemon = daemons(env, name)
        runs.append((daemon, redis_client(server), Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"))
    for daemon, _, _ in runs:
        daemon.wait_ready()
        wait_cycles(daemon, 2)

    holders = [_lock_database(db_path) for _, _, db_path in runs]
    for daemon, _, _ in runs:  # past the busy timeout: the flush failed
        wait_for("a flush failed on the lock", lambda d=daemon: "locked" in (d.health()["sqlite"]["last_error"] or ""))
    roomy, tight = runs
    # Bars pile up in memory (the roomy one) or are dropped past the bound (the tight one)
    # while the features go on.
    wait_for(f"{LOCK_BARS} bars kept in memory", lambda: roomy[0].health()["sqlite"]["buffered"] >= LOCK_BARS,
             timeout=10 * LOCK_BARS)
    wait_for(f"{LOCK_BARS} bars dropped", lambda: tight[0].health()["sqlite"]["dropped"] >= LOCK_BARS,
             timeout=10 * LOCK_BARS)
    for daemon, r, _ in runs:
        features_advance(r)
        h = daemon.health()
        assert h["status"] == "degraded" and "locked" in (h["sqlite"]["last_error"] or ""), h
    assert tight[0].health()["sqlite"]["buffered"] <= 12
    for holder in holders:
        _release(holder)

    for daemon, _, _ in runs:
        wait_for("the buffer written", lambda d=daemon: d.health()["sqlite"]["last_error"] is None
                 and d.health()["sqlite"]["buffered"] <= 4, timeout=30)
    dropped = tight[0].health()["sqlite"]["dropped"]
    assert dropped >= LOCK_BARS, "the tight buffer should have dropped bars"
    assert f"sidecar_sqlite_dropped_bars_total {float(dropped)}" in tight[0].metrics()
    assert roomy[0].health()["sqlite"]["dropped"] == 0
    for daemon, _, _ in runs:
        assert daemon.stop() == 0
        messages = daemon.messages()
        assert "sqlite flush failed; bars kept in memory" in messages
        assert "sqlite flush recovered" in messages
        failed = next(rec for rec in daemon.logs() if rec["msg"] == "sqlite flush failed; bars kept in memory")
        assert "locked" in failed["error"]
    assert_redis_in_sqlite(roomy[1], roomy[2])
    # Exactly the bars counted as dropped are missing, and they are the oldest of the lock.
    assert _missing_from_sqlite(tight[1], tight[2]) == dropped
    assert "sqlite buffer full: dropped oldest bars" in tight[0].messages()


@dataclass(frozen=True)
class SmallDisk:
    """A 4 MiB tmpfs: ``path`` where the daemon started with ``wrapper`` sees it, ``view``
    the same directory as this process reaches it."""

    path: Path
    view: Path
    wrapper: list[str]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs, so the disk can really fill up: mounted here with root's mount
    permission, else in a user and mount namespace of its own (no privilege needed), held
    by a process the daemon joins with ``nsenter``."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode == 0:
        try:
            yield SmallDisk(mount_point, mount_point, [])
        finally:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
        return
    # The holder lives until its stdin closes, so it never outlives this process.
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount",
         "sh", "-c", '"$@" && echo mounted && exec cat', "sh", *mount],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    try:
        if holder.stdout.readline().strip() != "mounted":
            holder.wait(10)
            pytest.skip(f"cannot mount a tmpfs to fill a disk for real: {done.stderr.strip()}; "
                        f"nor in a user namespace: {holder.stderr.read().strip()}")
        view = Path(f"/proc/{holder.pid}/root") / mount_point.relative_to("/")
        yield SmallDisk(mount_point, view, ["nsenter", f"--target={holder.pid}", "--user", "--mount",
                                            "--preserve-credentials", f"--wd={REPO}"])
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_disk_full_keeps_bars_in_memory_until_space_returns(
        clean_env: dict[str, str], tmp_path: Path, small_disk: SmallDisk, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    env = daemon_env(clean_env, server, SIDECAR_SQLITE_PATH=str(small_disk.path / "bars.sqlite3"))
    daemon = daemons(env, "daemon", wrapper=small_disk.wrapper)
    daemon.wait_ready()
    wait_cycles(daemon, 2)
    filler = small_disk.view / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    assert os.statvfs(small_disk.view).f_bavail == 0
    r = redis_client(server)
    wait_for("a failed flush", lambda: "full" in (daemon.health()["sqlite"]["last_error"] or ""))
    buffered = daemon.health()["sqlite"]["buffered"]
    for _ in range(4):
        features_advance(r)
    wait_for("more bars kept in memory", lambda: daemon.health()["sqlite"]["buffered"] > buffered)
    assert daemon.health()["status"] == "degraded"
    filler.unlink()
    wait_for("the buffer written", lambda: daemon.health()["sqlite"]["last_error"] is None, timeout=30)
    assert daemon.stop() == 0
    # SQLite would resolve a /proc/<pid>/root view to this process's own root: read a copy.
    stored = Path(shutil.copytree(small_disk.view, tmp_path / "disk-copy"))
    assert_redis_in_sqlite(r, stored / "bars.sqlite3")
    failed = next(rec for rec in daemon.logs() if rec["msg"] == "sqlite flush failed; bars kept in memory")
    assert "full" in failed["error"]


def test_database_file_deleted_underneath_is_restored(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    server = redis_servers()
    env = daemon_env(clean_env, server)
    db_path = Path(env["SIDECAR_DATA_DIR"]) / "bars.sqlite3"
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    wait_for("bars flushed to the file", lambda: daemon.health()["sqlite"]["flushed_rows"] >= 2 * 5)
    for f in db_path.parent.glob("bars.sqlite3*"):  # what a careless `rm bars.sqlite3*` does
        f.unlink()
    r = redis_client(server)
    wait_for("the file restored", lambda: "sqlite file restored" in daemon.messages())
    for _ in range(3):
        features_advance(r)
    assert daemon.health()["sqlite"]["last_error"] is None
    assert daemon.stop() == 0
    assert "sqlite file was deleted underneath the daemon; restoring it from the open connection" \
        in daemon.messages()
    # Everything, including the bars flushed into the deleted file, is in the new one.
    assert assert_redis_in_sqlite(r, db_path) >= 2 * 5
    assert sqlite_bars(db_path, SYMBOLS[0])[0].t == redis_bars(r, SYMBOLS[0])[0].t


# -- 4. clock trouble -------------------------------------------------------------------


def _libfaketime() -> str | None:
    """libfaketime (Debian package ``faketime``; scripts/test installs it when missing)."""
    import glob

    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") +
                   glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def test_wall_clock_jumps_neither_burst_nor_stall_and_admit_no_future_bar(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon],
        redis_servers: Callable[..., RedisServer]) -> None:
    lib = _libfaketime()
    if lib is None:
        pytest.skip("libfaketime not installed (apt-get install faketime; scripts/system-deps does it as root)")
    server = redis_servers()
    r = redis_client(server)
    offset_file = tmp_path / "offset"
    offset_file.write_text("+0\n")
    # Only the daemon's wall clock moves (time.time, CLOCK_REALTIME); its monotonic
    # clock, Redis' clock and this test's clock stay true.
    env = daemon_env(clean_env, server, LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(offset_file),
                     FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
    daemon = daemons(env, "daemon")
    daemon.wait_ready()
    wait_cycles(daemon, 2)
    announcements = r.pubsub(ignore_subscribe_messages=True)
    announcements.subscribe("f:v1:cycles")

    def newest() -> int:
        return max(redis_bars(r, sym)[-1].t for sym in SYMBOLS)

    def ticks_after(cycle: int, n: int, check: Callable[[], None]) -> list[int]:
        """The ticks of the first ``n`` cycles numbered above ``cycle`` (their announcements),
        calling ``check`` after each. A loop that stalls never announces: the deadline."""
        ticks: list[int] = []
        deadline = time.monotonic() + 30
        while len(ticks) < n:
            assert time.monotonic() < deadline, f"stall: {len(ticks)} of {n} cycles after cycle {cycle}"
            message = announcements.get_message(timeout=1.0)
            if message is not None and (announced := msgpack.unpackb(message["data"]))["cycle"] > cycle:
                ticks.append(int(announced["tick"]))
                check()
        return ticks

    start = daemon.health()
    skew_ms = 2_000
    # Back 3 min, forward 6 min, back 3 min (to the true time).
    previous_s = 0
    for offset_s, must_accept in ((-180, False), (180, True), (0, False)):
        before_newest = newest()
        before = daemon.health()
        # The daemon's clock reads at least this once the offset is written.
        jump_ms = (time.time() + offset_s) * 1000
        offset_file.write_text(f"{offset_s:+d}\n")
        jumped = wait_for(f"the jump to {offset_s:+d} s counted", lambda b=before: (
            h if (h := daemon.health())["cycle"]["clock_jumps"] > b["cycle"]["clock_jumps"] else None))

        def check(offset_s: int = offset_s, must_accept: bool = must_accept,
                  before_newest: int = before_newest) -> None:
            assert r.get("f:v1:heartbeat") is not None, "the loop stopped writing Redis"
            if not must_accept:
                # Bars made before the clock went back are in its future now: refused.
                assert newest() == before_newest, f"a future bar was accepted at offset {offset_s}"
            else:
                fake_now_ms = time.time() * 1000 + offset_s * 1000
                assert newest() <= fake_now_ms + skew_ms

        ticks = ticks_after(jumped["cycle"]["count"], 5, check)
        missed = daemon.health()["cycle"]["missed_ticks"] - jumped["cycle"]["missed_ticks"]
        # Resynchronised on the new timeline: the ticks a leap skipped are not replayed (no
        # burst) and a step back does not wait for the old timeline to return (no stall, or
        # the announcements would not have come).
        assert all(t > jump_ms for t in ticks), (ticks, jump_ms)
        if offset_s < previous_s:
            assert ticks[0] < before["cycle"]["last_tick_ms"], "the ticks stayed on the old timeline"
        # Whole seconds one after the other, a gap only where the daemon counted a missed tick.
        assert all(b > a and (b - a) % 1000 == 0 for a, b in itertools.pairwise(ticks)), ticks
        assert len(ticks) - 1 <= (ticks[-1] - ticks[0]) // 1000 <= len(ticks) - 1 + missed, ticks
        after = daemon.health()
        if must_accept:
            assert newest() > before_newest + 170_000, "no bars after the clock leapt forward"
        else:
            # The sim keeps offering its newest bar (now in the future): refused, as a
            # future bar or, unchanged, as a re-delivery recognised before the rules.
            def refused(h: dict[str, Any]) -> int:
                return int(h["bars"]["rejected"].get("future", 0) + h["bars"]["duplicates"])
            assert refused(after) > refused(before), "the source's bars were not offered"
        previous_s = offset_s
    end = daemon.health()
    announcements.close()
    assert daemon.stop() == 0
    assert end["cycle"]["clock_jumps"] - start["cycle"]["clock_jumps"] >= 3
    # A leap of minutes is a clock jump, not hundreds of missed ticks.
    assert end["cycle"]["missed_ticks"] - start["cycle"]["missed_ticks"] < 5


# -- 5. load ----------------------------------------------------------------------------

#: Per-symbol state fills up over the first ~50 bars (validator windows, the feature
#: engine's history until every handle is open); then the soak's cycles are watched.
SOAK_WARM_UP_CYCLES = 60
SOAK_CYCLES = 60
SOAK_SYMBOLS = 1_000


@pytest.mark.timeout(600)
def test_soak_1000_symbols_fds_and_tasks_stay_flat(
        clean_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """Nothing leaks cycle after cycle: descriptors, tasks; no bar dropped. Memory and
    missed ticks under this load are measured by ``bench/daemon_soak.py``, not judged."""
    symbols = ",".join(f"S{i:04d}" for i in range(SOAK_SYMBOLS))
    # Embedded Redis, as a user runs it; 1-second bars: every cycle closes 1,000 bars.
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS=symbols, SIDECAR_TIMEFRAME="1s",
               SIDECAR_BOOTSTRAP_DAYS="0")
    daemon = daemons(env, "daemon")
    daemon.wait_ready(timeout=120)
    wait_cycles(daemon, SOAK_WARM_UP_CYCLES, timeout=10 * SOAK_WARM_UP_CYCLES)
    samples = wait_cycles(daemon, SOAK_CYCLES, timeout=10 * SOAK_CYCLES)
    warm, end = samples[0], samples[-1]
    assert daemon.stop() == 0

    def proc(h: dict[str, Any], key: str) -> int:
        return int(h["process"][key])

    summary = {"fds": [proc(h, "open_fds") for h in (warm, end)],
               "tasks": [proc(h, "asyncio_tasks") for h in (warm, end)],
               "flushed": [h["sqlite"]["flushed_rows"] for h in (warm, end)]}
    assert max(proc(h, "open_fds") for h in samples) <= proc(warm, "open_fds") + 2, summary
    assert proc(end, "open_fds") <= proc(warm, "open_fds") + 1, summary
    assert proc(end, "asyncio_tasks") <= proc(warm, "asyncio_tasks") + 1, summary
    assert end["status"] == "ok" and end["sqlite"]["dropped"] == 0, end["reasons"]
    assert end["sqlite"]["flushed_rows"] > warm["sqlite"]["flushed_rows"], summary
