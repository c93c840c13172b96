"""The one place a provider's answer becomes a classified :class:`ProviderError`.

Every provider says "you failed" in its own words: an HTTP status, a JSON object
with a code, a label and a message, or (Alpha Vantage) one key of an HTTP 200 body.
A provider declares an :class:`ErrorTable`: which fields carry its code, label and
message, and which codes, labels and phrases mean which class (:class:`Rule`, first
match wins). What no rule decides is decided by the code as an HTTP status
(:func:`status_class`). The ccxt sources map ccxt's exception classes the same way,
through :func:`exception_class`.

``rate_limited`` and ``unavailable`` errors keep the provider's ``Retry-After``;
other classes do not wait, so they carry none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import ErrorClass, ProviderError

#: The classes a provider's ``Retry-After`` applies to.
WAITING_CLASSES: frozenset[ErrorClass] = frozenset(("rate_limited", "unavailable"))
#: Every HTTP server-error status.
SERVER_ERRORS: tuple[int, ...] = tuple(range(500, 600))

#: A phrase of a rule: a text, or a tuple of texts that must all appear.
Phrase = str | tuple[str, ...]


def status_class(status: int) -> ErrorClass:
    """The class an HTTP status (or a body's numeric code read as one) means on its own."""
    if status == 429:
        return "rate_limited"
    if status == 401:
        return "auth"
    if status == 403:
        return "not_entitled"
    if status == 404:
        return "unknown_symbol"
    if status >= 500 or status in (408, 425):
        return "unavailable"
    return "bad_response"


def provider_error(error_class: ErrorClass, message: str, source: str,
                   retry_after: float | None = None) -> ProviderError:
    """A :class:`ProviderError` that keeps ``retry_after`` only where waiting helps."""
    return ProviderError(error_class, message, source=source,
                         retry_after=retry_after if error_class in WAITING_CLASSES else None)


def http_status_error(
    status: int, detail: str, source: str, retry_after: float | None = None
) -> ProviderError:
    """The error an HTTP status means when the body does not say better."""
    return provider_error(status_class(status), f"HTTP {status} {detail}", source, retry_after)


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error answer says, read out of its body (see :meth:`ErrorTable.read`).

    ``status`` is the HTTP status as the table reads it; ``code`` the answer's numeric
    code (the body's, else the status); ``label`` its textual code, status or key
    (``NOT_AUTHORIZED``, ``Not Found``, ``Note``); ``text`` its message, cut to the
    table's length.
    """

    status: int
    code: int
    label: str
    text: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of a provider's error table: ``error_class`` when every condition given holds.

    ``when``: the answer's code is one of the integers or its label one of the strings.
    ``label``: its label is this one. ``phrases``: its message (case-insensitive) holds
    one of them; a tuple phrase holds all its parts. ``unless``: its message holds none
    of these. ``http``: whether the message names the HTTP status (``HTTP 503 ...``);
    ``None``: as the table says.
    """

    error_class: ErrorClass
    when: tuple[int | str, ...] = ()
    label: str | None = None
    phrases: tuple[Phrase, ...] = ()
    unless: tuple[str, ...] = ()
    http: bool | None = None

    def matches(self, body: ErrorBody, low: str) -> bool:
        """Whether this rule decides ``body`` (``low``: its text in lower case)."""
        if self.when and body.code not in self.when and body.label not in self.when:
            return False
        if self.label is not None and body.label != self.label:
            return False
        if self.phrases and not any(
            p in low if isinstance(p, str) else all(part in low for part in p) for p in self.phrases
        ):
            return False
        return not any(p in low for p in self.unless)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class ErrorTable:
    """A provider's error vocabulary: where its bodies say what, and what that means.

    ``code_field``, ``label_field`` and ``text_fields`` name the fields of an error
    object that carry its numeric code, its textual label and its message (the first
    non-empty of ``text_fields``), read by :meth:`read`. ``detail`` writes the message
    the error carries; ``http``: whether it names the HTTP status (``HTTP 403 ...``),
    for the errors the status decides and the rules that do not say.
    """

    source: str
    rules: tuple[Rule, ...]
    detail: Callable[[ErrorBody], str]
    code_field: str | None = None
    label_field: str | None = None
    text_fields: tuple[str, ...] = ()
    text_limit: int = 240
    http: bool = False

    def read(self, status: int, obj: Mapping[str, Any] | None) -> ErrorBody:
        """The code, label and message of an error object (``None``: a body without one)."""
        obj = obj or {}
        code = status
        if self.code_field is not None:
            try:
                code = int(obj.get(self.code_field, status))
            except (TypeError, ValueError, OverflowError):  # null, "abc", Infinity
                code = status
        label = _text(obj.get(self.label_field)) if self.label_field else ""
        text = next((_text(obj[f]) for f in self.text_fields if obj.get(f)), "")
        return self.said(status, label, text, code)

    def said(self, status: int, label: str, text: str, code: int | None = None) -> ErrorBody:
        """An answer's error as read by its parser (``code``: the status unless given)."""
        return ErrorBody(status, status if code is None else code, label, text[:self.text_limit])

    def decided(self, body: ErrorBody, retry_after: float | None = None) -> ProviderError | None:
        """The error of ``body`` when one of the rules decides it, else ``None``."""
        low = body.text.lower()
        rule = next((rule for rule in self.rules if rule.matches(body, low)), None)
        if rule is None:
            return None
        return self._error(body, rule.error_class, self.http if rule.http is None else rule.http,
                           retry_after)

    def error(self, body: ErrorBody, retry_after: float | None = None) -> ProviderError:
        """The classified error of ``body``: its rule's class, else its code's as a status."""
        return (self.decided(body, retry_after)
                or self._error(body, status_class(body.code), self.http, retry_after))

    def _error(self, body: ErrorBody, error_class: ErrorClass, http: bool,
               retry_after: float | None) -> ProviderError:
        detail = self.detail(body)
        message = f"HTTP {body.status} {detail}" if http else detail
        return provider_error(error_class, message, self.source, retry_after)

    def classify(self, status: int, obj: Mapping[str, Any] | None,
                 retry_after: float | None = None) -> ProviderError:
        """The classified error of an error object answered with HTTP ``status``."""
        return self.error(self.read(status, obj), retry_after)


def exception_class(exc: BaseException,
                    table: Sequence[tuple[type[BaseException], ErrorClass]]) -> ErrorClass:
    """The class of a client library's exception: the first ``(type, class)`` row it is an
    instance of (so subclasses come before their bases), else ``bad_response``."""
    return next((mapped for kind, mapped in table if isinstance(exc, kind)), "bad_response")
