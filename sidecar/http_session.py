"""One shared aiohttp session for the HTTP providers, and secret redaction.

Everything that is logged or put into an error message about a request goes
through :func:`redact` first (:func:`sidecar.logs.redact`): it strips
``apikey``/``api_key``/``token`` query parameters and ``Authorization`` values,
plus any literal secret it is given.
Transport failures become :class:`~sidecar.errors.ProviderError` (``unavailable``).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.errors import ProviderError
from sidecar.logs import redact as redact  # re-exported: the one redaction
from sidecar.provider_settings import ProviderSettings

USER_AGENT = "sidecar/0.1 (+market-data daemon)"


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` safe to log (``Authorization`` and key headers masked)."""
    return {
        k: ("***" if k.lower() in ("authorization", "x-api-key", "apikey") else v)
        for k, v in headers.items()
    }


def create_session(settings: ProviderSettings) -> aiohttp.ClientSession:
    """A pooled client session; create once per process (inside the running loop)."""
    connector = aiohttp.TCPConnector(
        limit=settings.http_pool_size,
        limit_per_host=max(2, settings.http_pool_size // 2),
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.http_timeout_s, sock_connect=settings.http_connect_timeout_s
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        raise_for_status=False,
    )


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        now = time.time() if now_s is None else now_s
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, 86_400.0))


@dataclass(frozen=True, slots=True)
class HttpReply:
    """What came back: status, the headers that matter, the raw body."""

    status: int
    body: bytes
    retry_after: float | None
    content_type: str
    #: The request URL with secrets removed: safe for logs and error messages.
    url: str

    def text(self, limit: int = 200) -> str:
        """The start of the body as text, for error messages."""
        return self.body[:limit].decode("utf-8", "replace").strip()


async def http_get(
    session: aiohttp.ClientSession,
    url: str,
    *,
    source: str,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    secrets: Iterable[str] = (),
) -> HttpReply:
    """GET ``url``; transport errors and timeouts raise ``ProviderError("unavailable")``."""
    secret_list = tuple(secrets)
    shown = redact(url if not params else f"{url}?{'&'.join(f'{k}={v}' for k, v in params.items())}",
                   secret_list)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.get(url, params=params, headers=headers, **kwargs) as resp:
            body = await resp.read()
            return HttpReply(
                status=resp.status,
                body=body,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                content_type=resp.headers.get("Content-Type", ""),
                url=shown,
            )
    except TimeoutError:
        raise ProviderError("unavailable", f"timeout on {shown}", source=source) from None
    except aiohttp.ClientPayloadError as exc:
        raise ProviderError(
            "bad_response", f"incomplete body from {shown}: {redact(exc, secret_list)}", source=source
        ) from None
    except aiohttp.ClientError as exc:
        raise ProviderError(
            "unavailable", f"{type(exc).__name__} on {shown}: {redact(exc, secret_list)}",
            source=source,
        ) from None
