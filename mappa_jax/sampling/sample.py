"""Choosing the next token: temperature, top-k, top-p (nucleus), greedy; all traced, so changing
them never recompiles. Randomness is per row and step (key = fold_in(fold_in(seed, row), step)),
so a row's samples do not depend on the batch bucket or on the other rows.

Written for speed on every backend, CPU included: no vocabulary sort (top-k / top-p thresholds are
found by bisection over float bit patterns, 32 masked reductions) and no per-token random numbers
(one uniform per row, inverted through a two-level CDF). Both are exact, up to float32 rounding of
partial sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_BLOCK = 256  # vocabulary block of the two-level inverse CDF


def _largest_passing(weights: jax.Array, passes) -> jax.Array:
    """Per row, the largest t in [0, max weight] with passes(t [B, 1]) true, where `passes` is
    monotone (true at 0, false above the max). Bisection over the int32 bits of non-negative
    floats, which order like the floats themselves: exact after 32 halvings."""
    lo = jnp.zeros(weights.shape[:1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(weights, axis=-1), jnp.int32) + 1

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = passes(jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def filtered_weights(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Unnormalised probabilities of softmax(logits / temperature), zero outside the top-k and
    then outside the top-p nucleus (the smallest set of most likely tokens whose mass reaches
    top_p). top_k <= 0 / top_p >= 1 disable a filter; tokens tied with the last kept one stay."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))

    def keep_top_k(w):
        k = jnp.minimum(top_k, w.shape[-1])
        t = _largest_passing(w, lambda t: jnp.sum(w >= t, axis=-1) >= k)
        return jnp.where(w >= t, w, 0.0)

    def keep_nucleus(w):
        total = jnp.sum(w, axis=-1)
        t = _largest_passing(w, lambda t: jnp.sum(jnp.where(w >= t, w, 0.0), axis=-1) >= top_p * total)
        return jnp.where(w >= t, w, 0.0)

    weights = jax.lax.cond(top_k > 0, keep_top_k, lambda w: w, weights)
    return jax.lax.cond(top_p < 1.0, keep_nucleus, lambda w: w, weights)


def _last_positive(w: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), axis=-1)


def inverse_cdf(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index i with probability weights[i] / sum(weights), per row, from one uniform in [0, 1).
    Two levels (blocks, then tokens in the chosen block) keep it O(V) with short cumsums."""
    rows, vocab = weights.shape
    blocks = -(-vocab // _BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(rows, blocks, _BLOCK)
    block_mass = jnp.sum(w, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_cdf[:, -1]
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
    inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]
    start = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=1)[:, 0]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    offset = jnp.minimum(jnp.sum(inner_cdf <= (target - start)[:, None], axis=-1), _last_positive(inner))
    return (block * _BLOCK + offset).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
    """argmax (first of ties) as two plain reductions: XLA CPU's variadic argmax reduce is ~10x slower."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == best, jnp.arange(logits.shape[-1]), logits.shape[-1]), axis=-1)


def row_keys(seed, row_ids: jax.Array) -> jax.Array:
    """One PRNG key per output row, from the call's seed and the row's global index."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


def next_tokens(logits: jax.Array, keys: jax.Array, step, temperature, top_k, top_p):
    """(token [B], logprob [B]) for float32 logits [B, V]; temperature 0 is greedy.

    The logprob is log softmax(logits / temperature)[token]: the tempered policy the token was
    drawn from, before top-k / top-p truncation, which is what the trainer recomputes from the
    row's temperature (`rl.experience.Experience.temperatures`). Greedy rows (temperature 0) record
    the untempered policy's (temperature 1) logprob; a point mass has none worth keeping."""
    uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)
    sampled = inverse_cdf(filtered_weights(logits, temperature, top_k, top_p), uniform)
    tokens = jnp.where(temperature > 0, sampled, greedy(logits)).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
