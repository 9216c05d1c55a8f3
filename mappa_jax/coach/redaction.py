"""Keep API keys out of logs, errors, verdicts and caches.

Backends register the secrets they load; every error text the coach stores or raises passes through
`redact`. Known key shapes are masked too, in case a server echoes a key we never loaded.
"""
from __future__ import annotations

import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()

_PATTERNS = (
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),                       # Google API keys
    re.compile(r"\bsk-[0-9A-Za-z_\-]{16,}"),                       # OpenAI-style keys
    re.compile(r"(?i)(bearer\s+)[0-9A-Za-z._\-]{8,}"),             # Authorization headers
    re.compile(r"(?i)((?:api[_-]?key|key|x-goog-api-key)[\"']?\s*[=:]\s*[\"']?)[^\s&\"',}]{8,}"),
)
REDACTED = "[REDACTED]"


def register_secret(value: str | None) -> None:
    """Remember a secret so that `redact` removes it (short values are ignored: too collision-prone)."""
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: object) -> str:
    out = str(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        out = out.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        out = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, out)
    return out
