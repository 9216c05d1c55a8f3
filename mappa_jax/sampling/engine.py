"""The compiled programs of generation: prefill, decode and their helpers. Pure functions of pytrees.

prefill: runs the distinct (left-padded) prompts once, then replicates each prompt's KV-cache rows
    to its n samples (`row_source`) and appends empty slots for the generation budget.
decode: one `lax.while_loop` over new tokens with the KV cache donated (updated in place); each
    step samples a token per row, records its logprob under the tempered policy it was drawn from
    (`sample.next_tokens`), updates the stop state, and runs the model on the new token. It exits
    once the rows still running number `exit_below` or fewer (0: once every row has stopped).
compact: keeps the given rows of a decode call's state, so the caller can continue the running
    rows in a smaller batch bucket (`DecodeProgress` carries the loop across calls).
decode_layers: every layer's weights copied out of the stacked arrays, as stored or transposed for
    weights-first matmuls (`Decoder.layer_slices`); what decode reads on CPU (sampler.decode_weights).
extend: a prefill that starts from kept KV-cache rows (an earlier call's prompt and generated
    tokens): only each row's new suffix runs through the model, then every row's real slots are
    packed to the right of a prompt bucket, so decode sees what a prefill of the whole prompt gives.
keep_rows: writes the rows of a decode call that have finished into the kept cache, by output row.

Parameters (and LoRA adapters) are arguments, never constants, so one compiled program serves
every agent of the same architecture; shapes come from buckets, so new lengths never recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mappa_jax.models.decoder import positions_from_mask
from mappa_jax.sampling.sample import next_tokens, row_keys


def _constrain(x, mesh, spec):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _cache_spec(batch_axes):
    """A KV-cache layer [B, Hkv, S, D]: rows split over the batch axes, the rest whole on each device."""
    return P(batch_axes, None, None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeProgress:
    """The per-row state of a decode loop, carried across calls when finished rows are dropped:
    step (shared by every row: new tokens so far), done (stopped, or a filler row), stopped (by a
    stop token or string), lengths, stop_state (the stop-string automata, [rows, patterns]) and the
    tokens and logprobs sampled so far ([rows, budget])."""
    step: jax.Array
    done: jax.Array
    stopped: jax.Array
    lengths: jax.Array
    stop_state: jax.Array
    tokens: jax.Array
    logprobs: jax.Array

    @classmethod
    def start(cls, active: np.ndarray, budget: int, patterns: int, pad_token_id: int) -> "DecodeProgress":
        """Host arrays before the first step; rows with active False are fillers (done from the start)."""
        rows = active.shape[0]
        return cls(np.int32(0), ~active, np.zeros((rows,), bool), np.zeros((rows,), np.int32),
                   np.zeros((rows, patterns), np.int32), np.full((rows, budget), pad_token_id, np.int32),
                   np.zeros((rows, budget), np.float32))


class SamplerPrograms(NamedTuple):
    """The jitted programs of one model graph and LoRA graph (see the module docstring)."""
    prefill: Callable
    decode: Callable
    compact: Callable
    decode_layers: Callable
    extend: Callable
    keep_rows: Callable


def build_programs(graphdef, lora_graphdef, cache_dtype, pad_token_id: int, mesh=None, batch_axes=None,
                   long_prompt_graphdef=None, long_prompt: int = 0):
    """SamplerPrograms for one model graph (and one LoRA graph, or None). Prompts longer than `long_prompt` prefill with `long_prompt_graphdef` (the same model,
    blockwise attention). decode takes `decode_layers`' output as its `layers`, or None to slice
    each layer out of the stacked arrays inside its loop."""

    def merged(params, lora, graph=graphdef):
        model = nnx.merge(graph, params)
        return model, (None if lora is None else nnx.merge(lora_graphdef, lora))

    def prefill(params, lora, tokens, mask, row_source, *, generation_slots: int):
        batch, prompt_len = tokens.shape
        long = long_prompt_graphdef is not None and prompt_len > long_prompt
        model, adapters = merged(params, lora, long_prompt_graphdef if long else graphdef)
        hidden, cache = model(tokens, positions_from_mask(mask), mask, lora=adapters, return_hidden=True,
                              build_cache=model.cfg.jnp_dtype if cache_dtype is None else cache_dtype)
        # Left padding: every row's last slot is real. The head runs on that position only.
        last = model.head(jnp.take(hidden[:, -1], row_source, axis=0))

        def grow(c):  # [B, Hkv, P, D] -> [rows, Hkv, P + G, D]
            rows = jnp.pad(jnp.take(c, row_source, axis=0), ((0, 0), (0, 0), (0, generation_slots), (0, 0)))
            return _constrain(rows, mesh, _cache_spec(batch_axes))

        return cache.map(grow), _constrain(last, mesh, P(batch_axes, None))

    def decode(params, lora, layers, cache, logits, prompt_mask, row_ids, progress, exit_below, seed, temperature,
               top_k, top_p, max_new, stop_ids, stop_table, stop_accept):
        model, adapters = merged(params, lora)
        rows, prompt_len = prompt_mask.shape
        if layers is None:  # sliced out of the stacked arrays inside the loop
            layers = model.layer_slices(adapters)
        budget = cache.slots - prompt_len
        prompt_lens = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
        # Future slots are hidden by the causal mask (query slot = prompt_len + step), so the key
        # mask is fixed for the whole loop.
        kv_mask = jnp.concatenate([prompt_mask, jnp.ones((rows, budget), bool)], axis=1)
        keys = row_keys(seed, row_ids)
        pattern_ids = jnp.arange(stop_table.shape[0])[None, :]

        def cond(carry):
            progress = carry[0]
            live = jnp.sum(~progress.done, dtype=jnp.int32)
            return (progress.step < max_new) & (live > exit_below)

        def body(carry):
            p, logits, cache = carry
            step, done = p.step, p.done
            tokens, logprobs = next_tokens(logits, keys, step, temperature, top_k, top_p)
            tokens = jnp.where(done, pad_token_id, tokens)
            logprobs = jnp.where(done, 0.0, logprobs)
            stop_state = stop_table[pattern_ids, p.stop_state, tokens[:, None]]
            hit = jnp.any(stop_state == stop_accept[None, :], axis=1) | jnp.any(tokens[:, None] == stop_ids[None, :], axis=1)
            p = DecodeProgress(
                step=step + 1, done=done | hit, stopped=p.stopped | (hit & ~done),
                lengths=jnp.where(done, p.lengths, step + 1), stop_state=stop_state,
                tokens=jax.lax.dynamic_update_index_in_dim(p.tokens, tokens, step, axis=1),
                logprobs=jax.lax.dynamic_update_index_in_dim(p.logprobs, logprobs, step, axis=1))
            positions = (prompt_lens + step)[:, None]
            logits, cache = model(tokens[:, None], positions, kv_mask, cache=cache,
                                  cache_index=prompt_len + step, lora=adapters, layers=layers)
            return p, logits[:, 0], cache

        # Everything carried is returned, so that the donated inputs alias the outputs: the loop
        # updates the caller's cache and buffers in place instead of copying them first.
        return jax.lax.while_loop(cond, body, (progress, logits, cache))

    def decode_layers(params, lora, *, weights_first: bool):
        """Every layer's weights (and adapters) copied out of the stack, transposed for
        weights-first matmuls or as stored: made once per generate call (and layout), read in
        place by its decode calls."""
        model, adapters = merged(params, lora)
        return model.layer_slices(adapters, weights_first=weights_first)

    def compact(cache, logits, prompt_mask, row_ids, progress, keep):
        """The rows `keep` [new rows] of everything a decode call carries, in that order."""
        take = lambda x, axis=0: _constrain(jnp.take(x, keep, axis=axis), mesh,
                                            P(*([None] * axis), batch_axes, *([None] * (x.ndim - axis - 1))))
        rows_of = lambda x: take(x) if x.ndim else x  # the step counter is shared by all rows
        return cache.map(take), take(logits), take(prompt_mask), take(row_ids), jax.tree.map(rows_of, progress)

    def extend(params, lora, context, context_mask, context_rows, tokens, mask, *, prompt_slots: int,
               generation_slots: int):
        """context [R, Hkv, W, D] per layer with context_mask [R, W] (its real slots); each of the B
        new prompts is context row `context_rows[b]`'s tokens followed by its suffix `tokens[b]`
        (left-padded [B, S], `mask`). Returns the cache [B, Hkv, prompt_slots + generation_slots, D]
        with each row's real slots (context, then suffix) right-aligned in the first prompt_slots,
        the logits after the last suffix token and the prompt mask [B, prompt_slots]: what prefill
        returns for the whole prompts, left-padded to prompt_slots, without recomputing the context."""
        model, adapters = merged(params, lora)
        width, suffix = context.slots, tokens.shape[1]
        kept_mask = jnp.concatenate([jnp.take(context_mask, context_rows, axis=0), mask], axis=1)  # [B, W+S]
        rows = context.map(lambda c: jnp.pad(jnp.take(c, context_rows, axis=0),
                                             ((0, 0), (0, 0), (0, suffix), (0, 0))))
        # Positions continue from the context's real tokens, wherever its slots are.
        positions = jnp.sum(kept_mask[:, :width], axis=1, dtype=jnp.int32)[:, None] + positions_from_mask(mask)
        hidden, cache = model(tokens, positions, kept_mask, cache=rows, cache_index=width, lora=adapters,
                              return_hidden=True)
        last = model.head(hidden[:, -1])  # left padding: every row's last suffix slot is real
        # Real slots to the right (a stable sort puts the masked ones first); slot order inside a
        # row does not change attention (positions are already in the keys), only the mask does.
        extra = max(0, prompt_slots - (width + suffix))
        kept_mask = jnp.pad(kept_mask, ((0, 0), (extra, 0)))
        order = jnp.argsort(kept_mask, axis=1, stable=True)[:, -prompt_slots:]  # [B, prompt_slots]

        def pack(c):  # [B, Hkv, W+S, D] -> [B, Hkv, prompt_slots + generation_slots, D]
            c = jnp.pad(c, ((0, 0), (0, 0), (extra, 0), (0, 0)))
            packed = jnp.take_along_axis(c, order[:, None, :, None], axis=2)
            return _constrain(jnp.pad(packed, ((0, 0), (0, 0), (0, generation_slots), (0, 0))), mesh,
                              _cache_spec(batch_axes))

        prompt_mask = jnp.take_along_axis(kept_mask, order, axis=1)
        return cache.map(pack), _constrain(last, mesh, P(batch_axes, None)), prompt_mask

    def keep_rows(kept, cache, destination):
        """kept [R, ...] with row r of `cache` written at kept row destination[r] (out of range:
        skipped), in place under donation."""
        return jax.tree.map(lambda k, c: k.at[destination].set(c, mode="drop"), kept, cache)

    return SamplerPrograms(
        prefill=jax.jit(prefill, static_argnames=("generation_slots",)),
        decode=jax.jit(decode, donate_argnames=("cache", "logits", "progress")),
        compact=jax.jit(compact),  # a smaller output: nothing to donate into
        decode_layers=jax.jit(decode_layers, static_argnames=("weights_first",)),
        extend=jax.jit(extend, static_argnames=("prompt_slots", "generation_slots")),
        keep_rows=jax.jit(keep_rows, donate_argnames=("kept",)))
