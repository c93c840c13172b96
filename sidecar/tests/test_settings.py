"""Settings from the environment: defaults, and a bad value always names its variable."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from sidecar import settings as settings_mod
from sidecar.errors import ConfigError
from sidecar.settings import (
    DEFAULT_HTTP_PORT,
    DEFAULT_SOURCES,
    DEFAULT_SYMBOLS,
    IndicatorPeriods,
    Settings,
)
from sidecar.timeframe import Timeframe


def test_defaults_from_empty_env(tmp_path: Path) -> None:
    s = Settings.from_env({"XDG_DATA_HOME": str(tmp_path)})
    assert s.symbols == DEFAULT_SYMBOLS
    assert s.sources == DEFAULT_SOURCES
    assert s.timeframe == Timeframe("1m", 60_000)
    assert s.redis_url is None
    assert s.redis_prefix == "sidecar"
    assert s.data_dir == tmp_path / "sidecar"
    assert s.sqlite_file == tmp_path / "sidecar" / "bars.sqlite3"
    assert s.redis_socket == tmp_path / "sidecar" / "redis" / "redis.sock"
    assert s.http_host == "127.0.0.1"
    assert s.http_port == DEFAULT_HTTP_PORT
    assert s.periods == IndicatorPeriods()
    assert (s.periods.macd_fast, s.periods.macd_slow, s.periods.macd_signal) == (12, 26, 9)
    assert s.session_anchor_min == 0
    assert s.clock_skew_ms == 2_000
    assert s.outlier_k == 15.0
    assert s.correction_window_bars == 10
    assert s.fill_gaps is False
    assert s.replay_file is None
    assert s.replay_speed == 1.0
    assert s.sim_seed == 42
    assert (s.log_format, s.log_level) == ("auto", "info")
    # Every field equals the dataclass default when nothing is configured.
    plain = Settings(data_dir=tmp_path / "sidecar")
    assert s == plain


def test_blank_values_mean_default(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path), "SIDECAR_HTTP_PORT": "  ", "SIDECAR_SYMBOLS": "",
           "SIDECAR_OUTLIER_K": "", "SIDECAR_FILL_GAPS": " "}
    s = Settings.from_env(env)
    assert s.http_port == DEFAULT_HTTP_PORT and s.symbols == DEFAULT_SYMBOLS
    assert s.outlier_k == 15.0 and s.fill_gaps is False


def test_good_values_parsed(tmp_path: Path) -> None:
    replay = tmp_path / "bars.jsonl"
    replay.write_text("")
    env = {
        "SIDECAR_SYMBOLS": " aapl, MSFT ,,AAPL,brk.b ",
        "SIDECAR_SOURCES": "Sim, replay",
        "SIDECAR_TIMEFRAME": "5m",
        "SIDECAR_REDIS_URL": "unix:///tmp/r.sock",
        "SIDECAR_REDIS_PREFIX": "md-1",
        "SIDECAR_DATA_DIR": str(tmp_path / "d"),
        "SIDECAR_SQLITE_PATH": str(tmp_path / "x.db"),
        "SIDECAR_REPLAY_FILE": str(replay),
        "SIDECAR_MACD": "5,35,5",
        "SIDECAR_RSI_PERIOD": "7",
        "SIDECAR_BB_NBDEV": "2.5",
        "SIDECAR_SESSION_ANCHOR": "13:30",
        "SIDECAR_HTTP_PORT": "0",
        "SIDECAR_FILL_GAPS": "YES",
        "SIDECAR_OUTLIER_K": "0",
        "SIDECAR_LOG_FORMAT": "JSON",
        "SIDECAR_REPLAY_SPEED": "10",
    }
    s = Settings.from_env(env)
    assert s.symbols == ("AAPL", "MSFT", "BRK.B")
    assert s.sources == ("sim", "replay")
    assert s.timeframe == Timeframe("5m", 300_000)
    assert s.redis_url == "unix:///tmp/r.sock"
    assert s.redis_prefix == "md-1"
    assert s.data_dir == tmp_path / "d"
    assert s.sqlite_file == tmp_path / "x.db"
    assert s.replay_file == replay
    assert (s.periods.macd_fast, s.periods.macd_slow, s.periods.macd_signal) == (5, 35, 5)
    assert s.periods.rsi == 7 and s.periods.bb_nbdev == 2.5
    assert s.session_anchor_min == 13 * 60 + 30
    assert s.http_port == 0
    assert s.fill_gaps is True
    assert s.outlier_k == 0.0
    assert s.log_format == "json"
    assert s.replay_speed == 10.0


@pytest.mark.parametrize(("text", "value"), [("1", True), ("true", True), ("On", True),
                                             ("0", False), ("no", False), ("OFF", False)])
def test_boolean_spellings(text: str, value: bool) -> None:
    assert Settings.from_env({"SIDECAR_FILL_GAPS": text}).fill_gaps is value


# One bad value per parsed variable (the name -> values that must be refused).
BAD_VALUES: dict[str, list[str]] = {
    "SIDECAR_SYMBOLS": ["AAPL,MS FT", ",,,"],
    "SIDECAR_SOURCES": ["sim,bad-name", " , "],
    "SIDECAR_TIMEFRAME": ["1x", "0m", "60"],
    "SIDECAR_REDIS_URL": ["http://localhost:6379", "localhost:6379", "redis://h:99999",
                          "redis://h:port", "redis://h/0?nosuchoption=1", "unix:///tmp/r.sock?db=x",
                          "rediss://h:6380/0?ssl_ca_certs=/nonexistent/ca.pem"],
    "SIDECAR_REDIS_SERVER": ["/nonexistent/redis-server", "{file}", "{dir}"],
    "SIDECAR_DATA_DIR": ["{file}"],
    "SIDECAR_SQLITE_PATH": ["{dir}", "{file}/bars.sqlite3"],
    "SIDECAR_HTTP_HOST": ["not a host", "127.0.0.1:8787", "http://127.0.0.1", "-bad-", "a..b", "x" * 300],
    "SIDECAR_HTTP_TOKEN": ["too-short", "has a space in it here", "t" * 257, "caf\u00e9-token-of-16+"],
    "SIDECAR_REDIS_PREFIX": ["a:b", "x" * 33, "pre fix"],
    "SIDECAR_REPLAY_FILE": ["/nonexistent/bars.jsonl"],
    "SIDECAR_MACD": ["12,26", "a,b,c", "26,12,9", "1,26,9", "12,26,0", "12,2000,9"],
    "SIDECAR_RSI_PERIOD": ["1", "abc", "1001"],
    "SIDECAR_EMA_PERIOD": ["1", "2.5"],
    "SIDECAR_BB_PERIOD": ["0", "x"],
    "SIDECAR_BB_NBDEV": ["0", "nan", "11", "two"],
    "SIDECAR_ATR_PERIOD": ["0", "-3"],
    "SIDECAR_VOLMA_PERIOD": ["1", "many"],
    "SIDECAR_MOM_PERIOD": ["0", "1e3"],
    "SIDECAR_SESSION_ANCHOR": ["24:00", "9:30", "12:60", "noon"],
    "SIDECAR_HTTP_PORT": ["65536", "-1", "http"],
    "SIDECAR_BARS_CAP": ["99", "lots"],
    "SIDECAR_FEATURES_TTL_MS": ["499", "2s"],
    "SIDECAR_HEARTBEAT_TTL_MS": ["999", "x"],
    "SIDECAR_REDIS_POOL_SIZE": ["1", "1001"],
    "SIDECAR_REDIS_TIMEOUT_S": ["0", "inf", "nan", "fast"],
    "SIDECAR_REDIS_DOWN_EXIT_S": ["0.5", "-inf"],
    "SIDECAR_FLUSH_INTERVAL_S": ["0.01", "NaN"],
    "SIDECAR_FLUSH_MAX_ROWS": ["0", "1.5"],
    "SIDECAR_BUFFER_MAX_ROWS": ["0", "x"],
    "SIDECAR_RETENTION_DAYS": ["0", "36501"],
    "SIDECAR_WARM_BARS": ["-1", "1000001"],
    "SIDECAR_BOOTSTRAP_DAYS": ["-1", "ninety"],
    "SIDECAR_CLOCK_SKEW_MS": ["-1", "600001"],
    "SIDECAR_OUTLIER_K": ["-1", "nan", "inf"],
    "SIDECAR_OUTLIER_WINDOW": ["1", "x"],
    "SIDECAR_CORRECTION_WINDOW_BARS": ["-1", "100001"],
    "SIDECAR_FILL_GAPS": ["maybe", "2"],
    "SIDECAR_FETCH_TIMEOUT_S": ["0.01", "61", "nan"],
    "SIDECAR_STALE_AFTER_MS": ["499", "x"],
    "SIDECAR_PARSE_PROCESS": ["maybe", "1", "process"],
    "SIDECAR_SIM_SEED": ["-1", "seed", str(2**63)],
    "SIDECAR_REPLAY_SPEED": ["0", "10001", "nan"],
    "SIDECAR_LOG_FORMAT": ["xml"],
    "SIDECAR_LOG_LEVEL": ["verbose", "critical"],
}



def test_every_variable_read_is_covered() -> None:
    source = inspect.getsource(settings_mod)
    read = set(re.findall(r'"(SIDECAR_[A-Z0-9_]+)"', source))
    assert read == set(BAD_VALUES), "a SIDECAR_* variable lacks a bad-value test"


def placeholders(value: str, tmp_path: Path) -> str:
    """``{file}``: an existing regular file; ``{dir}``: an existing directory."""
    regular = tmp_path / "a-file"
    regular.write_text("x")
    return value.replace("{file}", str(regular)).replace("{dir}", str(tmp_path))


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, vs in BAD_VALUES.items() for v in vs]
)
def test_bad_value_names_the_variable(name: str, value: str, tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path), name: placeholders(value, tmp_path)}
    if name == "SIDECAR_REPLAY_FILE":
        env["SIDECAR_SOURCES"] = "replay"
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.setting == name
    assert name in str(info.value)
    assert str(info.value).startswith(f"{name}: ")


@pytest.mark.parametrize(
    "symbol",
    ["MS FT", "AA:PL", "AAPL*", "*", "{AAPL}", "A{B", '"AAPL"', "'AAPL'", "AA\nPL", "AA\rPL",
     "AA\tPL", "X" * 25, "-AAPL", ".AAPL", "AA/PL", "AA\\PL", "AA;PL", "ÄPPLE", "AA\x00PL"],
)
def test_hostile_symbols_refused(symbol: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SIDECAR_SYMBOLS": f"MSFT,{symbol}"})
    assert info.value.setting == "SIDECAR_SYMBOLS"


def test_longest_symbol_accepted() -> None:
    sym = "X" * 24
    assert Settings.from_env({"SIDECAR_SYMBOLS": sym}).symbols == (sym,)


def test_replay_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SIDECAR_SOURCES": "replay"})
    assert info.value.setting == "SIDECAR_REPLAY_FILE"
    # A directory is not a file of bars.
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SIDECAR_SOURCES": "replay", "SIDECAR_REPLAY_FILE": str(tmp_path)})
    assert info.value.setting == "SIDECAR_REPLAY_FILE"
    assert str(tmp_path) in str(info.value)


def test_replay_file_ignored_unless_replay_source() -> None:
    s = Settings.from_env({"SIDECAR_SOURCES": "sim", "SIDECAR_REPLAY_FILE": "/nonexistent/x"})
    assert s.replay_file == Path("/nonexistent/x")


def test_replay_with_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "rec.csv"
    f.write_text("symbol,tf,t,o,h,l,c,v\n")
    s = Settings.from_env({"SIDECAR_SOURCES": "replay", "SIDECAR_REPLAY_FILE": str(f)})
    assert s.sources == ("replay",) and s.replay_file == f


def test_default_data_dir_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({})
    assert s.data_dir == tmp_path / ".local" / "share" / "sidecar"
