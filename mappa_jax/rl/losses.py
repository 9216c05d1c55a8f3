"""Policy losses and loss aggregations, registered by name.

A policy loss maps per-token (logp, old_logp, advantages, mask) to per-token losses and a
per-token "clipped" indicator. An aggregation turns per-token values into a scalar using counts
taken over the whole optimizer step (`step_counts`), so splitting a step into micro-batches and
summing their losses gives exactly the full-batch loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mappa_jax.rl.registry import Registry

POLICY_LOSSES = Registry("rl.policy_loss")
LOSS_AGGREGATIONS = Registry("rl.loss_agg")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(logp, old_logp, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=0.2):
    """PPO clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)."""
    ratio = jnp.exp(jnp.where(mask, logp - old_logp, 0.0))
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    return jnp.where(mask, loss, 0.0), (clipped < unclipped) & mask


@POLICY_LOSSES.register("vanilla_pg")
def vanilla_pg_loss(logp, old_logp, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=0.2):
    """Unclipped importance-weighted policy gradient, -ratio * A (for comparison)."""
    del clip_eps_low, clip_eps_high
    ratio = jnp.exp(jnp.where(mask, logp - old_logp, 0.0))
    return jnp.where(mask, -ratio * advantages, 0.0), jnp.zeros(mask.shape, bool)


def step_counts(mask: jax.Array) -> dict[str, jax.Array]:
    """Denominators of the aggregations: valid tokens and sequences with any valid token."""
    return {"tokens": jnp.sum(mask).astype(jnp.float32),
            "sequences": jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)}


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(values, mask, counts):
    """Mean over every valid token of the step (OpenRLHF's token-level loss)."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(counts["tokens"], 1.0)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(values, mask, counts):
    """Sum over each sequence's tokens, mean over sequences."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(counts["sequences"], 1.0)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(values, mask, counts):
    """Mean over each sequence's tokens, then mean over sequences."""
    per_seq = jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)
    return jnp.sum(per_seq) / jnp.maximum(counts["sequences"], 1.0)


@functools.partial(jax.jit, static_argnames=("name",))
def aggregate(name: str, values, mask, counts=None):
    return LOSS_AGGREGATIONS.get(name)(values, mask, step_counts(mask) if counts is None else counts)


def masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the categorical distribution at every position. logits: [..., V] -> [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
