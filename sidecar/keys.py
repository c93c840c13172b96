"""Redis key names (README "Redis layout"): the only place they are spelled.

On a single Redis server the layout is the one of schema version 1, unchanged.
On a Redis Cluster every key carries a hash tag right after ``{prefix}:v1:`` so that
each write touches one slot: a symbol's keys are tagged with its *bucket*
(:func:`bucket_of`, one of :data:`BUCKETS`), so a write groups an answer's symbols
per bucket and a reader gets a whole bucket in one ``MGET``; the daemon's own keys
(heartbeats, meta, shard registry) share the tag ``{g}``, so one script writes the
heartbeat and checks the meta key.
"""

from __future__ import annotations

import zlib

from sidecar.settings import SYMBOL_RE

SCHEMA_VERSION = 1

#: Hash-tag buckets of a cluster layout: a symbol's keys live in the slot of ``{NN}``.
BUCKETS = 64
#: The hash tag of the daemon's own keys on a cluster.
GLOBAL_TAG = "{g}"


def bucket_of(symbol: str) -> int:
    """The cluster bucket of a canonical symbol: bits 16..21 of its CRC-32 (stable, and
    independent of the low bits :func:`sidecar.shards.shard_of` uses)."""
    return (zlib.crc32(symbol.encode()) >> 16) % BUCKETS


def bucket_tag(bucket: int) -> str:
    """The hash tag of a bucket: ``{00}`` .. ``{63}``."""
    return f"{{{bucket:02d}}}"


class Keys:
    """Key names under one prefix, for one server layout and one shard.

    ``cluster``: the hash-tagged layout. ``shard``: the index of the daemon's shard
    (``None`` unsharded): its heartbeat and meta keys end in ``:{shard}``.
    A symbol outside the canonical charset raises ``ValueError``: it is refused at
    configuration, so reaching here is a bug, and it must not reach a key either.
    """

    __slots__ = ("_bars", "_features", "base", "cluster", "shard")

    def __init__(self, prefix: str, *, cluster: bool = False, shard: int | None = None) -> None:
        self.base = f"{prefix}:v{SCHEMA_VERSION}"
        self.cluster = cluster
        self.shard = shard
        # Every cycle names every symbol's keys twice: built (and checked) once each.
        self._bars: dict[tuple[str, str], str] = {}
        self._features: dict[tuple[str, str], str] = {}

    def _symbol_base(self, symbol: str) -> str:
        checked = _checked(symbol)
        if self.cluster:
            return f"{self.base}:{bucket_tag(bucket_of(checked))}"
        return self.base

    def bars(self, tf: str, symbol: str) -> str:
        key = self._bars.get((tf, symbol))
        if key is None:
            key = self._bars[(tf, symbol)] = f"{self._symbol_base(symbol)}:bars:{tf}:{symbol}"
        return key

    def features(self, tf: str, symbol: str) -> str:
        key = self._features.get((tf, symbol))
        if key is None:
            key = self._features[(tf, symbol)] = f"{self._symbol_base(symbol)}:feat:{tf}:{symbol}"
        return key

    def _global(self, name: str) -> str:
        return f"{self.base}:{GLOBAL_TAG}:{name}" if self.cluster else f"{self.base}:{name}"

    def heartbeat_of(self, shard: int | None) -> str:
        """The heartbeat key of shard ``shard`` (``None``: of an unsharded daemon)."""
        return self._global("heartbeat" if shard is None else f"heartbeat:{shard}")

    @property
    def heartbeat(self) -> str:
        return self.heartbeat_of(self.shard)

    @property
    def meta(self) -> str:
        return self._global("meta" if self.shard is None else f"meta:{self.shard}")

    @property
    def shards(self) -> str:
        """Hash of the shards that ran: field ``i/N`` -> msgpack ``{shard, shards, owned, ...}``."""
        return self._global("shards")

    @property
    def cycles_channel(self) -> str:
        return f"{self.base}:cycles"


def _checked(symbol: str) -> str:
    if not SYMBOL_RE.match(symbol):
        raise ValueError(f"not a canonical symbol, refusing it as part of a Redis key: {symbol[:40]!r}")
    return symbol
