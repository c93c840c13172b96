"""Client side for trading processes: read many symbols' features in one round trip.

>>> scanner = Scanner.from_settings(Settings.from_env())
>>> rows = await scanner.read(["AAPL", "MSFT"])
>>> signals = evaluate(rows, SignalRules.from_env())      # sidecar.signals

Each row is the features map (see README "Redis layout") plus ``broker`` (the
broker's spelling from the symbol mapping), ``age_ms`` (now minus ``computed_at``)
and ``stale``: true when the key is missing, older than ``stale_after_ms``,
flagged stale by the daemon, or the daemon's heartbeat is gone. A missing key
gives a row with ``missing: true`` and no feature values.

To react to the daemon instead of polling, iterate :meth:`Scanner.updates` (or
:meth:`Scanner.cycles` for the bare announcements): the daemon publishes on
``{prefix}:v1:cycles`` after every cycle, once the cycle's writes are readable.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import msgpack
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.redis_store import Keys, connect
from sidecar.settings import Settings

_ARRAY32 = b"\xdd"


class Scanner:
    """Reads features with one ``MGET`` (heartbeat included)."""

    __slots__ = ("_cached_packed", "_cached_symbols", "_owns", "brokers", "keys", "prefix", "redis",
                 "stale_after_ms", "tf")

    def __init__(self, redis: Redis, prefix: str = "sidecar", tf: str = "1m",
                 stale_after_ms: int = 2_000, *, brokers: Mapping[str, str] | None = None,
                 owns: bool = False) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.tf = tf
        self.stale_after_ms = stale_after_ms
        #: canonical -> broker spelling; a symbol not in it is spelled the same.
        self.brokers: Mapping[str, str] = brokers or {}
        self._owns = owns
        self._cached_symbols: tuple[str, ...] | None = None
        self._cached_packed: list[bytes] = []

    @classmethod
    def from_settings(cls, settings: Settings, *, stale_after_ms: int | None = None,
                      env: Mapping[str, str] | None = None, pool_size: int = 4) -> Scanner:
        """Connect to the daemon's Redis (``SIDECAR_REDIS_URL`` or its embedded socket).

        Broker spellings come from the symbol mapping (``SIDECAR_SYMBOLS_FILE``);
        ``stale_after_ms`` defaults to the features' TTL (``SIDECAR_FEATURES_TTL_MS``).
        """
        from sidecar.provider_settings import ProviderSettings
        from sidecar.symbols import load_symbol_map

        symbol_map = load_symbol_map(ProviderSettings.from_env(env or os.environ).symbols_file)
        brokers = {s: symbol_map.entry(s).broker for s in settings.symbols}
        brokers.update({s: symbol_map.entry(s).broker for s in symbol_map})
        url = settings.redis_url or f"unix://{settings.redis_socket}"
        redis = connect(url, pool_size=pool_size, timeout_s=settings.redis_timeout_s)
        return cls(redis, settings.redis_prefix, settings.timeframe.name,
                   settings.features_ttl_ms if stale_after_ms is None else stale_after_ms,
                   brokers=brokers, owns=True)

    def for_timeframe(self, tf: str) -> Scanner:
        """A scanner of another timeframe on the same connection pool and broker spellings."""
        if tf == self.tf:
            return self
        return Scanner(self.redis, self.prefix, tf, self.stale_after_ms, brokers=self.brokers)

    async def _mget(self, symbols: Sequence[str]) -> list[bytes | None]:
        """``MGET`` of the symbols' feature keys plus the heartbeat (last).

        A scanner asks for the same list every time, so the encoded command is built
        once and sent as is: packing 500 keys costs about as much as the round trip.
        """
        wanted = tuple(symbols)
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if wanted != self._cached_symbols:
                keys = [self.keys.features(self.tf, s) for s in wanted]
                keys.append(self.keys.heartbeat)
                self._cached_packed = conn.pack_command("MGET", *keys)
                self._cached_symbols = wanted
            packed = self._cached_packed  # ours even if a concurrent read replaces the cache
            try:
                await conn.send_packed_command(packed, check_health=False)
                return cast(list[bytes | None], await conn.read_response())
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await conn.disconnect()
            # Once more on a new connection (the server may have restarted since this one was used).
            await conn.send_packed_command(packed)
            return cast(list[bytes | None], await conn.read_response())
        finally:
            await pool.release(conn)

    async def read(self, symbols: Sequence[str]) -> list[dict[str, Any]]:
        """The features of ``symbols`` (in that order), one ``MGET``, decoded."""
        raw = await self._mget(symbols)
        alive = raw.pop() is not None  # the heartbeat
        now = int(time.time() * 1000)
        bound = self.stale_after_ms
        brokers = self.brokers
        present = [item for item in raw if item is not None]
        # One C call for all maps: wrap the values in a msgpack array32 header.
        decoded: list[dict[str, Any]] = msgpack.unpackb(
            _ARRAY32 + len(present).to_bytes(4, "big") + b"".join(present))
        it = iter(decoded)
        rows: list[dict[str, Any]] = []
        for sym, item in zip(symbols, raw, strict=True):
            if item is None:
                rows.append({"symbol": sym, "broker": brokers.get(sym, sym), "tf": self.tf,
                             "age_ms": None, "stale": True, "missing": True})
                continue
            row = next(it)
            age = now - row["computed_at"]
            row["broker"] = brokers.get(sym, sym)
            row["age_ms"] = age
            row["stale"] = row.get("stale") is True or age > bound or not alive
            rows.append(row)
        return rows

    async def cycles(self) -> AsyncIterator[dict[str, Any]]:
        """The daemon's announcement after each cycle, as it comes (pub/sub).

        Each is ``{cycle, t, tick, tf, features, updated}``: ``features`` keys
        written, ``updated`` the symbols a source answered for in that cycle.
        """
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.keys.cycles_channel)
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield dict(msgpack.unpackb(message["data"]))
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def updates(self, symbols: Sequence[str]) -> AsyncIterator[list[dict[str, Any]]]:
        """:meth:`read` right after each cycle of the daemon: no polling."""
        async for _ in self.cycles():
            yield await self.read(symbols)

    async def close(self) -> None:
        if self._owns:
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()
