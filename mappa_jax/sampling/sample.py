"""Choosing the next token: temperature, top-k, top-p (nucleus), greedy; all traced, so changing
them never recompiles. Randomness is per row and step (key = fold_in(fold_in(seed, row), step)),
so a row's samples do not depend on the batch bucket or on the other rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits / temperature with everything outside the top-k and then the top-p nucleus at -inf.

    top_k <= 0 and top_p >= 1 disable the filters (and skip the vocabulary sort entirely). The
    nucleus is the smallest set of most likely tokens whose probability reaches top_p (the first
    token is always kept); tokens tied with the last kept logit are kept too.
    """
    scaled = logits / jnp.maximum(temperature, 1e-6)

    def truncate(x):
        vocab = x.shape[-1]
        desc = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        desc = jnp.where(jnp.arange(vocab) < k, desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)
        return jnp.where(x >= threshold, x, -jnp.inf)

    return jax.lax.cond((top_k > 0) | (top_p < 1.0), truncate, lambda x: x, scaled)


def row_keys(seed, row_ids: jax.Array) -> jax.Array:
    """One PRNG key per output row, from the call's seed and the row's global index."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


def next_tokens(logits: jax.Array, keys: jax.Array, step, temperature, top_k, top_p):
    """(token [B], logprob [B]) for float32 logits [B, V]; the logprob is under the unmodified
    policy (temperature 1, no filtering), which is what the trainer recomputes."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    sampled = jax.vmap(jax.random.categorical)(step_keys, filtered)
    tokens = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
