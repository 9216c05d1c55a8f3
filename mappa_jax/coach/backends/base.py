"""The backend protocol and the HTTP error classification shared by the HTTP backends."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import httpx

from mappa_jax.coach.prompts import Prompt
from mappa_jax.coach.types import BackendError, RawResult


@runtime_checkable
class Backend(Protocol):
    """One coach model behind one async call. Retries, timeouts and caching live in CoachClient."""
    name: str           # backend kind, part of the cache key
    model: str          # model id, part of the cache key and of the price lookup
    output_format: str  # "json" (schema-enforced) or "text" (PROCESS_SCORE line)

    def prepare(self) -> None:
        """One-time setup (imports, SDK clients) kept out of the first call's timeout."""

    async def score(self, prompt: Prompt, schema: dict[str, Any]) -> RawResult: ...

    def check_credentials(self) -> None: ...

    async def aclose(self) -> None: ...


def _retry_after_seconds(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):  # an HTTP date: ignore, our backoff applies
        return None


def error_from_status(status: int, detail: str, headers: Any = None) -> BackendError:
    """429 and 5xx and 408 are worth retrying; other 4xx (bad request, bad key) are not."""
    if status == 429:
        return BackendError("rate_limited", f"HTTP 429: {detail}", retryable=True,
                            retry_after_s=_retry_after_seconds(headers))
    if status == 408:
        return BackendError("timeout", f"HTTP 408: {detail}", retryable=True)
    if status >= 500:
        return BackendError("server_error", f"HTTP {status}: {detail}", retryable=True,
                            retry_after_s=_retry_after_seconds(headers))
    return BackendError("client_error", f"HTTP {status}: {detail}", retryable=False)


def _transport_error_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    timeouts: list[type] = [httpx.TimeoutException]
    transports: list[type] = [httpx.TransportError]
    try:  # google-genai uses httpx2 (a fork with its own classes) when it is installed
        import httpx2  # pylint: disable=import-outside-toplevel
        timeouts.append(httpx2.TimeoutException)
        transports.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(timeouts), tuple(transports)


_TIMEOUT_ERRORS, _TRANSPORT_ERRORS = _transport_error_types()


def error_from_transport(exc: BaseException) -> BackendError | None:
    """Timeouts and dropped/refused connections are retryable; None if `exc` is neither."""
    if isinstance(exc, _TIMEOUT_ERRORS):
        return BackendError("timeout", f"{type(exc).__name__}: {exc}", retryable=True)
    if isinstance(exc, _TRANSPORT_ERRORS) or isinstance(exc, (ConnectionError, EOFError)):
        return BackendError("connection", f"{type(exc).__name__}: {exc}", retryable=True)
    return None
