"""Yahoo's live price stream (``yfinance.AsyncWebSocket``), as a tick cache.

The stream alone is not a bar source: it only carries the last price. The Yahoo
source uses the newest tick to move the forming bar's close/high/low between two
REST polls. The URL is a setting, so tests point it at a local server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.bar import MAX_EPOCH_MS

log = logging.getLogger("sidecar.sources.yahoo_stream")


@dataclass(frozen=True, slots=True)
class Tick:
    """The newest streamed price of one Yahoo ticker; ``t_ms`` is the trade time."""

    price: float
    t_ms: int


def tick_from_message(msg: dict[str, Any]) -> tuple[str, Tick] | None:
    """``(ticker, Tick)`` from one decoded pricing message, or ``None`` if unusable."""
    try:
        ticker = str(msg["id"])
        price = float(msg["price"])
        t_ms = int(msg["time"])  # protobuf int64 arrives as a string
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(price) and price > 0) or not 0 < t_ms <= MAX_EPOCH_MS:
        return None
    return ticker, Tick(price, t_ms)


class YahooStream:
    """Subscribes to tickers and keeps the newest tick per ticker; reconnects with back-off."""

    __slots__ = ("_clock", "_connected", "_errors", "_last_msg_ms", "_task", "_tickers", "ticks", "url")

    def __init__(self, url: str, tickers: Sequence[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._tickers = list(dict.fromkeys(tickers))
        self.ticks: dict[str, Tick] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._errors = 0
        self._last_msg_ms: int | None = None
        self._clock = clock

    def on_message(self, msg: dict[str, Any]) -> None:
        """Handle one decoded message (public for tests)."""
        parsed = tick_from_message(msg)
        if parsed is None:
            return
        ticker, tick = parsed
        old = self.ticks.get(ticker)
        if old is None or tick.t_ms >= old.t_ms:
            self.ticks[ticker] = tick
        self._last_msg_ms = int(self._clock() * 1000)

    async def _run(self) -> None:
        import yfinance as yf  # heavy import, only when the stream runs

        delay = 1.0
        while True:
            ws: Any = None
            try:
                ws = yf.AsyncWebSocket(url=self.url, verbose=False)
                await ws.subscribe(self._tickers)
                self._connected = True
                delay = 1.0
                await ws.listen(self.on_message)
                return  # listen() returns only after cancellation
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream is best-effort: log and retry
                self._errors += 1
                log.warning("yahoo stream: %s: %s (retry in %.0fs)", type(exc).__name__, exc, delay)
            finally:
                self._connected = False
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    def start(self) -> None:
        """Start the background task (idempotent); needs a running loop."""
        if self._task is None and self._tickers:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="yahoo-stream")

    async def close(self) -> None:
        """Stop the background task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        """Facts for ``/health``."""
        return {"connected": self._connected, "tickers": len(self._tickers),
                "errors": self._errors, "last_message_ms": self._last_msg_ms}
