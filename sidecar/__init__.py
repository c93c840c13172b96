"""sidecar: a low-latency asyncio market-data daemon.

Bars enter through :mod:`sidecar.sources`, are checked by :mod:`sidecar.validation`,
stored by :mod:`sidecar.redis_store` and :mod:`sidecar.sqlite_store`, and turned into
indicators by :mod:`sidecar.features`. The daemon itself lives in :mod:`sidecar.app`.
"""

__version__ = "0.1.0"
