"""The host API of generation: lists of token ids in, NumPy arrays out.

    sampler = Sampler(model_cfg, SamplerConfig(), mesh, tokenizer=tok)
    out = sampler.generate(params_state, [[1, 2, 3], [4, 5]], n=2, max_new_tokens=256,
                           temperature=1.0, stop_strings=[("```python", "```")], seed=7)
    out.tokens[i * n + j, :out.lengths[i * n + j]]   # sample j of prompt i

Prompts of different lengths are left-padded into a prompt-length bucket (positions come from the
mask, so logits equal the unpadded ones); the distinct prompts are prefilled once and their cache
rows replicated n times; batch and generation budget snap to buckets too. A multi-turn
continuation is a longer prompt (earlier context + new tokens): re-prefilled whole, or, with the
earlier call's `keep_context=True` output passed as `context`, only its new tokens are:

    first = sampler.generate(params_state, prompts, max_new_tokens=256, keep_context=True)
    second = sampler.generate(params_state, [p + g + tool_output for ...], max_new_tokens=256,
                              context=first.context)   # prefills the tool outputs only
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import WEIGHTS_FIRST_MAX_ROWS, KVCache
from mappa_jax.models.weights import abstract_model
from mappa_jax.parallel.distributed import fetch_global
from mappa_jax.parallel.mesh import mesh_platform
from mappa_jax.sampling.config import SamplerConfig, bucket_for
from mappa_jax.sampling.engine import DecodeProgress, SamplerPrograms, build_programs
from mappa_jax.sampling.stops import compile_stop_patterns, stop_table_arrays, token_bytes


@dataclasses.dataclass
class SampleOutput:
    """Row r = prompt r // n, sample r % n. Arrays are [rows, max_new_tokens] on the host.

    tokens: generated ids (the stop token / the token completing a stop string included), then pad.
    logprobs: log softmax(logits / temperature)[token], the tempered policy before top-k/top-p
        truncation (greedy, temperature 0: the untempered policy), 0 after length.
    lengths: generated tokens per row.
    truncated: the row used its whole budget without an EOS / stop token / stop string.
    """
    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    decode_steps: int = 0  # loop iterations run (summed over batch chunks); < budget on early exit
    decode_row_steps: int = 0  # rows x iterations computed, filler rows included (falls as rows are dropped)
    context: "KeptContext | None" = None  # with keep_context: every row's KV cache, for the next call
    prefilled_tokens: int = 0  # prompt tokens run through the model (a kept context's are not)

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@dataclasses.dataclass
class KeptContext:
    """The KV cache of a generate call's rows (prompt, then generated tokens), kept for a next call
    whose prompts extend them (`Sampler.generate(context=...)`, which frees it).

    cache: [rows, Hkv, slots, D] per layer; mask: [rows, slots], the real slots of each row;
    rows: the tokens of output row r (prompt + generated) -> its cache row; weights: the leaves of
    the params and LoRA state that computed it (a call with other weights prefills in full)."""
    cache: KVCache | None
    mask: jax.Array | None
    rows: dict[tuple[int, ...], int]
    weights: tuple
    lora_graphdef: object

    @property
    def nbytes(self) -> int:
        return 0 if self.cache is None else sum(x.nbytes for x in jax.tree.leaves((self.cache, self.mask)))

    def release(self) -> None:
        """Drops the device buffers (the arrays are freed once nothing else holds them)."""
        self.cache, self.mask, self.rows, self.weights = None, None, {}, ()

    def match(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]] | None:
        """(cache row, kept tokens) per prompt: the longest kept row each prompt strictly extends;
        None unless every prompt extends one."""
        if self.cache is None:
            return None
        by_length: dict[int, dict[tuple[int, ...], int]] = {}
        for tokens, row in self.rows.items():
            by_length.setdefault(len(tokens), {})[tokens] = row
        lengths = sorted(by_length, reverse=True)
        found = []
        for prompt in prompts:
            hit = next(((by_length[k][tuple(prompt[:k])], k) for k in lengths
                        if k < len(prompt) and tuple(prompt[:k]) in by_length[k]), None)
            if hit is None:
                return None
            found.append(hit)
        return found


def _as_state(obj):
    """(graphdef or None, state) from an nnx.Module, a (graphdef, state) pair, or a bare state."""
    if isinstance(obj, nnx.Module):
        return nnx.split(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nnx.GraphDef):
        return obj
    return None, obj


class Sampler:
    """Batched sampling for one model architecture; params and LoRA adapters are call arguments."""

    def __init__(self, cfg: ModelConfig, config: SamplerConfig | None = None, mesh=None, tokenizer=None,
                 token_pieces: Sequence[bytes] | None = None):
        """mesh: a `mappa_jax.parallel.make_mesh` mesh (rows split over its data axes, params by its
        rules) or None for the default device. tokenizer (or token_pieces, the bytes of each token
        id) is needed only for stop strings."""
        config = config or SamplerConfig()
        if config.compute_dtype is not None:
            cfg = cfg.replace(dtype=config.compute_dtype)
        self.cfg, self.config, self.mesh, self.tokenizer = cfg, config, mesh, tokenizer
        self.graphdef, _ = abstract_model(cfg)
        block = int(config.prefill_block_size)
        self.prefill_graphdef = abstract_model(cfg.replace(
            attention_impl="blockwise", attention_block_size=block, attention_query_block=block))[0] if block else None
        self.cache_dtype = jnp.dtype(config.cache_dtype) if config.cache_dtype else cfg.jnp_dtype
        self.batch_axes = None
        if mesh is not None:
            from mappa_jax.parallel import BATCH_AXES
            self.batch_axes = BATCH_AXES
            shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
            bad = [b for b in config.batch_buckets if b % shards]
            if bad:
                raise ValueError(f"sampler.batch_buckets {bad} are not multiples of the mesh's {shards} "
                                 f"data-parallel shards ({'x'.join(BATCH_AXES)})")
        self._programs: dict = {}
        self._relayouts: dict = {}  # target shardings -> jitted copy into the sampler's weight layout
        self._token_bytes = None if token_pieces is None else tuple(token_pieces)
        self._no_stop_table = stop_table_arrays([], cfg.vocab_size)

    # ---- compiled programs ----------------------------------------------------------------------
    def programs(self, lora_graphdef=None) -> SamplerPrograms:
        """The jitted programs generate runs for a LoRA graph (None: the base model); see
        `mappa_jax.sampling.engine`."""
        return self._programs_for(lora_graphdef)

    def _programs_for(self, lora_graphdef):
        if lora_graphdef not in self._programs:
            self._programs[lora_graphdef] = build_programs(
                self.graphdef, lora_graphdef, self.cache_dtype, self.config.pad_token_id, self.mesh, self.batch_axes,
                long_prompt_graphdef=self.prefill_graphdef, long_prompt=int(self.config.prefill_block_size))
        return self._programs[lora_graphdef]

    @property
    def platform(self) -> str:
        """The platform the programs run on ("cpu", "tpu", ...), which resolves the "auto" options."""
        return mesh_platform(self.mesh)

    @property
    def unstacks_weights(self) -> bool:
        """Whether generate copies each layer's weights out of the stack for its decode calls
        (sampler.decode_weights)."""
        if self.config.decode_weights != "auto":
            return self.config.decode_weights == "unstacked"
        return self.platform == "cpu"

    @property
    def reuses_context(self) -> bool:
        """Whether a policy's next call should start from the KV cache its last call kept
        (sampler.reuse_context; SamplerPolicy asks for it)."""
        if self.config.reuse_context != "auto":
            return self.config.reuse_context == "on"
        return self.platform == "cpu"

    def num_compiled(self) -> int:
        """Compiled (shape-specialised) programs so far, over all LoRA variants."""
        return sum(fn._cache_size() for fns in self._programs.values() for fn in fns)

    # ---- placement --------------------------------------------------------------------------------
    def _put_batch(self, x: np.ndarray):
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, NamedSharding(self.mesh, P(self.batch_axes, *([None] * (x.ndim - 1)))))

    def _put_replicated(self, x):
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, NamedSharding(self.mesh, P()))

    def weight_shardings(self, state):
        """The shardings prefill and decode take `state` (params, or a LoRA state) in, by
        sampler.weight_layout: "gathered" = whole over "fsdp", split over "tensor"
        (`parallel.decode_param_shardings`); "sharded" = the training layout. None without a mesh."""
        if self.mesh is None:
            return None
        from mappa_jax.parallel import decode_param_shardings, param_shardings
        layout = decode_param_shardings if self.config.weight_layout == "gathered" else param_shardings
        return layout(self.mesh, state)

    @property
    def copies_weights(self) -> bool:
        """Whether generate holds its own gathered copy of the weights for the call (the memory
        check counts it as the rollout's `sampler_weights`)."""
        return self.mesh is not None and self.config.weight_layout == "gathered" and self.mesh.shape["fsdp"] > 1

    def place_weights(self, state):
        """`state` in the sampler's weight layout. Leaves already there are kept; the others move in
        one jitted copy (every host runs it, as multi-controller JAX needs), so an FSDP-sharded
        policy is gathered once per generate call instead of per layer at every decoded token."""
        if self.mesh is None or state is None:
            return state
        leaves, treedef = jax.tree.flatten(state)
        targets = treedef.flatten_up_to(self.weight_shardings(state))
        for i, x in enumerate(leaves):  # host arrays: placed straight into the layout
            if not isinstance(x, jax.Array):
                leaves[i] = jax.device_put(x, targets[i])
        moving = [i for i, (x, target) in enumerate(zip(leaves, targets))
                  if not x.sharding.is_equivalent_to(target, x.ndim)]
        if moving:
            key = tuple(targets[i] for i in moving)
            if key not in self._relayouts:
                self._relayouts[key] = jax.jit(lambda *xs: xs, out_shardings=key)
            for i, x in zip(moving, self._relayouts[key](*(leaves[i] for i in moving))):
                leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    # ---- stop handling --------------------------------------------------------------------------
    def _stop_tables(self, stop_strings):
        if not stop_strings:
            return self._no_stop_table
        if self.tokenizer is None and self._token_bytes is None:
            raise ValueError("stop_strings need a tokenizer: pass Sampler(..., tokenizer=...)")
        if self._token_bytes is None:
            self._token_bytes = tuple(token_bytes(self.tokenizer))
        return compile_stop_patterns(stop_strings, self._token_bytes, self.cfg.vocab_size)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, params, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop_token_ids: Sequence[int] | None = None, stop_strings=(), seed: int = 0,
                 lora=None, keep_context: bool = False, context: KeptContext | None = None) -> SampleOutput:
        """Samples n continuations of every prompt (lists of token ids).

        params: the decoder's nnx.State (or the Decoder itself); on a mesh, pass it placed with
        `mappa_jax.parallel.shard_state` (else it is moved there first, every call); with
        sampler.weight_layout "gathered" and fsdp > 1 each call gathers a copy (`place_weights`). lora: LoraAdapters,
        or its nnx.split (graphdef, state), or None for the base model (= the reference policy). temperature 0 is greedy; top_k <= 0 / top_p >= 1 disable those
        filters. stop_token_ids defaults to the model's EOS ids; stop_strings are strings or tuples
        of strings matched in order (see `mappa_jax.sampling.stops`). Same seed, same tokens.
        keep_context: return every row's KV cache as `out.context` (when the call is one batch
        chunk; else None). context: an earlier call's `out.context`, freed by this call; when n is
        1, the call is one chunk, the weights are the same arrays and every prompt extends one of
        its rows (prompt + generated tokens), only the rest of each prompt is prefilled.
        """
        cfg, sc = self.cfg, self.config
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        budget = bucket_for(max_new_tokens, sc.generation_buckets, "generation_buckets", "max_new_tokens")
        per_call = sc.batch_buckets[-1] // n
        if per_call < 1:
            raise ValueError(f"n={n} samples exceed the largest entry {sc.batch_buckets[-1]} of sampler.batch_buckets")

        _, params = _as_state(params)
        lora_graphdef, lora_state = _as_state(lora) if lora is not None else (None, None)
        if lora is not None and lora_graphdef is None:
            raise ValueError("lora must be a LoraAdapters module or its (graphdef, state) pair from nnx.split "
                             "(the graph carries the targets and scale)")
        programs = self._programs_for(lora_graphdef)
        params, lora_state = self.place_weights(params), self.place_weights(lora_state)
        weights = (tuple(jax.tree.leaves(params)), tuple(jax.tree.leaves(lora_state)))
        single_chunk = len(prompts) <= per_call
        reuse = None
        if context is not None:
            same_weights = (context.lora_graphdef == lora_graphdef and len(context.weights) == 2
                            and all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
                                    for a, b in zip(context.weights, weights)))
            if n == 1 and single_chunk and same_weights:
                reuse = context.match(prompts)
        layers = self._decode_layers(programs[3], params, lora_state) if self.unstacks_weights else None

        stop_ids = sorted(set(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids))
        stop_id_array = np.full((max(4, 1 << (len(stop_ids) - 1).bit_length()),), -1, np.int32)
        stop_id_array[:len(stop_ids)] = stop_ids
        table, accept = self._stop_tables(stop_strings)
        scalars = [self._put_replicated(np.asarray(x, dtype)) for x, dtype in (
            (seed, np.uint32), (temperature, np.float32), (top_k, np.int32), (top_p, np.float32),
            (max_new_tokens, np.int32))]
        shared = [self._put_replicated(a) for a in (stop_id_array, table, accept)]

        parts = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            parts.append(self._generate_chunk(programs, params, lora_state, layers, chunk, start, n, budget,
                                              max_new_tokens, scalars, shared, context if reuse else None, reuse,
                                              keep_context and single_chunk))
        if context is not None:
            context.release()
        tokens, logprobs, lengths, stopped = (np.concatenate(x) for x in zip(*(p[:4] for p in parts)))
        tokens, logprobs = tokens[:, :max_new_tokens], logprobs[:, :max_new_tokens]
        kept = None
        if keep_context and single_chunk:
            cache, mask = parts[0][6]
            rows = {tuple(prompts[r // n]) + tuple(tokens[r, :lengths[r]].tolist()): r for r in range(len(tokens))}
            kept = KeptContext(cache, mask, rows, weights, lora_graphdef)
        return SampleOutput(tokens, logprobs, lengths, ~stopped, sum(p[4] for p in parts), sum(p[5] for p in parts),
                            context=kept, prefilled_tokens=sum(p[7] for p in parts))

    @staticmethod
    def _decode_layers(program, params, lora_state):
        """rows -> the layer copies (`engine.decode_layers`) a decode call of that many rows reads:
        transposed for weights-first matmuls at <= WEIGHTS_FIRST_MAX_ROWS rows, else as stored.
        Made when first needed; only the layout in use is kept (one copy of the weights)."""
        held = {}

        def layers_for(rows: int):
            weights_first = rows <= WEIGHTS_FIRST_MAX_ROWS
            if weights_first not in held:
                held.clear()
                held[weights_first] = program(params, lora_state, weights_first=weights_first)
            return held[weights_first]
        return layers_for

    def _generate_chunk(self, programs, params, lora_state, layers, prompts, first_prompt, n, budget,
                        max_new_tokens, scalars, shared, context=None, reuse=None, keep_cache=False):
        """Prefill (or, with `reuse` from `KeptContext.match`, extend the kept rows by the rest of
        each prompt), then decode; with sampler.compact_rows, each time the running rows fit a
        smaller batch bucket, the loop stops, keeps only those rows and continues in that bucket
        (rows that stopped early stop costing decode work). Same tokens either way: a row's
        randomness depends only on its id and step. Returns the rows' tokens, logprobs, lengths,
        stopped flags, the loop's iterations, the rows x iterations it computed, with `keep_cache` the
        (cache, mask) of every row once done (else None), and the prompt tokens prefilled."""
        decode, compact = programs.decode, programs.compact
        sc = self.config
        num_rows = len(prompts) * n
        prompt_len = bucket_for(max(len(p) for p in prompts), sc.prompt_buckets, "prompt_buckets", "prompt length")
        prefill_rows = bucket_for(len(prompts), sc.batch_buckets, "batch_buckets", "number of prompts")
        decode_rows = bucket_for(num_rows, sc.batch_buckets, "batch_buckets", "prompts x n")
        tokens = np.full((prefill_rows, prompt_len), sc.pad_token_id, np.int32)
        mask = np.zeros((prefill_rows, prompt_len), bool)
        mask[:, -1] = True  # filler rows: one pad token, so no row is fully masked
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):] = p
            mask[i, prompt_len - len(p):] = True
        row_source = np.zeros((decode_rows,), np.int32)
        row_source[:num_rows] = np.repeat(np.arange(len(prompts), dtype=np.int32), n)
        active = np.arange(decode_rows) < num_rows
        row_ids = (first_prompt * n + np.arange(decode_rows)).astype(np.int32)

        if reuse is None:
            cache, logits = programs.prefill(params, lora_state, self._put_batch(tokens), self._put_batch(mask),
                                             self._put_batch(row_source), generation_slots=budget)
            prompt_mask = self._put_batch(mask[row_source])
            prefilled = sum(len(p) for p in prompts)
        else:
            cache, logits, prompt_mask = self._extend(programs.extend, params, lora_state, context, reuse, prompts,
                                                      prefill_rows, prompt_len, budget)
            prefilled = sum(len(p) - kept for p, (_, kept) in zip(prompts, reuse))
        patterns = shared[1].shape[0]
        progress = DecodeProgress.start(active, budget, patterns, sc.pad_token_id)
        progress = jax.tree.map(lambda x: self._put_batch(x) if x.ndim else self._put_replicated(x), progress)
        row_ids_device = self._put_batch(row_ids)
        # keep_cache: every row's cache once it is done, by output row (the first call's cache is in that
        # order; rows finishing after a compaction are written back into it).
        kept, kept_prompt_mask = None, prompt_mask
        origin = np.where(active, np.arange(decode_rows), -1)  # output row of each decode row; -1 = filler
        out = [np.full((num_rows, budget), sc.pad_token_id, np.int32), np.zeros((num_rows, budget), np.float32),
               np.zeros((num_rows,), np.int32), np.zeros((num_rows,), bool)]
        row_steps, last_step = 0, 0
        while True:
            rows = len(origin)
            smaller = [b for b in sc.batch_buckets if b < rows] if sc.compact_rows else []
            exit_below = self._put_replicated(np.int32(smaller[-1] if smaller else 0))
            progress, logits, cache = decode(params, lora_state, None if layers is None else layers(rows), cache,
                                             logits, prompt_mask, row_ids_device, progress, exit_below, *scalars,
                                             *shared)
            state = fetch_global((progress.step, progress.done, progress.tokens, progress.logprobs,
                                  progress.lengths, progress.stopped))  # rows may span hosts
            step, done = int(state[0]), state[1]
            row_steps += rows * (step - last_step)
            last_step = step
            running = np.flatnonzero(~done)
            last_call = step >= max_new_tokens or running.size == 0
            finished = (origin >= 0) & (done | last_call)
            for dst, src in zip(out, state[2:]):
                dst[origin[finished]] = src[finished]
            if keep_cache and kept is None:
                kept = cache  # compact does not donate it: it outlives the smaller buckets' caches
            elif keep_cache and finished.any():
                destination = np.where(finished, origin, decode_rows).astype(np.int32)  # out of range: skipped
                kept = programs.keep_rows(kept, cache, self._put_replicated(destination))
            if last_call:
                break
            # Keep the running rows, then fill the smaller bucket with rows that are done.
            new_rows = bucket_for(running.size, sc.batch_buckets, "batch_buckets", "running rows")
            keep = np.concatenate([running, np.flatnonzero(done)[:new_rows - running.size]]).astype(np.int32)
            cache, logits, prompt_mask, row_ids_device, progress = compact(
                cache, logits, prompt_mask, row_ids_device, progress, self._put_replicated(keep))
            origin = np.where(np.arange(new_rows) < running.size, origin[keep], -1)
        kept_context = None
        if keep_cache:
            generated = np.zeros((decode_rows, budget), bool)
            generated[:num_rows] = np.arange(budget)[None, :] < out[2][:, None]  # every sampled token's KV is written
            kept_context = (kept, jnp.concatenate([kept_prompt_mask, self._put_batch(generated)], axis=1))
        return (*out, last_step, row_steps, kept_context, prefilled)

    def _extend(self, extend, params, lora_state, context, reuse, prompts, rows, prompt_len, budget):
        """extend's cache, logits and prompt mask for prompts that continue the kept rows `reuse`:
        the rest of each prompt left-padded into a prompt bucket, filler rows a pad token after the
        first prompt's kept row (so they fit the prompt bucket too)."""
        sc = self.config
        suffixes = [p[kept:] for p, (_, kept) in zip(prompts, reuse)]
        suffix_len = bucket_for(max(len(x) for x in suffixes), sc.prompt_buckets, "prompt_buckets", "prompt length")
        tokens = np.full((rows, suffix_len), sc.pad_token_id, np.int32)
        mask = np.zeros((rows, suffix_len), bool)
        mask[:, -1] = True
        context_rows = np.full((rows,), reuse[0][0], np.int32)
        for i, (suffix, (row, _)) in enumerate(zip(suffixes, reuse)):
            tokens[i, suffix_len - len(suffix):] = suffix
            mask[i, suffix_len - len(suffix):] = True
            context_rows[i] = row
        return extend(params, lora_state, context.cache, context.mask, self._put_batch(context_rows),
                      self._put_batch(tokens), self._put_batch(mask), prompt_slots=prompt_len, generation_slots=budget)
