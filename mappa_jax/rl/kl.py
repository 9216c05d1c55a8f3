"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1, k2, k3).

Definitions follow OpenRLHF: with log_ratio = logp - ref_logp,
k1 = log_ratio, k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) - 1 + log_ratio.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mappa_jax.rl.registry import Registry

KL_ESTIMATORS = Registry("rl.kl_estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(logp - ref_logp)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    neg_log_ratio = ref_logp - logp
    return jnp.exp(neg_log_ratio) - 1.0 - neg_log_ratio


@functools.partial(jax.jit, static_argnames=("estimator",))
def token_kl(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, estimator: str = "k1") -> jax.Array:
    """KL estimate per token, zero outside `mask`."""
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp)
    return jnp.where(mask, kl, 0.0)
