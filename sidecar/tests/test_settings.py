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
from sidecar.tests.helpers import SETTINGS_BAD_VALUES as BAD_VALUES
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
    assert s.session_anchor_min is None  # each symbol's own session open
    assert s.market_hours
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


def test_timeframes_lowest_first_and_the_old_single_variable(tmp_path: Path) -> None:
    base = {"XDG_DATA_HOME": str(tmp_path)}
    s = Settings.from_env({**base, "SIDECAR_TIMEFRAMES": "1h, 1m,15m,1d,5m"})
    assert [tf.name for tf in s.series_timeframes] == ["1m", "5m", "15m", "1h", "1d"]
    assert s.timeframe.name == "1m"
    old = Settings.from_env({**base, "SIDECAR_TIMEFRAME": "5m"})
    assert [tf.name for tf in old.series_timeframes] == ["5m"]
    both = Settings.from_env({**base, "SIDECAR_TIMEFRAME": "1m", "SIDECAR_TIMEFRAMES": "1m,1h"})
    assert [tf.name for tf in both.series_timeframes] == ["1m", "1h"]
    with pytest.raises(ConfigError, match="SIDECAR_TIMEFRAME"):
        Settings.from_env({**base, "SIDECAR_TIMEFRAME": "5m", "SIDECAR_TIMEFRAMES": "1m,1h"})


def test_retention_per_timeframe(tmp_path: Path) -> None:
    s = Settings.from_env({"XDG_DATA_HOME": str(tmp_path), "SIDECAR_RETENTION_DAYS": "30,1d:3650,1h:365"})
    assert (s.retention_for("1m"), s.retention_for("1h"), s.retention_for("1d")) == (30, 365, 3650)
    only = Settings.from_env({"XDG_DATA_HOME": str(tmp_path), "SIDECAR_RETENTION_DAYS": "1d:3650"})
    assert (only.retention_for("1m"), only.retention_for("1d")) == (90, 3650)


def test_sim_history_default_is_the_warm_window() -> None:
    """``sim`` alone: the bootstrap spans the days of the warm window, not 90."""
    base = {"SIDECAR_SOURCES": "sim"}
    assert Settings.from_env(base).bootstrap_days == 4  # 5,000 one-minute bars: 3.5 days
    assert Settings.from_env(dict(base, SIDECAR_TIMEFRAME="1s")).bootstrap_days == 1
    assert Settings.from_env(dict(base, SIDECAR_BOOTSTRAP_DAYS="30")).bootstrap_days == 30
    assert Settings.from_env({"SIDECAR_SOURCES": "yahoo"}).bootstrap_days == 90
