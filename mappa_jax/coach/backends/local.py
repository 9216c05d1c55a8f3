"""A coach that runs one of our own models: any object with `async generate(prompt_text) -> text`.

`mappa_jax.coach.sampler_judge.SamplerJudge` is the real one (our decoder through our sampler).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from mappa_jax.coach.prompts import Prompt
from mappa_jax.coach.types import RawResult


@runtime_checkable
class LocalGenerator(Protocol):
    """What the local judge needs from a sampler. Greedy (temperature 0) decoding is expected.

    A generator may also define `async generate_messages(messages: list[dict]) -> str` taking
    OpenAI-style {"role", "content"} messages, so it can apply the model's own chat template; the
    backend then prefers it over the flat text prompt. A returned str may carry `tokens_in` and
    `tokens_out` attributes (SamplerJudge's JudgeText does); the ledger counts them.
    """

    async def generate(self, prompt_text: str) -> str: ...


class LocalJudgeBackend:
    """Text-mode judge: the answer must end in a `PROCESS_SCORE: <n>` line (parsed strictly)."""
    name = "local"
    output_format = "text"

    def __init__(self, generator: LocalGenerator, *, model: str):
        if not isinstance(generator, LocalGenerator):
            raise TypeError(f"local coach backend needs a LocalGenerator (async generate(prompt_text) -> "
                            f"str), got {type(generator).__name__}")
        self.generator = generator
        self.model = model

    def check_credentials(self) -> None:
        """Our own weights: nothing to check."""

    def prepare(self) -> None:
        pass

    async def score(self, prompt: Prompt, schema: dict[str, Any]) -> RawResult:
        del schema  # a local sampler has no constrained decoding; the prompt asks for PROCESS_SCORE
        by_messages = getattr(self.generator, "generate_messages", None)
        if by_messages is not None:
            messages = [{"role": "system", "content": prompt.system}]
            messages += [{"role": role, "content": text} for role, text in prompt.turns]
            text = await by_messages(messages)
        else:
            text = await self.generator.generate(prompt.flat_text())
        if not isinstance(text, str):
            raise TypeError(f"LocalGenerator returned {type(text).__name__}, expected str")
        return RawResult(text=str(text), tokens_in=int(getattr(text, "tokens_in", 0)),
                         tokens_out=int(getattr(text, "tokens_out", 0)), structured=False)

    async def aclose(self) -> None:
        pass
