"""A local fake crypto exchange for the ccxt source (aiohttp on 127.0.0.1, random port).

REST: answers by URL path only (queries carry time-dependent values), with the
captured bodies of ``sidecar/tests/fixtures/ccxt`` or scripted :class:`Reply`s;
every request is recorded. Websocket: any path upgraded to a websocket is a stream;
text frames from the client are recorded as subscriptions (answered the way Binance
acknowledges them; Kraken's pings are answered with its pong), ``send`` pushes
messages to the clients (under one path, or all), ``drop`` closes them, and while
``refuse_streams`` is set an upgrade is answered 503 (the exchange's stream is down).

Use: ``ex = FakeExchange(); await ex.start(); ex.route("/api/v3/klines", Reply(...))``
with ``SIDECAR_CCXT_BASE_URL_<ID>=ex.base_url``, ``SIDECAR_CCXT_WS_URL_<ID>=ex.ws_url``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import WSMsgType, web

from sidecar.tests.fake_providers import FakeProviders, Reply, Seen

CCXT_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ccxt"


def case(exchange: str, name: str) -> dict[str, Any]:
    """One captured case: ``body`` (bytes), ``expected`` (ccxt's parse), ``input``, ``url``."""
    base = CCXT_FIXTURES / exchange / name
    request = json.loads(base.with_suffix(".request.json").read_text())
    return {"body": base.with_suffix(".json").read_bytes(),
            "expected": json.loads(base.with_suffix(".expected.json").read_text()),
            "input": request["input"], "url": request["generated_request"][0]["url"]}


def markets_file(exchange: str) -> Path:
    """The hand-built minimal markets of ``exchange`` (``SIDECAR_CCXT_MARKETS_<ID>``)."""
    return CCXT_FIXTURES / exchange / "markets_min.json"


def path_of(url: str) -> str:
    return urlsplit(url).path


class FakeExchange(FakeProviders):
    """The fake server; ``base_url``/``ws_url`` go into the rebasing settings."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, list[Reply]] = {}
        self.default_by_path: dict[str, Reply] = {}
        self.responders_by_path: dict[str, Callable[[Seen], Reply]] = {}
        self.subscriptions: list[Any] = []
        self.ws_paths: list[str] = []
        self.refuse_streams = False
        self._socket_path: dict[web.WebSocketResponse, str] = {}

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def route(self, path: str, *replies: Reply) -> None:
        """Queue answers for the next requests to ``path`` (then its default)."""
        self.routes.setdefault(path, []).extend(replies)

    def requests_to(self, endpoint: str) -> list[Seen]:
        """The requests to the URL path ``endpoint``."""
        return [s for s in self.seen if s.path == endpoint]

    async def close(self) -> None:
        await self.drop()
        await super().close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._stream(request)
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers), str(request.url)))
        queued = self.routes.get(request.path)
        if queued:
            reply: Reply | None = queued.pop(0)
        elif request.path in self.responders_by_path:
            reply = self.responders_by_path[request.path](self.seen[-1])
        else:
            reply = self.default_by_path.get(request.path)
        if reply is None:
            return web.Response(status=404, text="no fake answer configured")
        return await self._send(request, reply)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_streams:
            return web.Response(status=503, text="stream unavailable")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.ws_paths.append(request.path)
        self._sockets.add(ws)
        self._socket_path[ws] = request.path
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                sub = json.loads(msg.data)
                if isinstance(sub, dict) and "ping" in (sub.get("event"), sub.get("method")):
                    key = "event" if "event" in sub else "method"  # Kraken's v1 / v2 keep-alive
                    await ws.send_str(json.dumps({key: "pong", "req_id": sub.get("req_id")}))
                    continue
                self.subscriptions.append(sub)
                if isinstance(sub, dict) and "id" in sub:
                    await ws.send_str(json.dumps({"result": None, "id": sub["id"]}))
        finally:
            self._sockets.discard(ws)
            self._socket_path.pop(ws, None)
        return ws

    def _clients(self, path: str | None) -> list[web.WebSocketResponse]:
        return [ws for ws in list(self._sockets)
                if path is None or self._socket_path.get(ws, "").startswith(path)]

    async def send(self, *messages: Any, path: str | None = None) -> None:
        """Push ``messages`` (JSON) to the stream clients whose path starts with ``path`` (``None``: all)."""
        for ws in self._clients(path):
            for message in messages:
                await ws.send_str(json.dumps(message))

    async def drop(self, path: str | None = None) -> None:
        """Close the stream connections whose path starts with ``path`` (``None``: all):
        the exchange dropped them."""
        for ws in self._clients(path):
            await ws.close()
            self._sockets.discard(ws)

    async def wait_subscribed(self, timeout_s: float = 10.0, count: int = 1) -> None:
        """Until ``count`` subscriptions in all arrived and a client is connected."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (self._sockets and len(self.subscriptions) >= count):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{len(self.subscriptions)} stream subscriptions, wanted {count}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def exchange() -> AsyncIterator[FakeExchange]:
    server = FakeExchange()
    await server.start()
    yield server
    await server.close()
