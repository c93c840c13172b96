"""The repository stands on its own: a copy of its tracked files, with nothing beside
it, runs the tests that read recorded provider bodies, and no file names a path
outside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sidecar.tests.helpers import REPO

#: Modules that read the recorded bodies in sidecar/tests/fixtures.
FIXTURE_MODULES = ("test_source_yahoo.py", "test_source_twelvedata.py", "test_source_alphavantage.py",
                   "test_source_polygon.py", "test_garbage.py", "test_source_ccxt.py")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [REPO / name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    shared = "shared"  # spelt apart, so that this file does not match itself
    outside = re.compile(rf"\.\./{shared}\b|/work/{shared}\b|\b{shared}/(fixtures|notes|CONTRACT)")
    found = []
    for path in tracked_files():
        if "fixtures" in path.parts or path.suffix in {".png", ".lock"} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                  if outside.search(line)]
    assert found == []


def test_a_copy_with_nothing_beside_it_runs_the_fixture_tests(tmp_path: Path) -> None:
    copy = tmp_path / "alone" / "sidecar-repo"
    for path in tracked_files():
        if path.is_file():
            target = copy / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["sidecar-repo"]  # nothing beside it
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k != "PYTHONPATH"}
    env["SIDECAR_CI"] = "1"  # a skip (a missing body, say) fails the run
    where = subprocess.run([sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(copy)  # the copy's code, not this checkout's
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *(f"sidecar/tests/{m}" for m in FIXTURE_MODULES)],
        cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
