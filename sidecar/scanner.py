"""Client side for trading processes: read many symbols' features in one round trip.

>>> scanner = Scanner.from_settings(Settings.from_env())
>>> rows = await scanner.read(["AAPL", "MSFT"])

Each row is the features map (see README "Redis layout") plus ``age_ms`` (now
minus ``computed_at``) and ``stale``: true when the key is missing, older than
``stale_after_ms``, flagged stale by the daemon, or the daemon's heartbeat is gone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgpack
from redis.asyncio import Redis

from sidecar.redis_store import Keys, connect
from sidecar.settings import Settings


class Scanner:
    """Reads features with one ``MGET`` (heartbeat included)."""

    __slots__ = ("_owns", "keys", "redis", "stale_after_ms", "tf")

    def __init__(self, redis: Redis, prefix: str = "sidecar", tf: str = "1m",
                 stale_after_ms: int = 2_000, *, owns: bool = False) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.tf = tf
        self.stale_after_ms = stale_after_ms
        self._owns = owns

    @classmethod
    def from_settings(cls, settings: Settings) -> Scanner:
        """Connect to the daemon's Redis (``SIDECAR_REDIS_URL`` or its embedded socket)."""
        url = settings.redis_url or f"unix://{settings.redis_socket}"
        redis = connect(url, pool_size=4, timeout_s=settings.redis_timeout_s)
        return cls(redis, settings.redis_prefix, settings.timeframe.name,
                   settings.features_ttl_ms, owns=True)

    async def read(self, symbols: Sequence[str]) -> list[dict[str, Any]]:
        keys = [self.keys.features(self.tf, s) for s in symbols]
        keys.append(self.keys.heartbeat)
        raw = await self.redis.mget(keys)
        alive = raw[-1] is not None
        now = int(time.time() * 1000)
        rows: list[dict[str, Any]] = []
        for sym, item in zip(symbols, raw[:-1], strict=True):
            if item is None:
                rows.append({"symbol": sym, "tf": self.tf, "age_ms": None, "stale": True,
                             "missing": True})
                continue
            row: dict[str, Any] = msgpack.unpackb(item)
            age = now - int(row["computed_at"])
            row["age_ms"] = age
            row["stale"] = bool(row.get("stale")) or age > self.stale_after_ms or not alive
            rows.append(row)
        return rows

    async def close(self) -> None:
        if self._owns:
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()
