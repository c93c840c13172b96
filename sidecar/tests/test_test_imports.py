"""The test suite's own plumbing: shared code lives in ``helpers``, ``fake_providers`` and
``conftest`` (fixtures), every module is imported by its ``sidecar.tests.`` name, and
no test module imports another, so each module (and conftest) loads exactly once."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LOCAL = {p.stem for p in TESTS.glob("*.py") if p.stem != "__init__"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in ``path``, nested ones included;
    a relative import is reported with its leading dots."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append((node.lineno, module))
            if node.module in (None, "sidecar.tests"):  # from sidecar.tests import test_x
                found += [(node.lineno, f"{module}.{alias.name}".replace("..", ".")) for alias in node.names]
    return found


def test_no_test_module_imports_another_or_a_local_module_by_a_bare_name() -> None:
    problems = []
    for path in sorted(TESTS.glob("*.py")):
        for line, module in imported_modules(path):
            where = f"{path.name}:{line}: {module}"
            last = module.rsplit(".", 1)[-1]
            if module.startswith("."):
                problems.append(f"{where} (relative: use the sidecar.tests. name)")
            elif module.split(".")[0] in LOCAL:
                problems.append(f"{where} (bare name: use sidecar.tests.{module})")
            elif module.startswith("sidecar.tests.") and (last.startswith("test_") or last == "conftest"):
                problems.append(f"{where} (shared code goes in sidecar.tests.helpers or conftest fixtures)")
    assert problems == []


def test_no_local_module_is_loaded_under_a_second_name() -> None:
    assert sorted(LOCAL & set(sys.modules)) == []
    assert f"sidecar.tests.{Path(__file__).stem}" in sys.modules
