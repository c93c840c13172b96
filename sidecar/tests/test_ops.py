"""What operators get: the standard process metrics beside the daemon's own in
``/metrics``; a Grafana dashboard and alerting rules (``ops/``) whose every PromQL query
names a metric the daemon exports; the rules checked and unit-tested with promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app.http import DaemonView, make_app
from sidecar.app.pipeline import Pipeline
from sidecar.app.ticker import SecondTicker
from sidecar.breaker import SourceCircuits
from sidecar.redis_store import RedisStore
from sidecar.sqlite_store import BarStore
from sidecar.tests.helpers import REPO, Switchable, series, settings

DASHBOARD = REPO / "ops" / "grafana" / "sidecar.json"
RULES = REPO / "ops" / "prometheus" / "alerts.yml"
RULES_TEST = REPO / "ops" / "prometheus" / "alerts_test.yml"
#: Series Prometheus makes itself for every scrape target.
SCRAPE_SERIES = {"up"}
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    e = re.sub(r"\{[^}]*\}", "", e)  # matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_metric_names_of_promql() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="$job"}[5m]))) > 0.5') == {
        "a_bucket"}
    assert metric_names('time() - b_seconds{x="y{z}"} and on (instance) c == 1 offset 1h') == {"b_seconds", "c"}
    assert metric_names("max_over_time(d{state=\"closed\"}[15m]) == 0 or 1e3 < e") == {"d", "e"}


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", ()):
            out.append(target["expr"])
    return out


def rule_queries() -> list[str]:
    """Every ``expr`` of the rules file (inline or a ``|`` block): a YAML subset is enough."""
    lines = RULES.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            out.append(m.group(2))
            continue
        block = []
        for follow in lines[i + 1:]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= len(m.group(1)):
                break
            block.append(follow)
        out.append("\n".join(block))
    return out


async def scrape(redis_store: RedisStore, bar_store: BarStore) -> str:
    """``/metrics`` of a pipeline that ran a few cycles, one source's breaker open."""
    bars = {s: series(s, 20, 1_700_000_000_000, i) for i, s in enumerate(("AAA", "BBB"))}
    cursor = [0]
    primary, backup = Switchable("primary", bars, cursor), Switchable("backup", bars, cursor)
    pipe = Pipeline(settings(), [primary, backup], redis_store, bar_store,
                    {"primary": SourceCircuits("primary", fail_max=1, reset_timeout_s=3600)})
    tick = int(time.time() * 1000)
    for i in range(3):
        primary.fail = i == 2
        await pipe.run_cycle(tick + i * 1000)
    async with TestClient(TestServer(make_app(DaemonView(pipe, SecondTicker(), ready=True)))) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        return await resp.text()


def exported(text: str) -> set[str]:
    """Every series name ``text`` offers, the suffixes of each family's type included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "summary": ("_count", "_sum"), "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


async def test_metrics_carry_the_process_collectors(redis_store: RedisStore, bar_store: BarStore) -> None:
    names = exported(await scrape(redis_store, bar_store))
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_collections_total",
                 "sidecar_cycles_total", "sidecar_redis_up", "sidecar_sqlite_up"):
        assert name in names, name


async def test_dashboard_and_rules_query_only_what_the_daemon_exports(
        redis_store: RedisStore, bar_store: BarStore) -> None:
    names = exported(await scrape(redis_store, bar_store)) | SCRAPE_SERIES
    queries = dashboard_queries()
    rules = rule_queries()
    assert len(queries) >= 20 and len(rules) == 8
    for expr in queries + rules:
        used = metric_names(expr)
        assert used, expr
        assert used <= names, f"{expr!r} names {sorted(used - names)}, which /metrics does not export"
    # What the issue asks the dashboard to show.
    every = " ".join(queries)
    for name in ("sidecar_cycle_duration_seconds_bucket", "sidecar_bars_accepted_total",
                 "sidecar_source_errors_total", "sidecar_circuit_state", "sidecar_symbol_stale",
                 "sidecar_redis_up", "sidecar_sqlite_up", "process_resident_memory_bytes"):
        assert name in every, name
    doc = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # a skip fails a CI run (skip_gate.py): scripts/system-deps installs it
        pytest.skip("promtool not installed (apt-get install prometheus, or scripts/system-deps as root)")
    return path


@pytest.mark.parametrize("args", [("check", "rules", str(RULES)), ("test", "rules", str(RULES_TEST))],
                         ids=["check", "test"])
def test_promtool_accepts_the_rules(args: tuple[str, ...]) -> None:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(RULES).parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
