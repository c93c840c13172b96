"""Bar timeframes (``1s``, ``1m``, ``5m``, ``1h``, ``1d`` ...) and time alignment."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"^([1-9][0-9]{0,3})([smhd])\Z")


@dataclass(frozen=True, slots=True)
class Timeframe:
    """A fixed-length bar period; ``name`` is its canonical spelling (``"1m"``)."""

    name: str
    ms: int

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        """Parse ``"1m"``-style text; raises ``ValueError`` on anything else."""
        match = _PATTERN.match(text.strip())
        if not match:
            raise ValueError(f"not a timeframe: {text!r} (expected e.g. 1s, 1m, 5m, 1h, 1d)")
        count, unit = int(match.group(1)), match.group(2)
        return cls(f"{count}{unit}", count * _UNITS_MS[unit])

    def floor(self, t_ms: int) -> int:
        """Open time of the bar that contains ``t_ms``."""
        return t_ms - t_ms % self.ms

    def is_aligned(self, t_ms: int) -> bool:
        return t_ms % self.ms == 0

    def __str__(self) -> str:
        return self.name
