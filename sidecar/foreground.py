"""The cycle comes first: background work (start-up history, warm-up) waits while one runs.

The 1-second cycle is the latency-critical work of the process. Work that can wait
(generating or writing history, opening feature handles at start) runs between
cycles: on the event loop it awaits :func:`wait_idle` before each slice, in a thread
it calls :func:`wait_idle_blocking` between slices, so neither competes with a cycle
for the interpreter. The state is per process and loop-agnostic (a
:class:`threading.Event`), so sources and stores can consult it without a reference
to the pipeline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: A thread waits at most this long for a cycle to end (a stuck flag never deadlocks it).
THREAD_WAIT_S = 2.0

_idle = threading.Event()
_idle.set()
_lock = threading.Lock()
_running = 0
_waiters: list[asyncio.Future[None]] = []


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@contextmanager
def cycle() -> Iterator[None]:
    """Mark a cycle as running for the duration of the block (nestable, thread-safe)."""
    global _running
    with _lock:
        _running += 1
        _idle.clear()
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                _idle.set()
                waiters = _waiters[:]
                _waiters.clear()
            else:
                waiters = []
        for fut in waiters:
            loop = fut.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, fut)


def idle() -> bool:
    """No cycle is running."""
    return _idle.is_set()


async def wait_idle() -> None:
    """Return once no cycle is running; always yields to the event loop first, so a
    run of background steps lets a due tick in between any two of them."""
    await asyncio.sleep(0)
    with _lock:
        if _idle.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _waiters.append(fut)
    await fut


def wait_idle_blocking(timeout_s: float = THREAD_WAIT_S) -> None:
    """From a worker thread: block until no cycle is running (at most ``timeout_s``)."""
    _idle.wait(timeout_s)
