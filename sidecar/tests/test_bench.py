"""Smoke runs of every benchmark in bench/ (tiny sizes): the scripts keep working and
write well-formed results. No timing is asserted: speed is measured, not tested."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import __main__ as run_all
from bench import (
    ccxt_source,
    completeness,
    cycle,
    daemon_soak,
    features,
    http_api,
    replay_week,
    scanner_read,
    shards,
    store,
    tick,
)
from sidecar.tests.helpers import have_cluster_binaries


def _load(out: Path, name: str) -> dict:
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["bench"] == name
    assert doc["smoke"] is True
    assert doc["machine"]["cpus"] >= 1
    return doc


def _timing(summary: dict) -> None:
    assert summary["n"] >= 1
    assert 0 <= summary["p50"] <= summary["p99"] <= summary["max"]
    assert all(math.isfinite(summary[k]) for k in ("p50", "p99", "max"))


def test_features_smoke_is_bit_identical(tmp_path: Path) -> None:
    features.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "features")
    ident = doc["identity"]
    assert ident["bit_identical"] is True and ident["mismatches"] == 0
    assert ident["values_checked"] > 0 and ident["sessions_crossed"] >= 1
    for method in ("update", "peek"):
        row = doc["us_per_bar"][method]
        assert set(row) == {"engine", "raw_stream", "talipp", "batch_5000"}
        assert all(v > 0 for v in row.values())


def test_identity_check_catches_a_wrong_value(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check must be able to fail: perturb one indicator and it reports mismatches.
    real = features.batch_reference

    def off_by_one_ulp(bars, p):
        out = real(bars, p)
        out[:, 1] = [math.nextafter(x, math.inf) for x in out[:, 1]]
        return out

    monkeypatch.setattr(features, "batch_reference", off_by_one_ulp)
    assert features.check_identity(60, 20)["bit_identical"] is False


def test_store_smoke(tmp_path: Path) -> None:
    store.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "store")
    assert doc["sqlite"]["rows"] == 200 and doc["sqlite"]["barstore_rows_per_s"] > 0
    for size in doc["redis"].values():
        assert set(size["ms"]) == {"lua", "lua_per_arg", "pipeline", "mset"}
    assert doc["redis_verdict"] in ("lua", "pipeline")


def test_tick_smoke(tmp_path: Path) -> None:
    tick.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "tick")
    assert [r["mode"] for r in doc["runs"]] == ["idle", "gil_load", "loop_load"]
    for r in doc["runs"]:
        _timing(r["lateness_ms"])


def test_scanner_read_smoke(tmp_path: Path) -> None:
    scanner_read.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "scanner_read")
    assert set(doc["ms"]) == {"raw", "scanner", "scanner_signals", "raw_2tf", "scanner_2tf"}
    for s in doc["ms"].values():
        _timing(s)
        assert s["n"] == doc["reads"]
    assert doc["signals_per_read"] > 0


def test_http_api_smoke(tmp_path: Path) -> None:
    http_api.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "http_api")
    assert set(doc["ms"]) == {"raw", "scanner", "http_features", "http_signals"}
    for s in doc["ms"].values():
        _timing(s)
        assert s["n"] == doc["reads"]
    assert doc["body_bytes"]["/v1/features"] > doc["body_bytes"]["/v1/signals"] > 0
    assert set(doc["cpu_ms_p50"]) == set(doc["ms"]) and all(v >= 0 for v in doc["cpu_ms_p50"].values())


def test_shards_smoke_runs_real_daemons_on_a_local_cluster(tmp_path: Path) -> None:
    if not have_cluster_binaries():
        pytest.skip("redis-server/redis-cli not installed (scripts/system-deps)")
    shards.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "shards")
    assert [r["shards"] for r in doc["runs"]] == [1, 2, 4]
    for run in doc["runs"]:
        assert sum(r["symbols"] for r in run["per_shard"]) == doc["total_symbols"]
        assert all(r["cycles"] > 0 and r["capacity"] > 0 for r in run["per_shard"])
    assert set(doc["scanner"]["ms"]) == {"cluster", "single"}
    for s in doc["scanner"]["ms"].values():
        _timing(s)


def test_cycle_smoke_runs_the_real_pipeline(tmp_path: Path) -> None:
    cycle.main(["--smoke", "--out", str(tmp_path), "--shards", "2"])
    doc = _load(tmp_path, "cycle")
    (run,) = doc["runs"]
    assert run["cycles"] >= 1
    _timing(run["cycle_ms"])
    # Every symbol came through the Twelve Data source and the validator each cycle.
    assert run["source_errors"] == 0 and run["redis_ok"] is True
    assert run["bars_accepted_per_cycle"] >= run["symbols"]
    assert run["rejected"] == {}
    assert run["rss_mb"]["end"] > 0
    # The same size again with four timeframes per symbol, in one process and as two shards.
    multi, sharded = doc["multi_tf"]
    assert multi["timeframes"] == "1m,5m,15m,1h" and multi["symbols"] == run["symbols"]
    assert multi["source_errors"] == 0 and multi["redis_ok"] is True and multi["rejected"] == {}
    assert sharded["timeframes"] == "1m,5m,15m,1h" and sharded["shards"] == 2
    assert sum(part["symbols"] for part in sharded["shard_runs"]) == run["symbols"]
    assert all(part["cycles"] >= 1 for part in sharded["shard_runs"])
    assert sharded["cycles"] >= 1 and sharded["source_errors"] == 0
    assert sharded["bars_accepted_per_cycle"] >= run["symbols"]  # every symbol, by one shard or the other
    _timing(sharded["cycle_ms"])


def test_daemon_soak_smoke_samples_a_running_daemon(tmp_path: Path) -> None:
    daemon_soak.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "daemon_soak")
    assert doc["samples"] >= 2 and doc["cycles"] >= 1
    assert doc["rss_mb"]["warm"] > 0 and doc["rss_mb"]["end"] > 0 and math.isfinite(doc["rss_growth_pct"])
    assert doc["missed_ticks"] >= 0 and all(n > 0 for n in doc["open_fds"] + doc["asyncio_tasks"])


def test_ccxt_source_smoke(tmp_path: Path) -> None:
    ccxt_source.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "ccxt_source")
    for name in ("ccxt", "polygon"):
        assert doc[name]["bars_per_s"] > 0 and doc[name]["cpu_ms_per_symbol"] > 0
    assert doc["stream"]["peeked_symbols"] == doc["symbols"] and doc["stream"]["updates_per_s"] > 0
    assert doc["import"]["import_s"] > 0


def test_replay_week_smoke_replays_a_day(tmp_path: Path) -> None:
    replay_week.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "replay_week")
    (run,) = doc["runs"]
    assert run["bars"] == 210 and run["bars_accepted"] == 210 and run["gaps"] == 0
    assert run["replay_s"] > 0 and run["launch_to_exhausted_s"] >= run["replay_s"]


def test_completeness_smoke_times_the_tracker_against_the_raw_calendar(tmp_path: Path) -> None:
    completeness.main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "completeness")
    assert doc["same_views"] and doc["before_rev"] is None and "before" not in doc
    for name in ("raw", "tracker"):
        assert all(doc[name][k] > 0 for k in ("build_ms", "steady_ms", "minute_ms", "minute_max_ms"))
    assert set(doc["tracker_vs_raw"]) == {"build_ms", "steady_ms", "minute_ms", "minute_max_ms"}


def test_run_all_refuses_an_unknown_name() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
