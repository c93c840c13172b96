"""Start-up time: cold start and warm restart of the daemon at a given number of symbols.

``python -m sidecar run`` on ``sim`` (1-minute bars, its default history: the days
of the 5,000-bar warm window) with its embedded Redis, first on an empty data
directory (cold: every symbol's warm window is fetched), then again on the same
directory once the first run stopped (warm: the stores are full). For each run,
seconds from launch until ``/ready`` answers 200, until every symbol has fresh
features, and until every symbol's handles are open on the warm window
(``/health`` ``warmup.done``), plus the cycles' missed ticks by then, MiB the
daemon and its Redis wrote, the CPU seconds they used, and the cycle's p50/p99 while
warm-up ran against the same run's idle cycles (``--idle`` seconds after warm-up). Results are written
after every size, so a stopped run keeps what it measured.

    .venv/bin/python -m bench.startup [--symbols 500,2000] [--idle 30] [--kinds cold,warm] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import cli, percentile, table, terminate, write_results

NAME = "startup"
REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.1
#: /health is large at thousands of symbols: asked about once a second.
HEALTH_POLL_S = 1.0
GIVE_UP_S = 900.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return exc.code, dict(json.loads(exc.read()))
    except OSError:
        return None


def _family(pid: int) -> list[int]:
    """The daemon and its children (the embedded Redis)."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        pass
    return pids


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the daemon and its children used so far."""
    total = 0
    for p in _family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _write_bytes(pid: int) -> int:
    """Bytes the daemon and its children (the embedded Redis) wrote to storage so far."""
    total = 0
    for p in _family(pid):
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _cycles(h: dict[str, Any], into: dict[int, float]) -> None:
    """Each cycle's duration by its number, from ``/health``'s recent durations."""
    c = h["cycle"]
    recent = c["recent_ms"]
    for j, ms in enumerate(recent):
        into[c["count"] - len(recent) + 1 + j] = ms


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 1),
            "p99_ms": round(percentile(values, 99), 1)}


def one_start(data: str, symbols: int, idle_s: float) -> dict[str, Any]:
    """Launch the daemon on ``data``, time its milestones, watch ``idle_s`` more seconds
    of cycles once warm-up is done, stop it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
    env.update(SIDECAR_DATA_DIR=data, SIDECAR_LOG_FORMAT="json", SIDECAR_SOURCES="sim",
               SIDECAR_SYMBOLS=",".join(f"S{i:04d}" for i in range(symbols)),
               SIDECAR_TIMEFRAME="1m", SIDECAR_HTTP_PORT=str(port))
    before = _dir_bytes(data)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"ready_s": None, "fresh_s": None, "warm_s": None}
    durations: dict[int, float] = {}
    warm_cycle: int | None = None
    idle_until: float | None = None
    try:
        while idle_until is None or time.perf_counter() < idle_until:
            elapsed = time.perf_counter() - started
            if proc.poll() is not None or elapsed > GIVE_UP_S:
                raise RuntimeError(f"the daemon gave no answer in time (exit {proc.poll()})")
            if out["ready_s"] is None:
                got = _get(port, "/ready")
                if got is not None and got[0] == 200:
                    out["ready_s"] = round(elapsed, 2)
                time.sleep(POLL_S)
                continue
            got = _get(port, "/health")
            if got is not None:
                h = got[1]
                _cycles(h, durations)
                if out["fresh_s"] is None and all(
                        not s["stale"] and s["newest_bar_t"] is not None for s in h["symbols"].values()):
                    out["fresh_s"] = round(elapsed, 2)
                w = h["warmup"]
                out["warm_symbols"] = w["live"]
                if warm_cycle is None and w["done"]:
                    warm_cycle = h["cycle"]["count"]
                    idle_until = time.perf_counter() + idle_s
                    out["warm_s"] = round(elapsed, 2)
                    out["fresh_s"] = out["fresh_s"] or out["warm_s"]
                    out["missed_ticks"] = h["cycle"]["missed_ticks"]
                    out["cycles"] = warm_cycle
                    out["history_bars"] = w["history_bars"]
                    out["cold_symbols"] = w["cold"]
                    out["failed"] = w.get("failed")
                    out["write_mb"] = round(_write_bytes(proc.pid) / 2**20, 1)
                    out["cpu_s"] = round(_cpu_s(proc.pid), 1)
                    out["load_avg"] = round(os.getloadavg()[0], 2)
                out["missed_ticks_end"] = h["cycle"]["missed_ticks"]
            time.sleep(HEALTH_POLL_S)
    finally:
        terminate(proc, 120)
    out["data_dir_mb_added"] = round((_dir_bytes(data) - before) / 2**20, 1)
    assert warm_cycle is not None
    out["cycle_warming"] = _pcts([ms for c, ms in durations.items() if c <= warm_cycle])
    out["cycle_idle"] = _pcts([ms for c, ms in durations.items() if c > warm_cycle + 2])
    return out


def measure(symbols: int, idle_s: float, kinds: Sequence[str], keep: str | None = None) -> dict[str, Any]:
    """``keep``: the data directory to use and keep (a ``warm`` run alone restarts on
    what an earlier run left there), else a temporary one."""
    with tempfile.TemporaryDirectory(prefix="sidecar-startup-") as tmp:
        data = tmp if keep is None else f"{keep}/{symbols}"
        Path(data).mkdir(parents=True, exist_ok=True)
        got: dict[str, Any] = {"symbols": symbols}
        for kind in kinds:
            got[kind] = one_start(data, symbols, idle_s)
            print(kind, symbols, json.dumps(got[kind]), flush=True)
    return got


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    counts = [20] if smoke else [int(x) for x in args.symbols.split(",")]
    idle_s = 3.0 if smoke else args.idle
    kinds = ("cold", "warm") if smoke else tuple(args.kinds.split(","))
    runs: list[dict[str, Any]] = []
    for n in counts:
        runs.append(measure(n, idle_s, kinds, None if smoke else args.data))
        # A stopped run keeps what it measured: the results so far, after every size.
        write_results(NAME, {"runs": runs, "partial": True}, args.out)
    return {"runs": runs}


def render(r: dict[str, Any]) -> str:
    rows = []
    for m in r["runs"]:
        for kind in ("cold", "warm"):
            x = m.get(kind)
            if x is None:
                continue
            rows.append([m["symbols"], kind, x["ready_s"], x["fresh_s"], x["warm_s"],
                         x.get("history_bars"), x.get("missed_ticks"), x.get("write_mb"), x.get("cpu_s"),
                         x["cycle_warming"]["p50_ms"], x["cycle_warming"]["p99_ms"],
                         x["cycle_idle"]["p50_ms"], x["cycle_idle"]["p99_ms"], x.get("load_avg")])
    return table(["symbols", "start", "s to /ready", "s to all fresh", "s to all warm",
                  "history bars fetched", "missed ticks", "MiB written", "CPU s to warm",
                  "cycle p50 warming", "p99 warming", "p50 idle", "p99 idle", "load avg at warm"], rows)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", default="500,2000", help="comma-separated symbol counts")
    parser.add_argument("--idle", type=float, default=30.0,
                        help="seconds of cycles watched once warm-up is done (the idle figures)")
    parser.add_argument("--kinds", default="cold,warm",
                        help="cold (empty directory) and/or warm (restart on it), in order")
    parser.add_argument("--data", default=None,
                        help="keep the data directories under this one (DATA/<symbols>), so a "
                             "later --kinds warm restarts on them; default: temporary ones")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
