"""What the daemon must not let in: keys out of every output, hostile symbols out of keys
and SQL, state changes through HTTP, listeners beyond 127.0.0.1 unless asked."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.sources.base import Source
from sidecar.tests.fake_providers import FakeProviders, Reply, fake, fixture  # noqa: F401
from sidecar.tests.helpers import REPO, RedisServer, free_port

KEYS = {
    "ALPHAVANTAGE_API_KEY": "AVk3yQ7zz91xq",
    "TWELVEDATA_API_KEY": "TDk3yQ7zz92xq",
    "POLYGON_API_KEY": "PGk3yQ7zz93xq",
}


def leaks(text: str | bytes) -> list[str]:
    """Every key, or a 6-character start or end of one, found in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    found = []
    for key in KEYS.values():
        for part in (key, key[:6], key[-6:]):
            if part.encode() in data:
                found.append(part)
    return found


def echo_errors(fake: FakeProviders) -> None:
    """Every endpoint answers errors that quote the request's URL and Authorization header."""
    fake.push("av",
              Reply(body=b'{"Error Message": "Invalid API call for {url}"}', echo=True),
              Reply(body=b'{"Information": "premium endpoint; you asked {url}"}', echo=True),
              Reply(status=500, body=b"upstream failed for {url}", echo=True, content_type="text/plain"),
              Reply(body=b"not json {url}", echo=True, content_type="text/plain"))
    fake.default["av"] = Reply(body=b'{"Note": "call frequency exceeded for {url}"}', echo=True)
    fake.push("td",
              Reply(status=401, body=b'{"code": 401, "message": "**apikey** {authorization} is incorrect '
                                     b'({url})", "status": "error"}', echo=True),
              Reply(status=500, body=b"<html>{authorization} {url}</html>", echo=True,
                    content_type="text/html"),
              Reply(body=b'{"code": 400, "message": "**symbol** not found {authorization}", '
                         b'"status": "error"}', echo=True))
    fake.default["td"] = Reply(status=429, body=b'{"code": 429, "message": "run out of API credits '
                                                 b'{authorization}", "status": "error"}', echo=True)
    fake.push("polygon",
              Reply(status=401, body=b'{"status": "ERROR", "error": "Unknown API Key {authorization} '
                                     b'for {url}"}', echo=True),
              Reply(status=403, body=b'{"status": "NOT_AUTHORIZED", "message": "plan {authorization}"}',
                    echo=True),
              Reply(body=b"{authorization} {url}", echo=True, content_type="text/plain"))
    fake.default["polygon"] = Reply(status=503, body=b"down {authorization} {url}", echo=True,
                                    content_type="text/plain")


def provider_env(clean_env: dict[str, str], fake: FakeProviders) -> dict[str, str]:
    return dict(clean_env, **KEYS,
                SIDECAR_ALPHAVANTAGE_BASE_URL=fake.base_url, SIDECAR_TWELVEDATA_BASE_URL=fake.base_url,
                SIDECAR_POLYGON_BASE_URL=fake.base_url, SIDECAR_YAHOO_BASE_URL=fake.base_url,
                SIDECAR_YAHOO_STREAM="0", SIDECAR_LOG_LEVEL="debug", SIDECAR_HTTP_TIMEOUT_S="2")


async def run(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_keys_never_appear_in_any_output(fake: FakeProviders, clean_env: dict[str, str],
                                               redis_server: RedisServer, tmp_path: Path) -> None:
    """A full daemon run and ``fetch`` through each keyed provider, against providers that
    echo the request into their errors: no key in stdout, stderr, files, or HTTP bodies."""
    echo_errors(fake)
    port = free_port()
    env = provider_env(clean_env, fake)
    env.update(SIDECAR_SOURCES="alphavantage,twelvedata,polygon,sim", SIDECAR_SYMBOLS="AAPL,EURUSD",
               SIDECAR_HTTP_PORT=str(port), SIDECAR_BOOTSTRAP_DAYS="1", SIDECAR_WARM_BARS="50",
               SIDECAR_BREAKER_RESET_S="1", SIDECAR_FETCH_TIMEOUT_S="3",
               SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX="keys")
    # Files, not pipes: a debug log fills a pipe nobody reads and blocks the daemon.
    out_file, err_file = tmp_path / "daemon.out", tmp_path / "daemon.err"
    with out_file.open("wb") as out_fh, err_file.open("wb") as err_fh:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", "run", cwd=REPO,
                                                    env=env, stdout=out_fh, stderr=err_fh)
    bodies: list[bytes] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            deadline = time.monotonic() + 40
            cycles = 0
            while time.monotonic() < deadline and cycles < 6:
                await asyncio.sleep(0.5)
                assert proc.returncode is None
                for path in ("/health", "/metrics", "/ready"):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                            bodies.append(await resp.read())
                            if path == "/health":
                                cycles = json.loads(bodies[-1])["cycle"]["count"]
                    except aiohttp.ClientConnectionError:
                        pass
            assert cycles >= 6, "the daemon did not run its cycles"
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = out_file.read_bytes(), err_file.read_bytes()
    assert proc.returncode == 0, err.decode()[-2000:]
    outputs: dict[str, bytes] = {"daemon stdout": out, "daemon stderr": err, "http": b"\n".join(bodies)}
    health = json.loads(next(b for b in reversed(bodies) if b.startswith(b'{"status"')))
    assert {"alphavantage", "twelvedata", "polygon"} <= set(health["sources"])
    # The providers really were asked, with the keys, and answered with echoes.
    seen = [s.url + json.dumps(s.headers) for s in fake.seen]
    assert sum(bool(leaks(s)) for s in seen) >= 3

    for source, symbol in (("alphavantage", "AAPL"), ("twelvedata", "EURUSD"), ("polygon", "AAPL"),
                           ("alphavantage", "EURUSD"), ("twelvedata", "AAPL"), ("polygon", "C:EURUSD"),
                           ("twelvedata", "MSFT")):
        code, out, err = await run(["fetch", source, symbol, "--timeframe", "1m"], env)
        assert code != 0, (source, err)
        outputs[f"fetch {source} {symbol}"] = out + err
    # And a successful fetch prints bars, not keys.
    fake.push("polygon", Reply.fixture("polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json"))
    code, out, err = await run(["fetch", "polygon", "AAPL", "--timeframe", "1d", "--start", "2023-01-01",
                                "--end", "2023-01-10"], env)
    assert code == 0 and out.count(b"\n") >= 5, err
    outputs["fetch ok"] = out + err

    for path in Path(env["SIDECAR_DATA_DIR"]).rglob("*"):
        if path.is_file():
            outputs[str(path)] = path.read_bytes()
    found = {name: leaks(data) for name, data in outputs.items() if leaks(data)}
    assert found == {}, found
    # The errors did reach the outputs (redacted), so the check had something to look at.
    everything = b"".join(outputs.values())
    assert b"***" in everything and b"Invalid API call" in everything


# -- HTTP: loopback by default, read-only ------------------------------------------------
HOSTILE = ["A:B", "*", "../x", "x' OR 1=1", "x'); DROP TABLE bars;--", "{x}", "A B", "A\nB", "AAPL\n",
           "\u00c4PPLE", "\U0001f4c8", "X" * 300, "", "sidecar:v1:heartbeat", "a\\b", "%s", "?"]


def test_http_defaults_to_loopback() -> None:
    from sidecar.settings import Settings

    assert Settings().http_host == "127.0.0.1"
    assert Settings.from_env({}).http_host == "127.0.0.1"


async def _pipeline(redis_store: Any, bar_store: Any, symbols: tuple[str, ...] = ("AAPL", "EURUSD"),
                    sources: list[Any] | None = None) -> Any:
    import dataclasses

    from sidecar.app.pipeline import Pipeline
    from sidecar.settings import Settings
    from sidecar.sources.sim import SimSource
    from sidecar.timeframe import Timeframe

    settings = dataclasses.replace(Settings(), symbols=symbols, sources=("sim",),
                                   timeframe=Timeframe.parse("1s"), outlier_k=0.0,
                                   market_hours=False)  # on the wall clock: any hour of the week
    return Pipeline(settings, sources or [SimSource(seed=1)], redis_store, bar_store)


def _api(redis_store: Any) -> Any:
    """The read API on the test's Redis (its own scanner, not closed: the store owns the pool)."""
    from sidecar.app.api import ReadApi
    from sidecar.scanner import Scanner
    from sidecar.signals import SignalRules

    return ReadApi(Scanner(redis_store.redis, "test", "1s"), ("AAPL", "EURUSD"), SignalRules())


async def _state(pipeline: Any) -> Any:
    """Everything a request could change: counters, buffers, every Redis key and value, SQLite."""
    r = pipeline.redis.redis
    keys = {}
    for key in sorted(await r.keys("*")):
        kind = (await r.type(key)).decode()
        if kind == "zset":
            keys[key] = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            keys[key] = await r.get(key)
        else:
            keys[key] = kind
    v = pipeline.validator
    return (keys, await pipeline.store.count(), pipeline.store.buffered, pipeline.store.flushed_rows,
            pipeline.stats.cycles, v.accepted, dict(v.rejected), v.duplicates, v.held,
            {n: (st.base.forming, st.base.last) for n, st in pipeline.symbols.items()})


async def test_no_endpoint_changes_state(redis_store: Any, bar_store: Any) -> None:
    """Every route the app serves refuses POST/PUT/PATCH/DELETE (405), and GET/HEAD leave
    the pipeline, Redis and SQLite exactly as they were."""
    from sidecar.app.http import DaemonView, start_http
    from sidecar.app.ticker import SecondTicker

    pipeline = await _pipeline(redis_store, bar_store)
    for i in range(3):
        await pipeline.run_cycle(int(time.time() * 1000) + i)
    view = DaemonView(pipeline, SecondTicker(), ready=True)
    runner = await start_http(view, "127.0.0.1", 0, _api(redis_store))
    try:
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1"
        paths = sorted({r.resource.canonical for r in runner.app.router.routes() if r.resource})
        assert {"/health", "/ready", "/metrics", "/v1/features", "/v1/signals", "/v1/stream"} <= set(paths)
        before = await _state(pipeline)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for path in [*paths, "/", "/health/", "/admin", "/flush", "/../etc/passwd"]:
                url = f"http://127.0.0.1:{port}{path}"
                for method in ("POST", "PUT", "PATCH", "DELETE"):
                    async with http.request(method, url, data=b'{"status": "ok"}') as resp:
                        assert resp.status in (404, 405), (method, path, resp.status)
                        if path in paths:
                            assert resp.status == 405, (method, path)
                for _ in range(3):
                    for method in ("GET", "HEAD") if path != "/v1/stream" else ("HEAD",):
                        async with http.request(method, url) as resp:
                            await resp.read()
                            assert resp.status in (200, 400, 404, 503), (method, path, resp.status)
        assert await _state(pipeline) == before
    finally:
        await runner.cleanup()
        await pipeline.drain()


async def test_binding_elsewhere_is_explicit_and_warned(redis_store: Any, bar_store: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.app.daemon import _listen
    from sidecar.app.http import DaemonView
    from sidecar.app.ticker import SecondTicker
    from sidecar.settings import Settings

    view = DaemonView(await _pipeline(redis_store, bar_store), SecondTicker())
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        settings = Settings(http_host=host, http_port=0, http_token="t" * 16)
        runner = await _listen(view, settings, _api(redis_store))
        try:
            assert runner.addresses[0][0] == host
        finally:
            await runner.cleanup()
        assert any("beyond this machine" in r.getMessage() for r in caplog.records) is warned


# -- hostile symbols ------------------------------------------------------------------
@pytest.mark.parametrize("symbol", HOSTILE)
def test_hostile_symbols_refused_by_config_and_by_keys(symbol: str) -> None:
    from sidecar.errors import ConfigError
    from sidecar.redis_store import Keys
    from sidecar.settings import Settings

    if symbol.strip() in ("", "AAPL"):  # surrounding whitespace is trimmed: what is left is safe
        assert Settings.from_env({"SIDECAR_SYMBOLS": f"AAPL,{symbol}"}).symbols == ("AAPL",)
    else:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"SIDECAR_SYMBOLS": f"AAPL,{symbol}"})
        assert info.value.setting == "SIDECAR_SYMBOLS"
    with pytest.raises(ValueError):
        Keys("sidecar").bars("1m", symbol)
    with pytest.raises(ValueError):
        Keys("sidecar").features("1m", symbol)


@pytest.mark.parametrize("prefix", ["a:b", "*", "{x}", "../x", "x y", "p\nq", "p\r\n*"])
def test_hostile_prefix_refused(prefix: str) -> None:
    from sidecar.errors import ConfigError
    from sidecar.settings import Settings

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SIDECAR_REDIS_PREFIX": prefix})
    assert info.value.setting == "SIDECAR_REDIS_PREFIX"


def test_scan_refuses_hostile_symbols(clean_env: dict[str, str]) -> None:
    import subprocess

    for symbols in ("AAPL,A:B", "*", "x' OR 1=1"):
        out = subprocess.run([sys.executable, "-m", "sidecar", "scan", "--symbols", symbols], cwd=REPO,
                             env=clean_env, capture_output=True, timeout=30)
        assert out.returncode == 2 and "--symbols" in out.stderr.decode(), out.stderr


async def test_sqlite_takes_hostile_text_as_data(bar_store: Any) -> None:
    """Parameterized SQL: hostile strings are stored and found as themselves, nothing else."""
    from sidecar.bar import Bar

    bars = [Bar(sym, "1m", 60_000 * (i + 1), 1.0, 2.0, 0.5, 1.5, 1.0, sym or "src")
            for i, sym in enumerate(HOSTILE)]
    bar_store.add(bars)
    assert await bar_store.flush() == len(HOSTILE)
    for bar in bars:
        got = await bar_store.bars_between(bar.symbol, "1m", 0, 2**62)
        assert [(b.symbol, b.t, b.src) for b in got] == [(bar.symbol, bar.t, bar.src)]
        assert await bar_store.count(bar.symbol) == 1
    assert await bar_store.count() == len(HOSTILE)
    await bar_store.delete_older_than(0)
    async with bar_store.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name") as cur:
        assert [r[0] for r in await cur.fetchall()] == ["bars", "gaps", "meta"]


def test_sql_is_never_built_from_values() -> None:
    """The only text interpolated into SQL anywhere in the package is a column list constant."""
    import ast

    for path in (REPO / "sidecar").rglob("*.py"):
        if "tests" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if any(w in text.upper() for w in ("SELECT ", "INSERT ", "DELETE ", "UPDATE ", " WHERE ")):
                    names = [ast.unparse(v.value) for v in node.values if isinstance(v, ast.FormattedValue)]
                    assert set(names) <= {"_COLUMNS"}, (path, ast.unparse(node))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and isinstance(side.value, str) and any(
                            w in side.value.upper() for w in ("SELECT ", "INSERT ", "DELETE ", "UPDATE ")):
                        raise AssertionError(f"{path}: SQL built with an operator: {ast.unparse(node)}")


class _Mislabelling(Source):
    """A source whose bars carry hostile symbols (as a hostile provider body could)."""

    name = "hostile"
    max_batch = 100

    async def fetch_latest(self, symbols: Any, tf: Any, now_ms: int) -> dict[str, Any]:
        from sidecar.bar import Bar

        t = tf.floor(now_ms) - tf.ms
        return {s: [Bar(h, tf.name, t, 1.0, 1.0, 1.0, 1.0, 1.0, "hostile") for h in HOSTILE]
                + [Bar(s, tf.name, t, 1.0, 1.0, 1.0, 1.0, 1.0, "hostile")] for s in symbols}

    async def fetch_history(self, *args: Any) -> list[Any]:
        return []


async def test_hostile_symbols_from_a_source_never_reach_keys_or_rows(redis_store: Any,
                                                                      bar_store: Any) -> None:
    pipeline = await _pipeline(redis_store, bar_store, sources=[_Mislabelling()])
    for i in range(2):
        await pipeline.run_cycle(int(time.time() * 1000) + i)
    await bar_store.flush()
    assert pipeline.validator.rejected["wrong_symbol"] == 2 * 2 * len(HOSTILE)
    keys = sorted(k.decode() for k in await redis_store.redis.keys("*"))
    assert keys == ["test:v1:bars:1s:AAPL", "test:v1:bars:1s:EURUSD", "test:v1:feat:1s:AAPL",
                    "test:v1:feat:1s:EURUSD", "test:v1:heartbeat"]
    async with bar_store.db.execute("SELECT DISTINCT symbol FROM bars ORDER BY symbol") as cur:
        assert [r[0] for r in await cur.fetchall()] == ["AAPL", "EURUSD"]


async def test_hostile_replay_file_is_refused_at_start(clean_env: dict[str, str], tmp_path: Path) -> None:
    record = tmp_path / "rec.jsonl"
    record.write_text(json.dumps({"symbol": "x' OR 1=1", "tf": "1m", "t": 60_000, "o": 1, "h": 1, "l": 1,
                                  "c": 1, "v": 1, "src": "yahoo"}) + "\n")
    env = dict(clean_env, SIDECAR_SOURCES="replay", SIDECAR_REPLAY_FILE=str(record), SIDECAR_SYMBOLS="AAPL",
               SIDECAR_HTTP_PORT=str(free_port()))
    code, _, err = await run(["run"], env)
    assert code == 2 and b"SIDECAR_REPLAY_FILE" in err and b"not a canonical symbol" in err, err


def test_hostile_names_inside_provider_bodies_label_nothing() -> None:
    """Bars are labelled with the symbol asked for, never with a name found in a body."""
    from sidecar.sources._parsing import ParseContext
    from sidecar.sources.polygon import parse_aggs
    from sidecar.sources.twelvedata import parse_batch
    from sidecar.timeframe import Timeframe

    tf = Timeframe.parse("1d")
    body = json.loads(fixture("twelvedata/time_series_batch_fx_USD-CZK_EUR_GBP_CHF_1day_2023-08.json"))
    first = next(iter(body))
    for hostile in HOSTILE:
        body[hostile] = dict(body[first], meta=dict(body[first]["meta"], symbol=hostile))
    out = parse_batch(json.dumps(body), 200, {first: ParseContext("USDCZK", tf, "twelvedata", 2 * 10**12)})
    assert list(out) == [first] and {b.symbol for b in out[first]} == {"USDCZK"}  # type: ignore[union-attr]
    aggs = json.loads(fixture("polygon/openbb_aggs_AAPL_1day_2023-01-01_2023-01-10.json"))
    aggs["ticker"] = "x' OR 1=1"
    for row in aggs["results"]:
        row["T"] = "A:B"
    bars, _ = parse_aggs(json.dumps(aggs), 200, ParseContext("AAPL", tf, "polygon", 2 * 10**12))
    assert bars and {b.symbol for b in bars} == {"AAPL"}
