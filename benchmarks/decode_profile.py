"""Where a decode step's time goes: SmolLM2-135M-Instruct (float32, from the GGUF), one new token
per row over a KV cache, timed in parts.

    python benchmarks/decode_profile.py [--batch 32] [--slots 228] [--repeats 15]

Parts, each its own jitted program on the same inputs: the whole step (layers with the cache, then
the output head), the layers without the head, the layers without any KV cache (no cache writes,
reads or attention over past slots), the head alone and as a weights-first matmul, every layer's
attention over its cache layer (`attention`), sampling one token (`sample.next_tokens`,
temperature 1), and `--loop-steps` whole steps inside one `lax.fori_loop` as the sampler's decode
loop runs them, per step: with each layer's weights sliced out of the stacked arrays inside the
loop (sampler.decode_weights="stacked"), copied out before it by a program of their own, and copied
out transposed for weights-first matmuls (`decoder.matmul_weights_first`; what "unstacked", the
default on CPU, runs). The variants are timed round-robin, `--repeats` times each; the table shows
medians and min-max, with the load average before and after. The decode loop of the sampler runs
exactly the whole step plus sampling per token.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mappa_jax.models import hub, weights  # noqa: E402
from mappa_jax.models.decoder import KEYS_FROM_CACHE, KVCache, attention, matmul_weights_first  # noqa: E402
from mappa_jax.models.weights import abstract_model  # noqa: E402
from mappa_jax.sampling.sample import next_tokens, row_keys  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--slots", type=int, default=228, help="KV-cache slots (default: the sampler benchmark's "
                        "~100-token prompt + 128 new tokens)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--loop-steps", type=int, default=8, help="whole steps per timed decode loop")
    args = parser.parse_args()
    cfg, state = weights.load_gguf(hub.smollm2_gguf_path())
    graphdef, _ = abstract_model(cfg)
    b, s = args.batch, args.slots
    index = s // 2  # the new token's slot: mid-generation
    tokens = jnp.ones((b, 1), jnp.int32)
    positions = jnp.full((b, 1), index, jnp.int32)
    rng = np.random.default_rng(0)
    layer_cache = lambda: tuple(jnp.asarray(rng.standard_normal((b, cfg.num_kv_heads, s, cfg.head_dim), np.float32))
                                for _ in range(cfg.num_layers))
    cache = KVCache(layer_cache(), layer_cache())

    def step(state, cache, with_head, layers=None, at=index):
        model = nnx.merge(graphdef, state)
        out, cache = model(tokens, positions, jnp.ones((b, s), bool), cache=cache, cache_index=at,
                           return_hidden=not with_head, layers=layers)
        return out, cache

    def loop(state, layers, cache):
        body = lambda i, c: step(state, c[1], True, layers, index + i % 4)  # a few slots, as decoding moves on
        return jax.lax.fori_loop(0, args.loop_steps, body, step(state, cache, True, layers))

    def no_cache(state):
        return nnx.merge(graphdef, state)(tokens, positions, jnp.ones((b, 1), bool), return_hidden=True)[0]

    hidden = jnp.ones((b, 1, cfg.hidden_size), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, 1, cfg.num_heads, cfg.head_dim), np.float32))
    q_slots, kv_mask = jnp.array([index]), jnp.ones((b, s), bool)

    def attention_only(q, k_layers, v_layers):  # every layer's attention over its cache layer
        return [attention(q, k, v, q_slots, kv_mask, jnp.float32, KEYS_FROM_CACHE) for k, v in zip(k_layers, v_layers)]

    logits = jnp.asarray(rng.standard_normal((b, cfg.vocab_size), np.float32))
    keys = row_keys(jnp.uint32(0), jnp.arange(b))
    # The cache is donated (updated in place), as in the sampler; each call gets back the new one.
    full = jax.jit(lambda st, c: step(st, c, True), donate_argnums=1)
    layers = jax.jit(lambda st, c: step(st, c, False), donate_argnums=1)
    # Layers copied out of the stack in a program of their own, as the sampler does once per call.
    sliced = {weights_first: jax.jit(lambda st, w=weights_first: nnx.merge(graphdef, st).layer_slices(
        weights_first=w))(state) for weights_first in (False, True)}
    loop_jit = jax.jit(loop, donate_argnums=2)
    loops = {"stacked": lambda st, c: loop_jit(st, None, c), "unstacked": lambda st, c: loop_jit(st, sliced[False], c),
             "weights_first": lambda st, c: loop_jit(st, sliced[True], c)}
    layers_no_cache, head = jax.jit(no_cache), jax.jit(lambda st, h: nnx.merge(graphdef, st).head(h))
    head_weights_first = jax.jit(lambda st, h: matmul_weights_first(h, nnx.merge(graphdef, st).embed[...], jnp.float32))
    attend = jax.jit(attention_only)
    sample = jax.jit(lambda lg: next_tokens(lg, keys, 3, jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0)))
    held = {"cache": cache}

    def with_cache(fn):
        def run():
            out, held["cache"] = fn(state, held["cache"])
            return out, held["cache"]
        return run

    parts = {  # name -> a call that runs the part once
        "whole step (layers + cache + head)": with_cache(full),
        "layers + cache, no head": with_cache(layers),
        "layers, no KV cache": lambda: layers_no_cache(state),
        "head alone": lambda: head(state, hidden),
        "head alone, weights first (embedding @ hidden^T)": lambda: head_weights_first(state, hidden),
        "attention over the cache layers": lambda: attend(q, held["cache"].k, held["cache"].v),
        "sampling one token": lambda: sample(logits),
        "decode loop step, stacked weights": with_cache(loops["stacked"]),
        "decode loop step, unstacked weights, as stored": with_cache(loops["unstacked"]),
        "decode loop step, unstacked weights, transposed (weights first: the sampler on CPU, <= 64 rows)":
            with_cache(loops["weights_first"]),
    }
    per_call_steps = {name: args.loop_steps + 1 for name in parts if name.startswith("decode loop")}

    load_before = os.getloadavg()[0]
    for run in parts.values():  # compile and warm up
        jax.block_until_ready(run())
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, run in parts.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    print(f"SmolLM2-135M float32, batch {b}, {s} cache slots, {args.repeats} repeats round-robin; "
          f"load {load_before:.1f} -> {load_after:.1f}")
    print("| part | ms per step, median (min-max) |\n|---|---|")
    for name, ts in times.items():
        ms = np.array(ts) * 1e3 / per_call_steps.get(name, 1)
        print(f"| {name} | {np.median(ms):.1f} ({ms.min():.1f}-{ms.max():.1f}) |")


if __name__ == "__main__":
    main()
