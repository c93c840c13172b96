"""Provider settings: defaults, bad values name the variable, keys never in repr."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.http_session import redact, redact_headers
from sidecar.provider_settings import ProviderSettings


def test_defaults_and_repr_hides_keys():
    s = ProviderSettings.from_env({"POLYGON_API_KEY": "SECRETPOLY", "TWELVEDATA_API_KEY": "SECRETTD"})
    assert s.alphavantage_per_day == 25 and s.alphavantage_per_second == 1
    assert s.twelvedata_credits_per_minute == 8 and s.twelvedata_credits_per_day == 800
    assert s.polygon_per_minute == 5 and s.yahoo_base_url is None
    assert "SECRET" not in repr(s) and "SECRET" not in str(s)
    assert set(s.secrets()) == {"SECRETPOLY", "SECRETTD"}


@pytest.mark.parametrize(
    ("env", "var"),
    [({"SIDECAR_POLYGON_BASE_URL": "ftp://x"}, "SIDECAR_POLYGON_BASE_URL"),
     ({"SIDECAR_YAHOO_STREAM_URL": "http://x"}, "SIDECAR_YAHOO_STREAM_URL"),
     ({"SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE": "0"}, "SIDECAR_TWELVEDATA_CREDITS_PER_MINUTE"),
     ({"SIDECAR_HTTP_TIMEOUT_S": "abc"}, "SIDECAR_HTTP_TIMEOUT_S"),
     ({"SIDECAR_BREAKER_FAIL_MAX": "1.5"}, "SIDECAR_BREAKER_FAIL_MAX"),
     ({"SIDECAR_SYMBOLS_FILE": "/nonexistent/x.toml"}, "SIDECAR_SYMBOLS_FILE"),
     ({"SIDECAR_YAHOO_STREAM": "maybe"}, "SIDECAR_YAHOO_STREAM")],
)
def test_bad_values_name_the_variable(env, var):
    with pytest.raises(ConfigError) as info:
        ProviderSettings.from_env(env)
    assert info.value.setting == var


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
