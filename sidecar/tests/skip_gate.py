"""A pytest plugin that makes skips count under CI.

When ``SIDECAR_CI`` (set by ``.ci/run``) or ``CI`` is set to anything but ``0``/``false``,
every skipped test or module must match an entry of the allowlist; any other skip fails
the session (exit code 1) with a message naming the test and its skip reason. Elsewhere
skips are reported by ``-ra`` as usual.

The allowlist (``sidecar/tests/skip_allowlist.txt``, or the ``skip_allowlist`` ini
option) has one entry a line, three fields separated by `` | ``: a glob over the node id,
a glob over the skip reason, and why that skip is acceptable under CI. Blank lines and
lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

DEFAULT_ALLOWLIST = Path(__file__).resolve().parent / "skip_allowlist.txt"
CI_FLAGS = ("SIDECAR_CI", "CI")


@dataclass(frozen=True)
class Allowed:
    """One allowlist entry."""

    node: str
    reason: str
    why: str

    def matches(self, nodeid: str, reason: str) -> bool:
        """Whether this entry covers ``nodeid`` skipped for ``reason``."""
        return fnmatchcase(nodeid, self.node) and fnmatchcase(reason, self.reason)


def load_allowlist(path: Path) -> list[Allowed]:
    """The entries of an allowlist file; raises ``pytest.UsageError`` on a malformed line."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split(" | ")]
        if len(fields) != 3 or not all(fields):
            raise pytest.UsageError(
                f"{path}:{number}: expected 'node-id glob | skip-reason glob | why', got {line!r}")
        entries.append(Allowed(*fields))
    return entries


def ci_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this run is a CI run, where skips must be allowlisted."""
    return any(environ.get(flag, "").strip().lower() not in ("", "0", "false", "no")
               for flag in CI_FLAGS)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    return str(longrepr)


class SkipGate:
    """Collects the skips of a run and fails it on those not allowlisted."""

    def __init__(self, allowlist: list[Allowed], source: Path) -> None:
        self.allowlist = allowlist
        self.source = source
        self.refused: list[tuple[str, str]] = []

    def _check(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = _skip_reason(report)
        if not any(entry.matches(report.nodeid, reason) for entry in self.allowlist):
            self.refused.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Every test phase's outcome: a skip is checked against the allowlist."""
        self._check(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module skipped as a whole (``importorskip``, ``allow_module_level``)."""
        self._check(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """A passing run with refused skips exits 1 instead."""
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Name every refused skip and where skips may be allowed."""
        if not self.refused:
            return
        terminalreporter.section("skips not allowed under CI", sep="=", red=True, bold=True)
        for nodeid, reason in self.refused:
            terminalreporter.line(f"SKIP NOT ALLOWED {nodeid}: {reason}", red=True)
        terminalreporter.line(
            f"{len(self.refused)} skip(s) under CI that are not on the allowlist ({self.source}): "
            "install what the test needs (scripts/setup --dev) or allowlist the skip with its reason")


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``skip_allowlist`` ini option."""
    parser.addini("skip_allowlist", "file of skips allowed under CI (see sidecar/tests/skip_gate.py)",
                  default=str(DEFAULT_ALLOWLIST))


def pytest_configure(config: pytest.Config) -> None:
    """Under CI, register the gate with the allowlist loaded."""
    if not ci_enabled():
        return
    source = Path(str(config.getini("skip_allowlist")))
    if not source.is_absolute():
        source = config.rootpath / source
    config.pluginmanager.register(SkipGate(load_allowlist(source), source), "sidecar-skip-gate")
