"""Where bars and features are stored for the scanner: Redis, msgpack values.

Layout (schema version :data:`SCHEMA_VERSION`, documented in README "Redis layout"):

* ``{prefix}:v1:bars:{tf}:{symbol}`` — sorted set, score = open time (ms), member =
  msgpack ``[t, o, h, l, c, v|nil, src, flags]``; the newest ``bars_cap`` bars. A
  revision replaces the member with the same score, so bars never duplicate.
* ``{prefix}:v1:feat:{tf}:{symbol}`` — msgpack map of features, expires after
  ``features_ttl_ms``.
* ``{prefix}:v1:heartbeat`` — msgpack map ``{pid, t, cycle, tf, symbols}``, expires
  after ``heartbeat_ttl_ms``: the daemon is alive while it exists.
* ``{prefix}:v1:meta`` — msgpack map ``{schema, tf, symbols, started_at}``.
* ``{prefix}:v1:cycles`` — pub/sub channel; after each cycle the daemon publishes
  msgpack ``{cycle, t, tick, tf, features, updated}`` (inside the cycle's final write).

Every write is one ``EVALSHA`` of :data:`_WRITE_CYCLE_LUA` (bars and features as two
msgpack blobs; optionally the heartbeat and an announcement). The pipeline writes each
answered request's bars and features as soon as they are ready, then one final write
with the heartbeat and the announcement once all of them have completed (README
"Redis layout").
``bench/store.py`` measures it against a pipeline of the same commands (about 4× slower:
redis-py's per-command cost) and against one bare ``MSET`` of the same bytes (the bound).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.bar import Bar
from sidecar.settings import SYMBOL_RE

log = logging.getLogger("sidecar.redis")

SCHEMA_VERSION = 1

_WRITE_CYCLE_LUA = """
-- KEYS[1]: heartbeat key, KEYS[2]: meta key
-- ARGV: cap, feat_ttl_ms, hb_ttl_ms, hb_payload, bars, features, channel, message
--   bars: msgpack array [key, t, member, key, t, member, ...]
--   features: msgpack array [key, payload, key, payload, ...]
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
for i = 1, #feats, 2 do
  redis.call('SET', feats[i], feats[i + 1], 'PX', ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
end
if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[8])
end
-- 0 when the meta key is gone: Redis lost its data (restarted empty, flushed).
return redis.call('EXISTS', KEYS[2])
"""


class Keys:
    """Key names under one prefix.

    A symbol outside the canonical charset raises ``ValueError``: it is refused at
    configuration, so reaching here is a bug, and it must not reach a key either.
    """

    __slots__ = ("_bars", "_features", "base")

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}:v{SCHEMA_VERSION}"
        # Every cycle names every symbol's keys twice: built (and checked) once each.
        self._bars: dict[tuple[str, str], str] = {}
        self._features: dict[tuple[str, str], str] = {}

    def bars(self, tf: str, symbol: str) -> str:
        key = self._bars.get((tf, symbol))
        if key is None:
            key = self._bars[(tf, symbol)] = f"{self.base}:bars:{tf}:{_checked(symbol)}"
        return key

    def features(self, tf: str, symbol: str) -> str:
        key = self._features.get((tf, symbol))
        if key is None:
            key = self._features[(tf, symbol)] = f"{self.base}:feat:{tf}:{_checked(symbol)}"
        return key

    @property
    def heartbeat(self) -> str:
        return f"{self.base}:heartbeat"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    @property
    def cycles_channel(self) -> str:
        return f"{self.base}:cycles"


def _checked(symbol: str) -> str:
    if not SYMBOL_RE.match(symbol):
        raise ValueError(f"not a canonical symbol, refusing it as part of a Redis key: {symbol[:40]!r}")
    return symbol


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
    redis: Redis, should_stop: asyncio.Event, *,
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
            await redis.ping()
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


class RedisStore:
    """Writes bars, features, heartbeat and announcement (one script call each time); reads them back."""

    __slots__ = ("_features_ttl_ms", "_heartbeat_ttl_ms", "_script", "bars_cap", "keys", "redis")

    def __init__(
        self,
        redis: Redis,
        prefix: str = "sidecar",
        *,
        bars_cap: int = 5_000,
        features_ttl_ms: int = 2_000,
        heartbeat_ttl_ms: int = 3_000,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.bars_cap = bars_cap
        self._features_ttl_ms = features_ttl_ms
        self._heartbeat_ttl_ms = heartbeat_ttl_ms
        self._script: AsyncScript = redis.register_script(_WRITE_CYCLE_LUA)

    async def write_cycle(
        self,
        bars: Sequence[Bar],
        features: Sequence[tuple[str, str, bytes]],
        heartbeat: dict[str, Any] | None = None,
        publish: dict[str, Any] | None = None,
    ) -> bool:
        """Store ``bars`` (capped, revisions in place), ``features`` as (tf, symbol, packed
        map) with their TTL, and the heartbeat, then publish ``publish`` on
        :attr:`Keys.cycles_channel` — all in one ``EVALSHA`` (atomic), so subscribers
        are told only once everything this call writes is readable; the caller makes
        sure its earlier writes have completed before it announces them.

        Returns whether the meta key exists: ``False`` means Redis lost its data
        since :meth:`write_meta` (restarted empty) and should be refilled."""
        bars_of = self.keys.bars
        flat: list[Any] = []
        for b in bars:
            flat += (bars_of(b.tf, b.symbol), b.t, b.pack())
        features_of = self.keys.features
        feats: list[Any] = []
        for tf, sym, payload in features:
            feats += (features_of(tf, sym), payload)
        hb = msgpack.packb(heartbeat) if heartbeat is not None else b""
        message = msgpack.packb(publish) if publish is not None else b""
        args = [self.bars_cap, self._features_ttl_ms, self._heartbeat_ttl_ms, hb,
                msgpack.packb(flat, use_bin_type=False), msgpack.packb(feats, use_bin_type=False),
                self.keys.cycles_channel, message]
        return bool(await self._script(keys=[self.keys.heartbeat, self.keys.meta], args=args))

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

    async def write_meta(self, meta: dict[str, Any]) -> None:
        await self.redis.set(self.keys.meta, msgpack.packb({"schema": SCHEMA_VERSION, **meta}))

    async def recent_bars(self, symbol: str, tf: str, n: int) -> list[Bar]:
        """The newest ``n`` bars of a symbol, oldest first."""
        raw = await self.redis.zrange(self.keys.bars(tf, symbol), -n, -1)
        return [Bar.unpack(symbol, tf, item) for item in raw if isinstance(item, bytes)]

    async def recent_packed(self, symbol: str, tf: str, n: int) -> list[tuple[int, bytes]]:
        """The newest ``n`` bars of a symbol as stored, ``(t, packed bar)``, oldest first."""
        raw = await self.redis.zrange(self.keys.bars(tf, symbol), -n, -1, withscores=True)
        return [(int(item[1]), item[0]) for item in raw
                if isinstance(item, (tuple, list)) and isinstance(item[0], bytes)]

    async def tails(self, symbols: Sequence[str], tf: str, n: int) -> dict[str, list[Bar]]:
        """The newest ``n`` bars of each symbol, oldest first, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for sym in symbols:
            pipe.zrange(self.keys.bars(tf, sym), -n, -1)
        replies = await pipe.execute()
        return {sym: [Bar.unpack(sym, tf, item) for item in raw if isinstance(item, bytes)]
                for sym, raw in zip(symbols, replies, strict=True)}

    async def bars_since(self, symbol: str, tf: str, t_ms: int) -> list[Bar]:
        """The bars of a symbol with open time ``>= t_ms``, oldest first."""
        raw = await self.redis.zrangebyscore(self.keys.bars(tf, symbol), t_ms, "+inf")
        return [Bar.unpack(symbol, tf, item) for item in raw if isinstance(item, bytes)]

    async def bar_count(self, symbol: str, tf: str) -> int:
        return int(await self.redis.zcard(self.keys.bars(tf, symbol)))

    async def read_features(self, symbols: Sequence[str], tf: str) -> list[dict[str, Any] | None]:
        """Features of many symbols in one ``MGET``; ``None`` where a key is missing."""
        if not symbols:
            return []
        raw = await self.redis.mget([self.keys.features(tf, s) for s in symbols])
        return [None if item is None else msgpack.unpackb(item) for item in raw]

    async def read_heartbeat(self) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.heartbeat)
        return None if raw is None else dict(msgpack.unpackb(raw))

    async def clear_heartbeat(self) -> None:
        """Say at once that the daemon is gone (clean stop): scanners mark everything stale."""
        await self.redis.delete(self.keys.heartbeat)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()
