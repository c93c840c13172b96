"""Helpers shared by the test modules: the daemon as a subprocess, a private redis-server,
a bar factory, a fake clock, a scripted source, a pipeline on a driven clock and the
reference feature series.

Test modules import these as ``sidecar.tests.helpers``; no test module imports another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import numpy as np
import talib

from sidecar.app.daemon import recount_completeness
from sidecar.app.pipeline import Pipeline
from sidecar.bar import Bar
from sidecar.calendars import MarketCalendar
from sidecar.errors import ProviderError
from sidecar.features import FEATURE_FIELDS, session_of
from sidecar.redis_server import find_redis_server
from sidecar.redis_store import RedisStore, connect
from sidecar.settings import IndicatorPeriods, Settings
from sidecar.sources.base import LatestResult, Source
from sidecar.sqlite_store import BarStore
from sidecar.symbols import SymbolMap
from sidecar.timeframe import Timeframe

REPO = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r'"((?:SIDECAR|ALPHAVANTAGE|TWELVEDATA|POLYGON)_[A-Z0-9_]+(?:<ID>)?)"')


def variables_read_by_the_package() -> set[str]:
    """Every variable name the package's code spells out (``..._<ID>``: one per instance)."""
    package = REPO / "sidecar"
    found: set[str] = set()
    for path in package.rglob("*.py"):
        if "tests" not in path.relative_to(package).parts:
            found.update(_VARIABLE.findall(path.read_text()))
    return found


# -- bad settings ------------------------------------------------------------------------

#: One or more bad values per variable ``Settings`` reads (the name -> values that must be refused;
#: ``{file}``, ``{dir}``: placeholders).
SETTINGS_BAD_VALUES: dict[str, list[str]] = {
    "SIDECAR_SYMBOLS": ["AAPL,MS FT", ",,,"],
    "SIDECAR_SOURCES": ["sim,bad-name", " , "],
    "SIDECAR_TIMEFRAME": ["1x", "0m", "60", "1m,5m"],
    "SIDECAR_TIMEFRAMES": ["1m,1x", "1m,1m", "2m,5m", "1m,2d", ","],
    "SIDECAR_REDIS_URL": ["http://localhost:6379", "localhost:6379", "redis://h:99999",
                          "redis://h:port", "redis://h/0?nosuchoption=1", "unix:///tmp/r.sock?db=x",
                          "rediss://h:6380/0?ssl_ca_certs=/nonexistent/ca.pem"],
    "SIDECAR_REDIS_SERVER": ["/nonexistent/redis-server", "{file}", "{dir}"],
    "SIDECAR_DATA_DIR": ["{file}"],
    "SIDECAR_SQLITE_PATH": ["{dir}", "{file}/bars.sqlite3"],
    "SIDECAR_HTTP_HOST": ["not a host", "127.0.0.1:8787", "http://127.0.0.1", "-bad-", "a..b", "x" * 300],
    "SIDECAR_HTTP_TOKEN": ["too-short", "has a space in it here", "t" * 257, "caf\u00e9-token-of-16+"],
    "SIDECAR_REDIS_PREFIX": ["a:b", "x" * 33, "pre fix"],
    "SIDECAR_REPLAY_FILE": ["/nonexistent/bars.jsonl"],
    "SIDECAR_MACD": ["12,26", "a,b,c", "26,12,9", "1,26,9", "12,26,0", "12,2000,9"],
    "SIDECAR_RSI_PERIOD": ["1", "abc", "1001"],
    "SIDECAR_EMA_PERIOD": ["1", "2.5"],
    "SIDECAR_BB_PERIOD": ["0", "x"],
    "SIDECAR_BB_NBDEV": ["0", "nan", "11", "two"],
    "SIDECAR_ATR_PERIOD": ["0", "-3"],
    "SIDECAR_VOLMA_PERIOD": ["1", "many"],
    "SIDECAR_MOM_PERIOD": ["0", "1e3"],
    "SIDECAR_SESSION_ANCHOR": ["24:00", "9:30", "12:60", "noon"],
    "SIDECAR_HTTP_PORT": ["65536", "-1", "http"],
    "SIDECAR_BARS_CAP": ["99", "lots"],
    "SIDECAR_FEATURES_TTL_MS": ["499", "2s"],
    "SIDECAR_HEARTBEAT_TTL_MS": ["999", "x"],
    "SIDECAR_REDIS_TIMEOUT_S": ["0", "inf", "nan", "fast"],
    "SIDECAR_REDIS_DOWN_EXIT_S": ["0.5", "-inf"],
    "SIDECAR_FLUSH_INTERVAL_S": ["0.01", "NaN"],
    "SIDECAR_BUFFER_MAX_ROWS": ["0", "x"],
    "SIDECAR_RETENTION_DAYS": ["0", "36501", "90,1d:0", "90,1x:30", "90,80", "1d:"],
    "SIDECAR_WARM_BARS": ["-1", "1000001"],
    "SIDECAR_BOOTSTRAP_DAYS": ["-1", "ninety"],
    "SIDECAR_CLOCK_SKEW_MS": ["-1", "600001"],
    "SIDECAR_OUTLIER_K": ["-1", "nan", "inf"],
    "SIDECAR_OUTLIER_WINDOW": ["1", "x"],
    "SIDECAR_CORRECTION_WINDOW_BARS": ["-1", "100001"],
    "SIDECAR_FILL_GAPS": ["maybe", "2"],
    "SIDECAR_MARKET_HOURS": ["sometimes"],
    "SIDECAR_FETCH_TIMEOUT_S": ["0.01", "61", "nan"],
    "SIDECAR_STALE_AFTER_MS": ["499", "x"],
    "SIDECAR_PARSE_PROCESS": ["maybe", "1", "process"],
    "SIDECAR_SIM_SEED": ["-1", "seed", str(2**63)],
    "SIDECAR_REPLAY_SPEED": ["0", "10001", "nan"],
    "SIDECAR_LOG_FORMAT": ["xml"],
    "SIDECAR_LOG_LEVEL": ["verbose", "critical"],
    "SIDECAR_SHARD": ["1/1", "3/2", "a/b", "1", "0/0", "0/2000"],
    "SIDECAR_SHARDS": ["0", "x", "1025"],
    "SIDECAR_REDIS_READ_REPLICAS": ["maybe"],
}


_URLS = ["ftp://x", "http://", "localhost:8080", "http://x/path?a=1"]
#: One or more bad values per variable the provider settings read ({dir}, {file}, {bad_toml}:
#: placeholders).
PROVIDER_BAD_VALUES: dict[str, list[str]] = {
    "ALPHAVANTAGE_API_KEY": ["has space SECRET", "SECRET" * 50, "tab\tSECRET", "\u00fcSECRET"],
    "TWELVEDATA_API_KEY": ["has space SECRET", "SECRET\x00"],
    "POLYGON_API_KEY": ["has space SECRET", "SECRET\u2028x"],
    "SIDECAR_YAHOO_BASE_URL": _URLS,
    "SIDECAR_ALPHAVANTAGE_BASE_URL": _URLS,
    "SIDECAR_TWELVEDATA_BASE_URL": _URLS,
    "SIDECAR_POLYGON_BASE_URL": _URLS,
    "SIDECAR_YAHOO_STREAM_URL": ["http://x", "wss://", "streamer"],
    "SIDECAR_YAHOO_STREAM": ["maybe", "2"],
    "SIDECAR_HTTP_TIMEOUT_S": ["0", "abc", "nan", "301"],
    "SIDECAR_ALPHAVANTAGE_PER_DAY": ["-1", "x"],
    "SIDECAR_ALPHAVANTAGE_PER_SECOND": ["0", "1001"],
    "SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE": ["0", "eight"],
    "SIDECAR_TWELVEDATA_CREDITS_PER_DAY": ["-1", "1e3"],
    "SIDECAR_POLYGON_PER_MINUTE": ["0", "x"],
    "SIDECAR_YAHOO_PER_MINUTE": ["0", "-1"],
    "SIDECAR_YAHOO_PER_DAY": ["-5", "x"],
    "SIDECAR_YAHOO_POLL_S": ["-1", "nan", "86401"],
    "SIDECAR_429_COOLDOWN_S": ["-1", "inf"],
    "SIDECAR_BREAKER_FAIL_MAX": ["0", "1.5"],
    "SIDECAR_BREAKER_RESET_S": ["0", "x"],
    "SIDECAR_SYMBOLS_FILE": ["/nonexistent/x.toml", "{dir}", "{bad_toml}"],
}


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports_below_ephemeral(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now, chosen below the kernel's
    ephemeral range so that no outgoing connection takes one meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    rng = random.Random()
    while True:
        base = rng.randrange(10_000, max(low - n, 10_001))
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` from the daemon's HTTP port: the status and the JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def tcp_listeners(port: int) -> set[str]:
    """Addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                ip = ipaddress.ip_address(raw)
                found.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return found


def scan(env: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    """``python -m sidecar scan --json [extra]`` with ``env``: one dict per line (a row, or
    a signal with ``--signals``)."""
    out = subprocess.run([sys.executable, "-m", "sidecar", "scan", "--json", *extra], cwd=REPO, env=env,
                         capture_output=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str,
                     every_s: float = 0.3) -> Any:
    """Await ``check()`` every ``every_s`` until it gives a true value (returned); fail
    naming ``what`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    """``python -m sidecar <args>`` in a subprocess: stderr (its log) goes to ``log_path``,
    stdout to ``log_path`` with the suffix ``.out``; no pipe is left for nobody to read.

    ``wrapper``: a command the daemon runs under (e.g. ``nsenter ...``); ``cwd``: its
    working directory (where it looks for ``.env``; the package must be importable there).
    The HTTP port is ``SIDECAR_HTTP_PORT`` from ``env`` when set, else a free one (then
    written into :attr:`env`); plus ``i`` for shard ``SIDECAR_SHARD=i/N``. Use the ``daemons`` fixture, which kills every daemon it
    started at teardown and adds the log tails to a failed test's report.
    """

    def __init__(self, env: dict[str, str], log_path: Path, args: Sequence[str] = ("run",),
                 wrapper: Sequence[str] = (), cwd: Path = REPO) -> None:
        base = int(env["SIDECAR_HTTP_PORT"]) if "SIDECAR_HTTP_PORT" in env else free_port()
        self.env = dict(env, SIDECAR_HTTP_PORT=str(base))
        #: A shard (``SIDECAR_SHARD=i/N``) listens on the base port + i.
        self.port = base + int(env.get("SIDECAR_SHARD", "0/1").split("/")[0])
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log, open(self.out_path, "ab") as out:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "sidecar", *args], cwd=cwd, env=self.env, stdout=out,
                stderr=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``/ready`` answers 200; fail with the log's tail if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log_tail()}"
            try:
                if http_get(self.port, "/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        """The body of ``/health``."""
        return http_get(self.port, "/health")[1]

    def metrics(self) -> str:
        """The text of ``/metrics``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def log_text(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        """The end of stderr, and of stdout when it wrote any: for failure messages."""
        out = tail(self.out_path, lines)
        return tail(self.log_path, lines) + (f"\n--- stdout ---\n{out}" if out else "")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log records so far (lines that are not JSON are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def messages(self) -> list[str]:
        """The ``msg`` of every JSON log record so far."""
        return [rec.get("msg", "") for rec in self.logs()]

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (if still running), then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Until the log holds ``text``; fail with the log's tail if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log_tail()}"
            time.sleep(0.1)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        """Until ``check()`` is true (an ``OSError`` counts as not yet); fail if the daemon exits."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"daemon exited while waiting for {what}:\n{self.log_tail()}"
            try:
                if check():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"never saw {what}:\n{self.log_tail()}"
            time.sleep(0.1)

    def embedded_redis_pid(self) -> int | None:
        """The pid in the embedded Redis server's pidfile, if the daemon runs one."""
        if "SIDECAR_REDIS_URL" in self.env:
            return None
        try:
            return int((Path(self.env["SIDECAR_DATA_DIR"]) / "redis" / "redis.pid").read_text().strip())
        except (KeyError, OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL if still running, and reap it; then the embedded Redis it leaves
        running (a killed daemon leaves it for the next start to adopt)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        pid = self.embedded_redis_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class RedisServer:
    """A private real redis-server on a unix socket in ``directory``."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.args = args  # extra redis-server options, e.g. "--appendonly", "yes"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start it and wait for its socket."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--dir", str(self.directory), "--save", "",
             "--appendonly", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("test redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no save, no goodbye (a crash or an OOM kill)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def have_redis_binary() -> bool:
    """True when a redis-server binary can be found (bundled or on PATH)."""
    try:
        find_redis_server()
    except Exception:
        return shutil.which("redis-server") is not None
    return True


# -- bars and time ---------------------------------------------------------------------


def bar(t: int = 0, c: float = 100.0, *, symbol: str = "AAPL", tf: str = "1m", o: float | None = None,
        h: float | None = None, l: float | None = None, v: float | None = 10.0, src: str = "test",
        forming: bool = False, synthetic: bool = False) -> Bar:
    """A valid Bar opening at ``t`` (epoch ms) and closing at ``c``.

    ``o`` defaults to ``c``; ``h`` and ``l`` default to one above and one below the
    larger and smaller of ``o`` and ``c``. Every other field can be given by keyword.
    """
    o = c if o is None else o
    h = max(o, c) + 1 if h is None else h
    l = min(o, c) - 1 if l is None else l
    return Bar(symbol, tf, t, o, h, l, c, v, src, forming=forming, synthetic=synthetic)


def ny(text: str) -> int:
    """Epoch ms of a New York wall time (``2024-12-02T09:30``)."""
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("America/New_York")).timestamp() * 1000)


class Clock:
    """A fake clock: epoch seconds that move only when a test moves them.

    The instance is callable, so it can be passed wherever the code takes ``clock=`` (a
    callable returning epoch seconds); :meth:`now` is the same reading.
    """

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    @classmethod
    def from_ms(cls, t_ms: int) -> Clock:
        """A clock reading ``t_ms`` epoch milliseconds."""
        clock = cls()
        clock.t_ms = t_ms
        return clock

    def now(self) -> float:
        """The current reading in epoch seconds."""
        return self.t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        """Move the clock by ``seconds`` (negative: back) and return the new reading."""
        self.t += seconds
        return self.t

    @property
    def t_ms(self) -> float:
        """The reading in epoch milliseconds."""
        return self.t * 1000

    @t_ms.setter
    def t_ms(self, value: float) -> None:
        self.t = value / 1000


# -- a recording for replay ------------------------------------------------------------


def write_recording(path: Path, symbol: str, calendar: MarketCalendar, start_ms: int, end_ms: int,
                    *, tf: str = "1m", seed: int = 11, price: float = 230.0) -> list[Bar]:
    """A recording as ``python -m sidecar fetch`` writes it (JSON lines, oldest first):
    one ``tf`` bar per step of every regular session of ``calendar`` overlapping
    ``[start_ms, end_ms)`` (holidays and early closes as the exchange had them), a seeded
    random walk with the day's U-shaped volume. Returns the bars written."""
    rng = np.random.default_rng(seed)
    tf_ms = Timeframe.parse(tf).ms
    bars: list[Bar] = []
    c = price
    for session in calendar.sessions_between(start_ms, end_ms):
        n = (session.close - session.open) // tf_ms
        for i in range(n):
            o = c
            c = o * float(np.exp(rng.normal(0, 0.0008)))
            wick = abs(float(rng.normal(0, 0.0004)))
            edge = min(i, n - 1 - i) / max(n, 1)  # 0 at the open and the close
            v = float(int(rng.integers(20_000, 60_000) * (1 + 4 * max(0.0, 0.15 - edge) / 0.15)))
            bars.append(Bar(symbol, tf, session.open + i * tf_ms, round(o, 4), round(max(o, c) * (1 + wick), 4),
                            round(min(o, c) * (1 - wick), 4), round(c, 4), v, "yahoo"))
    path.write_text("".join(json.dumps(b.to_json_dict()) + "\n" for b in bars))
    return bars


# -- a scripted source and its series --------------------------------------------------

TF_1S = Timeframe.parse("1s")


class ScriptedSource(Source):
    """Serves a prepared list of bars: each call returns the next step's bars."""

    name = "scripted"

    def __init__(self, steps: list[dict[str, list[Bar]]], fail: bool = False) -> None:
        self.steps = steps
        self.fail = fail
        self.calls = 0

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        self.calls += 1
        if self.fail:
            raise ProviderError("unavailable", "scripted outage", source=self.name)
        step = self.steps.pop(0) if self.steps else {}
        return {s: step.get(s, []) for s in symbols}

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


class Switchable(ScriptedSource):
    """Serves the next bar of each series per call, or fails while ``fail`` is set."""

    def __init__(self, name: str, bars: dict[str, list[Any]], cursor: list[int]) -> None:
        super().__init__([])
        self.name = name
        self.bars = bars
        self.cursor = cursor  # shared: whichever source answers serves the next bar

    async def fetch_latest(self, symbols, tf, now_ms):  # type: ignore[no-untyped-def]
        self.steps = [{s: [self.bars[s][self.cursor[0]]] for s in symbols}]
        result = await super().fetch_latest(symbols, tf, now_ms)
        self.cursor[0] += 1
        return result


def settings(**kw: object) -> Settings:
    """Settings for a pipeline on :class:`ScriptedSource` (symbols AAA and BBB, 1 s bars,
    no outlier or clock-skew checks, no market hours: scripted series trade at any hour
    of the driven clock); keywords replace fields."""
    base = Settings(symbols=("AAA", "BBB"), sources=("scripted",), timeframe=TF_1S, warm_bars=5_000,
                    outlier_k=0.0, clock_skew_ms=10**12, market_hours=False)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def series(symbol: str, n: int, t0: int, seed: int) -> list[Bar]:
    """``n`` one-second bars of a seeded random walk from ``t0``, source ``scripted``."""
    rng = np.random.default_rng(seed)
    c = 50 * np.exp(np.cumsum(rng.normal(0, 0.003, n)))
    o = np.concatenate([[50.0], c[:-1]])
    return [Bar(symbol, "1s", t0 + i * 1000, float(o[i]), float(max(o[i], c[i]) * 1.001),
                float(min(o[i], c[i]) * 0.999), float(c[i]), float(100 + i % 17), "scripted")
            for i in range(n)]



# -- a pipeline on a driven clock ------------------------------------------------------

#: One minute in epoch ms: the usual step of a driven clock.
MINUTE_MS = 60_000


@contextlib.asynccontextmanager
async def fresh_stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, BarStore]]:
    """An emptied ``redis_server`` (prefix ``test``, features that live an hour) and a new
    SQLite store: for a test that runs many examples on one server (hypothesis)."""
    client = connect(redis_server.url)
    await client.flushall()
    redis_store = RedisStore(client, "test", features_ttl_ms=3_600_000)
    with tempfile.TemporaryDirectory() as tmp:
        bar_store = BarStore(Path(tmp) / "bars.sqlite3")
        await bar_store.open()
        try:
            yield redis_store, bar_store
        finally:
            await bar_store.close()
            await redis_store.close()


def lasting_store(redis_store: RedisStore, prefix: str) -> RedisStore:
    """A store on ``redis_store``'s Redis under ``prefix`` whose features maps live an hour
    of wall time (the default TTL is shorter than a test that drives a clock for hours)."""
    return RedisStore(redis_store.redis, prefix, features_ttl_ms=3_600_000)


async def driven_pipeline(store: RedisStore, bar_store: BarStore, source: Source, clock: Clock,
                          tfs: tuple[Timeframe, ...], *, warm: bool = True,
                          symbol_map: SymbolMap | None = None, **fields: object) -> Pipeline:
    """A pipeline of ``source`` on the driven ``clock``: :func:`settings` with base timeframe
    ``tfs[0]``, the others higher, market hours on, ``fields`` replacing more; its meta
    written and, with ``warm``, warmed at the clock's reading (without: the test warms it)."""
    chosen: dict[str, object] = {"timeframe": tfs[0], "higher_timeframes": tfs[1:], "market_hours": True}
    chosen.update(fields)
    pipe = Pipeline(settings(**chosen), [source], store, bar_store, clock=clock, symbol_map=symbol_map)
    await pipe.write_meta()
    if warm:
        await pipe.warm(int(clock.t_ms))
    return pipe


async def cycle_at(pipe: Pipeline, clock: Clock, t_ms: int) -> None:
    """Move the driven ``clock`` to ``t_ms`` and run one cycle there."""
    clock.t_ms = t_ms
    await pipe.run_cycle(t_ms)


async def drive(pipe: Pipeline, clock: Clock, until_ms: int, step_ms: int = MINUTE_MS) -> None:
    """Cycles on the driven ``clock``: while it reads ``until_ms`` or earlier, a cycle at
    its reading, then the clock moves ``step_ms`` on. It ends one step past the last
    cycle (the reading a test that goes on from there starts at)."""
    while clock.t_ms <= until_ms:
        await pipe.run_cycle(int(clock.t_ms))
        clock.advance(step_ms / 1000)


async def recounted_completeness(pipe: Pipeline, source: Source, symbol: str,
                                 now_ms: int) -> dict[str, dict[str, Any]] | None:
    """``symbol``'s completeness report at ``now_ms`` as a restart counts it from SQLite: a
    new pipeline of ``source`` with ``pipe``'s settings, stores and clock."""
    again = Pipeline(pipe.settings, [source], pipe.redis, pipe.store, clock=pipe.clock)
    await recount_completeness(again, pipe.store, symbol, now_ms)
    return again.completeness.report(symbol, now_ms)


#: The bar time of :func:`features` rows.
FEATURES_BAR_T = 1_727_875_800_000


def features(symbol: str, **values: Any) -> dict[str, Any]:
    """A features map as the daemon writes it (1m, fresh), ``values`` replacing fields."""
    now = int(time.time() * 1000)
    row: dict[str, Any] = {
        "symbol": symbol, "tf": "1m", "t": FEATURES_BAR_T, "open": 99.5, "high": 100.5, "low": 99.0,
        "close": 100.0, "v": 10.0, "rsi": 50.0,
        "ema": 100.0, "bb_upper": 105.0, "bb_middle": 100.0, "bb_lower": 95.0, "atr": 1.0,
        "vwap": 100.0, "vol_ma": 10.0, "macd": 0.1, "macd_signal": 0.1, "macd_hist": 0.5,
        "macd_hist_prev": 0.4, "mom": 0.0, "forming": True, "src": "test", "synthetic": False,
        "stale": False, "computed_at": now, "updated_at": now,
    }
    row.update(values)
    return row


def bar_of_features(fmap: dict[str, Any]) -> Bar:
    """The bar a features map describes (its ``t``, ``open`` ... ``v``, flags)."""
    return Bar(fmap["symbol"], fmap["tf"], fmap["t"], fmap["open"], fmap["high"], fmap["low"], fmap["close"],
               fmap["v"], fmap["src"], fmap["forming"], fmap["synthetic"])


async def read_events(resp: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` ``cycle`` events of an SSE response (comments skipped)."""
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    while len(events) < n:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line == "":
            if fields.get("event") == "cycle":
                assert fields["id"] == str(json.loads(fields["data"])["cycle"])
                events.append(json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


# -- several timeframes on a driven clock ----------------------------------------------

def law(symbol: str, tf: str, t: int, parts: list[Bar], forming: bool = False) -> Bar:
    """The aggregation law, written out: first open, max high, min low, last close,
    volumes summed in order (None if any is None)."""
    v: float | None = 0.0
    for b in parts:
        v = None if v is None or b.v is None else v + b.v
    return Bar(symbol, tf, t, parts[0].o, max(b.h for b in parts), min(b.l for b in parts), parts[-1].c,
               v, parts[-1].src, forming, any(b.synthetic for b in parts))


def same(a: Bar, b: Bar) -> bool:
    return (a.t, a.o, a.h, a.l, a.c, a.v, a.forming) == (b.t, b.o, b.h, b.l, b.c, b.v, b.forming)


def assert_features(fmap: dict[str, object], bars: list[Bar]) -> None:
    """``fmap`` (one Redis features map) equals TA-Lib batch over ``bars``' last row."""
    expected = batch_values(bars)
    for name in FEATURE_FIELDS:
        want = expected[name][-1]
        got = fmap[name]
        if np.isnan(want):
            assert got is None, f"{bars[-1].tf} {name}: expected null, got {got}"
        else:
            assert got == want, f"{bars[-1].tf} {name}: {got!r} != batch {want!r}"


class MinuteFeed(Source):
    """Serves prepared 1m bars: the two minutes before ``now`` closed, the current one
    forming (a partial version of it), and each correction once."""

    name = "feed"

    def __init__(self, bars: dict[str, dict[int, Bar]]) -> None:
        self.bars = bars
        self.extra: dict[str, list[Bar]] = {}

    def correct(self, symbol: str, t: int, dc: float) -> None:
        old = self.bars[symbol][t]
        c = old.c + dc
        new = dataclasses.replace(old, c=c, h=max(old.h, c), l=min(old.l, c), v=None if old.v is None
                                  else old.v + 1.25)
        self.bars[symbol][t] = new
        self.extra.setdefault(symbol, []).append(new)

    async def fetch_latest(self, symbols: Sequence[str], tf: Timeframe, now_ms: int) -> LatestResult:
        current = now_ms - now_ms % MINUTE_MS
        out: LatestResult = {}
        for sym in symbols:
            own = self.bars.get(sym, {})
            rows = [own[t] for t in (current - 2 * MINUTE_MS, current - MINUTE_MS) if t in own]
            rows = sorted(self.extra.pop(sym, []) + rows, key=lambda b: b.t)
            if current in own:
                b = own[current]
                mid = (b.o + b.c) / 2
                rows.append(dataclasses.replace(b, h=max(b.o, mid), l=min(b.o, mid), c=mid,
                                                v=None if b.v is None else b.v / 2, forming=True))
            out[sym] = rows
        return out

    async def fetch_history(self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int) -> list[Bar]:
        return []


def walk(symbol: str, ts: list[int], seed: int, volume: bool = True) -> dict[int, Bar]:
    rng = np.random.default_rng(seed)
    c = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, len(ts))))
    o = np.concatenate([[100.0], c[:-1]])
    vols = rng.uniform(1, 5_000, len(ts))
    return {t: Bar(symbol, "1m", t, float(o[i]), float(max(o[i], c[i]) * 1.0007),
                   float(min(o[i], c[i]) * 0.9993), float(c[i]), float(vols[i]) if volume else None, "feed")
            for i, t in enumerate(ts)}


async def features_of(pipe: Pipeline, symbol: str, tf: str) -> dict[str, object]:
    raw = await pipe.redis.redis.get(pipe.redis.keys.features(tf, symbol))
    assert raw is not None, (symbol, tf)
    return dict(msgpack.unpackb(raw))


async def check_live(pipe: Pipeline, symbol: str) -> None:
    """Every timeframe's features in Redis equal batch over its Redis bars (closed, then
    the one the features are of). The base's forming bar is in its sorted set; a higher
    forming bar is only in its features map."""
    for tf in pipe.timeframes:
        fmap = await features_of(pipe, symbol, tf.name)
        bars = await pipe.redis.recent_bars(symbol, tf.name, 100_000)
        closed = [b for b in bars if not b.forming and b.t < int(fmap["t"])]  # type: ignore[call-overload]
        newest = [b for b in bars if b.t == fmap["t"]]
        if tf == pipe.timeframes[0] or not fmap["forming"]:
            assert newest and newest[0].forming == fmap["forming"], (tf.name, fmap["t"])
            assert same(newest[0], bar_of_features(fmap)), (tf.name, newest[0], fmap)
        else:
            assert not newest, (tf.name, newest)
        assert_features(fmap, [*closed, bar_of_features(fmap)])


async def check_forming(pipe: Pipeline, symbol: str) -> int:
    """Each higher forming bar (its features map) equals the law over its bucket's
    closed 1m bars in Redis plus the forming 1m bar; returns how many were compared."""
    n = 0
    base = await pipe.redis.recent_bars(symbol, "1m", 100_000)
    forming = [b for b in base if b.forming]
    closed = [b for b in base if not b.forming]
    for ser in pipe.symbols[symbol].higher:
        fmap = await features_of(pipe, symbol, ser.tf.name)
        if not fmap["forming"]:
            continue
        assert ser.grid is not None
        bucket = ser.grid.bucket(max(b.t for b in forming or closed))
        parts = [b for b in closed if ser.grid.bucket(b.t).t == bucket.t] + forming[-1:]
        want = law(symbol, ser.tf.name, bucket.t, parts, forming=True)
        assert same(bar_of_features(fmap), want), (ser.tf.name, fmap, want)
        n += 1
    return n


# -- the reference feature series ------------------------------------------------------

FEATURES_TF_MS = 60_000
FEATURES_T0 = 1_727_827_200_000 + 13 * 3_600_000  # a UTC day, mid-morning: sessions roll over inside


def make_series(n: int, seed: int = 7, volume: bool = True, t0: int = FEATURES_T0) -> list[Bar]:
    """``n`` minute bars of symbol TEST from ``t0``: a seeded random walk."""
    rng = np.random.default_rng(seed)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    opens = np.concatenate([[100.0], closes[:-1]])
    highs = np.maximum(opens, closes) * (1 + rng.uniform(0, 0.002, n))
    lows = np.minimum(opens, closes) * (1 - rng.uniform(0, 0.002, n))
    vols = rng.integers(1, 5_000, n).astype(float)
    return [
        Bar("TEST", "1m", t0 + i * FEATURES_TF_MS, float(opens[i]), float(highs[i]),
            float(lows[i]), float(closes[i]), float(vols[i]) if volume else None, "test")
        for i in range(n)
    ]


def batch_values(bars: list[Bar], anchor_min: int = 0,
                 periods: IndicatorPeriods = IndicatorPeriods()) -> dict[str, np.ndarray]:  # noqa: B008
    """Every feature of ``bars`` by TA-Lib's batch functions (NaN during warm-up). The
    volume indicators run over each unbroken run of bars with volume (a bar without
    volume restarts them), VWAP per session."""
    p = periods
    h = np.array([b.h for b in bars])
    l = np.array([b.l for b in bars])
    c = np.array([b.c for b in bars])
    out: dict[str, np.ndarray] = {
        "rsi": talib.RSI(c, p.rsi), "ema": talib.EMA(c, p.ema), "atr": talib.ATR(h, l, c, p.atr),
        "mom": talib.MOM(c, p.mom),
    }
    out["bb_upper"], out["bb_middle"], out["bb_lower"] = talib.BBANDS(c, p.bb, p.bb_nbdev, p.bb_nbdev)
    out["macd"], out["macd_signal"], out["macd_hist"] = talib.MACD(c, p.macd_fast, p.macd_slow, p.macd_signal)
    n = len(bars)
    out["vol_ma"] = np.full(n, np.nan)
    out["vwap"] = np.full(n, np.nan)
    i = 0
    while i < n:
        if bars[i].v is None:
            i += 1
            continue
        j = i
        while j < n and bars[j].v is not None:
            j += 1
        v = np.array([b.v for b in bars[i:j]], dtype=float)
        out["vol_ma"][i:j] = talib.SMA(v, p.vol_ma)
        sessions = np.array([session_of(b.t, anchor_min * 60_000) for b in bars[i:j]])
        for s in np.unique(sessions):
            idx = np.nonzero(sessions == s)[0]
            out["vwap"][i + idx] = talib.VWAP(h[i + idx], l[i + idx], c[i + idx], v[idx])
        i = j
    return out


def assert_row_equal(values: list[float | None], expected: dict[str, np.ndarray], i: int) -> None:
    """Row ``i`` of streamed feature values is bit-identical to the batch (null where NaN)."""
    for name, got in zip(FEATURE_FIELDS, values, strict=True):
        want = expected[name][i]
        if np.isnan(want):
            assert got is None, f"{name}[{i}]: expected null during warm-up, got {got}"
        else:
            assert got == want, f"{name}[{i}]: {got!r} != batch {want!r}"  # bit-identical


# -- a local Redis Cluster -------------------------------------------------------------

#: Debian's redis-server and redis-cli (scripts/system-deps): the cluster needs both.
SYSTEM_REDIS_SERVER = "/usr/bin/redis-server"
SYSTEM_REDIS_CLI = "/usr/bin/redis-cli"


def have_cluster_binaries() -> bool:
    """True when the redis-server and redis-cli a local cluster needs are installed."""
    return all(os.access(p, os.X_OK) for p in (SYSTEM_REDIS_SERVER, SYSTEM_REDIS_CLI))


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port + 10_000 > 65_535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port


def _serving_master(flags: str) -> bool:
    """Whether ``CLUSTER NODES`` flags name a master not failed (nor suspected to be)."""
    names = flags.split(",")
    return "master" in names and "fail" not in names and "fail?" not in names


class LocalCluster:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters with ``replicas`` replicas
    each, one ``redis-server --cluster-enabled yes`` per node on free ports, joined by
    ``redis-cli --cluster create``. :meth:`start` returns once every node says
    ``cluster_state:ok`` and every replica has finished its first sync."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.masters = masters
        self.replicas = replicas
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``redis://`` of the first node: any node will do."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def cli(self, port: int, *args: str, timeout: float = 10) -> str:
        """``redis-cli -p port args...``: its stdout."""
        out = subprocess.run([SYSTEM_REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
                             capture_output=True, timeout=timeout, check=True)
        return out.stdout.decode()

    def start_node(self, port: int) -> None:
        """Start (or restart, from its nodes file) the node on ``port``."""
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [SYSTEM_REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.cli(port, "PING").strip() == "PONG":
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline or self.procs[port].poll() is not None:
                raise RuntimeError(f"cluster node on port {port} did not start")
            time.sleep(0.05)

    def start(self, timeout: float = 60) -> None:
        self.ports = []
        while len(self.ports) < self.masters * (1 + self.replicas):
            port = _free_cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        for port in self.ports:
            self.start_node(port)
        subprocess.run([SYSTEM_REDIS_CLI, "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       capture_output=True, timeout=60, check=True)
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every running node says ``cluster_state:ok`` and agrees on the masters,
        and every replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._ok():
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local cluster never reached cluster_state:ok")
            time.sleep(0.1)

    def _ok(self) -> bool:
        running = [p for p in self.ports if self.procs[p].poll() is None]
        for port in running:
            if "cluster_state:ok" not in self.cli(port, "CLUSTER", "INFO"):
                return False
            if len(self.master_ports(port)) != self.masters:
                return False
            info = self.cli(port, "INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def master_ports(self, via: int | None = None) -> list[int]:
        """The ports of the masters that serve slots, as node ``via`` (or the first
        running node) sees them."""
        out = []
        via = via or next(p for p in self.ports if self.procs[p].poll() is None)
        for line in self.cli(via, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if _serving_master(fields[2]) and len(fields) > 8:
                out.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)

    def master_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot`` (as the first running node sees it)."""
        via = next(p for p in self.ports if self.procs[p].poll() is None)
        for line in self.cli(via, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if not _serving_master(fields[2]):
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(slot)

    def wait_failover(self, dead: int, slot: int, timeout: float = 60) -> int:
        """Until a replica took over ``slot`` from the killed master on port ``dead`` and
        the cluster is whole again (:meth:`wait_ok`); returns the new master's port."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                running = [p for p in self.ports if self.procs[p].poll() is None]
                if all(dead not in self.master_ports(p) for p in running):
                    port = self.master_of_slot(slot)
                    if port != dead:
                        self.wait_ok(timeout)
                        return port
            except (subprocess.SubprocessError, LookupError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from the master on port {dead}")
            time.sleep(0.05)

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on port ``master``."""
        lines = [line.split() for line in self.cli(master, "CLUSTER", "NODES").splitlines()]
        master_id = next(f[0] for f in lines if "myself" in f[2])
        return next(int(f[1].split("@")[0].rsplit(":", 1)[1]) for f in lines if f[3] == master_id)

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash)."""
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def flush(self) -> None:
        """Empty every master."""
        for port in self.master_ports():
            self.cli(port, "FLUSHALL")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
