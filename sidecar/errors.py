"""Small typed exceptions shared by the whole package."""

from __future__ import annotations

from typing import Literal

ErrorClass = Literal[
    "rate_limited", "auth", "unknown_symbol", "unavailable", "bad_response", "not_entitled"
]

#: Exit codes used by ``python -m sidecar fetch`` for each provider error class.
EXIT_CODES: dict[str, int] = {
    "rate_limited": 10,
    "auth": 11,
    "unknown_symbol": 12,
    "unavailable": 13,
    "bad_response": 14,
    "not_entitled": 15,
}


class SidecarError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """A setting has a bad value; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class ProviderError(SidecarError):
    """A data source failed; ``error_class`` is one of CONTRACT.md's classes.

    ``retry_after`` (seconds) is set when the provider said how long to back off.
    Messages must never contain API keys: build them from redacted URLs only.
    """

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        source: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class: ErrorClass = error_class
        self.source = source
        self.retry_after = retry_after

    @property
    def counts_as_failure(self) -> bool:
        """Whether this error should count against the source's circuit breaker."""
        return self.error_class not in ("unknown_symbol", "not_entitled")


class StoreError(SidecarError):
    """A storage backend (Redis or SQLite) failed."""
