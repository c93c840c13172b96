"""The Yahoo stream against a local websocket server: it reconnects when the server
drops it, and backs off (1 s, 2 s, 4 s, ...) while the server is gone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from sidecar.sources.yahoo_stream import YahooStream
from sidecar.tests.fake_providers import FakeProviders, fake  # noqa: F401

T_MS = 1_760_000_000_000


async def until(what: str, check: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Until ``check()`` is truthy; fails naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def tick(fake: FakeProviders, stream: YahooStream, price: float) -> None:
    """Send one AAPL tick and wait until the stream has it."""
    await fake.send_stream({"id": "AAPL", "price": price, "time": T_MS + int(price)})
    await until(f"tick {price}", lambda: (t := stream.ticks.get("AAPL")) is not None and t.price == price)


async def test_the_stream_reconnects_after_the_server_drops_it(fake: FakeProviders) -> None:
    stream = YahooStream(fake.stream_url, ["AAPL"], first_retry_s=0.05)
    stream.start()
    try:
        await fake.wait_subscribed()
        await tick(fake, stream, 101.0)
        await fake.drop_stream()
        await until("disconnected", lambda: not fake._sockets)
        await until("resubscribed", lambda: bool(fake._sockets))
        await tick(fake, stream, 102.0)
        assert stream.status()["connected"]
    finally:
        await stream.close()


def retry_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the stream announced before each reconnection, in order."""
    return [float(r.args[1]) for r in caplog.records  # type: ignore[index, arg-type]
            if r.name == "sidecar.sources.yahoo_stream" and "retry in" in r.msg]


async def test_the_stream_backs_off_while_the_server_is_gone_and_resets_after_a_tick(
        fake: FakeProviders, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.sources.yahoo_stream")
    stream = YahooStream(fake.stream_url, ["AAPL"], first_retry_s=0.05)
    stream.start()
    try:
        await fake.wait_subscribed()
        port = fake.port
        await fake.close()  # connections refused from now on
        await until("four failed reconnections", lambda: len(retry_waits(caplog)) >= 5)
        waits = retry_waits(caplog)
        assert waits[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]  # the drop, then each refusal doubles it
        assert not stream.status()["connected"] and stream.status()["errors"] >= 5

        await fake.start(port=port)
        await until("reconnected", lambda: bool(fake._sockets))
        await tick(fake, stream, 103.0)
        seen = len(retry_waits(caplog))
        await fake.drop_stream()
        await until("the next retry", lambda: len(retry_waits(caplog)) > seen)
        assert retry_waits(caplog)[seen] == 0.05  # a tick came through: the back-off starts over
    finally:
        await stream.close()
