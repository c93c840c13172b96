"""Data sources, by name. ``build_source`` turns a name from ``SIDECAR_SOURCES`` into one.

Each provider module exposes ``build(settings, providers) -> Source`` (``providers``:
the provider settings and the symbol map, :class:`~sidecar.sources._http.Providers`,
read once for all the sources; ``ccxt_exchange.build`` also takes the exchange id) and raises
:class:`SourceDisabled` when it cannot run (e.g. its API key is missing), so the
daemon can report it at start and go on with the others.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError, SidecarError
from sidecar.settings import Settings
from sidecar.sources.base import LatestResult, Source

if TYPE_CHECKING:
    from sidecar.sources._http import Providers

__all__ = ["KNOWN_SOURCES", "LatestResult", "Source", "SourceDisabled", "build_source"]

#: name -> module that implements it (imported only when configured).
KNOWN_SOURCES: dict[str, str] = {
    "sim": "sidecar.sources.sim",
    "replay": "sidecar.sources.replay",
    "yahoo": "sidecar.sources.yahoo",
    "alphavantage": "sidecar.sources.alphavantage",
    "twelvedata": "sidecar.sources.twelvedata",
    "polygon": "sidecar.sources.polygon",
    "ccxt:<exchange id>": "sidecar.sources.ccxt_exchange",
}


class SourceDisabled(SidecarError):
    """A configured source cannot run here; the message says why (never a secret)."""


def build_source(name: str, settings: Settings, env: Mapping[str, str] | None = None,
                 providers: Providers | None = None) -> Source:
    """Create the source called ``name``; raises ``ConfigError`` or ``SourceDisabled``.

    ``providers`` (read from ``env`` when not given) is shared by the sources built together.
    """
    if name == "sim":
        from sidecar.sources._http import Providers
        from sidecar.sources.sim import SimSource

        mapped = (providers or Providers.from_env(os.environ if env is None else env)).symbols
        return SimSource(seed=settings.sim_seed,
                         asset_classes={s: mapped.entry(s).asset_class for s in mapped})
    if name == "replay":
        from sidecar.sources.replay import ReplaySource

        if settings.replay_file is None:
            raise ConfigError("SIDECAR_REPLAY_FILE", "the replay source needs a file of bars")
        return ReplaySource(settings.replay_file, speed=settings.replay_speed)
    module_name = "sidecar.sources.ccxt_exchange" if name.startswith("ccxt:") else KNOWN_SOURCES.get(name)
    if module_name is None:
        raise ConfigError(
            "SIDECAR_SOURCES", f"unknown source {name!r} (known: {', '.join(KNOWN_SOURCES)})"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise SourceDisabled(f"{name}: not available in this build") from None
        raise
    if providers is None:
        from sidecar.sources._http import Providers

        providers = Providers.from_env(os.environ if env is None else env)
    if name.startswith("ccxt:"):
        exchange: Source = module.build(settings, providers, name.partition(":")[2])
        return exchange
    source: Source = module.build(settings, providers)
    return source
