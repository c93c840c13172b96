"""The configuration file, ``.env`` and the environment: precedence, provenance, errors that
name the file and key, secrets kept out of files and output, and a reference that is current."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import Configuration, catalogue, file_key, read_config_file
from sidecar.config_reference import DOCS, reference_markdown
from sidecar.errors import ConfigError
from sidecar.provider_settings import ProviderSettings
from sidecar.settings import Settings
from sidecar.tests.helpers import REPO, variables_read_by_the_package
from sidecar.timeframe import Timeframe

FILE = """\
symbols = ["AAPL", "EURUSD"]
timeframe = "5m"
sources = ["sim"]
bars_cap = 1000
fill_gaps = true
outlier_k = 7.5

[redis]
url = "redis://:hunter22@127.0.0.1:6379/0"
prefix = "fromfile"

[signal]
rsi_below = 25
"""


def write(tmp_path: Path, text: str, name: str = "sidecar.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def loaded(tmp_path: Path, env: dict[str, str], text: str = FILE,
           dotenv: str | None = None) -> tuple[Configuration, dict[str, str]]:
    """The configuration of ``text`` (and a ``.env``) applied beneath ``env``."""
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    config = Configuration.load(write(tmp_path, text), env, cwd=tmp_path)
    merged = dict(env)
    config.apply(merged)
    return config, merged


def test_file_values_reach_every_reader(tmp_path: Path) -> None:
    config, env = loaded(tmp_path, {"XDG_DATA_HOME": str(tmp_path)})
    s = Settings.from_env(env)
    assert s.symbols == ("AAPL", "EURUSD") and s.timeframe == Timeframe.parse("5m")
    assert s.sources == ("sim",) and s.bars_cap == 1000 and s.fill_gaps is True
    assert s.outlier_k == 7.5 and s.redis_prefix == "fromfile"
    assert s.redis_url == "redis://:hunter22@127.0.0.1:6379/0"
    from sidecar.signals import SignalRules

    assert SignalRules.from_env(env).rsi_below == 25.0
    assert config.origin("SIDECAR_TIMEFRAME") == "file"
    assert config.origin("SIDECAR_HTTP_PORT") == "default"
    assert config.file_values["SIDECAR_REDIS_URL"][0] == "redis.url"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config, env = loaded(tmp_path, {"SIDECAR_TIMEFRAME": "15m", "SIDECAR_BARS_CAP": " "})
    assert Settings.from_env(env).timeframe == Timeframe.parse("15m")
    assert config.origin("SIDECAR_TIMEFRAME") == "env"
    # A blank variable is unset: the file's value stands.
    assert Settings.from_env(env).bars_cap == 1000 and config.origin("SIDECAR_BARS_CAP") == "file"


def test_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'timeframe = "1h"\n')
    config = Configuration.load(None, {"SIDECAR_CONFIG": str(path)}, cwd=tmp_path)
    assert config.file == path and config.file_values["SIDECAR_TIMEFRAME"] == ("timeframe", "1h")
    assert Configuration.load(None, {}, cwd=tmp_path).file is None


@pytest.mark.parametrize(("text", "where", "problem"), [
    ('timefrme = "1m"\n', "timefrme", "did you mean timeframe"),
    ('[redis]\nurll = "x"\n', "redis.urll", "did you mean redis_url"),
    ('polygon_api_key = "KEYSECRET"\n', "polygon_api_key", "environment"),
    ('[polygon]\napi_key = "KEYSECRET"\n', "polygon.api_key", "environment"),
    ('redis_url = "redis://a"\n[redis]\nurl = "redis://b"\n', "redis.url", "set twice"),
    ("bars_cap = 2024-01-01\n", "bars_cap", "got date"),
    ('symbols = [["AAPL"]]\n', "symbols", "got list"),
    ("[redis]\n[redis.deep]\nx = 1\n", "redis.deep", "got dict"),
    ("symbols = [\n", "", "not valid TOML"),
])
def test_bad_file_names_the_file_and_key(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_config_file(path, catalogue())
    assert info.value.setting == (f"{path}: {where}" if where else str(path))
    assert problem in info.value.problem
    assert "KEYSECRET" not in str(info.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.toml", tmp_path):
        with pytest.raises(ConfigError) as info:
            Configuration.load(path, {}, cwd=tmp_path)
        assert info.value.setting == str(path)


def test_dotenv_holds_secrets_only_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = ("# keys\nexport POLYGON_API_KEY='POLYSECRET'\nTWELVEDATA_API_KEY=TDSECRET # mine\n"
              'ALPHAVANTAGE_API_KEY="AVSECRET"\nPOSTGRES_PASSWORD=not-ours\n')
    config, env = loaded(tmp_path, {"ALPHAVANTAGE_API_KEY": "FROMENV"}, dotenv=dotenv)
    provider = ProviderSettings.from_env(env)
    assert provider.polygon_api_key == "POLYSECRET" and provider.twelvedata_api_key == "TDSECRET"
    assert provider.alphavantage_api_key == "FROMENV"
    assert "POSTGRES_PASSWORD" not in env  # another program's line is left alone
    assert config.origin("POLYGON_API_KEY") == ".env" and config.origin("ALPHAVANTAGE_API_KEY") == "env"
    assert "SECRET" not in repr(config)


def test_dotenv_gives_the_http_token_and_its_report_names_only(tmp_path: Path) -> None:
    token = "TOKENSECRET-of-16+"
    config, env = loaded(tmp_path, {"XDG_DATA_HOME": str(tmp_path), "POLYGON_API_KEY": "FROMENV"},
                         dotenv=f"SIDECAR_HTTP_TOKEN={token}\nPOLYGON_API_KEY=POLYSECRET\n")
    assert Settings.from_env(env).http_token == token
    assert config.origin("SIDECAR_HTTP_TOKEN") == ".env"
    (tmp_path / ".env").chmod(0o600)
    report = Configuration.load(None, {"POLYGON_API_KEY": "FROMENV"}, cwd=tmp_path).dotenv_report()
    assert report == {"path": str((tmp_path / ".env").resolve()), "loaded": ["SIDECAR_HTTP_TOKEN"],
                      "environment_wins": ["POLYGON_API_KEY"], "open_to_others": False}
    (tmp_path / ".env").chmod(0o640)
    assert Configuration.load(None, {}, cwd=tmp_path).dotenv_report()["open_to_others"] is True  # type: ignore[index]
    assert "SECRET" not in repr(config) and "SECRET" not in str(report)
    assert Configuration.load(None, {}, cwd=tmp_path / "elsewhere").dotenv_report() is None


@pytest.mark.parametrize(("dotenv", "line"), [("SIDECAR_TIMEFRAME=5m\n", 1),
                                              ("# ok\nnot a line KEYSECRET\n", 2)])
def test_bad_dotenv_names_the_line_never_the_value(tmp_path: Path, dotenv: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, {}, dotenv=dotenv)
    assert info.value.setting == f"{tmp_path / '.env'}:{line}"
    assert "KEYSECRET" not in str(info.value)


def test_every_setting_has_a_file_key_or_is_a_secret() -> None:
    for name in catalogue():
        key = file_key(name)
        secret = name.endswith("_API_KEY") or name == "SIDECAR_HTTP_TOKEN"
        assert (key is None) == (secret or not name.startswith("SIDECAR_")), name


def test_every_setting_is_documented() -> None:
    assert set(DOCS) == set(catalogue()), "add the setting's meaning to sidecar/config_reference.py"


def test_every_variable_the_code_reads_is_in_the_reference() -> None:
    """Pattern ones (``SIDECAR_CCXT_MARKETS_<ID>``) included; ``SIDECAR_CONFIG`` names the file."""
    read = variables_read_by_the_package()
    assert {"SIDECAR_CCXT_MARKETS_<ID>", "SIDECAR_CCXT_BASE_URL_<ID>", "SIDECAR_CCXT_WS_URL_<ID>"} <= read
    assert read - {"SIDECAR_CONFIG"} <= set(catalogue())
    reference = reference_markdown()
    assert [name for name in sorted(read) if f"`{name}`" not in reference] == []


def test_per_exchange_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    from sidecar.sources.ccxt_support import CcxtSettings

    config, merged = loaded(tmp_path, {"SIDECAR_CCXT_BASE_URL_KRAKEN": "https://gw.example"},
                            text='[ccxt]\nmarkets_kraken = "/srv/kraken.json"\nstream = "off"\n')
    assert config.file_values["SIDECAR_CCXT_MARKETS_KRAKEN"] == ("ccxt.markets_kraken", "/srv/kraken.json")
    read = CcxtSettings.from_env(merged, "kraken")
    assert (str(read.markets_file), read.base_url, read.stream) == (
        "/srv/kraken.json", "https://gw.example", "off")
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, {}, text='[ccxt]\nmarket_kraken = "/srv/kraken.json"\n')
    assert info.value.problem.startswith("unknown setting")


def test_config_command_shows_each_configured_exchange_masked(tmp_path: Path) -> None:
    write(tmp_path, '[ccxt]\nmarkets_kraken = "/srv/kraken.json"\n')
    out = cli(tmp_path, "config", "--config", "sidecar.toml", "--json",
              env={"SIDECAR_SOURCES": "ccxt:kraken,ccxt:okx",
                   "SIDECAR_CCXT_BASE_URL_KRAKEN": "https://user:GWSECRET@gw.example"})
    assert out.returncode == 0, out.stderr
    rows = {r["variable"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["SIDECAR_CCXT_BASE_URL_KRAKEN"] == {
        "variable": "SIDECAR_CCXT_BASE_URL_KRAKEN", "key": "ccxt_base_url_kraken",
        "value": "https://user:***@gw.example", "from": "env"}
    assert rows["SIDECAR_CCXT_MARKETS_KRAKEN"]["from"] == "file (ccxt.markets_kraken)"
    assert rows["SIDECAR_CCXT_WS_URL_OKX"] == {
        "variable": "SIDECAR_CCXT_WS_URL_OKX", "key": "ccxt_ws_url_okx",
        "value": "the exchange's own hosts", "from": "default"}
    assert rows["SIDECAR_CCXT_MARKETS_<ID>"]["from"] == "default"
    assert "GWSECRET" not in out.stdout


def test_reference_is_up_to_date() -> None:
    on_disk = (REPO / "docs" / "configuration.md").read_text()
    assert on_disk == reference_markdown(), \
        "regenerate: python -m sidecar config --reference > docs/configuration.md"


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m sidecar ARGS`` in ``tmp_path`` with no inherited settings or keys."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SIDECAR_") and not k.endswith("_API_KEY")}
    base.update(PYTHONPATH=str(REPO), SIDECAR_DATA_DIR=str(tmp_path / "data"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=tmp_path, env=base,
                          capture_output=True, text=True, timeout=60)


def test_config_command_shows_values_and_origins_with_secrets_masked(tmp_path: Path) -> None:
    write(tmp_path, FILE)
    (tmp_path / ".env").write_text("POLYGON_API_KEY=POLYSECRET\n")
    out = cli(tmp_path, "config", "--config", "sidecar.toml", "--json",
              env={"SIDECAR_TIMEFRAME": "1h", "TWELVEDATA_API_KEY": "TDSECRET"})
    assert out.returncode == 0, out.stderr
    rows = {r["variable"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["SIDECAR_TIMEFRAME"] == {"variable": "SIDECAR_TIMEFRAME", "key": "timeframe",
                                         "value": "1h", "from": "env"}
    assert rows["SIDECAR_BARS_CAP"]["value"] == "1000"
    assert rows["SIDECAR_BARS_CAP"]["from"] == "file (bars_cap)"
    assert rows["SIDECAR_REDIS_URL"]["value"] == "redis://:***@127.0.0.1:6379/0"
    assert rows["SIDECAR_HTTP_PORT"] == {"variable": "SIDECAR_HTTP_PORT", "key": "http_port",
                                         "value": "8787", "from": "default"}
    assert rows["POLYGON_API_KEY"]["value"] == "***" and rows["POLYGON_API_KEY"]["from"] == ".env"
    assert rows["TWELVEDATA_API_KEY"]["from"] == "env"
    assert rows["ALPHAVANTAGE_API_KEY"]["value"] == "-"
    assert set(rows) == set(DOCS)
    text = cli(tmp_path, "--config", "sidecar.toml", "config").stdout
    for secret in ("POLYSECRET", "TDSECRET", "hunter22"):
        assert secret not in out.stdout + text
    assert "configuration file: sidecar.toml" in text and "file (redis.url)" in text


def test_bad_value_in_the_file_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    write(tmp_path, '[http]\nport = 70000\n')
    out = cli(tmp_path, "run", env={"SIDECAR_CONFIG": "sidecar.toml", "SIDECAR_SOURCES": "sim"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("sidecar: bad configuration: sidecar.toml: http.port (SIDECAR_HTTP_PORT): "
                                  "70000 is out of range [0, 65535]")
    # From the environment the same value is named by its variable.
    out = cli(tmp_path, "config", env={"SIDECAR_HTTP_PORT": "70000"})
    assert out.returncode == 2
    assert "bad configuration: SIDECAR_HTTP_PORT: 70000 is out of range" in out.stderr


def test_reference_command_prints_the_reference(tmp_path: Path) -> None:
    out = cli(tmp_path, "config", "--reference")
    assert out.returncode == 0 and out.stdout == reference_markdown()
