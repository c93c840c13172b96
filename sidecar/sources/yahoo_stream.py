"""Yahoo's live price stream (the protocol of ``yfinance.AsyncWebSocket``), as a tick cache.

The stream alone is not a bar source: it only carries the last price. The Yahoo
source uses the newest tick to move the forming bar's close/high/low between two
REST polls. The URL is a setting, so tests point it at a local server.

The connection is ours (``websockets``), not ``AsyncWebSocket.listen``: that one spins
without yielding once the server has closed the connection, freezing the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.bar import MAX_EPOCH_MS

log = logging.getLogger("sidecar.sources.yahoo_stream")

#: How often the subscription is sent again on an open connection.
RESUBSCRIBE_S = 15.0


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

    __slots__ = ("_clock", "_connected", "_errors", "_first_retry_s", "_last_msg_ms", "_task",
                 "_tickers", "ticks", "url")

    def __init__(self, url: str, tickers: Sequence[str],
                 clock: Callable[[], float] = time.time, first_retry_s: float = 1.0) -> None:
        self.url = url
        self._first_retry_s = first_retry_s
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

    def on_raw(self, raw: str | bytes) -> None:
        """Handle one frame as the server sends it: JSON whose ``message`` is a base64
        protobuf ``PricingData``; a frame that does not decode is skipped."""
        from yfinance.pricing_pb2 import PricingData

        try:
            encoded = json.loads(raw)["message"]
            data = PricingData()
            data.ParseFromString(base64.b64decode(encoded))
        except Exception:  # anything malformed: not a tick
            return
        self.on_message({"id": data.id, "price": data.price, "time": data.time})

    async def _run(self) -> None:
        """Connect, subscribe, read; when the connection fails or the server closes it,
        wait and connect again, doubling the wait (up to a minute) until a tick arrives."""
        from websockets.asyncio.client import connect  # only when the stream runs

        delay = first = self._first_retry_s
        while True:
            try:
                async with connect(self.url) as ws:
                    await ws.send(self._subscription)
                    self._connected = True
                    keep = asyncio.get_running_loop().create_task(self._resubscribe(ws))
                    try:
                        async for raw in ws:
                            self.on_raw(raw)
                            delay = first
                    finally:
                        keep.cancel()
                why = "connection closed by the server"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream is best-effort: log and retry
                why = f"{type(exc).__name__}: {exc}"
            finally:
                self._connected = False
            self._errors += 1
            log.warning("yahoo stream: %s (retry in %gs)", why, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    @property
    def _subscription(self) -> str:
        return json.dumps({"subscribe": self._tickers})

    async def _resubscribe(self, ws: Any) -> None:
        """Repeat the subscription (Yahoo forgets one it does not hear again)."""
        while True:
            await asyncio.sleep(RESUBSCRIBE_S)
            await ws.send(self._subscription)

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
