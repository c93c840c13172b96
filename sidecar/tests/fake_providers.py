"""A local fake of the four providers, for tests (aiohttp on 127.0.0.1, random port).

It serves the recorded bodies of ``sidecar/tests/fixtures`` (see its ``PROVENANCE.tsv``) at the providers' real paths, and injects faults on demand: any status,
body, headers (``Retry-After``), a delay (timeouts) or a truncated body.
Every request is recorded (path, query, headers) so tests can check that nothing
was sent, or that no key leaked into a URL.

Use: ``fake = FakeProviders(); await fake.start(); fake.push("td", Reply(...))``;
the default answer of each endpoint is set with ``fake.default[...]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

REPO = Path(__file__).resolve().parents[2]


def fixtures_dir() -> Path:
    """The recorded provider bodies kept in the repository (``sidecar/tests/fixtures``)."""
    return Path(__file__).resolve().parent / "fixtures"


def fixture(rel: str) -> bytes:
    """The bytes of one recorded body."""
    return (fixtures_dir() / rel).read_bytes()


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Send only this many bytes of ``body`` (with a matching Content-Length): truncated JSON.
    truncate: int | None = None
    content_type: str = "application/json"
    #: Treat ``body`` as a template: ``{url}`` and ``{authorization}`` become the request's
    #: URL and Authorization header (providers that echo the request in their errors).
    echo: bool = False

    @classmethod
    def fixture(cls, rel: str, status: int = 200, **kw: Any) -> Reply:
        ctype = "text/plain" if rel.endswith(".txt") else "application/json"
        return cls(status=status, body=fixture(rel), content_type=ctype, **kw)

    @classmethod
    def json(cls, obj: Any, status: int = 200, **kw: Any) -> Reply:
        return cls(status=status, body=json.dumps(obj).encode(), **kw)


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    url: str


# endpoint key -> path prefix
ENDPOINTS = {
    "av": "/query",
    "td": "/time_series",
    "polygon": "/v2/aggs/",
    "yahoo": "/v8/finance/chart/",
}


class FakeProviders:
    """The fake server; ``base_url`` works for every provider's base-URL setting."""

    def __init__(self) -> None:
        self.queue: dict[str, list[Reply]] = {k: [] for k in ENDPOINTS}
        self.default: dict[str, Reply] = {}
        #: Answers computed from the request (e.g. bars for the asked range), after the queue.
        self.responders: dict[str, Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.stream_messages: list[dict[str, Any]] = []
        self.stream_subscriptions: list[Any] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    def push(self, endpoint: str, *replies: Reply) -> None:
        """Queue answers for the next requests to ``endpoint`` (then the default)."""
        self.queue[endpoint].extend(replies)

    def requests_to(self, endpoint: str) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(ENDPOINTS[endpoint])]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream", self._stream)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers), str(request.url)))
        if request.path in ("/", "/consent"):
            return web.Response(text="ok")  # yfinance's cookie fetch (fc.yahoo.com)
        if request.path.endswith("/getcrumb"):
            return web.Response(text="fakecrumb")
        for key, prefix in ENDPOINTS.items():
            if request.path.startswith(prefix):
                if self.queue[key]:
                    reply: Reply | None = self.queue[key].pop(0)
                elif key in self.responders:
                    reply = self.responders[key](self.seen[-1])
                else:
                    reply = self.default.get(key)
                if reply is None:
                    return web.Response(status=404, text="no fake answer configured")
                return await self._send(request, reply)
        return web.Response(status=404, text="404 page not found")

    async def _send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        body = reply.body
        if reply.echo:
            auth = request.headers.get("Authorization", "")
            body = body.replace(b"{url}", json.dumps(str(request.url))[1:-1].encode()).replace(
                b"{authorization}", json.dumps(auth)[1:-1].encode())
        if reply.truncate is None:
            return web.Response(status=reply.status, body=body, headers=reply.headers,
                                content_type=reply.content_type)
        body = body[: reply.truncate]
        resp = web.Response(status=reply.status, body=body, headers=reply.headers,
                            content_type=reply.content_type)
        return resp

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                self.stream_subscriptions.append(json.loads(msg.data))
                for message in self.stream_messages:
                    await ws.send_str(json.dumps({"type": "pricing", "message": message_b64(message)}))
        finally:
            self._sockets.discard(ws)
        return ws

    async def send_stream(self, *messages: dict[str, Any]) -> None:
        """Send pricing messages now to every subscribed stream client."""
        for ws in list(self._sockets):
            for message in messages:
                await ws.send_str(json.dumps({"type": "pricing", "message": message_b64(message)}))

    async def wait_subscribed(self, timeout_s: float = 10.0) -> None:
        """Until a stream client has subscribed (the daemon's stream is up)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (self._sockets and self.stream_subscriptions):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("no stream subscription")
            await asyncio.sleep(0.02)


def message_b64(fields: dict[str, Any]) -> str:
    """A Yahoo pricing message (protobuf, base64) as the real streamer sends it."""
    from yfinance.pricing_pb2 import PricingData

    data = PricingData(**fields)
    return base64.b64encode(data.SerializeToString()).decode()


@pytest.fixture
async def fake() -> Any:
    """A running fake-provider server for one test."""
    server = FakeProviders()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
