"""REINFORCE++ for several agents with separate weights: pure math, experience, sharded update.

Read top to bottom: kl.py (KL estimators) -> advantages.py (token rewards, returns,
normalization) -> losses.py (PPO-clip, aggregations) -> experience.py (padded batches) ->
update.py (the compiled per-agent update) -> pipeline.py (one training step for all agents).
Bytes per device: mappa_jax/parallel/memory_check.py.
"""
from mappa_jax.rl.advantages import (ADVANTAGE_SCOPES, discounted_returns, normalize_advantages,
                                     segment_normalize, token_rewards)
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Experience, Sample, build_experience, sample_counts
from mappa_jax.rl.kl import KL_ESTIMATORS, token_kl
from mappa_jax.rl.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate, step_counts, token_entropy
from mappa_jax.rl.optim import learning_rate_schedule, make_optimizer
from mappa_jax.rl.pipeline import prepare_experiences, reinforce_returns, train_step
from mappa_jax.rl.update import AgentPolicy, PolicyUpdater, TrainState

__all__ = [
    "ADVANTAGE_SCOPES", "AgentPolicy", "Experience", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
    "PolicyUpdater", "RLConfig", "Sample", "TrainState", "aggregate", "build_experience", "discounted_returns",
    "learning_rate_schedule", "make_optimizer", "normalize_advantages", "prepare_experiences",
    "reinforce_returns", "sample_counts", "segment_normalize", "step_counts", "token_entropy", "token_kl",
    "token_rewards", "train_step",
]
