"""REINFORCE++ credit assignment: token rewards, discounted returns, advantage normalization.

All arrays are [B, T] aligned with the token sequence (entry t scores token t); `mask` marks the
generated tokens of valid samples. Everything is a pure jnp function with masks, jit-able.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


ADVANTAGE_SCOPES = ("global", "agent", "group", "none")


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last True entry (T-1 for an empty row). mask: [B, T] -> [B] int32."""
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(jnp.flip(mask, axis=-1), axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("kl_coef", "reward_clip"))
def token_rewards(rewards: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float,
                  reward_clip: tuple[float, float] | None = (-10.0, 10.0)) -> jax.Array:
    """r_t = -kl_coef * kl_t on every token, plus the (clipped) action reward on its last masked token."""
    if reward_clip is not None:
        rewards = jnp.clip(rewards, reward_clip[0], reward_clip[1])
    last = last_token_index(mask)
    at_last = (jnp.arange(mask.shape[-1])[None, :] == last[:, None]) & jnp.any(mask, axis=-1, keepdims=True)
    kl_coef = max(float(kl_coef), 0.0)
    return jnp.where(at_last, rewards[:, None].astype(kl.dtype), 0.0) - kl_coef * kl


@functools.partial(jax.jit, static_argnames=("gamma",))
def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    """G_t = sum_{i >= t} gamma^(i-t) * r_i * mask_i (a masked reverse cumulative sum)."""
    rewards = jnp.where(mask, rewards, 0.0)
    if gamma == 1.0:
        return jnp.flip(jnp.cumsum(jnp.flip(rewards, -1), axis=-1), -1)
    decay = jnp.full_like(rewards, gamma)

    # Affine maps G -> r + d * G compose associatively, so the recurrence runs in log depth.
    def compose(later, earlier):
        d_later, g_later = later
        d_earlier, r_earlier = earlier
        return d_earlier * d_later, r_earlier + d_earlier * g_later

    _, returns = jax.lax.associative_scan(compose, (decay, rewards), reverse=True, axis=rewards.ndim - 1)
    return returns


@functools.partial(jax.jit, static_argnames=("num_segments", "divide_by_std", "eps"))
def segment_normalize(values: jax.Array, mask: jax.Array, segment_ids: jax.Array, num_segments: int,
                      divide_by_std: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries of each segment (population variance, std floored
    at sqrt(eps) as OpenRLHF does). values, mask, segment_ids: same shape. Zero outside `mask`."""
    w = mask.astype(values.dtype)
    flat_ids, flat_w, flat_x = segment_ids.reshape(-1), w.reshape(-1), values.reshape(-1)
    count = jax.ops.segment_sum(flat_w, flat_ids, num_segments)
    total = jax.ops.segment_sum(flat_x * flat_w, flat_ids, num_segments)
    mean = total / jnp.maximum(count, 1.0)
    centered = values - mean[segment_ids]
    if divide_by_std:
        sq = jax.ops.segment_sum(jnp.square(centered).reshape(-1) * flat_w, flat_ids, num_segments)
        var = sq / jnp.maximum(count, 1.0)
        centered = centered * jax.lax.rsqrt(jnp.maximum(var, eps))[segment_ids]
    return jnp.where(mask, centered, 0.0)


@functools.partial(jax.jit, static_argnames=("num_segments", "divide_by_std"))
def _pooled_normalize(values, masks, row_segments, num_segments, divide_by_std):
    """Normalize several [B_i, T_i] arrays together; row_segments[i]: [B_i] segment id per row."""
    flat = jnp.concatenate([v.reshape(-1) for v in values])
    flat_mask = jnp.concatenate([m.reshape(-1) for m in masks])
    flat_ids = jnp.concatenate([jnp.broadcast_to(g[:, None], v.shape).reshape(-1)
                                for g, v in zip(row_segments, values)])
    normed = segment_normalize(flat, flat_mask, flat_ids, num_segments, divide_by_std)
    out, offset = [], 0
    for v in values:
        out.append(normed[offset:offset + v.size].reshape(v.shape))
        offset += v.size
    return out


def normalize_advantages(returns: Sequence[jax.Array], masks: Sequence[jax.Array], scope: str = "agent",
                         divide_by_std: bool = True, group_ids: Sequence[jax.Array] | None = None) -> list[jax.Array]:
    """Normalize the returns of several agents' batches ([B_a, T_a] each) into advantages.

    scope: "global" pools every agent's valid tokens; "agent" (MAPPA's default) normalizes each
    agent over its whole batch; "group" normalizes each prompt group (group_ids [B_a]) of each agent
    separately, GRPO-style, over the group's tokens; "none" keeps the returns (masked).
    """
    if scope not in ADVANTAGE_SCOPES:
        raise ValueError(f"rl.advantage_scope={scope!r} is not one of {ADVANTAGE_SCOPES}")
    if len(returns) != len(masks):
        raise ValueError(f"normalize_advantages: {len(returns)} return arrays but {len(masks)} masks")
    if scope == "none":
        return [jnp.where(m, r, 0.0) for r, m in zip(returns, masks)]
    if scope == "global":
        segments = [jnp.zeros(r.shape[0], jnp.int32) for r in returns]
    elif scope == "agent":
        segments = [jnp.full(r.shape[0], i, jnp.int32) for i, r in enumerate(returns)]
    else:
        if group_ids is None:
            raise ValueError("rl.advantage_scope='group' needs group ids (Experience.group_ids)")
        segments, offset = [], 0
        for g in group_ids:
            g = jnp.asarray(g, jnp.int32)
            segments.append(g + offset)
            offset += int(jax.device_get(jnp.max(g))) + 1
    num_segments = 1 + int(jax.device_get(max(jnp.max(s) for s in segments)))
    return _pooled_normalize(tuple(returns), tuple(masks), tuple(segments), num_segments, divide_by_std)
