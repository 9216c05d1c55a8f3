"""Generation speed of our jitted sampler alone, and the sampler workloads' prompts.

SmolLM2-135M-Instruct (float32 weights from the GGUF), batches of chat prompts of ~100 tokens, 256 new
tokens sampled at temperature 1 (EOS ignored, so every row decodes every step). Prints tokens/s, the
compile time, and how close decode gets to this machine's memory-bandwidth roofline (bandwidth
measured here with a large NumPy copy): a quick check while working on the sampler.

    python benchmarks/sampler.py [--batches 8 32] [--new-tokens 256] [--compute-dtype bfloat16]

Comparisons with other systems come only from benchmarks/compare.py, which runs each system in its
own process, alternating (two runtimes in one process starve each other's threads); its workers
take their prompts from here (make_prompts, make_mixed_prompts).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mappa_jax.models import hub, weights  # noqa: E402
from mappa_jax.sampling import Sampler, SamplerConfig  # noqa: E402

TOPICS = ["the water cycle", "prime numbers", "how a compiler works", "photosynthesis", "the French revolution",
          "black holes", "sorting algorithms", "the immune system", "plate tectonics", "neural networks",
          "the stock market", "volcanoes", "the Roman empire", "quantum computing", "climate change", "jazz music"]


def make_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """Chat prompts cut or padded (by repeating the request) to about `length` tokens."""
    prompts = []
    for i in range(batch):
        text = (f"Please explain {TOPICS[i % len(TOPICS)]} to a curious student, step by step, with one "
                f"example and one common misconception. ") * 6
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        prompts.append(ids[-(length - i % 7):])  # slightly different lengths, as in real batches
    return prompts


# Requests whose natural answers run from a few tokens to hundreds, so that at EOS rows stop at
# very different steps (as an agent's turns do in training).
REQUESTS = ["In one word: is {} a science topic? Answer yes or no.", "Name one famous person linked to {}.",
            "Give exactly three short bullet points about {}.",
            "Please explain {} to a curious student, step by step, with one example and one common misconception."]


def make_mixed_prompts(tokenizer, batch: int) -> list[list[int]]:
    """Chat prompts cycling through REQUESTS x TOPICS (rows stop early at EOS, at varied steps)."""
    prompts = []
    for i in range(batch):
        text = REQUESTS[i % len(REQUESTS)].format(TOPICS[(i // len(REQUESTS)) % len(TOPICS)])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return prompts


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read + write bandwidth of a large NumPy copy (GB/s): the decode roofline's denominator."""
    src = np.ones(size_mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def decode_bytes_per_step(cfg, batch: int, context: float, param_bytes: int, cache_itemsize: int) -> float:
    """Bytes a decode step must read at minimum: every weight once, plus the live KV cache."""
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * cache_itemsize
    return param_bytes + kv


_COMPILE_SECONDS = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: _COMPILE_SECONDS.__setitem__(0, _COMPILE_SECONDS[0] + seconds)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def bench_ours(sampler, state, prompts, new_tokens, repeats):
    before = _COMPILE_SECONDS[0]
    sampler.generate(state, prompts, max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=[], seed=0)
    compile_s = _COMPILE_SECONDS[0] - before  # XLA compile time of this batch's programs
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        out = sampler.generate(state, prompts, max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=[],
                               seed=r + 1)
        times.append(time.perf_counter() - start)
    assert (out.lengths == new_tokens).all()
    best = min(times)
    return out.lengths.sum() / best, compile_s, best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compute-dtype", default=None, help="e.g. bfloat16 (weights stay float32)")
    args = parser.parse_args()

    path = hub.smollm2_gguf_path()
    cfg, state = weights.load_gguf(path)
    tokenizer = weights.load_tokenizer(path)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    bandwidth = memory_bandwidth_gbs()
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; memory bandwidth (numpy copy) "
          f"{bandwidth:.1f} GB/s; params {param_bytes / 1e6:.0f} MB ({cfg.num_params() / 1e6:.0f}M)")
    sampler_config = SamplerConfig(batch_buckets=tuple(sorted(set(args.batches))), prompt_buckets=(128,),
                                   generation_buckets=(args.new_tokens,), compute_dtype=args.compute_dtype)
    sampler = Sampler(cfg, sampler_config)
    for batch in args.batches:
        prompts = make_prompts(tokenizer, batch, args.prompt_tokens)
        ours, compile_s, seconds = bench_ours(sampler, state, prompts, args.new_tokens, args.repeats)
        context = np.mean([len(p) for p in prompts]) + args.new_tokens / 2
        itemsize = np.dtype(sampler.cache_dtype).itemsize
        step_bytes = decode_bytes_per_step(cfg, batch, context, param_bytes, itemsize)
        roofline_step = step_bytes / (bandwidth * 1e9)
        step = seconds / args.new_tokens  # upper bound: includes prefill
        print(f"batch {batch:3d}: {ours:7.1f} tok/s ({seconds:.2f} s, compile {compile_s:.1f} s, "
              f"{step * 1e3:.1f} ms/step, roofline {roofline_step * 1e3:.1f} ms/step = {roofline_step / step:.0%})",
              flush=True)


if __name__ == "__main__":
    main()
