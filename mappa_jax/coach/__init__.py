"""The coach: per-action process rewards from an LLM judge (or a rule-based reference).

    client = make_coach(config.coach)            # validates; names bad keys
    client.check_credentials()                   # before rollouts: fails fast on a missing key
    future = client.submit(CoachRequest(...))    # non-blocking, inside the episode runner's loop
    verdicts = await client.score_all(requests)  # or all at once
A Verdict with status "fallback" has no score and must be masked out of the loss.
"""
from mappa_jax.coach.backends import (GeminiBackend, LocalGenerator, LocalJudgeBackend,
                                      OpenAICompatBackend, RuleBasedBackend)
from mappa_jax.coach.cache import VerdictCache, cache_key
from mappa_jax.coach.client import CoachClient, RetryPolicy
from mappa_jax.coach.config import coach_config, make_coach, validate, wants_ground_truth
from mappa_jax.coach.prompts import SCORE_SCHEMA, Prompt, build_prompt
from mappa_jax.coach.sampler_judge import SamplerJudge
from mappa_jax.coach.types import (FALLBACK_REASONS, CoachConfigError, CoachCredentialsError,
                                   CoachError, CoachRequest, Verdict)

__all__ = [
    "CoachClient", "CoachConfigError", "CoachCredentialsError", "CoachError", "CoachRequest",
    "FALLBACK_REASONS", "GeminiBackend", "LocalGenerator", "LocalJudgeBackend",
    "OpenAICompatBackend", "Prompt", "RetryPolicy", "RuleBasedBackend", "SCORE_SCHEMA", "SamplerJudge",
    "Verdict", "VerdictCache", "build_prompt", "cache_key", "coach_config", "make_coach",
    "validate", "wants_ground_truth",
]
