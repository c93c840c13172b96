"""Run every benchmark at full size, one after the other: ``.venv/bin/python -m bench``.

Writes ``bench/results/*.json`` and ``bench/results/cycle.png``; prints each table.
About 13–15 minutes on the 2-core machine. ``--smoke`` runs them all with tiny sizes
(seconds). ``--only features,store`` picks some.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence

BENCHMARKS = ("features", "store", "tick", "scanner_read", "http_api", "cluster_read", "shards", "cycle",
              "daemon_soak", "ccxt_source", "replay_week", "completeness")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every script works")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    common = (["--smoke"] if args.smoke else []) + (["--out", args.out] if args.out else [])
    for name in names:
        started = time.monotonic()
        print(f"\n## {name}\n", flush=True)
        importlib.import_module(f"bench.{name}").main(common)
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    if not args.smoke and not args.out:
        from bench import report

        report.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
