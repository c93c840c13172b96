"""What every benchmark shares: statistics, the machine's description, results files,
tables, and a private real Redis server.

Each benchmark module has ``run(smoke: bool) -> dict`` (results, JSON-ready) and a
``main()`` that writes ``bench/results/<name>.json`` and prints a table. Absolute
times drift on a shared machine; the ratios against the raw library, measured side by
side in the same run, are the figures that count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` (same unit), plus the count."""
    return {"n": len(values), "p50": statistics.median(values) if values else float("nan"),
            "p99": percentile(values, 99), "max": max(values) if values else float("nan")}


def interleaved(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median timing of each case, the cases run round-robin so noise hits them alike."""
    seen: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            seen[name].append(fn())
    return {name: statistics.median(v) for name, v in seen.items()}


async def timed_reads(cases: dict[str, Callable[[], Awaitable[object]]], reads: int,
                      cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Each case's times (ms) over ``reads`` rounds, after a warm-up and ``settle_gc()``
    (as a trading process does after start-up, README "Scanner"); the order of the cases
    alternates round by round, so noise hits them alike. With ``cpu``, the CPU
    milliseconds this process spent in each call go there."""
    from sidecar.gc_tuning import settle_gc

    for _ in range(max(3, reads // 20)):  # warm the connections and caches
        for fn in cases.values():
            await fn()
    settle_gc()
    timings: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(reads):
        order = list(cases.items())
        if i % 2:
            order.reverse()
        for name, fn in order:
            c0, t0 = time.process_time(), time.perf_counter()
            await fn()
            timings[name].append((time.perf_counter() - t0) * 1000)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.process_time() - c0) * 1000)
    return timings


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (this one by default) in MiB."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_results(name: str, results: dict[str, Any], out_dir: Path | None = None) -> Path:
    """``bench/results/<name>.json`` with the machine and the time of the run."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **results}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            if x != x:
                return "-"
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def timing_table(title: str, results: dict[str, Any]) -> str:
    """p50/p99/max of each case in ``results["ms"]`` and its p50 over the ``raw`` case's."""
    rows = [[name, s["p50"], s["p99"], s["max"], results["ratio_p50"][name]]
            for name, s in results["ms"].items()]
    return table([title, "p50 ms", "p99 ms", "max ms", "p50 × raw"], rows)


def cli(name: str, run: Callable[[bool], dict[str, Any]], render: Callable[[dict[str, Any]], str],
        argv: Sequence[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None,
        ) -> dict[str, Any]:
    """The common command line: ``--smoke`` (tiny sizes), ``--out DIR``."""
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=(sys.modules[run.__module__].__doc__
                                                                          or "").split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script works")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    results = run(args.smoke) if extra is None else run(args.smoke, args)  # type: ignore[call-arg]
    results["smoke"] = bool(args.smoke)
    path = write_results(name, results, args.out)
    print(render(results))
    print(f"\nresults: {path}")
    return results


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM a daemon and wait for it; SIGKILL if it does not stop in ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_health(port: int) -> dict[str, Any] | None:
    """A daemon's ``/health`` body (a 503 carries one too); ``None`` while it does not answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except OSError:
        return None


class PrivateRedis:
    """A real redis-server of our own on a unix socket, without persistence (no fork
    noise): the test suite's ``RedisServer`` in a temporary directory."""

    def __init__(self) -> None:
        from sidecar.tests.helpers import RedisServer

        self._dir = tempfile.TemporaryDirectory(prefix="sidecar-bench-")
        self.server = RedisServer(Path(self._dir.name))
        self.url = self.server.url

    def start(self) -> PrivateRedis:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self._dir.cleanup()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
