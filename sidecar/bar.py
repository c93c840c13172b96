"""The one bar model used everywhere, and its encodings (JSON line, msgpack array)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

# Bit flags of the msgpack array encoding (see docs/redis-layout.md).
FLAG_FORMING = 1
FLAG_SYNTHETIC = 2
#: 9999-12-31: the last instant ``datetime`` (and any sane store) can represent.
MAX_EPOCH_MS = 253_402_300_799_000

#: ``msgpack.packb`` without building a Packer per call (the hot path packs every bar and
#: feature map of every cycle). Packing these plain types holds the GIL from start to end,
#: so sharing the Packer cannot interleave two packings; a failed packing resets it.
pack_msgpack: Callable[[Any], bytes] = msgpack.Packer().pack


@dataclass(slots=True)
class Bar:
    """One OHLCV bar.

    ``t`` is the open time in epoch milliseconds UTC, aligned to ``tf``.
    ``v`` is ``None`` where the source has no volume (FX, indices).
    ``forming`` is true while the bar is still open and may be revised.
    ``synthetic`` marks a bar the daemon made up (gap fill) or a simulated market:
    such a bar is never indistinguishable from real data.
    """

    symbol: str
    tf: str
    t: int
    o: float
    h: float
    l: float
    c: float
    v: float | None
    src: str
    forming: bool = False
    synthetic: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.symbol, self.tf, self.t)

    def same_values(self, other: Bar) -> bool:
        """True when prices, volume and state are equal (a no-op revision)."""
        return (
            self.o == other.o
            and self.h == other.h
            and self.l == other.l
            and self.c == other.c
            and self.v == other.v
            and self.forming == other.forming
        )

    # -- JSON lines (the format ``fetch`` prints and ``replay`` reads) --------
    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "symbol": self.symbol,
            "tf": self.tf,
            "t": self.t,
            "o": self.o,
            "h": self.h,
            "l": self.l,
            "c": self.c,
            "v": self.v,
            "src": self.src,
        }
        if self.forming:
            out["forming"] = True
        if self.synthetic:
            out["synthetic"] = True
        return out

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> Bar:
        """Build a bar from a ``fetch`` JSON object; raises ``ValueError`` if malformed."""
        try:
            v = d.get("v")
            return cls(
                symbol=str(d["symbol"]),
                tf=str(d["tf"]),
                t=int(d["t"]),
                o=float(d["o"]),
                h=float(d["h"]),
                l=float(d["l"]),
                c=float(d["c"]),
                v=None if v is None or v == "" else float(v),
                src=str(d.get("src", "")),
                forming=bool(d.get("forming", False)),
                synthetic=bool(d.get("synthetic", False)),
            )
        except (KeyError, TypeError, OverflowError) as exc:  # missing, null, Infinity
            raise ValueError(f"malformed bar {str(d)[:200]}: {exc}") from exc

    # -- msgpack array (Redis values) -----------------------------------------
    def pack(self) -> bytes:
        """``[t, o, h, l, c, v|nil, src, flags]`` as msgpack."""
        flags = (FLAG_FORMING if self.forming else 0) | (FLAG_SYNTHETIC if self.synthetic else 0)
        return pack_msgpack([self.t, self.o, self.h, self.l, self.c, self.v, self.src, flags])

    @classmethod
    def unpack(cls, symbol: str, tf: str, data: bytes) -> Bar:
        t, o, h, l, c, v, src, flags = msgpack.unpackb(data)
        return cls(
            symbol, tf, t, o, h, l, c, v, src,
            forming=bool(flags & FLAG_FORMING), synthetic=bool(flags & FLAG_SYNTHETIC),
        )


def is_finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0.0
