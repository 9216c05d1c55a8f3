"""Worker: this machine's ceilings, measured in a process of their own.

- memory bandwidth: read + write bytes of a large NumPy copy, split over one thread per core (NumPy
  releases the GIL while copying), best of several; and the same with one thread.
- float32 matmul peak: a large square matmul in NumPy (its BLAS, all cores) and in jax.jit.
- the SmolLM2 sampler workload's bytes: float32 weights and KV-cache bytes per token per row, from
  the GGUF's config, for the decode roofline (every weight and the live cache read once per step).
"""
from __future__ import annotations

import concurrent.futures
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import common  # noqa: E402


def copy_bandwidth_gbs(size_mb: int, threads: int, repeats: int) -> float:
    src = np.ones(size_mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    chunks = list(zip(bounds[:-1], bounds[1:]))

    def copy(chunk):
        np.copyto(dst[chunk[0]:chunk[1]], src[chunk[0]:chunk[1]])
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, chunks))  # touch every page first
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(copy, chunks))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_matmul_gflops(n: int, repeats: int) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return 2 * n ** 3 / best_seconds(lambda: a @ a, repeats) / 1e9


def jax_matmul_gflops(n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / best_seconds(lambda: f(a).block_until_ready(), repeats) / 1e9


def smollm2_bytes() -> dict:
    import gguf
    from mappa_jax.models import hub, weights
    cfg = weights.gguf_config(gguf.GGUFReader(str(hub.smollm2_gguf_path())))
    # Per generated token: every weight is one multiply-add (the tied embedding as the output head);
    # attention adds q.k and p.v over each cached slot.
    return {"param_bytes_f32": 4 * cfg.num_params(),
            "kv_bytes_per_token_f32": 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim,
            "matmul_flops_per_token": 2 * cfg.num_params(),
            "attention_flops_per_token_per_slot": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim}


def prepare(workload: dict, system: str) -> common.Prepared:
    size_mb, n, repeats = workload["copy_mb"], workload["matmul_n"], workload["repeats"]
    figures = {}

    def call(seed: int):
        figures.update(
            bandwidth_gbs=copy_bandwidth_gbs(size_mb, common.cores(), repeats),
            bandwidth_1thread_gbs=copy_bandwidth_gbs(size_mb, 1, repeats),
            numpy_matmul_gflops=numpy_matmul_gflops(n, repeats),
            jax_matmul_gflops=jax_matmul_gflops(n, repeats))

    def check() -> dict:
        return dict(figures, copy_mb=size_mb, matmul_n=n, **smollm2_bytes())
    return common.Prepared(call, 1, {}, check)


if __name__ == "__main__":
    common.run(prepare)
