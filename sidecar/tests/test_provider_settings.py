"""Provider settings: defaults, bad values name the variable, keys never in repr."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.http_session import redact, redact_headers
from sidecar.provider_settings import ProviderSettings
from sidecar.tests.helpers import PROVIDER_BAD_VALUES as BAD_VALUES


def test_defaults_and_repr_hides_keys():
    s = ProviderSettings.from_env({"POLYGON_API_KEY": "SECRETPOLY", "TWELVEDATA_API_KEY": "SECRETTD"})
    assert s.alphavantage_per_day == 25 and s.alphavantage_per_second == 1
    assert s.twelvedata_credits_per_minute == 8 and s.twelvedata_credits_per_day == 800
    assert s.polygon_per_minute == 5 and s.yahoo_base_url is None
    assert "SECRET" not in repr(s) and "SECRET" not in str(s)
    assert set(s.secrets()) == {"SECRETPOLY", "SECRETTD"}


def test_every_variable_read_is_covered():
    import inspect
    import re

    from sidecar import provider_settings

    read = set(re.findall(r'"((?:SIDECAR|[A-Z]+)_[A-Z0-9_]+)"', inspect.getsource(provider_settings)))
    read.discard("SIDECAR_")  # not a variable
    assert read == set(BAD_VALUES), "a provider variable lacks a bad-value test"


def load_like_the_daemon(env):
    """What the daemon reads at start besides Settings: provider settings and the mapping."""
    from sidecar.symbols import load_symbol_map

    provider = ProviderSettings.from_env(env)
    load_symbol_map(provider.symbols_file)
    return provider


@pytest.mark.parametrize(("var", "value"), [(n, v) for n, vs in BAD_VALUES.items() for v in vs])
def test_bad_values_name_the_variable(var, value, tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[EURUSD\n")
    value = value.replace("{dir}", str(tmp_path)).replace("{bad_toml}", str(bad_toml))
    with pytest.raises(ConfigError) as info:
        load_like_the_daemon({var: value})
    assert info.value.setting == var and str(info.value).startswith(f"{var}: ")
    if var.endswith("_API_KEY"):
        assert "SECRET" not in str(info.value)  # a key, even a malformed one, is never echoed


def test_bad_key_is_not_echoed():
    with pytest.raises(ConfigError) as info:
        ProviderSettings.from_env({"ALPHAVANTAGE_API_KEY": "has space SECRET"})
    assert info.value.setting == "ALPHAVANTAGE_API_KEY" and "SECRET" not in str(info.value)


def test_redact():
    url = "https://www.alphavantage.co/query?function=X&apikey=ABC123&symbol=MSFT"
    assert redact(url) == "https://www.alphavantage.co/query?function=X&apikey=***&symbol=MSFT"
    assert "VAL" not in redact("GET /x?token=VAL1&api_key=VAL2")
    assert "abcdef" not in redact("Authorization: Bearer abcdef")
    assert "abcdef" not in redact("{'Authorization': 'apikey abcdef'}")
    assert redact("echoed K3Y here", secrets=["K3Y"]) == "echoed *** here"
    assert redact_headers({"Authorization": "Bearer x", "Accept": "a"}) == {"Authorization": "***", "Accept": "a"}
