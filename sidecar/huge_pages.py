"""Transparent huge pages for the daemon's heap (Linux).

Each cycle reads every symbol's series once: feature handles, bars, maps — a few hundred
MB at 5,000 symbols × 4 timeframes, scattered over the heap in 4 KiB pages, so most of
those reads miss the TLB as well as the caches. Once warm-up has built that state,
:meth:`HugePages.advise` asks the kernel to back the heap with 2 MiB pages: it marks
each private writable anonymous mapping (and the ``[heap]``) ``MADV_HUGEPAGE``, so the
kernel may use huge pages there from then on, and calls ``MADV_COLLAPSE`` (Linux 6.1+)
on it, so the pages already there become huge now rather than whenever ``khugepaged``
gets round to them. bench/cycle.py measures the effect (bench/README.md).

Nothing changes where the kernel's transparent huge pages are ``never``, off Linux,
or with ``SIDECAR_HUGE_PAGES=off``. A mapping the kernel refuses (no free huge page,
an older kernel without ``MADV_COLLAPSE``) keeps its small pages and is counted in
:attr:`Advice.refused`; nothing fails because of it.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20
#: The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``).
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True, slots=True)
class Advice:
    """What one :meth:`HugePages.advise` did."""

    #: Mappings advised this time (those advised before, unchanged, are skipped).
    mappings: int
    #: Bytes in 2 MiB ranges of those mappings that were advised.
    advised_bytes: int
    #: Mappings the kernel would not collapse now (they get huge pages as it can).
    refused: int
    #: The process's anonymous memory on huge pages afterwards (``AnonHugePages``).
    huge_bytes: int | None
    seconds: float


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode; ``None`` without one (not Linux, no THP)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_bytes(smaps_rollup: str = "/proc/self/smaps_rollup") -> int | None:
    """This process's anonymous memory on huge pages (``None`` where the kernel does not say)."""
    try:
        with open(smaps_rollup) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _anonymous_ranges(maps: str) -> list[tuple[int, int]]:
    """The 2 MiB-aligned part of each private writable anonymous mapping (and the
    ``[heap]``) of a ``/proc/<pid>/maps`` text; mappings with none are left out."""
    out: list[tuple[int, int]] = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":
            continue  # a file, the stack, vdso...
        lo_text, _, hi_text = fields[0].partition("-")
        lo = (int(lo_text, 16) + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        hi = int(hi_text, 16) // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            out.append((lo, hi))
    return out


class HugePages:
    """Advises the kernel to back this process's heap with huge pages (module docstring).

    ``enabled``: ``SIDECAR_HUGE_PAGES`` is ``auto`` (the default); it only acts where
    the kernel's mode is ``madvise`` or ``always``. Call :meth:`advise` (blocking: from a
    thread) after warm-up and now and then after, for the mappings made since.
    """

    def __init__(self, enabled: bool, *, maps_file: str = "/proc/self/maps",
                 mode_file: Path = THP_MODE_FILE) -> None:
        self.enabled = enabled
        self.kernel_mode = thp_mode(mode_file)
        self._maps_file = maps_file
        self._advised: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self.last: Advice | None = None
        self._madvise: Any = None
        if self.active:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            self._madvise = libc.madvise

    @property
    def active(self) -> bool:
        """Whether :meth:`advise` does anything here."""
        return self.enabled and sys.platform == "linux" and self.kernel_mode in ("madvise", "always")

    def advise(self) -> Advice | None:
        """Mark and collapse the mappings not advised yet; ``None`` when not :attr:`active`.
        Releases the GIL during the system calls (``ctypes``)."""
        if not self.active:
            return None
        started = time.monotonic()
        with self._lock:
            with open(self._maps_file) as f:
                ranges = _anonymous_ranges(f.read())
            fresh = [r for r in ranges if r not in self._advised]
            refused = 0
            for lo, hi in fresh:
                self._madvise(lo, hi - lo, MADV_HUGEPAGE)
                if self._madvise(lo, hi - lo, MADV_COLLAPSE) != 0:
                    refused += 1
            self._advised = set(ranges)
            self.last = Advice(len(fresh), sum(hi - lo for lo, hi in fresh), refused, huge_bytes(),
                               round(time.monotonic() - started, 3))
        return self.last

    def status(self) -> dict[str, Any]:
        """For ``/health``: the setting, the kernel's mode, and what the last advice did."""
        return {"enabled": self.enabled, "kernel_mode": self.kernel_mode, "active": self.active,
                "last": None if self.last is None else asdict(self.last)}

