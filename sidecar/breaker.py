"""Circuit breakers for the data sources, on pybreaker, used the asyncio way.

pybreaker has no native asyncio support. This
wrapper admits a call first (open -> refuse; open after its timeout -> half-open,
and half-open lets exactly one probe through at a time), awaits the request
outside of pybreaker, and then reports the outcome with ``with breaker.calling():``:

* success -> pybreaker's success path (closes a half-open breaker);
* a counting error -> pybreaker's failure path (opens after ``fail_max``);
* a non-counting :class:`ProviderError` (``unknown_symbol``, ``not_entitled``) is
  in pybreaker's ``exclude`` list, so it is not a failure;
* :class:`asyncio.CancelledError` and :class:`BudgetExhausted` (nothing was sent)
  are *neutral*: they never reach pybreaker, so a cancelled probe neither closes
  nor re-opens the circuit, and the next caller may probe.

State changes are logged once each on logger ``sidecar.breaker`` and kept for
``/health`` and ``/metrics``. Time comes from an injectable epoch-seconds clock
(tests drive it; pybreaker's own reading of the wall clock is kept consistent
with it by :class:`_ClockedStorage`).

A source has one breaker, or one per asset class where its asset classes are
served by different endpoints or products (:class:`SourceCircuits`): Alpha
Vantage's ``FX_INTRADAY`` failing must not cut off its stock series.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pybreaker

from sidecar.errors import ProviderError, SidecarError
from sidecar.logs import redact
from sidecar.rate_budget import BudgetExhausted

if TYPE_CHECKING:
    from sidecar.sources.base import Source

log = logging.getLogger("sidecar.breaker")
T = TypeVar("T")

#: Circuit states, best first (a source's summary state is its worst breaker's).
STATES = ("closed", "half_open", "open")
_STATE_NAMES = {
    pybreaker.STATE_CLOSED: "closed",
    pybreaker.STATE_OPEN: "open",
    pybreaker.STATE_HALF_OPEN: "half_open",
}


class BreakerOpen(SidecarError):
    """The circuit refused the call (open, or a probe is already in flight)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: circuit {reason}")
        self.name = name
        self.reason = reason


def _nothing_sent(result: object) -> bool:
    """A batched answer in which the local budget refused every symbol."""
    return (
        isinstance(result, dict) and bool(result)
        and all(isinstance(v, BudgetExhausted) for v in result.values())
    )


def _not_a_failure(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and not exc.counts_as_failure


#: pybreaker's "not a failure" list (an excluded error counts as a success there).
_EXCLUDE: list[Any] = [asyncio.CancelledError, _not_a_failure]


class _ClockedStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's state storage with the opening time kept on the breaker's clock.

    pybreaker stamps ``opened_at`` with ``datetime.now()`` and compares it with
    ``datetime.now()`` again; this storage records the injected clock instead and
    answers an ``opened_at`` that lies as far in the past as that clock says, so
    both pybreaker and :class:`SourceBreaker` see the same elapsed time.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self.opened_clock: float | None = None
        #: ``closed``, ``open`` or ``half_open``, kept with every state pybreaker stores:
        #: asked per symbol per cycle, it must not cost three property lookups.
        self.state_name = _STATE_NAMES[pybreaker.STATE_CLOSED]

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self.state_name = _STATE_NAMES.get(state, state)

    @property
    def opened_at(self) -> datetime | None:
        if self.opened_clock is None:
            return None
        return datetime.now(UTC) - timedelta(seconds=self._clock() - self.opened_clock)

    @opened_at.setter
    def opened_at(self, _when: datetime) -> None:
        self.opened_clock = self._clock()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: SourceBreaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner._on_state_change(
            _STATE_NAMES.get(old_state.name if old_state else "", "closed"),
            _STATE_NAMES.get(new_state.name, new_state.name),
        )


class SourceBreaker:
    """One circuit breaker for one source (or one source and asset class)."""

    __slots__ = (
        "_cb",
        "_clock",
        "_last_change_ms",
        "_last_error",
        "_last_error_class",
        "_last_success_ms",
        "_opened_reason",
        "_probe_in_flight",
        "_reset_timeout",
        "_storage",
        "asset_class",
        "name",
        "opens",
        "source",
    )

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        asset_class: str | None = None,
    ) -> None:
        #: ``source`` or ``source/asset_class``.
        self.name = name if asset_class is None else f"{name}/{asset_class}"
        self.source = name
        #: The asset class this breaker guards (``None``: every class of the source).
        self.asset_class = asset_class
        #: How many times it opened (``/metrics``).
        self.opens = 0
        self._clock = clock
        self._storage = _ClockedStorage(clock)
        self._reset_timeout = reset_timeout_s
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=_EXCLUDE,
            listeners=[_Listener(self)],
            state_storage=self._storage,
            name=self.name,
            throw_new_error_on_trip=False,
        )
        self._probe_in_flight = False
        self._last_error_class: str | None = None
        self._last_error: str | None = None
        self._last_success_ms: int | None = None
        self._last_change_ms: int | None = None
        self._opened_reason: str | None = None

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        return self._storage.state_name

    @property
    def breaker(self) -> pybreaker.CircuitBreaker:
        """The underlying pybreaker object (for tests and mirroring)."""
        return self._cb

    def _timeout_elapsed(self) -> bool:
        opened = self._storage.opened_clock
        return opened is None or self._clock() >= opened + self._reset_timeout

    def allows(self) -> bool:
        """Whether a call would be admitted right now (no side effects)."""
        state = self._storage.state_name
        if state == "closed":
            return True
        if state == "open" and not self._timeout_elapsed():
            return False
        return not self._probe_in_flight

    def _admit(self) -> bool:
        """Admit a call; returns True if it is the (single) probe."""
        state = self.state
        if state == "closed":
            return False
        if state == "open" and not self._timeout_elapsed():
            raise BreakerOpen(self.name, "open")
        if self._probe_in_flight:
            raise BreakerOpen(self.name, "half-open, probe in flight")
        if state == "open":
            self._cb.half_open()  # the timeout elapsed: this call is the probe
        self._probe_in_flight = True
        return True

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``await fn()`` under the breaker; raises :class:`BreakerOpen` if refused."""
        probe = self._admit()
        try:
            try:
                result = await fn()
            except (asyncio.CancelledError, BudgetExhausted):
                raise  # neutral: pybreaker never hears of it
            except BaseException as exc:
                self._record_failure(exc)
                raise
            if _nothing_sent(result):
                return result  # neutral: every symbol was refused by the local budget
            self._record_success()
            return result
        finally:
            if probe:
                self._probe_in_flight = False

    def _report(self, exc: BaseException | None) -> None:
        try:
            with self._cb.calling():
                if exc is not None:
                    raise exc
        except pybreaker.CircuitBreakerError:
            pass  # the state moved meanwhile (another call opened it): nothing to record
        except BaseException as raised:
            if raised is not exc:
                raise

    def _record_success(self) -> None:
        self._last_success_ms = int(self._clock() * 1000)
        self._report(None)

    def _record_failure(self, exc: BaseException) -> None:
        counts = not _not_a_failure(exc)
        if counts:
            self._last_error_class = (
                exc.error_class if isinstance(exc, ProviderError) else type(exc).__name__
            )
            self._last_error = redact(str(exc))[:300]  # /health shows it
        self._report(exc)

    def _on_state_change(self, old: str, new: str) -> None:
        self._last_change_ms = int(self._clock() * 1000)
        extra = {"source": self.source, "asset_class": self.asset_class, "state": new,
                 "previous": old}
        if new == "open":
            self.opens += 1
            self._opened_reason = (
                f"{self._last_error_class}: {self._last_error}" if self._last_error_class else None
            )
            extra["reason"] = self._opened_reason
            log.warning("circuit %s %s -> %s (%s)", self.name, old, new, self._opened_reason,
                        extra=extra)
        else:
            log.info("circuit %s %s -> %s", self.name, old, new, extra=extra)

    def status(self) -> dict[str, Any]:
        """Facts for ``/health``."""
        return {
            "name": self.name,
            "source": self.source,
            "asset_class": self.asset_class,
            "state": self.state,
            "fail_count": self._cb.fail_counter,
            "opens": self.opens,
            "last_error_class": self._last_error_class,
            "last_error": self._last_error,
            "last_success_ms": self._last_success_ms,
            "last_state_change_ms": self._last_change_ms,
            "opened_reason": self._opened_reason if self.state != "closed" else None,
            "probe_in_flight": self._probe_in_flight,
        }


class SourceCircuits:
    """The breakers of one source: one for everything, or one per asset class.

    Which breaker guards a symbol is the source's choice
    (:meth:`Source.breaker_lane`: its asset class where the source serves classes
    through different endpoints or products, else ``None``). The breakers of the
    configured symbols exist from the start (so ``/health`` and ``/metrics`` list
    them before any request); another lane gets its breaker when first asked for.
    """

    __slots__ = ("_breakers", "_clock", "_fail_max", "_reset_timeout_s", "source")

    def __init__(
        self,
        source: str,
        lanes: Iterable[str | None] = (None,),
        *,
        fail_max: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self._fail_max = fail_max
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._breakers: dict[str | None, SourceBreaker] = {}
        for lane in sorted(set(lanes), key=lambda x: x or ""):
            self.lane(lane)

    @classmethod
    def for_source(
        cls,
        source: Source,
        symbols: Sequence[str],
        *,
        fail_max: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> SourceCircuits:
        """The breakers ``source`` needs for the ``symbols`` it can serve."""
        lanes = {source.breaker_lane(sym) for sym in symbols if source.can_serve(sym)}
        return cls(source.name, lanes, fail_max=fail_max, reset_timeout_s=reset_timeout_s,
                   clock=clock)

    def lane(self, lane: str | None) -> SourceBreaker:
        """The breaker of ``lane`` (an asset class, or ``None`` for the whole source)."""
        breaker = self._breakers.get(lane)
        if breaker is None:
            breaker = SourceBreaker(self.source, fail_max=self._fail_max,
                                    reset_timeout_s=self._reset_timeout_s, clock=self._clock,
                                    asset_class=lane)
            self._breakers[lane] = breaker
        return breaker

    def __iter__(self) -> Iterator[SourceBreaker]:
        return iter(self._breakers.values())

    @property
    def state(self) -> str:
        """The worst state of its breakers (``closed`` when it has none)."""
        worst = max((STATES.index(b.state) for b in self), default=0)
        return STATES[worst]

    def status(self) -> list[dict[str, Any]]:
        """Each breaker's facts for ``/health``."""
        return [b.status() for b in self]
