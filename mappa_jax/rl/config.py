"""RL hyper-parameters; defaults are MAPPA's released REINFORCE++ settings."""
from __future__ import annotations

import dataclasses
from typing import Any

from mappa_jax.rl.advantages import ADVANTAGE_SCOPES
from mappa_jax.rl.kl import KL_ESTIMATORS
from mappa_jax.rl.losses import LOSS_AGGREGATIONS, POLICY_LOSSES


# Settings that were removed, and what replaced them (a config still setting one gets this reason).
REMOVED_KEYS = {
    "temperature": "logprobs are taken at the temperature each action was sampled at; set it per agent "
                   "with topology.agents.<name>.temperature",
}


@dataclasses.dataclass(frozen=True)
class RLConfig:
    # KL to the frozen reference: estimator, coefficient (beta), and where it enters:
    # "reward" (-beta * kl added to token rewards, MAPPA/OpenRLHF default) or "loss" (beta * kl term).
    kl_estimator: str = "k1"
    kl_coef: float = 0.01
    kl_mode: str = "reward"
    reward_clip: tuple[float, float] | None = (-10.0, 10.0)
    gamma: float = 1.0
    # Advantage normalization: "global" | "agent" | "group" | "none"; divide by std or only center.
    advantage_scope: str = "agent"
    advantage_std: bool = True
    policy_loss: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg: str = "token_mean"
    # Sequences per optimizer step, and per micro-batch (gradients accumulate across micro-batches).
    train_batch_size: int = 16
    micro_batch_size: int = 4
    # AdamW with global-norm clipping, linear warm-up and cosine decay to min_lr_ratio * lr;
    # the horizon is counted in optimizer steps.
    learning_rate: float = 1e-6
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    total_optimizer_steps: int = 1000
    # "trainer": recompute old logprobs with the training model (as OpenRLHF does);
    # "sampler": use the sampler's logprobs. The gap between the two is reported either way.
    # Every logprob (sampler, trainer, reference) is of softmax(logits / T) at the temperature T
    # the action was sampled at (its agent's topology temperature, carried per row as
    # Experience.temperatures), before top-k / top-p truncation: with sampler.top_p < 1 or
    # top_k > 0 the behaviour logprob is the tempered full policy's, not the truncated one's.
    old_logprobs: str = "trainer"
    compute_entropy: bool = True  # entropy of the tempered policy, logged

    def __post_init__(self):
        choices = {"kl_estimator": KL_ESTIMATORS.names(), "kl_mode": ("reward", "loss"),
                   "advantage_scope": ADVANTAGE_SCOPES, "policy_loss": POLICY_LOSSES.names(),
                   "loss_agg": LOSS_AGGREGATIONS.names(), "old_logprobs": ("trainer", "sampler")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"rl.{key}={getattr(self, key)!r} is not one of {tuple(allowed)}")
        for key in ("train_batch_size", "micro_batch_size", "total_optimizer_steps"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"rl.{key} must be positive, got {getattr(self, key)}")
        if self.train_batch_size % self.micro_batch_size:
            raise ValueError(f"rl.train_batch_size={self.train_batch_size} is not a multiple of "
                             f"rl.micro_batch_size={self.micro_batch_size}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"rl.gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"rl.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.reward_clip is not None and self.reward_clip[0] > self.reward_clip[1]:
            raise ValueError(f"rl.reward_clip={self.reward_clip} has low > high")

    @property
    def micro_batches_per_step(self) -> int:
        return self.train_batch_size // self.micro_batch_size

    def replace(self, **changes) -> "RLConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RLConfig":
        """From a plain dict (e.g. an ml_collections ConfigDict's to_dict()); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in set(values) & set(REMOVED_KEYS):
            raise ValueError(f"rl.{key} is no longer a setting: {REMOVED_KEYS[key]}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"rl config has unknown keys {unknown}; known: {sorted(known)}")
        values = dict(values)
        if values.get("reward_clip") is not None:
            values["reward_clip"] = tuple(values["reward_clip"])
        return cls(**values)
