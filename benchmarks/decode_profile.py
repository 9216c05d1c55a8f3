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

Then a floor. First each distinct matmul of the step alone (all cores, its weights hot in cache),
as weights first (w [O, I] @ x^T) and activations first (x @ w [I, O]), q/k/v and gate/up also
fused into one matmul each. Then the step's matmuls alone, chained as in the model, every layer
with weights of its own, so that they stream from memory as in decoding (`matmul_chain_ms`). That
chain plus the attention and the sampling above is the floor of a decode step made of XLA:CPU's
kernels, and bounds the fraction of the compute roofline (the step's FLOPs at this machine's
measured float32 matmul peak, as benchmarks/compare.py computes it) that it can reach; also with
the attention at its bandwidth bound, and with the matmuls alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mappa_jax.models import hub, weights  # noqa: E402
from mappa_jax.models.decoder import (KEYS_FROM_CACHE, KVCache, attention, matmul_weights_first,  # noqa: E402
                                      projection_shapes)
from mappa_jax.models.weights import abstract_model  # noqa: E402
from mappa_jax.sampling.sample import next_tokens, row_keys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from roofline import copy_bandwidth_gbs, jax_matmul_gflops, numpy_matmul_gflops, smollm2_bytes  # noqa: E402


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
    medians = {}
    for name, ts in times.items():
        ms = np.array(ts) * 1e3 / per_call_steps.get(name, 1)
        medians[name] = np.median(ms)
        print(f"| {name} | {medians[name]:.1f} ({ms.min():.1f}-{ms.max():.1f}) |")
    print_floor(cfg, b, s, args.repeats, medians["attention over the cache layers"], medians["sampling one token"])


def matmul_alone_ms(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict[str, float]:
    """Fastest time (ms) of x [rows, fan_in] times a [fan_in, fan_out] weight, alone in its own
    jitted program, weights first and activations first."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, fan_in), np.float32))
    w = rng.standard_normal((fan_in, fan_out), np.float32)
    variants = {"weights first": (jax.jit(lambda w_t, x: jnp.dot(w_t, x.T)), jnp.asarray(w.T.copy())),
                "activations first": (jax.jit(lambda w, x: jnp.dot(x, w)), jnp.asarray(w))}
    best = {}
    for name, (fn, weight) in variants.items():
        fn(weight, x).block_until_ready()
        start = time.perf_counter()
        fn(weight, x).block_until_ready()
        calls = max(1, int(0.02 / (time.perf_counter() - start)))  # ~20 ms a timing
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(weight, x)
            out.block_until_ready()
            timings.append((time.perf_counter() - start) / calls)
        best[name] = min(timings) * 1e3
    return best


def matmul_chain_ms(cfg, batch: int, repeats: int, fused: bool) -> float:
    """Fastest time (ms) of the step's matmuls alone: every layer's q/k/v, o, gate/up and down
    projections (weights first, separate or fused) and the head, chained through adds and a product
    as in the model so that none overlaps another, each layer with weights of its own (streamed
    from memory, as in decoding; values are random: the time does not depend on them)."""
    rng = np.random.default_rng(0)
    shapes = projection_shapes(cfg)
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, shapes["q_proj"][1], shapes["k_proj"][1]
    weight = lambda fan_out, fan_in: jnp.asarray(rng.standard_normal((fan_out, fan_in), np.float32) * 0.02)
    groups = {"qkv": ((q + 2 * kv, d),) if fused else ((q, d), (kv, d), (kv, d)), "o": ((d, q),),
              "gate_up": ((2 * f, d),) if fused else ((f, d), (f, d)), "down": ((d, f),)}
    layers = [{name: [weight(*shape) for shape in group] for name, group in groups.items()}
              for _ in range(cfg.num_layers)]
    head = weight(cfg.vocab_size, d)

    def chain(layers, head, x):
        project = lambda ws, x: jnp.concatenate([matmul_weights_first(x, w) for w in ws], axis=-1)
        for w in layers:
            x = x + project(w["o"], project(w["qkv"], x)[:, :q])
            gate_up = project(w["gate_up"], x)
            x = x + project(w["down"], gate_up[:, :f] * gate_up[:, f:])
        return matmul_weights_first(x, head)

    fn, x = jax.jit(chain), jnp.full((batch, d), 0.1, jnp.float32)
    fn(layers, head, x).block_until_ready()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(layers, head, x).block_until_ready()
        timings.append(time.perf_counter() - start)
    return min(timings) * 1e3


def print_floor(cfg, batch: int, slots: int, repeats: int, attention_ms: float, sampling_ms: float):
    shapes = projection_shapes(cfg)
    d = cfg.hidden_size
    shapes["q_proj + k_proj + v_proj fused"] = (d, sum(shapes[k][1] for k in ("q_proj", "k_proj", "v_proj")))
    shapes["gate_proj + up_proj fused"] = (d, 2 * cfg.intermediate_size)
    shapes["output head"] = (d, cfg.vocab_size)
    print(f"\nEach matmul alone, {batch} rows, fastest of {repeats} (ms; its weights hot in cache):\n"
          "| matmul (in -> out) | weights first | activations first | GFLOP/s of the faster |\n|---|---|---|---|")
    for name, (fan_in, fan_out) in shapes.items():
        ms = matmul_alone_ms(batch, fan_in, fan_out, repeats)
        print(f"| {name} ({fan_in} -> {fan_out}) | {ms['weights first']:.3f} | {ms['activations first']:.3f} | "
              f"{2 * batch * fan_in * fan_out / min(ms.values()) / 1e6:.0f} |")
    chains = {fused: matmul_chain_ms(cfg, batch, repeats, fused) for fused in (False, True)}
    matmuls = min(chains.values())
    peak = max(numpy_matmul_gflops(4096, 3), jax_matmul_gflops(4096, 3)) * 1e9
    bandwidth = max(copy_bandwidth_gbs(1024, os.cpu_count() or 1, 3), copy_bandwidth_gbs(1024, 1, 3)) * 1e9
    per_token = smollm2_bytes()  # the roofline worker's per-token bytes and FLOPs, as compare.py uses them
    kv_bytes = batch * slots * per_token["kv_bytes_per_token_f32"]
    flops = batch * (per_token["matmul_flops_per_token"] + slots * per_token["attention_flops_per_token_per_slot"])
    roofline_ms = flops / peak * 1e3
    floor = matmuls + attention_ms + sampling_ms
    generous = matmuls + kv_bytes / bandwidth * 1e3 + sampling_ms
    print(f"\nThe step's matmuls alone, chained as in the model, each layer's weights streamed from memory, "
          f"fastest of {repeats}: {chains[False]:.1f} ms with q/k/v and gate/up separate (as the sampler runs them), "
          f"{chains[True]:.1f} ms fused.\n"
          f"Compute roofline: {flops / 1e9:.2f} GFLOP per step at {peak / 1e9:.0f} GFLOP/s (the faster of NumPy's "
          f"and jax.jit's 4096^3 float32 matmul) = {roofline_ms:.1f} ms, as benchmarks/compare.py computes it.\n"
          f"Floor of a decode step made of these kernels: matmuls {matmuls:.1f} + attention {attention_ms:.1f} + "
          f"sampling {sampling_ms:.1f} = {floor:.1f} ms, at most {roofline_ms / floor:.0%} of the roofline; with "
          f"attention at its bandwidth bound ({kv_bytes / 1e6:.0f} MB of cache at {bandwidth / 1e9:.1f} GB/s: "
          f"{kv_bytes / bandwidth * 1e3:.1f} ms) {generous:.1f} ms, at most {roofline_ms / generous:.0%}; the "
          f"matmuls alone, at most {roofline_ms / matmuls:.0%}.")


if __name__ == "__main__":
    main()
