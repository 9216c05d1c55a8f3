"""Data types of the coach: what is scored (CoachRequest), what comes back (Verdict), errors."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mappa_jax.coach.redaction import redact

PIPELINES = ("mathchat", "datascience")


@dataclasses.dataclass(frozen=True)
class CoachRequest:
    """One agent action to be judged. Everything except the ids goes into the prompt (and cache key).

    `tool_output` is passed raw; the prompt builder truncates it to `tool_output_chars` from config.
    `ground_truth` is set by the caller only for roles named in `ground_truth_roles`.
    """
    pipeline: str
    task: str
    role: str
    role_instructions: str
    agent_input: str
    agent_output: str
    tool_output: str = ""
    files_present: tuple[str, ...] = ()
    files_created: tuple[str, ...] = ()
    harness_metrics: Mapping[str, Any] | None = None
    ground_truth: str | None = None
    # Bookkeeping ids: never part of the prompt or cache key, so identical actions share a verdict.
    episode_id: str = ""
    agent: str = ""
    turn: int = 0

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise ValueError(f"CoachRequest.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        for name in ("task", "role", "agent_output"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"CoachRequest.{name} must be str, got {type(getattr(self, name)).__name__}")
        # Tuples keep the dataclass hashable and the prompt deterministic.
        object.__setattr__(self, "files_present", tuple(self.files_present))
        object.__setattr__(self, "files_created", tuple(self.files_created))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The coach's judgement of one action.

    status "ok": score in [0, 10] and reward = score / 10.
    status "fallback": no judgement could be obtained; score and reward are None and the action must
    be masked out of the loss. `fallback_reason` is a short category (see FALLBACK_REASONS) and
    `reasoning` carries the (redacted) detail of the last error.
    """
    score: float | None
    reward: float | None
    reasoning: str
    correct: bool | None = None
    status: str = "ok"
    fallback_reason: str | None = None
    latency_s: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Verdict.from_dict: unknown fields {sorted(unknown)}")
        return cls(**data)


# Why a verdict is a fallback; the ledger counts each.
FALLBACK_REASONS = (
    "rate_limited",     # 429 after all retries
    "server_error",     # 5xx after all retries
    "timeout",          # call exceeded timeout_s after all retries
    "connection",       # dropped/refused connection after all retries
    "client_error",     # non-retryable 4xx (bad request, auth)
    "malformed_json",   # structured output was not valid JSON of the schema, also after repair
    "no_score",         # text output without a PROCESS_SCORE line, also after repair
    "out_of_range",     # score outside 0..10, also after repair
    "backend_error",    # anything else the backend raised
)


class CoachError(Exception):
    """Base class of coach errors."""


class CoachConfigError(CoachError, ValueError):
    """Invalid coach configuration; the message names the key."""


class CoachCredentialsError(CoachError):
    """A required credential is missing; raised before any rollout starts."""


class BackendError(CoachError):
    """A backend call failed. `reason` is one of FALLBACK_REASONS; `retryable` drives the retry loop."""

    def __init__(self, reason: str, message: str, *, retryable: bool, retry_after_s: float | None = None):
        super().__init__(redact(message))  # server error bodies may echo the credential
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class ParseError(CoachError):
    """The coach answered but the answer is not a valid verdict. `reason` in FALLBACK_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(redact(message))
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RawResult:
    """What a backend returns: the answer text (JSON when structured) and token usage."""
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    structured: bool = False  # True when the backend enforced the JSON schema
