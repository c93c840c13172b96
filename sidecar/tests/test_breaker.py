"""Circuit breakers: open after fail_max, one probe at a time, close on success; neutral cancels."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest

from sidecar.breaker import BreakerOpen, SourceBreaker
from sidecar.errors import ProviderError
from sidecar.rate_budget import BudgetExhausted


def age(br: SourceBreaker, seconds: float) -> None:
    """Pretend the breaker opened ``seconds`` earlier (pybreaker reads the wall clock)."""
    storage = br.breaker._state_storage
    storage.opened_at = storage.opened_at - timedelta(seconds=seconds)


async def fail(cls: str = "unavailable") -> None:
    raise ProviderError(cls, "boom", source="t")


async def ok() -> str:
    return "ok"


@pytest.mark.asyncio
async def test_opens_after_fail_max_and_refuses(caplog):
    br = SourceBreaker("t", fail_max=3, reset_timeout_s=30)
    with caplog.at_level(logging.INFO, logger="sidecar.breaker"):
        for _ in range(3):
            with pytest.raises(ProviderError):
                await br.call(fail)
    assert br.state == "open"
    assert "closed -> open" in caplog.text
    called = []

    async def spy() -> None:
        called.append(1)

    with pytest.raises(BreakerOpen):
        await br.call(spy)
    assert not called
    st = br.status()
    assert st["state"] == "open" and st["last_error_class"] == "unavailable"
    assert "boom" in st["opened_reason"]


@pytest.mark.asyncio
async def test_non_counting_errors_do_not_open():
    br = SourceBreaker("t", fail_max=2)
    for cls in ("unknown_symbol", "not_entitled", "unknown_symbol"):
        with pytest.raises(ProviderError):
            await br.call(lambda c=cls: fail(c))
    assert br.state == "closed"


@pytest.mark.asyncio
async def test_exactly_one_probe_then_close():
    br = SourceBreaker("t", fail_max=1, reset_timeout_s=30)
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open"
    age(br, 31)
    gate = asyncio.Event()
    started = []

    async def probe() -> str:
        started.append(1)
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(br.call(probe)) for _ in range(5)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert started == [1] and br.status()["probe_in_flight"]
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 1
    assert sum(isinstance(r, BreakerOpen) for r in results) == 4
    assert br.state == "closed" and br.status()["last_success_ms"] is not None


@pytest.mark.asyncio
async def test_failed_probe_reopens():
    br = SourceBreaker("t", fail_max=1, reset_timeout_s=30)
    with pytest.raises(ProviderError):
        await br.call(fail)
    age(br, 31)
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open"
    with pytest.raises(BreakerOpen):
        await br.call(ok)


@pytest.mark.asyncio
async def test_cancellation_and_budget_refusals_are_neutral():
    br = SourceBreaker("t", fail_max=1, reset_timeout_s=30)
    with pytest.raises(ProviderError):
        await br.call(fail)
    age(br, 31)

    async def hang() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(br.call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert br.state == "open"  # the cancelled probe neither closed nor re-opened it

    async def refused() -> None:
        raise BudgetExhausted("nothing sent")

    with pytest.raises(BudgetExhausted):
        await br.call(refused)
    assert br.state == "open" and br.allows()
    assert await br.call(ok) == "ok"
    assert br.state == "closed"


@pytest.mark.asyncio
async def test_cancellation_does_not_count_when_closed():
    br = SourceBreaker("t", fail_max=2)
    with pytest.raises(ProviderError):
        await br.call(fail)

    async def hang() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(br.call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert br.breaker.fail_counter == 1 and br.state == "closed"
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open"
