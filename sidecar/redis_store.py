"""Where bars and features are stored for the scanner: Redis, msgpack values.

Layout (schema version :data:`SCHEMA_VERSION`, documented in docs/redis-layout.md):

* ``{prefix}:v1:bars:{tf}:{symbol}`` — sorted set, score = open time (ms), member =
  msgpack ``[t, o, h, l, c, v|nil, src, flags]``; the newest ``bars_cap`` bars. A
  revision replaces the member with the same score, so bars never duplicate.
* ``{prefix}:v1:feat:{tf}:{symbol}`` — msgpack map of features, expires after
  ``features_ttl_ms`` (while its market is closed: that long after it reopens).
* ``{prefix}:v1:heartbeat`` — msgpack map ``{pid, t, cycle, tf, symbols}``, expires
  after ``heartbeat_ttl_ms``: the daemon is alive while it exists.
* ``{prefix}:v1:meta`` — msgpack map ``{schema, tf, symbols, started_at}``.
* ``{prefix}:v1:cycles`` — pub/sub channel; after each cycle the daemon publishes
  msgpack ``{cycle, t, tick, tf, features, updated}`` (inside the cycle's final write).

Every write is one ``EVALSHA`` of :data:`_WRITE_CYCLE_LUA` (bars and features as two
msgpack blobs; optionally the heartbeat and an announcement). The pipeline writes each
answered request's bars and features as soon as they are ready, then one final write
with the heartbeat and the announcement once all of them have completed
(docs/redis-layout.md).
``bench/store.py`` measures it against a pipeline of the same commands (about 4× slower:
redis-py's per-command cost) and against one bare ``MSET`` of the same bytes (the bound).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import LoadBalancingStrategy
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.bar import Bar
from sidecar.keys import SCHEMA_VERSION, Keys, bucket_of

log = logging.getLogger("sidecar.redis")

__all__ = ["SCHEMA_VERSION", "Keys", "PartialWrite", "RedisStore", "connect", "lost_connection",
           "open_client", "reports_lost_connection"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: A sorted set's size, oldest score and newest ARGV[1] members, read atomically.
_EDGES_LUA = """
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then return {0, false, {}} end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
return {n, first, redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1, 'WITHSCORES')}
"""

_WRITE_CYCLE_LUA = """
-- KEYS[1]: heartbeat key, KEYS[2]: meta key; or, on a cluster, KEYS[1]: a key of the
--   one bucket the bars and features belong to (then no heartbeat, no announcement)
-- ARGV: cap, feat_ttl_ms, hb_ttl_ms, hb_payload, bars, features, channel, message
--   bars: msgpack array [key, t, member, key, t, member, ...]
--   features: msgpack array [key, payload, ttl_ms, key, payload, ttl_ms, ...] (ttl 0: feat_ttl_ms)
-- Two msgpack blobs instead of one argument per value: the client packs them in C,
-- where redis-py would build tens of thousands of arguments in Python. Packed without
-- the bin type (Redis's cmsgpack does not read it); raw strings are byte-exact.
local keep = -tonumber(ARGV[1]) - 1
local bars = cmsgpack.unpack(ARGV[5])
for i = 1, #bars, 3 do
  local k, t = bars[i], bars[i + 1]
  -- A revision replaces the member with the same score; only a new bar can grow the set.
  local replaced = redis.call('ZREMRANGEBYSCORE', k, t, t)
  redis.call('ZADD', k, t, bars[i + 2])
  if replaced == 0 then
    redis.call('ZREMRANGEBYRANK', k, 0, keep)
  end
end
local feats = cmsgpack.unpack(ARGV[6])
for i = 1, #feats, 3 do
  local ttl = feats[i + 2]
  if ttl == 0 then ttl = ARGV[2] end
  redis.call('SET', feats[i], feats[i + 1], 'PX', ttl)
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
end
if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[8])
end
-- 0 when the meta key is gone: Redis lost its data (restarted empty, flushed). A write
-- of one cluster bucket names only a key of its slot, and answers 1.
if #KEYS < 2 then
  return 1
end
return redis.call('EXISTS', KEYS[2])
"""


#: A client on one server or on a Redis Cluster (:func:`open_client` tells which).
AnyRedis = Redis | RedisCluster


#: One feature map to write: ``(tf, symbol, packed map, ttl_ms)``; ttl 0 is the store's default.
FeatureRow = tuple[str, str, bytes, int]


class PartialWrite(RedisError):
    """Some buckets of a cluster write failed (their slot's master is down or failing
    over): :attr:`bars` and :attr:`features` were not written, the rest was."""

    def __init__(self, cause: BaseException, bars: list[Bar],
                 features: list[FeatureRow | tuple[str, str, bytes]], failed: int, buckets: int) -> None:
        super().__init__(f"{failed} of {buckets} cluster buckets not written: {cause}")
        self.cause = cause
        self.bars = bars
        self.features: list[FeatureRow] = [(row[0], row[1], row[2], row[3] if len(row) > 3 else 0)
                                            for row in features]
        self.failed = failed


class _Bucket:
    """The part of a cluster write that goes to one bucket's slot."""

    __slots__ = ("bars", "feats", "flat", "rows")

    def __init__(self) -> None:
        self.bars: list[Bar] = []
        self.rows: list[FeatureRow | tuple[str, str, bytes]] = []
        self.flat: list[Any] = []
        self.feats: list[Any] = []


def lost_connection(exc: RuntimeError) -> RedisConnectionError | None:
    """The connection error ``exc`` stands for, or ``None`` when it is another error.

    Under uvloop, redis-py lets through the ``RuntimeError`` of a transport that closed
    under it (a Redis or cluster node killed mid-call: "... closed=True ...; the handler
    is closed"). The connection is lost, and callers that buffer and retry on
    ``ConnectionError`` should see one. Raise the result ``from exc``.
    """
    text = str(exc)
    if "handler is closed" in text or "closed=True" in text:
        return RedisConnectionError(f"connection lost: {text}")
    return None


def reports_lost_connection(
        call: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """``call`` with a transport closed under redis-py raised as ``ConnectionError``
    (:func:`lost_connection`); any other ``RuntimeError`` propagates unchanged."""
    @functools.wraps(call)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await call(*args, **kwargs)
        except RuntimeError as exc:
            lost = lost_connection(exc)
            if lost is None:
                raise
            raise lost from exc
    return wrapper


def redis_refusal(exc: RedisError) -> str | None:
    """Why Redis refused us for good (a password or certificate problem), else ``None``.

    A server that is down is not a configuration error (the daemon degrades and
    waits); one that rejects our credentials will not change its mind.
    """
    text = str(exc)
    if (isinstance(exc, AuthenticationError) or text.startswith(("NOAUTH", "WRONGPASS"))
            or "called with the client already authenticated" in text):  # HELLO without a password
        return f"Redis refused the credentials: {text}"
    if "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text:
        return f"TLS with Redis failed (check rediss://, ssl_ca_certs): {text}"
    return None


async def wait_loaded(
    redis: AnyRedis, should_stop: asyncio.Event, *,
    running: Callable[[], bool] | None = None, poll_s: float = 0.1,
) -> bool:
    """Wait while Redis answers ``LOADING`` (it is reading its dataset from disk).

    A loading server holds data: it must not be taken for an empty one. A server
    busy loading a large file may not answer at all until done: when ``running``
    is given (a server we started: whether its process still runs), a server that
    does not answer is waited for as long as it runs. Returns True once it answers
    normally (or is unreachable otherwise: that is the callers' outage path),
    False if ``should_stop`` was set first.
    """
    said = False
    while not should_stop.is_set():
        try:
            await reports_lost_connection(redis.ping)()
        except (RedisError, OSError) as exc:
            silent = isinstance(exc, (RedisConnectionError, RedisTimeout, TimeoutError, OSError))
            if not (isinstance(exc, BusyLoadingError) or (silent and running is not None and running())):
                return True
            if not said:
                log.warning("redis is loading its dataset; waiting for it")
                said = True
            try:
                await asyncio.wait_for(should_stop.wait(), poll_s)
            except TimeoutError:
                pass
            continue
        if said:
            log.info("redis finished loading its dataset")
        return True
    return False


def connect(url: str, *, pool_size: int = 20, timeout_s: float = 2.0) -> Redis:
    """A client on one ``BlockingConnectionPool`` (waits for a free connection, never raises)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return Redis(connection_pool=pool)


async def is_cluster(client: Redis) -> bool | None:
    """Whether the server behind ``client`` is a Redis Cluster node (``INFO cluster``);
    ``None`` when it cannot be asked (unreachable)."""
    try:
        info = await reports_lost_connection(client.info)("cluster")
    except (RedisError, OSError):
        return None
    return bool(int(info.get("cluster_enabled", 0) or 0))


def connect_cluster(url: str, *, timeout_s: float = 2.0, read_from_replicas: bool = False) -> RedisCluster:
    """A Redis Cluster client that starts from the node of ``url`` and learns the others.

    MOVED/ASK redirects and a failover are followed by the client (it refreshes its
    slot map); ``read_from_replicas`` sends reads to replicas (``READONLY``).
    """
    kwargs: dict[str, Any] = {}
    if read_from_replicas:
        kwargs["load_balancing_strategy"] = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
    return RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                 **kwargs)


async def open_client(url: str, *, pool_size: int = 20, timeout_s: float = 2.0,
                      read_from_replicas: bool = False) -> AnyRedis:
    """:func:`connect`, or :func:`connect_cluster` when ``url`` names a cluster node.

    A server that does not answer is taken for a single server (the daemon's outage
    path); nothing but the URL is needed to find a cluster.
    """
    single = connect(url, pool_size=pool_size, timeout_s=timeout_s)
    if not url.startswith("unix://") and await is_cluster(single):
        await single.aclose()
        await single.connection_pool.disconnect()
        cluster = connect_cluster(url, timeout_s=timeout_s, read_from_replicas=read_from_replicas)
        await cluster.initialize()
        return cluster
    return single


class RedisStore:
    """Writes bars, features, heartbeat and announcement (one script call each time); reads them back.

    Every coroutine method is :func:`reports_lost_connection`: a node killed mid-call
    fails it with ``ConnectionError``, like any other outage, never ``RuntimeError``.
    """

    __slots__ = ("_edges", "_features_ttl_ms", "_heartbeat_ttl_ms", "_script", "bars_cap", "cluster",
                 "keys", "redis")

    def __init__(
        self,
        redis: AnyRedis,
        prefix: str = "sidecar",
        *,
        bars_cap: int = 5_000,
        features_ttl_ms: int = 2_000,
        heartbeat_ttl_ms: int = 3_000,
        shard: int | None = None,
    ) -> None:
        self.redis = redis
        #: On a cluster each write goes out per bucket (one slot per script call).
        self.cluster = isinstance(redis, RedisCluster)
        self.keys = Keys(prefix, cluster=self.cluster, shard=shard)
        self.bars_cap = bars_cap
        self._features_ttl_ms = features_ttl_ms
        self._heartbeat_ttl_ms = heartbeat_ttl_ms
        self._script: AsyncScript = redis.register_script(_WRITE_CYCLE_LUA)
        self._edges: AsyncScript = redis.register_script(_EDGES_LUA)

    @property
    def features_ttl_ms(self) -> int:
        """How long a features key lives after it is written (while its market is open)."""
        return self._features_ttl_ms

    @reports_lost_connection
    async def write_cycle(
        self,
        bars: Sequence[Bar],
        features: Sequence[FeatureRow | tuple[str, str, bytes]],
        heartbeat: dict[str, Any] | None = None,
        publish: dict[str, Any] | None = None,
    ) -> bool:
        """Store ``bars`` (capped, revisions in place), ``features`` as (tf, symbol, packed
        map[, ttl_ms]) with their TTL (the store's default where none is given), and the
        heartbeat, then publish ``publish`` on
        :attr:`Keys.cycles_channel` — all in one ``EVALSHA`` (atomic), so subscribers
        are told only once everything this call writes is readable; the caller makes
        sure its earlier writes have completed before it announces them.

        Returns whether the meta key exists: ``False`` means Redis lost its data
        since :meth:`write_meta` (restarted empty) and should be refilled."""
        if self.cluster:
            return await self._write_cluster(bars, features, heartbeat, publish)
        bars_of = self.keys.bars
        flat: list[Any] = []
        for b in bars:
            flat += (bars_of(b.tf, b.symbol), b.t, b.pack())
        features_of = self.keys.features
        feats: list[Any] = []
        for row in features:
            feats += (features_of(row[0], row[1]), row[2], row[3] if len(row) > 3 else 0)
        hb = msgpack.packb(heartbeat) if heartbeat is not None else b""
        message = msgpack.packb(publish) if publish is not None else b""
        args = [self.bars_cap, self._features_ttl_ms, self._heartbeat_ttl_ms, hb,
                msgpack.packb(flat, use_bin_type=False), msgpack.packb(feats, use_bin_type=False),
                self.keys.cycles_channel, message]
        return bool(await self._run_script(keys=[self.keys.heartbeat, self.keys.meta], args=args))

    async def _write_cluster(
        self,
        bars: Sequence[Bar],
        features: Sequence[FeatureRow | tuple[str, str, bytes]],
        heartbeat: dict[str, Any] | None,
        publish: dict[str, Any] | None,
    ) -> bool:
        """:meth:`write_cycle` on a cluster: one script call per bucket (each touches one
        slot), all at once, then the heartbeat and announcement once they completed.

        Buckets whose slot's master fails (a failover in progress) do not stop the
        others: their bars and features come back in :class:`PartialWrite`, and the
        heartbeat is still written (the symbols of the other slots are fresh) but the
        cycle is not announced."""
        keys = self.keys
        groups: dict[int, _Bucket] = {}
        for b in bars:
            n = bucket_of(b.symbol)
            bucket = groups.get(n) or groups.setdefault(n, _Bucket())
            bucket.bars.append(b)
            bucket.flat.extend((keys.bars(b.tf, b.symbol), b.t, b.pack()))
        for row in features:
            sym = row[1]
            n = bucket_of(sym)
            bucket = groups.get(n) or groups.setdefault(n, _Bucket())
            bucket.rows.append(row)
            bucket.feats.extend((keys.features(row[0], sym), row[2], row[3] if len(row) > 3 else 0))
        head: list[Any] = [self.bars_cap, self._features_ttl_ms, self._heartbeat_ttl_ms, b""]
        failed = await self._write_buckets(list(groups.values()), head)
        if failed:
            # The client rebuilds its slot map when a node fails, cutting the commands in
            # flight on the others: one more round, and only the failing slots remain.
            failed = await self._write_buckets([g for g, _ in failed], head)
        has_meta = True
        if heartbeat is not None or publish is not None:
            hb = msgpack.packb(heartbeat) if heartbeat is not None else b""
            message = msgpack.packb(publish) if publish is not None and not failed else b""
            empty = msgpack.packb([])
            args = [*head[:3], hb, empty, empty, keys.cycles_channel, message]
            try:
                has_meta = bool(await self._run_script(keys=[keys.heartbeat, keys.meta], args=args))
            except (RedisError, OSError) as exc:
                if not failed:
                    raise
                log.debug("heartbeat not written either", extra={"error": str(exc)})
        if failed:
            raise PartialWrite(failed[0][1], [b for g, _ in failed for b in g.bars],
                               [r for g, _ in failed for r in g.rows], len(failed), len(groups))
        return has_meta

    @reports_lost_connection
    async def _run_script(self, keys: list[str], args: list[Any]) -> Any:
        """One call of the write script (each cluster bucket's on its own: a bucket
        whose node was killed fails as a connection error, the others are written)."""
        return await self._script(keys=keys, args=args)

    async def _write_buckets(self, buckets: list[_Bucket], head: list[Any],
                             ) -> list[tuple[_Bucket, BaseException]]:
        """One script call per bucket, all at once; the buckets Redis failed to write, with why."""
        channel = self.keys.cycles_channel
        calls = [self._run_script(keys=[str(g.flat[0] if g.flat else g.feats[0])],
                              args=[*head, msgpack.packb(g.flat, use_bin_type=False),
                                    msgpack.packb(g.feats, use_bin_type=False), channel, b""])
                 for g in buckets]
        failed: list[tuple[_Bucket, BaseException]] = []
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for bucket, outcome in zip(buckets, outcomes, strict=True):
            if isinstance(outcome, (RedisError, OSError)):
                failed.append((bucket, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
        return failed

    def masters(self) -> frozenset[str]:
        """The masters of the client's current slot map (``host:port``); empty on a
        single server. It changes when a replica took over a failed master."""
        if isinstance(self.redis, RedisCluster):
            return frozenset(node.name for node in self.redis.get_primaries())
        return frozenset()

    @reports_lost_connection
    async def write_history(self, bars: Iterable[Bar], chunk: int = 2_000) -> int:
        """Bulk-load closed bars (e.g. warming an empty Redis from SQLite)."""
        n = 0
        batch: list[Bar] = []
        for bar in bars:
            batch.append(bar)
            if len(batch) >= chunk:
                await self.write_cycle(batch, [])
                n += len(batch)
                batch = []
        if batch:
            await self.write_cycle(batch, [])
            n += len(batch)
        return n

    @reports_lost_connection
    async def write_meta(self, meta: dict[str, Any]) -> None:
        """The meta key; a sharded daemon also enters ``meta`` in the shard registry
        (:attr:`Keys.shards`, field ``i/N``) for ``python -m sidecar status``."""
        packed = msgpack.packb({"schema": SCHEMA_VERSION, **meta})
        await self.redis.set(self.keys.meta, packed)
        if "shard" in meta and "shards" in meta:
            await self.redis.hset(self.keys.shards, f"{meta['shard']}/{meta['shards']}", packed)

    @reports_lost_connection
    async def read_shards(self) -> dict[str, dict[str, Any]]:
        """The shard registry: ``i/N`` -> the meta that shard wrote at its start."""
        raw = await self.redis.hgetall(self.keys.shards)
        return {k.decode() if isinstance(k, bytes) else k: dict(msgpack.unpackb(v)) for k, v in raw.items()}

    @reports_lost_connection
    async def read_heartbeats(self, shards: Iterable[int | None]) -> dict[int | None, dict[str, Any] | None]:
        """The heartbeat of each of ``shards`` (``None``: the unsharded daemon's)."""
        wanted = list(shards)
        out: dict[int | None, dict[str, Any] | None] = {}
        for shard in wanted:
            raw = await self.redis.get(self.keys.heartbeat_of(shard))
            out[shard] = None if raw is None else dict(msgpack.unpackb(raw))
        return out

    @reports_lost_connection
    async def read_meta(self) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.meta)
        return None if raw is None else dict(msgpack.unpackb(raw))

    @reports_lost_connection
    async def recent_bars(self, symbol: str, tf: str, n: int) -> list[Bar]:
        """The newest ``n`` bars of a symbol, oldest first."""
        raw = await self.redis.zrange(self.keys.bars(tf, symbol), -n, -1)
        return [Bar.unpack(symbol, tf, item) for item in raw if isinstance(item, bytes)]

    @reports_lost_connection
    async def recent_packed(self, symbol: str, tf: str, n: int) -> list[tuple[int, bytes]]:
        """The newest ``n`` bars of a symbol as stored, ``(t, packed bar)``, oldest first."""
        raw = await self.redis.zrange(self.keys.bars(tf, symbol), -n, -1, withscores=True)
        return [(int(item[1]), item[0]) for item in raw
                if isinstance(item, (tuple, list)) and isinstance(item[0], bytes)]

    @reports_lost_connection
    async def recent_packed_many(self, symbols: Sequence[str], tf: str,
                                 n: int) -> dict[str, list[tuple[int, bytes]]]:
        """:meth:`recent_packed` of many symbols in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for sym in symbols:
            pipe.zrange(self.keys.bars(tf, sym), -n, -1, withscores=True)
        replies = await pipe.execute()
        return {sym: [(int(item[1]), item[0]) for item in raw
                      if isinstance(item, (tuple, list)) and isinstance(item[0], bytes)]
                for sym, raw in zip(symbols, replies, strict=True)}

    @reports_lost_connection
    async def edges_many(self, symbols: Sequence[str], tf: str,
                         n: int) -> dict[str, tuple[int, int | None, list[tuple[int, bytes]]]]:
        """Each symbol's bar count, oldest open time and newest ``n`` bars as stored
        (``(t, packed bar)``, oldest first), each symbol's read atomic (one script
        call per key, all at once: a cycle's write cannot fall between its parts)."""
        replies = await asyncio.gather(*(self._edges(keys=[self.keys.bars(tf, sym)], args=[n])
                                         for sym in symbols))
        out: dict[str, tuple[int, int | None, list[tuple[int, bytes]]]] = {}
        for sym, (count, first, flat) in zip(symbols, replies, strict=True):
            out[sym] = (int(count), None if first is None else int(float(first)),
                        [(int(float(flat[i + 1])), flat[i]) for i in range(0, len(flat), 2)])
        return out

    @reports_lost_connection
    async def tails(self, symbols: Sequence[str], tf: str, n: int) -> dict[str, list[Bar]]:
        """The newest ``n`` bars of each symbol, oldest first, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for sym in symbols:
            pipe.zrange(self.keys.bars(tf, sym), -n, -1)
        replies = await pipe.execute()
        return {sym: [Bar.unpack(sym, tf, item) for item in raw if isinstance(item, bytes)]
                for sym, raw in zip(symbols, replies, strict=True)}

    @reports_lost_connection
    async def bars_since(self, symbol: str, tf: str, t_ms: int) -> list[Bar]:
        """The bars of a symbol with open time ``>= t_ms``, oldest first."""
        raw = await self.redis.zrangebyscore(self.keys.bars(tf, symbol), t_ms, "+inf")
        return [Bar.unpack(symbol, tf, item) for item in raw if isinstance(item, bytes)]

    @reports_lost_connection
    async def bar_count(self, symbol: str, tf: str) -> int:
        return int(await self.redis.zcard(self.keys.bars(tf, symbol)))

    @reports_lost_connection
    async def read_features(self, symbols: Sequence[str], tf: str) -> list[dict[str, Any] | None]:
        """Features of many symbols in one ``MGET`` (one per slot on a cluster); ``None``
        where a key is missing."""
        if not symbols:
            return []
        keys = [self.keys.features(tf, s) for s in symbols]
        if isinstance(self.redis, RedisCluster):
            raw = await self.redis.mget_nonatomic(keys)
        else:
            raw = await self.redis.mget(keys)
        return [None if item is None else msgpack.unpackb(item) for item in raw]

    @reports_lost_connection
    async def read_heartbeat(self) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.heartbeat)
        return None if raw is None else dict(msgpack.unpackb(raw))

    @reports_lost_connection
    async def clear_heartbeat(self) -> None:
        """Say at once that the daemon is gone (clean stop): scanners mark everything stale."""
        await self.redis.delete(self.keys.heartbeat)

    @reports_lost_connection
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    @reports_lost_connection
    async def close(self) -> None:
        await close_client(self.redis)


async def close_client(client: AnyRedis) -> None:
    """Close a client and every connection it holds."""
    await client.aclose()
    if isinstance(client, Redis):
        await client.connection_pool.disconnect()
