"""The interface the episode runner samples through, and a scripted policy for tests.

The runner makes one `generate` call per agent turn holding the prompts of ALL live episodes, so a
real sampler batches them into one jitted call. Several agents may share a policy (same weights).
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence, Union, runtime_checkable

# A stop string, or strings that must appear in that order, or either counted only outside
# reasoning blocks (OutsideReasoning), as mappa_jax.sampling matches them.
from mappa_jax.sampling.stops import StopPattern, match_end


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sampled completion.

    token_ids: the generated ids exactly as sampled (including a final end-of-turn token when the
    model emitted one). logprobs: the sampler's log-probability of each of those ids. truncated:
    generation hit max_new_tokens without an end-of-turn token or stop string (masked out of RL).
    text: the decoded completion (special tokens removed), for tools, downstream agents and coach.
    """
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    truncated: bool
    text: str

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Generation has {len(self.token_ids)} token_ids but "
                             f"{len(self.logprobs)} logprobs")


@runtime_checkable
class Policy(Protocol):
    """What the runner calls: one batched generation for a policy's prompts."""

    async def generate(self, policy_name: str, prompts: list[list[int]], max_new_tokens: int,
                       stop_strings: Sequence[StopPattern], temperature: float,
                       seed: int) -> list[Generation]:
        ...


# A scripted completion: fixed text, or a function of the prompt's text (to vary per episode).
Completion = Union[str, Callable[[str], str]]


@dataclasses.dataclass(frozen=True)
class PolicyCall:
    """One generate call as the scripted policy received it."""
    policy_name: str
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    stop_strings: tuple
    temperature: float
    seed: int


class ScriptedPolicy:
    """Serves canned completions through the Policy interface, tokenized with the real tokenizer.

    script maps policy name -> one completion per call to that policy, in call order (with one
    agent per policy, call k is the agent's turn k). A completion is text or a function of the
    prompt text. Each completion is cut where its first stop pattern ends (no end-of-turn
    token then), otherwise the tokenizer's EOS id is appended; more than max_new_tokens ids are cut
    and flagged truncated. Logprobs are 0: a script puts probability 1 on its tokens. Every call is
    recorded in `calls` with exactly the prompt ids received.
    """

    def __init__(self, tokenizer: Any, script: Mapping[str, Sequence[Completion]],
                 latency_s: float = 0.0):
        self.tokenizer = tokenizer
        self.script = {name: list(turns) for name, turns in script.items()}
        self.latency_s = latency_s
        self.calls: list[PolicyCall] = []
        eos = tokenizer.eos_token_id
        self.eos_id = eos if isinstance(eos, int) else eos[0]

    async def generate(self, policy_name: str, prompts: list[list[int]], max_new_tokens: int,
                       stop_strings: Sequence[StopPattern], temperature: float,
                       seed: int) -> list[Generation]:
        if policy_name not in self.script:
            raise KeyError(f"ScriptedPolicy has no script for policy {policy_name!r} "
                           f"(scripted: {sorted(self.script)})")
        call_index = sum(1 for c in self.calls if c.policy_name == policy_name)
        turns = self.script[policy_name]
        if call_index >= len(turns):
            raise IndexError(f"ScriptedPolicy: policy {policy_name!r} called {call_index + 1} times "
                             f"but scripted for {len(turns)}")
        self.calls.append(PolicyCall(policy_name, tuple(tuple(p) for p in prompts), max_new_tokens,
                                     tuple(stop_strings), temperature, seed))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        completion = turns[call_index]
        out = []
        for prompt in prompts:
            text = completion(self.tokenizer.decode(prompt)) if callable(completion) else completion
            out.append(self._tokenize(text, max_new_tokens, stop_strings))
        return out

    def _tokenize(self, text: str, max_new_tokens: int, stop_strings: Sequence[StopPattern]) -> Generation:
        ends = [end for end in (match_end(text, p) for p in stop_strings) if end is not None]
        stopped = bool(ends)
        if stopped:
            text = text[:min(ends)]
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not stopped:
            ids.append(self.eos_id)
        truncated = len(ids) > max_new_tokens
        ids = ids[:max_new_tokens]
        decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(tuple(ids), (0.0,) * len(ids), truncated, decoded)
