"""The Policy interface over mappa_jax.sampling.Sampler, plus a router over several policies.

The sampler's generate is a blocking jitted call; it runs on one worker thread so the event loop
(coach requests, code runs of other work) keeps going while the device samples.

With the sampler's reuse_context, each call keeps its rows' KV cache and the policy's next call
starts from it: an agent's next turn (the Code Executor's after its code ran) extends its last
turn's rows exactly (runner: prompt + generated ids + tool output), so only the tool output is
prefilled. One cache is held at a time, the last call's; new weights drop it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from typing import Any, Mapping, Sequence

from mappa_jax.workflows.policy import Generation, Policy, StopPattern


@dataclasses.dataclass
class PolicyWeights:
    """What one policy samples with: the decoder's params (nnx.State) and optional LoRA adapters
    (agents sharing a frozen base carry their own adapters)."""
    params: Any
    lora: Any = None


def group_duplicates(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], int, list[int]]:
    """(distinct prompts, n, row of each prompt) when every distinct prompt occurs exactly n times
    (samples of one task at an agent's first turn), so the sampler prefills each once; otherwise
    (all prompts, 1, identity)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(index)
    sizes = {len(members) for members in groups.values()}
    if len(sizes) != 1 or sizes == {1}:
        return [list(p) for p in prompts], 1, list(range(len(prompts)))
    n = sizes.pop()
    rows = [0] * len(prompts)
    for g, members in enumerate(groups.values()):
        for k, index in enumerate(members):
            rows[index] = g * n + k
    return [list(p) for p in groups], n, rows


class SamplerPolicy:
    """Policy.generate served by a Sampler; one set of weights per policy name.

    top_p / top_k apply to every call (the released scripts sample with top_p 1.0). Logprobs are
    the sampler's log softmax(logits / temperature) of each token at the call's temperature,
    before top-k / top-p truncation: what the trainer recomputes for the action's temperature.
    """

    def __init__(self, sampler: Any, tokenizer: Any, weights: Mapping[str, PolicyWeights], *,
                 top_p: float = 1.0, top_k: int = 0, reuse_context: bool | None = None):
        """reuse_context: None = as the sampler's config says (`Sampler.reuses_context`)."""
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.weights = dict(weights)
        self.top_p = top_p
        self.top_k = top_k
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sampler")
        self.last_call_rows = 0  # rows the last call sampled (after merging duplicate prompts)
        self.prefilled_tokens = 0  # prompt tokens the sampler ran through the model, over all calls
        self.prompt_tokens = 0  # prompt tokens asked for (the distinct prompts), over all calls
        self.reuse_context = (bool(getattr(sampler, "reuses_context", False)) if reuse_context is None
                              else reuse_context)
        self._kept: tuple[str, Any] | None = None  # (policy name, the last call's KeptContext)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the sampler takes (its largest prompt bucket)."""
        return int(self.sampler.config.prompt_buckets[-1])

    def set_weights(self, policy_name: str, params: Any, lora: Any = None) -> None:
        """New weights for a policy (after an update step); a cache kept under its old ones goes."""
        self.weights[policy_name] = PolicyWeights(params, lora)
        if self._kept is not None and self._kept[0] == policy_name:
            self._release_kept()

    def _release_kept(self) -> None:
        if self._kept is not None:
            self._kept[1].release()
            self._kept = None

    def _take_context(self, policy_name: str):
        """The cache the last call kept, if it was this policy's (any other is freed)."""
        if self._kept is None or self._kept[0] != policy_name:
            self._release_kept()
            return None
        context, self._kept = self._kept[1], None
        return context

    async def generate(self, policy_name: str, prompts: list[list[int]], max_new_tokens: int,
                       stop_strings: Sequence[StopPattern], temperature: float,
                       seed: int) -> list[Generation]:
        if policy_name not in self.weights:
            raise KeyError(f"SamplerPolicy has no weights for policy {policy_name!r} "
                           f"(known: {sorted(self.weights)})")
        if not prompts:
            return []
        weights = self.weights[policy_name]
        distinct, n, rows = group_duplicates(prompts)
        reuse = {}
        if self.reuse_context:
            reuse = dict(keep_context=True, context=self._take_context(policy_name))
        call = functools.partial(
            self.sampler.generate, weights.params, distinct, n=n, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            stop_strings=list(stop_strings), seed=seed, lora=weights.lora, **reuse)
        out = await asyncio.get_running_loop().run_in_executor(self._worker, call)
        self.last_call_rows = len(distinct) * n
        self.prompt_tokens += sum(len(p) for p in distinct)
        self.prefilled_tokens += getattr(out, "prefilled_tokens", sum(len(p) for p in distinct))
        if self.reuse_context and getattr(out, "context", None) is not None:
            self._release_kept()  # a concurrent call's, if any: one cache at a time
            self._kept = (policy_name, out.context)
        generations = []
        for row in rows:
            length = int(out.lengths[row])
            ids = out.tokens[row, :length].tolist()
            generations.append(Generation(
                token_ids=tuple(ids), logprobs=tuple(out.logprobs[row, :length].tolist()),
                truncated=bool(out.truncated[row]),
                text=self.tokenizer.decode(ids, skip_special_tokens=True)))
        return generations

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._release_kept()


class PolicyRouter:
    """One Policy over several: each policy name goes to the backend that serves it (e.g. trained
    agents on the sampler and a frozen agent on another backend)."""

    def __init__(self, routes: Mapping[str, Policy]):
        self.routes = dict(routes)

    @property
    def max_prompt_tokens(self) -> int | None:
        limits = [getattr(p, "max_prompt_tokens", None) for p in self.routes.values()]
        limits = [n for n in limits if n]
        return min(limits) if limits else None

    async def generate(self, policy_name: str, prompts: list[list[int]], max_new_tokens: int,
                       stop_strings: Sequence[StopPattern], temperature: float,
                       seed: int) -> list[Generation]:
        if policy_name not in self.routes:
            raise KeyError(f"PolicyRouter has no route for policy {policy_name!r} "
                           f"(routes: {sorted(self.routes)})")
        return await self.routes[policy_name].generate(policy_name, prompts, max_new_tokens,
                                                       stop_strings, temperature, seed)
