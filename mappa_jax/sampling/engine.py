"""The two compiled programs of generation: prefill and decode. Pure functions of pytrees.

prefill: runs the distinct (left-padded) prompts once, then replicates each prompt's KV-cache rows
    to its n samples (`row_source`) and appends empty slots for the generation budget.
decode: one `lax.while_loop` over new tokens with the KV cache donated (updated in place); each
    step samples a token per row, records its logprob under the tempered policy it was drawn from
    (`sample.next_tokens`), updates the stop state, and runs the model on the new token. It exits
    early once every row has stopped.

Parameters (and LoRA adapters) are arguments, never constants, so one compiled program serves
every agent of the same architecture; shapes come from buckets, so new lengths never recompile.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mappa_jax.models.decoder import KVCache, positions_from_mask
from mappa_jax.sampling.sample import next_tokens, row_keys


def _constrain(x, mesh, spec):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _cache_spec(batch_axes):
    """KV cache [L, B, Hkv, S, D]: rows split over the batch axes, the rest whole on each device."""
    return P(None, batch_axes, None, None, None)


def build_programs(graphdef, lora_graphdef, cache_dtype, pad_token_id: int, mesh=None, batch_axes=None,
                   long_prompt_graphdef=None, long_prompt: int = 0):
    """(prefill, decode) jitted for one model graph (and one LoRA graph, or None). Prompts longer
    than `long_prompt` prefill with `long_prompt_graphdef` (the same model, blockwise attention)."""

    def merged(params, lora, graph=graphdef):
        model = nnx.merge(graph, params)
        return model, (None if lora is None else nnx.merge(lora_graphdef, lora))

    def prefill(params, lora, tokens, mask, row_source, *, generation_slots: int):
        batch, prompt_len = tokens.shape
        long = long_prompt_graphdef is not None and prompt_len > long_prompt
        model, adapters = merged(params, lora, long_prompt_graphdef if long else graphdef)
        cache = KVCache.zeros(model.cfg, batch, prompt_len, cache_dtype)
        hidden, cache = model(tokens, positions_from_mask(mask), mask, cache=cache, cache_index=0, lora=adapters,
                              return_hidden=True)
        # Left padding: every row's last slot is real. The head runs on that position only.
        last = model.head(jnp.take(hidden[:, -1], row_source, axis=0))

        def grow(c):  # [L, B, Hkv, P, D] -> [L, rows, Hkv, P + G, D]
            rows = jnp.take(c, row_source, axis=1)
            return jnp.pad(rows, ((0, 0), (0, 0), (0, 0), (0, generation_slots), (0, 0)))

        cache = KVCache(_constrain(grow(cache.k), mesh, _cache_spec(batch_axes)),
                        _constrain(grow(cache.v), mesh, _cache_spec(batch_axes)))
        return cache, _constrain(last, mesh, P(batch_axes, None))

    def decode(params, lora, cache, logits, prompt_mask, active, row_ids, seed, temperature, top_k,
               top_p, max_new, stop_ids, stop_table, stop_accept):
        model, adapters = merged(params, lora)
        rows, prompt_len = prompt_mask.shape
        budget = cache.slots - prompt_len
        prompt_lens = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
        # Future slots are hidden by the causal mask (query slot = prompt_len + step), so the key
        # mask is fixed for the whole loop.
        kv_mask = jnp.concatenate([prompt_mask, jnp.ones((rows, budget), bool)], axis=1)
        keys = row_keys(seed, row_ids)
        pattern_ids = jnp.arange(stop_table.shape[0])[None, :]

        def cond(carry):
            step, done = carry[0], carry[1]
            return (step < max_new) & ~jnp.all(done)

        def body(carry):
            step, done, stopped, lengths, stop_state, out_tokens, out_logprobs, logits, cache = carry
            tokens, logprobs = next_tokens(logits, keys, step, temperature, top_k, top_p)
            tokens = jnp.where(done, pad_token_id, tokens)
            logprobs = jnp.where(done, 0.0, logprobs)
            out_tokens = jax.lax.dynamic_update_index_in_dim(out_tokens, tokens, step, axis=1)
            out_logprobs = jax.lax.dynamic_update_index_in_dim(out_logprobs, logprobs, step, axis=1)
            stop_state = stop_table[pattern_ids, stop_state, tokens[:, None]]
            hit = jnp.any(stop_state == stop_accept[None, :], axis=1) | jnp.any(tokens[:, None] == stop_ids[None, :], axis=1)
            lengths = jnp.where(done, lengths, step + 1)
            stopped = stopped | (hit & ~done)
            done = done | hit
            positions = (prompt_lens + step)[:, None]
            logits, cache = model(tokens[:, None], positions, kv_mask, cache=cache,
                                  cache_index=prompt_len + step, lora=adapters)
            return (step + 1, done, stopped, lengths, stop_state, out_tokens, out_logprobs, logits[:, 0], cache)

        zeros = jnp.zeros((rows,), jnp.int32)
        init = (jnp.int32(0), ~active, jnp.zeros((rows,), bool), zeros,
                jnp.zeros((rows, stop_table.shape[0]), jnp.int32),
                _constrain(jnp.full((rows, budget), pad_token_id, jnp.int32), mesh, P(batch_axes, None)),
                _constrain(jnp.zeros((rows, budget), jnp.float32), mesh, P(batch_axes, None)),
                logits, cache)
        steps, _, stopped, lengths, _, out_tokens, out_logprobs, logits, cache = jax.lax.while_loop(cond, body, init)
        # The cache and logits are returned only so that their donated input buffers alias them:
        # the loop then updates the caller's cache in place instead of copying it first.
        return (out_tokens, out_logprobs, lengths, stopped, steps), (cache, logits)

    prefill_jit = jax.jit(prefill, static_argnames=("generation_slots",))
    decode_jit = jax.jit(decode, donate_argnames=("cache", "logits"))
    return prefill_jit, decode_jit
