"""Bad configuration: every variable the package reads has a refused bad value, and a real
daemon stops at start (exit 2) naming it; a bad mapping entry is reported, the rest run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.settings import Settings
from sidecar.tests.helpers import (
    PROVIDER_BAD_VALUES,
    REPO,
    SETTINGS_BAD_VALUES,
    Daemon,
    RedisServer,
    free_port,
    http_get,
    variables_read_by_the_package,
)

# ``scan --signals`` reads these (test_settings and test_provider_settings hold the others).
SIGNAL_BAD_VALUES: dict[str, list[str]] = {
    "SIDECAR_SIGNAL_RULES": ["rsi_below,moon", " , "],
    "SIDECAR_SIGNAL_RSI_BELOW": ["abc", "-1", "nan"],
    "SIDECAR_SIGNAL_RSI_ABOVE": ["101", "x"],
    "SIDECAR_SIGNAL_VWAP_PCT": ["-1", "inf"],
    "SIDECAR_SIGNAL_CLOSED_ONLY": ["maybe"],
}


@pytest.mark.parametrize(("var", "value"), [(n, v) for n, vs in SIGNAL_BAD_VALUES.items() for v in vs])
def test_bad_signal_values_name_the_variable(var: str, value: str) -> None:
    from sidecar.errors import ConfigError
    from sidecar.signals import SignalRules

    with pytest.raises(ConfigError) as info:
        SignalRules.from_env({var: value})
    assert info.value.setting == var and str(info.value).startswith(f"{var}: ")


#: The variable that names the configuration file (its contents: test_config.py).
CONFIG_BAD_VALUES: dict[str, list[str]] = {
    "SIDECAR_CONFIG": ["/nonexistent/sidecar.toml", "{dir}", "{bad_toml}"],
}


@pytest.mark.parametrize("value", CONFIG_BAD_VALUES["SIDECAR_CONFIG"])
def test_bad_config_file_is_named(value: str, tmp_path: Path) -> None:
    from sidecar.config import Configuration
    from sidecar.errors import ConfigError

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[EURUSD\n")
    path = value.replace("{dir}", str(tmp_path)).replace("{bad_toml}", str(bad_toml))
    with pytest.raises(ConfigError) as info:
        Configuration.load(None, {"SIDECAR_CONFIG": path}, cwd=tmp_path)
    assert info.value.setting == path


#: The ccxt sources' settings; ``<ID>`` ones are per exchange (tried on ``ccxt:binance``).
CCXT_BAD_VALUES: dict[str, list[str]] = {
    "SIDECAR_CCXT_STREAM": ["sometimes", "OHLCV!"],
    "SIDECAR_CCXT_POLL_S": ["-1", "soon", "inf"],
    "SIDECAR_CCXT_BASE_URL_<ID>": ["ftp://x", "https://", "https://h/?q=1"],
    "SIDECAR_CCXT_WS_URL_<ID>": ["http://127.0.0.1:1", "wss://h/#f"],
    "SIDECAR_CCXT_MARKETS_<ID>": ["/nonexistent/markets.json", "{dir}"],
}


@pytest.mark.parametrize(("var", "value"), [(k, v) for k, vs in CCXT_BAD_VALUES.items() for v in vs])
def test_bad_ccxt_value_is_named(var: str, value: str, tmp_path: Path) -> None:
    from sidecar.errors import ConfigError
    from sidecar.sources import build_source

    var = var.replace("<ID>", "BINANCE")
    settings = Settings(symbols=("BTCUSD",), sources=("ccxt:binance",), data_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        build_source("ccxt:binance", settings, {var: value.replace("{dir}", str(tmp_path))})
    assert info.value.setting == var and str(info.value).startswith(f"{var}: ")


def test_every_variable_the_package_reads_has_a_bad_value_test() -> None:
    """A new setting anywhere in the package fails here until it gets a bad-value row."""
    covered = (set(SETTINGS_BAD_VALUES) | set(PROVIDER_BAD_VALUES) | set(SIGNAL_BAD_VALUES)
               | set(CONFIG_BAD_VALUES) | set(CCXT_BAD_VALUES))
    read = variables_read_by_the_package()
    assert len(read) > 60
    assert read - covered == set(), "these variables have no bad-value test"


def run_daemon(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                          capture_output=True, timeout=timeout)


BAD_AT_START = [
    ("SIDECAR_HTTP_HOST", "not a host"),
    ("SIDECAR_REDIS_URL", "redis://:hunter22@localhost:99999"),
    ("SIDECAR_BB_NBDEV", "nan"),
    ("POLYGON_API_KEY", "bad key KEYSECRET"),
    ("SIDECAR_BREAKER_FAIL_MAX", "0"),
    ("SIDECAR_SYMBOLS_FILE", "{bad_toml}"),
    ("SIDECAR_SYMBOLS_FILE", "{bad_classes}"),
    ("SIDECAR_DATA_DIR", "{file}"),
]


def test_daemon_refuses_bad_values_at_start(clean_env: dict[str, str], tmp_path: Path) -> None:
    """Real ``python -m sidecar run`` processes (in parallel): exit 2, the name on stderr,
    never a secret, nothing started."""
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[EURUSD\n")
    regular = tmp_path / "a-file"
    regular.write_text("x")
    bad_classes = tmp_path / "classes.toml"  # a mapping's per-class setting with a bad value
    bad_classes.write_text('[asset_classes.stock]\nextended_hours = "sometimes"\n')
    procs = []
    for var, value in BAD_AT_START:
        value = (value.replace("{bad_toml}", str(bad_toml)).replace("{file}", str(regular))
                 .replace("{bad_classes}", str(bad_classes)))
        env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_HTTP_PORT=str(free_port()), **{var: value})
        procs.append((var, subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for var, proc in procs:
        out, err = proc.communicate(timeout=60)
        text = (out + err).decode()
        assert proc.returncode == 2, (var, text)
        assert f"bad configuration: {var}: " in err.decode(), text
        assert "KEYSECRET" not in text and "hunter22" not in text
        assert "Traceback" not in text
    assert not (Path(clean_env["SIDECAR_DATA_DIR"]) / "redis").exists()  # no Redis was started


def test_port_in_use_names_the_port(clean_env: dict[str, str], redis_server: RedisServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="AAPL", SIDECAR_HTTP_PORT=str(port),
                   SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX="busyport",
                   SIDECAR_BOOTSTRAP_DAYS="0")
        out = run_daemon(env)
    assert out.returncode == 2, out.stderr.decode()
    assert "bad configuration: SIDECAR_HTTP_PORT: cannot listen on 127.0.0.1:" in out.stderr.decode()


MAPPING = """
[EURUSD]
asset_class = "fx"
polygon = "C:EURUSD"
twelvedata = "EUR/USD"

[GBPUSD]
asset_class = "forex"
polygon = "C:GBPUSD"

[XAUUSD]
asset_class = "metal"
bloomberg = "XAU Curncy"
"""


def test_bad_mapping_entries_are_reported_and_the_rest_run(clean_env: dict[str, str], tmp_path: Path,
                                                           redis_server: RedisServer,
                                                           daemons: Callable[..., Daemon]) -> None:
    mapping = tmp_path / "symbols.toml"
    mapping.write_text(MAPPING)
    port = free_port()
    env = dict(clean_env, SIDECAR_SOURCES="sim", SIDECAR_SYMBOLS="EURUSD,GBPUSD,XAUUSD,ZZZZ",
               SIDECAR_SYMBOLS_FILE=str(mapping), SIDECAR_HTTP_PORT=str(port),
               SIDECAR_REDIS_URL=redis_server.url, SIDECAR_REDIS_PREFIX="mapping",
               SIDECAR_BOOTSTRAP_DAYS="0", SIDECAR_TIMEFRAME="1s")
    daemon = daemons(env)
    proc = daemon.proc
    try:
        daemon.wait_ready(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, health = http_get(port, "/health")
            if health["symbols"]["EURUSD"]["newest_bar_t"] is not None:
                break
            time.sleep(0.2)
        assert health["symbols"]["EURUSD"]["newest_bar_t"] is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = daemon.log_text()
    problems = [line for line in log.splitlines() if '"symbol mapping"' in line]
    assert any("GBPUSD" in line and "asset_class 'forex'" in line for line in problems), log
    assert any("XAUUSD" in line and "bloomberg" in line for line in problems), log
    assert any("ZZZZ" in line and "not in the mapping" in line for line in problems), log
    assert not any('"EURUSD"' in line for line in problems)


def test_a_rejected_entry_is_served_by_no_provider(tmp_path: Path) -> None:
    from sidecar.sources import polygon, twelvedata
    from sidecar.sources._http import Providers

    mapping = tmp_path / "symbols.toml"
    mapping.write_text(MAPPING)
    env = {"SIDECAR_SYMBOLS_FILE": str(mapping), "POLYGON_API_KEY": "k" * 8, "TWELVEDATA_API_KEY": "k" * 8}
    settings = Settings.from_env({"SIDECAR_SYMBOLS": "EURUSD,GBPUSD", "XDG_DATA_HOME": str(tmp_path)})
    for module in (polygon, twelvedata):
        source = module.build(settings, Providers.from_env(env))
        assert source.can_serve("EURUSD") and not source.can_serve("GBPUSD")
        assert not source.can_serve("XAUUSD")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "0.0.0.0", "sidecar-1.internal"])
def test_good_hosts_accepted(host: str) -> None:
    assert Settings.from_env({"SIDECAR_HTTP_HOST": host}).http_host == host
