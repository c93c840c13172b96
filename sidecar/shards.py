"""Which daemon owns which symbol when several share the work (``SIDECAR_SHARD=i/N``).

A symbol belongs to shard ``crc32(symbol) mod N`` (CRC-32 of the canonical symbol's
ASCII bytes, as :func:`zlib.crc32`), unless the symbol mapping gives it ``shard = i``
explicitly (used when ``i < N``; otherwise the hash decides). The assignment depends
only on the symbol, ``N`` and the mapping, so every daemon and every scanner computes
the same owner without asking anyone; changing ``N`` moves the symbols whose owner
changes (docs/operations.md, "Shards").
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.symbols import SymbolMap


def shard_of(symbol: str, shards: int, explicit: Mapping[str, int] | None = None) -> int:
    """The shard (``0 .. shards-1``) that owns ``symbol``."""
    if explicit:
        chosen = explicit.get(symbol)
        if chosen is not None and chosen < shards:
            return chosen
    return zlib.crc32(symbol.encode()) % shards


def owned(symbols: Iterable[str], shard: int, shards: int,
          explicit: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """Those of ``symbols`` shard ``shard`` of ``shards`` owns, in their order."""
    return tuple(s for s in symbols if shard_of(s, shards, explicit) == shard)


def explicit_shards(symbol_map: SymbolMap) -> dict[str, int]:
    """The symbols the mapping assigns a shard to (``shard = i``), and their shard."""
    return {sym: shard for sym in symbol_map if (shard := symbol_map.entry(sym).shard) is not None}
