"""The skip gate (``skip_gate.py``): pytest run in a subprocess on small test files that
skip, with and without the CI flag, against a temporary allowlist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.tests.helpers import REPO
from sidecar.tests.skip_gate import DEFAULT_ALLOWLIST, ci_enabled, load_allowlist

TESTS = '''
import pytest

@pytest.fixture
def missing_tool():
    pytest.skip("frobnicator not installed")

def test_skips_in_call():
    pytest.skip("no chromium here")

def test_skips_in_setup(missing_tool):
    pass

@pytest.mark.skipif(True, reason="not on this platform")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_module_anywhere")

def test_never_runs():
    pass
'''


def run_pytest(directory: Path, allowlist: str, flag: str | None) -> subprocess.CompletedProcess[str]:
    """pytest with the gate on ``directory``'s tests; ``flag``: the value of ``SIDECAR_CI``."""
    (directory / "allowlist.txt").write_text(allowlist)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SIDECAR_CI")}
    env["PYTHONPATH"] = str(REPO)
    if flag is not None:
        env["SIDECAR_CI"] = flag
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "sidecar.tests.skip_gate", "-p", "no:cacheprovider",
         "-p", "no:asyncio", "-o", "skip_allowlist=allowlist.txt", "--rootdir", str(directory), "-ra",
         str(directory)],
        cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def skipping_tests(tmp_path: Path) -> Path:
    (tmp_path / "test_sample.py").write_text(TESTS)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    return tmp_path


def test_under_ci_a_skip_not_allowlisted_fails_the_run_naming_it(skipping_tests: Path) -> None:
    done = run_pytest(skipping_tests, "test_sample.py::test_skipif | not on this platform | a reason\n", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("SKIP NOT ALLOWED")]
    assert sorted(refused) == [
        "SKIP NOT ALLOWED test_module_skip.py: could not import 'no_such_module_anywhere': "
        "No module named 'no_such_module_anywhere'",
        "SKIP NOT ALLOWED test_sample.py::test_skips_in_call: no chromium here",
        "SKIP NOT ALLOWED test_sample.py::test_skips_in_setup: frobnicator not installed",
    ], done.stdout
    assert "3 skip(s) under CI that are not on the allowlist" in done.stdout


def test_under_ci_allowlisted_skips_pass(skipping_tests: Path) -> None:
    allowlist = ("# comment\n\n"
                 "test_sample.py::test_skip* | * installed | the tool is optional\n"
                 "test_sample.py::test_skip* | no chromium here | headless only\n"
                 "test_sample.py::* | not on this platform | platform-specific\n"
                 "test_module_skip.py | could not import * | optional module\n")
    done = run_pytest(skipping_tests, allowlist, "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIP NOT ALLOWED" not in done.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in done.stdout


def test_an_entry_allows_only_its_skip_reason(skipping_tests: Path) -> None:
    (skipping_tests / "test_module_skip.py").unlink()
    allowlist = "test_sample.py::* | not on this platform | platform-specific\n"
    done = run_pytest(skipping_tests, allowlist, "1")
    assert done.returncode == 1
    assert "SKIP NOT ALLOWED test_sample.py::test_skips_in_call: no chromium here" in done.stdout
    assert "SKIP NOT ALLOWED test_sample.py::test_skipif" not in done.stdout


@pytest.mark.parametrize("flag", [None, "0", "false"])
def test_outside_ci_skips_are_reported_not_failed(skipping_tests: Path, flag: str | None) -> None:
    done = run_pytest(skipping_tests, "", flag)
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 4 and any(line.endswith(": no chromium here") for line in skipped), done.stdout
    assert "SKIP NOT ALLOWED" not in done.stdout


def test_a_malformed_allowlist_is_a_usage_error(skipping_tests: Path) -> None:
    done = run_pytest(skipping_tests, "test_sample.py::test_skips_in_call | no reason given\n", "1")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert "allowlist.txt:1: expected 'node-id glob | skip-reason glob | why'" in done.stderr


def test_ci_flags() -> None:
    assert ci_enabled({"SIDECAR_CI": "1"}) and ci_enabled({"CI": "true"})
    assert not ci_enabled({}) and not ci_enabled({"CI": "false", "SIDECAR_CI": "0"})


def test_the_suite_allowlist_parses_and_ci_runs_the_readme_command_with_the_gate_on() -> None:
    load_allowlist(DEFAULT_ALLOWLIST)
    ci_run = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci_run[-2:] == ["export SIDECAR_CI=1", "exec scripts/test"]
