"""Coach backends: each turns a Prompt into a RawResult with one async call."""
from mappa_jax.coach.backends.base import Backend
from mappa_jax.coach.backends.gemini import GeminiBackend
from mappa_jax.coach.backends.local import LocalGenerator, LocalJudgeBackend
from mappa_jax.coach.backends.openai_compat import OpenAICompatBackend
from mappa_jax.coach.backends.rule_based import RuleBasedBackend

__all__ = ["Backend", "GeminiBackend", "LocalGenerator", "LocalJudgeBackend",
           "OpenAICompatBackend", "RuleBasedBackend"]
