"""How long a recorded week takes to replay at 10,000x: the daemon on the recording's clock.

``python -m sidecar run`` with ``SIDECAR_SOURCES=replay``, ``SIDECAR_REPLAY_SPEED=10000``
and market hours on, replaying Thanksgiving week 2024 of AAPL 1-minute bars on the real
NYSE sessions (1,380 bars; Thursday closed, Friday's early close), the recording built
as the suite's test builds it (``sidecar.tests.helpers.write_recording``). Reported per
run: seconds from the daemon's ``replaying`` log line to ``replay finished: the
recording is exhausted`` (from the log's own timestamps), seconds from launch to
exhaustion, bars stored, gaps; the median over ``--runs``. A measurement, not a verdict.

    .venv/bin/python -m bench.replay_week [--smoke] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench._common import cli, daemon_health, free_port, table

NAME = "replay_week"
REPO = Path(__file__).resolve().parents[1]
SPEED = 10_000
WEEK = ("2024-11-25T00:00:00-05:00", "2024-11-30T00:00:00-05:00")
#: Smoke: Friday alone (the early close).
DAY = ("2024-11-29T00:00:00-05:00", "2024-11-30T00:00:00-05:00")


def _ts(records: list[dict[str, Any]], msg: str) -> float:
    """The log timestamp (epoch seconds) of the first record with ``msg``."""
    for rec in records:
        if rec.get("msg") == msg:
            return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
    raise RuntimeError(f"no {msg!r} in the daemon's log")


def measure(span: tuple[str, str]) -> dict[str, Any]:
    """One replay of ``span`` at :data:`SPEED` by a fresh daemon."""
    from sidecar.calendars import get_calendar
    from sidecar.tests.helpers import write_recording

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sidecar-replay-") as tmp:
        data = Path(tmp)
        recording = data / "aapl.jsonl"
        bars = write_recording(recording, "AAPL", get_calendar("XNYS"),
                               int(datetime.fromisoformat(span[0]).timestamp() * 1000),
                               int(datetime.fromisoformat(span[1]).timestamp() * 1000))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
        env.update(SIDECAR_DATA_DIR=str(data / "data"), SIDECAR_LOG_FORMAT="json",
                   SIDECAR_SOURCES="replay", SIDECAR_REPLAY_FILE=str(recording),
                   SIDECAR_REPLAY_SPEED=str(SPEED), SIDECAR_SYMBOLS="AAPL", SIDECAR_TIMEFRAME="1m",
                   SIDECAR_MARKET_HOURS="on", SIDECAR_HTTP_PORT=str(port))
        log_path = data / "daemon.log"
        launched = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while (h := daemon_health(port)) is None or not h.get("clock", {}).get("exhausted"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the replay did not finish (exit {proc.poll()})")
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        records = []
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    began, finished = _ts(records, "replaying"), _ts(records, "replay finished: the recording is exhausted")
    return {
        "bars": len(bars), "bars_accepted": h["bars"]["accepted"], "gaps": h["bars"]["gaps"],
        "recorded_span_h": round((bars[-1].t + 60_000 - bars[0].t) / 3_600_000, 2),
        "replay_s": round(finished - began, 3), "launch_to_exhausted_s": round(finished - launched, 3),
        "cycles": h["cycle"]["count"],
    }


def run(smoke: bool, args: argparse.Namespace) -> dict[str, Any]:
    span, runs = (DAY, 1) if smoke else (WEEK, args.runs)
    got = [measure(span) for _ in range(runs)]
    return {"speed": SPEED, "span": list(span), "runs": got,
            "replay_s_median": statistics.median(r["replay_s"] for r in got),
            "launch_to_exhausted_s_median": statistics.median(r["launch_to_exhausted_s"] for r in got)}


def render(r: dict[str, Any]) -> str:
    rows = [[f"{r['span'][0][:10]} .. {r['span'][1][:10]}", f"{r['speed']:,}×", x["bars"],
             x["bars_accepted"], x["gaps"], x["recorded_span_h"], x["cycles"], x["replay_s"],
             x["launch_to_exhausted_s"]] for x in r["runs"]]
    return table(["recording", "speed", "bars", "bars stored", "gaps", "first open to last close h",
                  "cycles", "replay s", "launch to exhausted s"], rows) + (
        f"\n\nmedian: replay {r['replay_s_median']} s, launch to exhausted "
        f"{r['launch_to_exhausted_s_median']} s")


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="replays of the week (median)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli(NAME, run, render, argv, extra=_extra)


if __name__ == "__main__":
    main()
