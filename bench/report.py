"""Write the latest results (``bench/results/*.json``) into ``bench/README.md``.

    .venv/bin/python -m bench.report

Replaces the block between the ``results:start`` and ``results:end`` markers with each
benchmark's table, the time it ran and the machine, so the README always shows what
the committed JSON says.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from bench._common import RESULTS_DIR

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("features", "cluster_read", "scanner_read", "http_api", "shards", "cycle", "cycle_soak",
         "daemon_soak", "replay_week", "store", "tick", "ccxt_source", "completeness")


def block(results_dir: Path = RESULTS_DIR) -> str:
    parts: list[str] = []
    for name in ORDER:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        module = importlib.import_module(f"bench.{'cycle' if name == 'cycle_soak' else name}")
        m = doc["machine"]
        parts.append(f"### {name}\n\n{doc['at']} · {m['cpus']} cores {m['cpu_model']} · Python {m['python']}"
                     f" · load average at start {m['load_avg'][0]}"
                     + (" · **smoke sizes**" if doc.get("smoke") else "")
                     + f"\n\n{module.render(doc)}\n")
        if doc.get("plot"):
            parts.append(f"![cycle time vs symbols](results/{doc['plot']})\n")
    return "\n".join(parts)


def main() -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{block()}{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
