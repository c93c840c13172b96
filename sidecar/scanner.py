"""Client side for trading processes: read many symbols' features in one round trip.

>>> scanner = Scanner.from_settings(Settings.from_env())
>>> rows = await scanner.read(["AAPL", "MSFT"])
>>> signals = evaluate(rows, SignalRules.from_env())      # sidecar.signals

Each row is the features map (see docs/redis-layout.md) plus ``broker`` (the
broker's spelling from the symbol mapping), ``age_ms`` (now minus ``computed_at``)
and ``stale``: true when the key is missing, older than ``stale_after_ms``,
flagged stale by the daemon, or the daemon's heartbeat is gone. A missing key
gives a row with ``missing: true`` and no feature values.

To react to the daemon instead of polling, iterate :meth:`Scanner.updates` (or
:meth:`Scanner.cycles` for the bare announcements): the daemon publishes on
``{prefix}:v1:cycles`` after every cycle, once the cycle's writes are readable.

On a Redis Cluster (found from the URL alone: ``INFO cluster``) a read costs one round
trip per node, all at once: the keys are grouped by the node serving their slot, one
``MGET`` per bucket slot (docs/redis-layout.md), the ``MGET`` s of one node sent as one
packed pipeline. With shards (``SIDECAR_SHARDS=N``) a row is stale when the heartbeat
of the shard that owns its symbol is gone. A reader told a different number of shards
than the daemon runs (or none) finds the running ones itself: when every heartbeat it
reads is gone, it looks at the shard registry (at most every :data:`DISCOVER_EVERY_S`)
and reads by the shards whose heartbeats answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import msgpack
import msgspec
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.redis_store import (
    AnyRedis,
    Keys,
    close_client,
    connect,
    connect_cluster,
    is_cluster,
    lost_connection,
)
from sidecar.settings import Settings
from sidecar.shards import explicit_shards, shard_of

_ARRAY32 = b"\xdd"
_NIL = b"\xc0"

#: Decodes a read's feature maps to the values ``msgpack.unpackb`` gives, in about 40% of
#: its time (bench/scanner_read.py): most of a large read's CPU is this decode.
_decode_maps = msgspec.msgpack.Decoder().decode

log = logging.getLogger("sidecar.scanner")

#: While every heartbeat a reader reads is gone, how often it looks for the shards
#: (or the unsharded daemon) that do run.
DISCOVER_EVERY_S = 5.0


class _NodeRead:
    """One cluster node's part of a read: its ``MGET`` s packed once, and where each
    ``MGET`` 's values go in the read's list of keys."""

    __slots__ = ("node", "packed", "places")

    def __init__(self, node: ClusterNode, packed: list[bytes], places: list[list[int]]) -> None:
        self.node = node
        self.packed = packed
        self.places = places


class _ReadPlan:
    """A read's symbols and timeframes (``key``), its (symbol, timeframe) pairs in order,
    and each pair's shard (``None`` with one shard)."""

    __slots__ = ("key", "owners", "wanted")

    def __init__(self, key: tuple[tuple[str, ...], tuple[str, ...]], wanted: list[tuple[str, str]],
                 owners: list[int] | None) -> None:
        self.key = key
        self.wanted = wanted
        self.owners = owners


class Scanner:
    """Reads features with one ``MGET`` (heartbeats included); on a cluster one round
    trip per node, concurrently."""

    __slots__ = ("_cached_packed", "_cached_symbols", "_discover_at", "_explicit", "_owns", "_plan",
                 "_probe_url", "_read_plan", "brokers", "keys", "read_replicas", "redis", "shards",
                 "stale_after_ms", "tf")

    def __init__(self, redis: AnyRedis, prefix: str = "sidecar", tf: str = "1m",
                 stale_after_ms: int = 2_000, *, brokers: Mapping[str, str] | None = None,
                 owns: bool = False, shards: int = 1, explicit_shards: Mapping[str, int] | None = None,
                 probe_url: str | None = None, read_replicas: bool = False) -> None:
        self.redis = redis
        self.keys = Keys(prefix, cluster=isinstance(redis, RedisCluster))
        self.tf = tf
        self.stale_after_ms = stale_after_ms
        #: canonical -> broker spelling; a symbol not in it is spelled the same.
        self.brokers: Mapping[str, str] = brokers or {}
        #: How many shards write (docs/operations.md, "Shards"), and the mapping's explicit owners.
        self.shards = shards
        self._explicit: Mapping[str, int] = explicit_shards or {}
        #: On a cluster, read from replicas (``READONLY``): less load on the masters, a
        #: little replication lag.
        self.read_replicas = read_replicas
        self._owns = owns
        #: The URL a single-server client was made from: the first read asks whether
        #: it is a cluster node, and switches to a cluster client if so.
        self._probe_url = probe_url
        self._cached_symbols: tuple[tuple[str, str], ...] | None = None
        self._cached_packed: list[bytes] = []
        self._plan: list[_NodeRead] | None = None
        self._read_plan: _ReadPlan | None = None
        self._discover_at = 0.0  # time.monotonic() of the next look for running shards

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
        explicit = explicit_shards(symbol_map)
        url = settings.redis_url or f"unix://{settings.redis_socket}"
        redis = connect(url, pool_size=pool_size, timeout_s=settings.redis_timeout_s)
        return cls(redis, settings.redis_prefix, settings.timeframe.name,
                   settings.features_ttl_ms if stale_after_ms is None else stale_after_ms,
                   brokers=brokers, owns=True, shards=settings.shards, explicit_shards=explicit,
                   probe_url=None if settings.redis_url is None else url,
                   read_replicas=settings.read_replicas)

    async def _detect(self) -> None:
        """Switch to a cluster client if the server is a cluster node (asked once)."""
        url = self._probe_url
        assert url is not None and isinstance(self.redis, Redis)
        found = await is_cluster(self.redis)
        if found is None:
            return  # unreachable: asked again next time
        self._probe_url = None
        if found:
            timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout") or 2.0
            await close_client(self.redis)
            cluster = connect_cluster(url, timeout_s=timeout, read_from_replicas=self.read_replicas)
            await cluster.initialize()
            self.redis = cluster
            self.keys = Keys(self.keys.base.rsplit(":", 1)[0], cluster=True)
            self._cached_symbols = None

    def _heartbeat_keys(self) -> list[str]:
        if self.shards > 1:
            return [self.keys.heartbeat_of(i) for i in range(self.shards)]
        return [self.keys.heartbeat_of(None)]

    def _wanted_keys(self, wanted: tuple[tuple[str, str], ...]) -> list[str]:
        """The feature keys of ``wanted`` (symbol, timeframe), then the heartbeat keys."""
        keys = [self.keys.features(tf, s) for s, tf in wanted]
        keys += self._heartbeat_keys()
        return keys

    async def client(self) -> AnyRedis:
        """The connection, a cluster client once the server is found to be a cluster node:
        for reads beyond the features (a symbol's bars) on the same pool."""
        if self._probe_url is not None:
            await self._detect()
        return self.redis

    async def _fetch(self, wanted: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """The feature values of ``wanted`` (symbol, timeframe), then the heartbeats (one per shard)."""
        if self._probe_url is not None:
            await self._detect()
        if isinstance(self.redis, RedisCluster):
            return await self._cluster_mget(self.redis, wanted)
        return await self._mget(wanted)

    def _cluster_plan(self, cluster: RedisCluster, keys: list[str]) -> list[_NodeRead]:
        """Group ``keys`` by slot (one ``MGET`` each) and the slots by the node serving them."""
        manager = cluster.nodes_manager
        strategy = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS if self.read_replicas else None
        by_node: dict[str, tuple[ClusterNode, dict[int, list[int]]]] = {}
        for i, key in enumerate(keys):
            slot = key_slot(key.encode())
            node = manager.get_node_from_slot(slot, load_balancing_strategy=strategy)
            by_node.setdefault(node.name, (node, {}))[1].setdefault(slot, []).append(i)
        plan = []
        for node, slots in by_node.values():
            places = list(slots.values())
            conn = node.acquire_connection()
            try:
                packed = conn.pack_commands([("MGET", *(keys[i] for i in idx)) for idx in places])
            finally:
                node.release(conn)
            plan.append(_NodeRead(node, packed, places))
        return plan

    @staticmethod
    async def _node_round(part: _NodeRead) -> list[list[bytes | None]]:
        """Send one node its packed ``MGET`` s and read their answers: one round trip."""
        conn = part.node.acquire_connection()
        try:
            await conn.send_packed_command(part.packed, check_health=False)
            return [cast(list[bytes | None], await conn.read_response()) for _ in part.places]
        except BaseException:
            await conn.disconnect()  # answers may be left unread: not reusable
            raise
        finally:
            part.node.release(conn)

    async def _cluster_mget(self, cluster: RedisCluster,
                            symbols: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """One packed pipeline of ``MGET`` s per node, all nodes at once.

        A node that fails or redirects (a failover, resharding) makes the read fall
        back to the client's own slot-aware ``MGET`` (it follows MOVED/ASK and
        refreshes its slot map); the next read plans again from the new map.
        """
        wanted = tuple(symbols)
        if wanted != self._cached_symbols or self._plan is None:
            self._cached_symbols = None
            keys = self._wanted_keys(wanted)
            self._plan = self._cluster_plan(cluster, keys)
            self._cached_symbols = wanted
        plan = self._plan
        size = sum(len(idx) for part in plan for idx in part.places)
        out: list[bytes | None] = [None] * size
        try:
            answers = await asyncio.gather(*(self._node_round(part) for part in plan))
        except (RedisError, OSError):
            self._plan = None
            await cluster.nodes_manager.initialize()
            keys = self._wanted_keys(wanted)
            return cast(list[bytes | None], await cluster.mget_nonatomic(keys))
        for part, values in zip(plan, answers, strict=True):
            for idx, got in zip(part.places, values, strict=True):
                for i, value in zip(idx, got, strict=True):
                    out[i] = value
        return out

    async def _mget(self, symbols: Sequence[tuple[str, str]]) -> list[bytes | None]:
        """``MGET`` of the symbols' feature keys plus the heartbeats (last).

        A scanner asks for the same list every time, so the encoded command is built
        once and sent as is: packing 500 keys costs about as much as the round trip.
        """
        wanted = tuple(symbols)
        assert isinstance(self.redis, Redis)
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if wanted != self._cached_symbols:
                keys = self._wanted_keys(wanted)
                self._cached_packed = conn.pack_command("MGET", *keys)
                self._cached_symbols = wanted
            packed = self._cached_packed  # ours even if a concurrent read replaces the cache
            try:
                await conn.send_packed_command(packed, check_health=False)
                return cast(list[bytes | None], await conn.read_response())
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await conn.disconnect()
            except RuntimeError as exc:
                if lost_connection(exc) is None:
                    raise
                await conn.disconnect()
            # Once more on a new connection (the server may have restarted since this one was used).
            try:
                await conn.send_packed_command(packed)
                return cast(list[bytes | None], await conn.read_response())
            except RuntimeError as exc:
                lost = lost_connection(exc)
                if lost is None:
                    raise
                raise lost from exc
        finally:
            await pool.release(conn)

    def _rows_plan(self, symbols: Sequence[str], tfs: Sequence[str]) -> _ReadPlan:
        """The (symbol, timeframe) pairs of a read and each one's shard, kept while the
        same lists are asked for: the same pair objects also make ``_mget`` 's check of its
        cached command a comparison by identity."""
        plan = self._read_plan
        key = (tuple(symbols), tuple(tfs))
        if plan is None or plan.key != key:
            wanted = [(s, tf) for s in key[0] for tf in key[1]]
            owners = ([shard_of(s, self.shards, self._explicit) for s, _ in wanted]
                      if self.shards > 1 else None)
            plan = self._read_plan = _ReadPlan(key, wanted, owners)
        return plan

    async def read(self, symbols: Sequence[str],
                   timeframes: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The features of ``symbols`` on ``timeframes`` (default: the scanner's one),
        one ``MGET``, decoded: per symbol in that order, its timeframes in that order."""
        plan = self._rows_plan(symbols, [self.tf] if timeframes is None else timeframes)
        wanted, owners = plan.wanted, plan.owners
        raw = await self._fetch(wanted)
        size = len(wanted)
        alive = [beat is not None for beat in raw[size:]]  # each shard's heartbeat
        if not any(alive) and time.monotonic() >= self._discover_at:
            self._discover_at = time.monotonic() + DISCOVER_EVERY_S
            if await self._discover_shards():
                return await self.read(symbols, timeframes)
        del raw[size:]
        dead = not alive[0]
        # One C call for all maps: the values (nil for a missing key) behind an array32 header.
        rows: list[dict[str, Any] | None] = _decode_maps(
            _ARRAY32 + size.to_bytes(4, "big") + b"".join([value or _NIL for value in raw]))
        now = int(time.time() * 1000)
        bound = self.stale_after_ms
        brokers = self.brokers
        for n, row in enumerate(rows):
            sym, tf = wanted[n]
            if row is None:
                rows[n] = {"symbol": sym, "broker": brokers.get(sym, sym), "tf": tf,
                           "age_ms": None, "stale": True, "missing": True}
                continue
            age = now - row["computed_at"]
            row["broker"] = brokers.get(sym, sym)
            row["age_ms"] = age
            row["stale"] = (row.get("stale") is True or age > bound
                            or (dead if owners is None else not alive[owners[n]]))
        return cast(list[dict[str, Any]], rows)

    async def _discover_shards(self) -> bool:
        """Find how many shards the daemon runs, when no heartbeat this reader reads
        answers: each shard count in the shard registry (largest first), then the
        unsharded daemon, whichever has a heartbeat. Returns whether the reader now
        reads by another count (:attr:`shards`)."""
        client = await self.client()
        try:
            fields = await client.hkeys(self.keys.shards)
            names = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
            counts = sorted({int(count) for name in names if (count := name.partition("/")[2]).isdigit()
                             and int(count) > 1}, reverse=True)
            for n in [*counts, 1]:
                if n == self.shards:
                    continue
                beats = await client.mget([self.keys.heartbeat_of(i if n > 1 else None) for i in range(n)])
                if any(beat is not None for beat in beats):
                    log.info("reading by the shards that run", extra={"shards": n, "told": self.shards})
                    self.shards = n
                    self._read_plan = None
                    self._cached_symbols = None
                    self._plan = None
                    return True
        except (RedisError, OSError):
            return False
        return False

    async def cycles(self, subscribed: asyncio.Event | None = None) -> AsyncIterator[dict[str, Any]]:
        """The daemon's announcement after each cycle, as it comes (pub/sub).

        Each is ``{cycle, t, tick, tf, features, updated}``: ``features`` keys
        written, ``updated`` the symbols a source answered for in that cycle. A message
        on the channel that is not an announcement is skipped (logged). ``subscribed``
        is set once the subscription is in place.
        """
        listener = await self.client()
        if isinstance(listener, RedisCluster):
            # A message published on any node reaches every node: one node's connection will do.
            node = listener.get_default_node()
            listener = Redis.from_pool(ConnectionPool(connection_class=node.connection_class,
                                                      max_connections=2, **node.connection_kwargs))
        pubsub = listener.pubsub()
        try:
            await pubsub.subscribe(self.keys.cycles_channel)
            if subscribed is not None:
                subscribed.set()
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                try:
                    announcement = msgpack.unpackb(message["data"])
                except (ValueError, msgpack.ExtraData) as exc:
                    log.warning("cycle announcement not readable", extra={"error": str(exc)[:200]})
                    continue
                if isinstance(announcement, dict):
                    yield announcement
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe()
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            if listener is not self.redis:
                await close_client(listener)

    async def updates(self, symbols: Sequence[str],
                      timeframes: Sequence[str] | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """:meth:`read` right after each cycle of the daemon: no polling."""
        async for _ in self.cycles():
            yield await self.read(symbols, timeframes)

    async def close(self) -> None:
        if self._owns:
            await close_client(self.redis)
