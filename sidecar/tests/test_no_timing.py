"""No pass/fail test judges how fast something happened: speed is measured in ``bench/``.

The convention, checked on every ``sidecar/tests/*.py``:

* a test waits for an event (a counter, a log line, a key, ``/health`` fields) or
  drives a clock it injects; it never measures elapsed time. ``perf_counter``,
  ``process_time`` and ``thread_time`` do not appear at all;
* the monotonic clock (or the loop's) is read only to bound a wait: ``deadline =
  time.monotonic() + T`` and ``time.monotonic() < deadline`` (the name holds
  ``deadline``), so a wait fails only when what it waits for never comes;
* ``time.time()`` makes timestamps for data, never an operand of a comparison;
* ``sleep`` of a second or more is not a way to wait for something: only a stub that
  stands for a hang does it, marked ``# hangs`` on its line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
BANNED = ("perf_counter", "perf_counter_ns", "process_time", "process_time_ns", "thread_time",
          "thread_time_ns")


def _clock_call(node: ast.AST, name: str) -> bool:
    """``time.<name>()`` or ``<name>()``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr in (name, f"{name}_ns")) or \
        (isinstance(func, ast.Name) and func.id in (name, f"{name}_ns"))


def _is_deadline(node: ast.AST) -> bool:
    return isinstance(node, (ast.Name, ast.Attribute)) and "deadline" in ast.unparse(node).lower()


def _deadline_uses(tree: ast.AST) -> set[int]:
    """ids of the clock calls (``monotonic()``, ``loop.time()``) that build or test a deadline."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is not None and all(_is_deadline(t) for t in targets):
                allowed |= {id(n) for n in ast.walk(node.value)
                            if _clock_call(n, "monotonic") or _clock_call(n, "time")}
        elif isinstance(node, ast.Compare) and len(node.comparators) == 1:
            left, right = node.left, node.comparators[0]
            if _is_deadline(right):
                allowed.add(id(left))
            elif _is_deadline(left):
                allowed.add(id(right))
    return allowed


def _sleep_seconds(node: ast.Call) -> float | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name != "sleep" or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    value = node.args[0].value
    return float(value) if isinstance(value, (int, float)) else None


def violations(source: str) -> Iterator[tuple[int, str]]:
    """(line, what) for every use of a clock that judges time in ``source``."""
    tree = ast.parse(source)
    lines = source.splitlines()
    deadlines = _deadline_uses(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in BANNED) or \
                (isinstance(node, ast.Name) and node.id in BANNED):
            yield node.lineno, "a stopwatch: measure speed in bench/"
        elif _clock_call(node, "monotonic") and id(node) not in deadlines:
            yield node.lineno, "monotonic() outside a deadline"
        elif isinstance(node, ast.Compare) and any(_clock_call(n, "time") and id(n) not in deadlines
                                                   for n in ast.walk(node)):
            yield node.lineno, "time.time() compared: an elapsed-time judgement"
        elif isinstance(node, ast.Call) and (seconds := _sleep_seconds(node)) is not None \
                and seconds >= 1 and "# hangs" not in lines[node.lineno - 1]:
            yield node.lineno, f"sleep({seconds:g}) to let time pass: wait for an event"


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_judges_elapsed_time(path: Path) -> None:
    found = [f"{path.name}:{line}: {what}" for line, what in violations(path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "took = time.perf_counter() - t0",
    "started = time.monotonic()",
    "assert time.monotonic() - began < 0.5",
    "while time.monotonic() - down_at < 30: pass",
    "assert now_ms - time.time() * 1000 < 2000",
    "time.sleep(1.5)",
    "await asyncio.sleep(4)",
])
def test_the_check_catches_each_kind(snippet: str) -> None:
    assert list(violations(snippet))


@pytest.mark.parametrize("snippet", [
    "deadline = time.monotonic() + 10",
    "while time.monotonic() < deadline: time.sleep(0.2)",
    "if time.monotonic() > self.deadline: raise AssertionError",
    "if asyncio.get_running_loop().time() > deadline: raise TimeoutError",
    "now = int(time.time() * 1000)",
    "await asyncio.sleep(60)  # hangs",
    "await clock.sleep(0.5)",
])
def test_the_check_allows_deadlines_timestamps_and_hangs(snippet: str) -> None:
    assert not list(violations(snippet))
