"""The symbol mapping: packaged file, defaults, passthrough, invalid entries."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.symbols import load_symbol_map, mapping_report, parse_symbol_map


def test_packaged_mapping():
    m = load_symbol_map()
    eur = m.for_source("alphavantage", "EURUSD")
    assert eur and (eur.base, eur.quote, eur.asset_class) == ("EUR", "USD", "fx") and not eur.has_volume
    assert m.for_source("yahoo", "EURUSD").ticker == "EURUSD=X"
    assert m.for_source("twelvedata", "EURUSD").ticker == "EUR/USD"
    assert m.for_source("polygon", "BTCUSD").ticker == "X:BTCUSD"
    assert m.for_source("yahoo", "BTCUSD").ticker == "BTC-USD"
    assert m.for_source("yahoo", "XAUUSD") is None  # cannot serve: skipped, not an error
    assert m.entry("NAS100").broker == "NAS100"
    assert m.for_source("yahoo", "BRK.B").ticker == "BRK-B"


def test_unlisted_symbol_is_a_us_stock_and_provider_spellings_pass_through():
    m = load_symbol_map()
    p = m.for_source("polygon", "ZZZZ")
    assert p and p.ticker == "ZZZZ" and p.asset_class == "stock"
    assert m.for_source("polygon", "C:EURUSD").asset_class == "fx"
    assert m.for_source("yahoo", "EURUSD=X").asset_class == "fx"
    td = m.for_source("twelvedata", "EUR/USD")
    assert td.ticker == "EUR/USD" and td.asset_class == "fx"
    av = m.for_source("alphavantage", "BTC/USD")
    assert (av.base, av.quote, av.asset_class) == ("BTC", "USD", "crypto")


@pytest.mark.parametrize(
    ("data", "msg"),
    [({"eurusd": {}}, "not a canonical symbol"),
     ({"EURUSD": {"asset_class": "forex"}}, "asset_class"),
     ({"EURUSD": {"asset_class": "fx", "yahooo": "X"}}, "unknown keys"),
     ({"EURUSD": {"asset_class": "fx", "alphavantage": "EURUSD"}}, "needs"),
     ({"EURUSD": {"asset_class": "fx", "alphavantage": {"from": "EUR"}}}, "'from' and 'to'"),
     ({"EURUSD": {"asset_class": "fx", "polygon": 3}}, "expected a ticker")],
)
def test_invalid_entries_are_reported_and_the_rest_load(data, msg):
    good = {"BTCUSD": {"asset_class": "crypto", "polygon": "X:BTCUSD"}}
    m = parse_symbol_map({**data, **good})
    (bad,) = data
    assert msg in m.rejected[bad] and bad not in m
    assert m.for_source("polygon", "BTCUSD").ticker == "X:BTCUSD"
    # The rejected symbol is served by nobody (not guessed as a US stock).
    assert all(m.for_source(p, bad) is None for p in ("yahoo", "polygon", "twelvedata", "alphavantage"))
    report = dict(mapping_report(m, [bad, "BTCUSD", "ZZZZ"]))
    assert msg in report[bad] and "ZZZZ" in report and "BTCUSD" not in report


def test_file_errors(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text("[EURUSD\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_symbol_map(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_symbol_map(tmp_path / "missing.toml")
