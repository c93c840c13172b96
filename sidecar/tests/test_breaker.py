"""Circuit breakers: open after fail_max, one probe at a time, close on success; neutral cancels.

Time is driven (the breakers' injected clock), never slept.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.breaker import BreakerOpen, SourceBreaker, SourceCircuits
from sidecar.errors import ProviderError
from sidecar.rate_budget import BudgetExhausted
from sidecar.tests.helpers import Clock


def breaker(clock: Clock, fail_max: int = 1, **kw: object) -> SourceBreaker:
    return SourceBreaker("t", fail_max=fail_max, reset_timeout_s=30, clock=clock, **kw)  # type: ignore[arg-type]


async def fail(cls: str = "unavailable") -> None:
    raise ProviderError(cls, "boom", source="t")


async def ok() -> str:
    return "ok"


async def cancel_mid_call(br: SourceBreaker) -> None:
    """Start a call that hangs, cancel it while it is in flight, and see the cancellation."""

    async def hang() -> None:
        await asyncio.sleep(10)  # hangs

    task = asyncio.create_task(br.call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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
    clock = Clock()
    br = breaker(clock)
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open"
    clock.t += 29.9
    assert not br.allows()
    with pytest.raises(BreakerOpen):
        await br.call(ok)
    clock.t += 0.2
    assert br.allows()
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
    assert br.state == "half_open" and not br.allows()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 1
    assert sum(isinstance(r, BreakerOpen) for r in results) == 4
    assert br.state == "closed" and br.status()["last_success_ms"] is not None


@pytest.mark.asyncio
async def test_failed_probe_reopens():
    clock = Clock()
    br = breaker(clock)
    with pytest.raises(ProviderError):
        await br.call(fail)
    clock.t += 31
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open" and br.status()["opens"] == 2
    with pytest.raises(BreakerOpen):
        await br.call(ok)
    clock.t += 29  # the timeout restarts from the failed probe
    assert not br.allows()
    clock.t += 1
    assert await br.call(ok) == "ok" and br.state == "closed"


@pytest.mark.asyncio
async def test_cancellation_and_budget_refusals_are_neutral():
    clock = Clock()
    br = breaker(clock)
    with pytest.raises(ProviderError):
        await br.call(fail)
    clock.t += 31

    await cancel_mid_call(br)
    # The cancelled probe neither closed nor re-opened it; the next caller may probe.
    assert br.state == "half_open" and br.allows()

    async def refused() -> None:
        raise BudgetExhausted("nothing sent")

    with pytest.raises(BudgetExhausted):
        await br.call(refused)
    assert br.state == "half_open" and br.allows()
    assert await br.call(ok) == "ok"
    assert br.state == "closed"


@pytest.mark.asyncio
async def test_cancellation_does_not_count_when_closed():
    br = SourceBreaker("t", fail_max=2)
    with pytest.raises(ProviderError):
        await br.call(fail)

    await cancel_mid_call(br)
    assert br.breaker.fail_counter == 1 and br.state == "closed"
    with pytest.raises(ProviderError):
        await br.call(fail)
    assert br.state == "open"


@pytest.mark.asyncio
async def test_each_state_change_is_logged_once(caplog):
    clock = Clock()
    br = breaker(clock, fail_max=2, asset_class="fx")
    assert br.name == "t/fx"
    with caplog.at_level(logging.INFO, logger="sidecar.breaker"):
        for _ in range(4):  # two failures open it; the next two are refused, not logged again
            with pytest.raises((ProviderError, BreakerOpen)):
                await br.call(fail)
        clock.t += 30
        for _ in range(3):
            await br.call(ok)
    changes = [(r.previous, r.state, r.asset_class, r.source) for r in caplog.records
               if r.name == "sidecar.breaker"]
    assert changes == [("closed", "open", "fx", "t"), ("open", "half_open", "fx", "t"),
                       ("half_open", "closed", "fx", "t")]
    assert br.status()["last_state_change_ms"] == int(clock.t * 1000)


@pytest.mark.asyncio
async def test_source_circuits_one_per_lane_worst_state_summarises():
    clock = Clock()
    circuits = SourceCircuits("av", ["stock", "fx", "stock"], fail_max=1, reset_timeout_s=30,
                              clock=clock)
    assert [b.name for b in circuits] == ["av/fx", "av/stock"]
    assert circuits.state == "closed"
    with pytest.raises(ProviderError):
        await circuits.lane("fx").call(fail)
    assert circuits.lane("fx").state == "open" and circuits.lane("stock").state == "closed"
    assert circuits.lane("stock").allows()
    assert circuits.state == "open"
    status = {(s["asset_class"], s["state"], s["last_error_class"]) for s in circuits.status()}
    assert status == {("fx", "open", "unavailable"), ("stock", "closed", None)}
    assert circuits.lane("crypto").state == "closed"  # a lane not configured gets one on demand
    whole = SourceCircuits("yahoo")
    assert [(b.name, b.asset_class) for b in whole] == [("yahoo", None)]


def test_state_follows_every_state_pybreaker_stores():
    # The state name is mirrored when pybreaker stores a state, not read through it.
    clock = Clock()
    br = breaker(clock)
    for move, want in ((br.breaker.open, "open"), (br.breaker.half_open, "half_open"),
                       (br.breaker.close, "closed"), (br.breaker.open, "open")):
        move()
        assert br.state == want == {"closed": "closed", "open": "open",
                                    "half-open": "half_open"}[br.breaker.current_state]
        assert br.allows() is (want != "open")
