"""``python -m sidecar symbols``: the mapping as the daemon and the scanner use it.

Run as the real command line (a subprocess) on a user's mapping file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sidecar.symbols import load_symbol_map

REPO = Path(__file__).resolve().parents[2]

USER_MAP = """
[EURUSD]
asset_class = "fx"
broker = "EURUSD.m"
yahoo = "EURUSD=X"
alphavantage = { from = "EUR", to = "USD" }
twelvedata = "EUR/USD"
polygon = "C:EURUSD"

[GER40]
asset_class = "index"
broker = "DE40"
session = "09:00 Europe/Berlin"
yahoo = "^GDAXI"
polygon = false
"""


def sidecar(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "symbols", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_symbols_json_and_table(clean_env: dict[str, str], tmp_path: Path) -> None:
    mapping = tmp_path / "symbols.toml"
    mapping.write_text(USER_MAP)
    env = {**clean_env, "SIDECAR_SYMBOLS_FILE": str(mapping), "SIDECAR_SYMBOLS": "EURUSD,GER40,AAPL"}

    done = sidecar(env, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows == [
        {"symbol": "EURUSD", "asset_class": "fx", "broker": "EURUSD.m", "session": None,
         "calendar": "FX", "extended_hours": "exclude",
         "yahoo": "EURUSD=X", "alphavantage": {"from": "EUR", "to": "USD"},
         "twelvedata": "EUR/USD", "polygon": "C:EURUSD", "ccxt": None},
        {"symbol": "GER40", "asset_class": "index", "broker": "DE40",
         "session": "09:00 Europe/Berlin", "calendar": "XETR", "extended_hours": "exclude", "yahoo": "^GDAXI", "alphavantage": None,
         "twelvedata": None, "polygon": None, "ccxt": None},
        # Not in the file: a US stock spelled the same everywhere.
        {"symbol": "AAPL", "asset_class": "stock", "broker": "AAPL",
         "session": "09:30 America/New_York", "calendar": "XNYS", "extended_hours": "exclude", "yahoo": "AAPL", "alphavantage": "AAPL",
         "twelvedata": "AAPL", "polygon": "AAPL", "ccxt": None},
    ]

    done = sidecar(env, "--symbols", "ger40")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["symbol", "asset_class", "broker", "yahoo", "alphavantage",
                              "twelvedata", "polygon", "ccxt", "session"]
    assert row.split() == ["GER40", "index", "DE40", "^GDAXI", "-", "-", "-", "-", "09:00",
                           "Europe/Berlin"]
    assert done.stderr.strip() == f"mapping: {mapping}"


def test_symbols_all_lists_the_packaged_file(clean_env: dict[str, str]) -> None:
    done = sidecar({**clean_env, "SIDECAR_SYMBOLS": "AAPL"}, "--all", "--json")
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line)["symbol"] for line in done.stdout.splitlines()]
    packaged = list(load_symbol_map())
    assert printed == ["AAPL", *[s for s in packaged if s != "AAPL"]]
    xau = next(json.loads(line) for line in done.stdout.splitlines() if '"XAUUSD"' in line)
    assert (xau["asset_class"], xau["yahoo"], xau["polygon"]) == ("metal", None, "C:XAUUSD")


def test_symbols_bad_input_exits_2_naming_the_setting(clean_env: dict[str, str], tmp_path: Path) -> None:
    done = sidecar(clean_env, "--symbols", "C:EURUSD")
    assert done.returncode == 2 and "--symbols" in done.stderr and done.stdout == ""
    bad = tmp_path / "bad.toml"
    bad.write_text('[EURUSD]\nasset_class = "forex"\n')
    done = sidecar({**clean_env, "SIDECAR_SYMBOLS_FILE": str(bad)})
    assert done.returncode == 2 and "SIDECAR_SYMBOLS_FILE" in done.stderr and "forex" in done.stderr


def test_symbols_shows_each_configured_ccxt_exchange(clean_env: dict[str, str]) -> None:
    env = {**clean_env, "SIDECAR_SYMBOLS": "BTCUSD,EURUSD",
           "SIDECAR_SOURCES": "ccxt:binance,ccxt:kraken,yahoo"}
    done = sidecar(env)
    assert done.returncode == 0, done.stderr
    header, btc, eur = (line.split() for line in done.stdout.splitlines())
    assert header[-3:] == ["ccxt:binance", "ccxt:kraken", "session"]
    assert btc[-3:] == ["BTC/USDT", "BTC/USD", "-"] and eur[-3:] == ["-", "-", "-"]
    row = json.loads(sidecar(env, "--json", "--symbols", "BTCUSD").stdout)
    assert (row["ccxt:binance"], row["ccxt:kraken"]) == ("BTC/USDT", "BTC/USD")
    assert row["ccxt"] == {"default": "BTC/USDT", "kraken": "BTC/USD", "coinbase": "BTC/USD",
                           "bitstamp": "BTC/USD"}
