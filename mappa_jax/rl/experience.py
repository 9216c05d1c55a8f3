"""Experience: one agent's actions as padded arrays, and the builder that makes them.

A row is one action: the exact prompt ids the agent saw followed by the exact ids it generated,
padded to a length bucket; rows are padded to a batch bucket with invalid rows (never dropped).
Per-token arrays are [B, T] aligned with `tokens`: entry t belongs to token t (its logprob is
log p(tokens[t] | tokens[:t])). `action_mask` marks generated tokens; `valid` zeroes whole rows
(truncated generations, actions whose reward is missing because the coach failed, batch padding).
`temperatures` is each row's sampling temperature: logprobs (sampler, trainer and reference alike)
are of softmax(logits / temperature), so rows of agents at different temperatures share one batch.

Layouts (`padding_side`): "right" / "left" pad whole rows to a length bucket; "split" left-pads
prompts to a prompt bucket P and right-pads generations to a generation bucket G, so every action
token lies in the window [P, P + G) and the trainer computes logits only there
(`Experience.logprob_start` = P, a static field: one compiled program per (P, G) bucket pair).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Experience:
    tokens: jax.Array            # [B, T] int32
    attention_mask: jax.Array    # [B, T] bool, real tokens (prompt + generation)
    action_mask: jax.Array       # [B, T] bool, generated tokens
    valid: jax.Array             # [B] bool, rows that train
    sampler_logprobs: jax.Array  # [B, T] float32, from the sampler (0 outside action_mask)
    old_logprobs: jax.Array      # [B, T] float32, behaviour policy for the PPO ratio and KL
    ref_logprobs: jax.Array      # [B, T] float32, frozen reference policy
    rewards: jax.Array           # [B] float32, the action's reward (0 where missing)
    group_ids: jax.Array         # [B] int32, prompt group (for group-scoped normalization)
    temperatures: jax.Array      # [B] float32 > 0, the temperature the row was sampled at (1 on padding)
    advantages: jax.Array        # [B, T] float32, filled by the advantage computation
    # Static: no action token lies before this index, so logprobs are computed for t >= it only
    # (1 = every position that has a prefix; the prompt bucket P in the "split" layout).
    logprob_start: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def loss_mask(self) -> jax.Array:
        """Tokens that enter the loss: generated tokens of valid rows."""
        return self.action_mask & self.valid[..., None]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def replace(self, **changes) -> "Experience":
        return dataclasses.replace(self, **changes)


PADDING_SIDES = ("right", "left", "split")


class Sample(NamedTuple):
    """One action as the workflow records it. reward None = no usable judgement (masked out).
    temperature: what it was sampled at; sampler_logprobs are of softmax(logits / temperature)."""
    prompt_ids: Sequence[int]
    generated_ids: Sequence[int]
    sampler_logprobs: Sequence[float]
    reward: float | None
    truncated: bool
    group_id: int = 0
    temperature: float = 1.0


def snap_to_bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= size."""
    fitting = [b for b in sorted(buckets) if b >= size]
    if not fitting:
        raise ValueError(f"{what}: {size} exceeds the largest bucket {max(buckets)} of {sorted(buckets)}")
    return fitting[0]


def batch_bucket(count: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """Rows for `count` samples: the smallest bucket that holds them (beyond the largest, whole
    multiples of it), rounded up to `multiple` (e.g. the train batch size x data shards)."""
    buckets = sorted(buckets)
    fitting = [b for b in buckets if b >= count]
    rows = fitting[0] if fitting else -(-count // buckets[-1]) * buckets[-1]
    return -(-max(rows, 1) // multiple) * multiple


def build_experience(samples: Sequence[Sample | tuple], *, batch_buckets: Sequence[int],
                     length_buckets: Sequence[int] | None = None, batch_multiple: int = 1, pad_id: int = 0,
                     padding_side: str = "right", prompt_buckets: Sequence[int] | None = None,
                     generation_buckets: Sequence[int] | None = None) -> Experience:
    """Pad a list of actions (Sample or (prompt_ids, generated_ids, sampler_logprobs, reward|None,
    truncated[, group_id[, temperature]]) tuples) into an Experience of bucketed shape. "right"/"left" padding
    snap prompt + generation to `length_buckets`; "split" snaps prompts to `prompt_buckets` and
    generations to `generation_buckets` (e.g. the sampler's own buckets). Arrays are NumPy; put
    them on the mesh with `jax.device_put` (see `rl.update.PolicyUpdater.place`)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is not one of {PADDING_SIDES}")
    if not batch_buckets:
        raise ValueError("build_experience needs non-empty batch_buckets")
    if padding_side == "split" and (not prompt_buckets or not generation_buckets):
        raise ValueError("padding_side='split' needs non-empty prompt_buckets and generation_buckets")
    if padding_side != "split" and not length_buckets:
        raise ValueError(f"padding_side={padding_side!r} needs non-empty length_buckets")
    samples = [s if isinstance(s, Sample) else Sample(*s) for s in samples]
    for i, s in enumerate(samples):
        if len(s.prompt_ids) == 0:
            raise ValueError(f"sample {i}: empty prompt_ids (the first generated token needs a prefix)")
        if len(s.sampler_logprobs) != len(s.generated_ids):
            raise ValueError(f"sample {i}: {len(s.generated_ids)} generated ids but "
                             f"{len(s.sampler_logprobs)} sampler_logprobs")
        if not s.temperature > 0:
            raise ValueError(f"sample {i}: temperature {s.temperature} (greedy decoding) has no behaviour "
                             "distribution to train on; sample trained agents at a temperature > 0")
    if padding_side == "split":
        prompt_len = snap_to_bucket(max((len(s.prompt_ids) for s in samples), default=1), prompt_buckets,
                                    "prompt length (prompt_buckets)")
        gen_len = snap_to_bucket(max((len(s.generated_ids) for s in samples), default=1), generation_buckets,
                                 "generation length (generation_buckets)")
        t, logprob_start = prompt_len + gen_len, prompt_len
    else:
        longest = max((len(s.prompt_ids) + len(s.generated_ids) for s in samples), default=1)
        t, logprob_start = snap_to_bucket(longest, length_buckets, "sequence length (prompt + generation)"), 1
    b = batch_bucket(len(samples), batch_buckets, batch_multiple)

    tokens = np.full((b, t), pad_id, np.int32)
    attention = np.zeros((b, t), bool)
    action = np.zeros((b, t), bool)
    valid = np.zeros((b,), bool)
    logprobs = np.zeros((b, t), np.float32)
    rewards = np.zeros((b,), np.float32)
    groups = np.zeros((b,), np.int32)
    temperatures = np.ones((b,), np.float32)
    for row, s in enumerate(samples):
        p, g = len(s.prompt_ids), len(s.generated_ids)
        start = {"right": 0, "left": t - p - g, "split": logprob_start - p}[padding_side]
        tokens[row, start:start + p] = s.prompt_ids
        tokens[row, start + p:start + p + g] = s.generated_ids
        attention[row, start:start + p + g] = True
        action[row, start + p:start + p + g] = True
        logprobs[row, start + p:start + p + g] = s.sampler_logprobs
        valid[row] = s.reward is not None and not s.truncated and g > 0
        rewards[row] = 0.0 if s.reward is None else float(s.reward)
        groups[row] = s.group_id
        temperatures[row] = s.temperature
    return Experience(tokens=tokens, attention_mask=attention, action_mask=action, valid=valid,
                      sampler_logprobs=logprobs, old_logprobs=logprobs.copy(),
                      ref_logprobs=np.zeros((b, t), np.float32), rewards=rewards, group_ids=groups,
                      temperatures=temperatures,
                      advantages=np.zeros((b, t), np.float32), logprob_start=logprob_start)


def sample_counts(samples: Sequence[Sample | tuple]) -> dict[str, int]:
    """How many actions train, and why the others are masked (for metrics)."""
    samples = [s if isinstance(s, Sample) else Sample(*s) for s in samples]
    return {"actions": len(samples),
            "trained": sum(s.reward is not None and not s.truncated and len(s.generated_ids) > 0 for s in samples),
            "truncated": sum(bool(s.truncated) for s in samples),
            "reward_missing": sum(s.reward is None for s in samples)}
