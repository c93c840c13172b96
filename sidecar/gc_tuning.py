"""The cyclic garbage collector kept out of the way of a long-running, latency-bound process.

Used by the daemon after warm-up, and meant for a trading process that reads with
:class:`sidecar.scanner.Scanner` every second: call :func:`settle_gc` once after
start-up (imports, connections, the symbol list built).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def settle_gc() -> None:
    """Keep the state built at start out of the cyclic GC's way; call once after start-up.

    The state built at start (the daemon's feature handles, validator memory and history;
    any process's imported modules) lives as long as the process. Frozen, full
    collections no longer walk it: at 5,000 symbols each one otherwise stalled a daemon
    cycle for ~100 ms and the GC took ~35% of the CPU (bench/cycle.py); in a scanner
    process they were what set the read's p99 (bench/scanner_read.py). A higher young
    threshold makes collections rarer; these loops create few reference cycles, so
    little garbage waits for them.
    """
    gc.collect()
    gc.freeze()
    _, gen1, _ = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, 1_000)


@contextmanager
def held() -> Iterator[None]:
    """No cyclic collection inside the block: the collections its allocations make due
    run at the first allocation after it (the GC's own trigger), not in the middle.

    The daemon's cycle runs in this block. Each cycle replaces every series' forming
    bar and values, so the young generations fill with objects that stay a second; a
    collection of them finds nothing to free and, landing inside a cycle at 5,000
    symbols × 4 timeframes, added ~15 ms (generation 1) to it. After the cycle it
    costs the same and delays nothing the scanner waits for. Nestable; a block entered
    with the GC already disabled leaves it so."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
