"""Update-step throughput of the compiled JAX REINFORCE++ update, and the update workload that
benchmarks/compare.py runs for it and for its PyTorch peer (`torch_update_step`: the same model
config, batch of B sequences x T tokens with all generated tokens trained, PPO-clipped token-mean
loss and AdamW with grad clipping). Prints tokens/s and MFU (model FLOPs over this machine's matmul
peak, measured here with a float32 matmul in JAX).

    python benchmarks/update.py                       # small llama-like model, CPU-friendly
    python benchmarks/update.py --preset smollm2 --batch 8 --seq 512

The comparison with PyTorch comes only from benchmarks/compare.py, each system in its own process.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, projection_shapes
from mappa_jax.parallel import make_mesh
from mappa_jax.plan import train_unrolls_layers
from mappa_jax.rl import RLConfig, Sample, build_experience, prepare_experiences
from mappa_jax.rl.update import PolicyUpdater

PRESETS = {
    "tiny": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),  # the harness's smoke test
    "small": dict(family="llama", vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6,
                  num_heads=6, num_kv_heads=2, head_dim=64),
    "smollm2": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
}


def model_config(preset: str) -> ModelConfig:
    return ModelConfig.tiny(**PRESETS[preset], rms_norm_eps=1e-5)


def rl_config(batch: int, micro: int) -> RLConfig:
    return RLConfig(train_batch_size=batch, micro_batch_size=micro, learning_rate=1e-5, warmup_ratio=0.0,
                    compute_entropy=False)


def train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """6 x matmul params x tokens, plus attention (QK^T and PV over the full padded length)."""
    matmul_params = cfg.num_layers * sum(i * o for i, o in projection_shapes(cfg).values())
    matmul_params += cfg.hidden_size * cfg.vocab_size  # output head (tied or not)
    tokens = batch * seq
    attention = 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim * tokens
    return 6.0 * matmul_params * tokens + attention


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine's default JAX backend."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - start)


def synthetic_samples(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    prompt = seq // 4
    return [Sample(rng.integers(3, cfg.vocab_size, prompt).tolist(), rng.integers(3, cfg.vocab_size, seq - prompt).tolist(),
                   (-rng.exponential(1.0, seq - prompt)).tolist(), float(rng.uniform()), False) for _ in range(batch)]


def jax_update_step(cfg: ModelConfig, rl: RLConfig, samples, seq: int):
    """One compiled PolicyUpdater update over `samples` per call (blocks until done)."""
    mesh = make_mesh()
    cfg = cfg.replace(unroll_layers=train_unrolls_layers("auto", mesh))  # the trainer's default layer loop
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    updater = PolicyUpdater(graphdef, rl, mesh)
    policy = [updater.new_full_agent(state)]
    exp = build_experience(samples, length_buckets=[seq], batch_buckets=[len(samples)])
    prepared, _ = prepare_experiences(updater, {"a": policy[0]}, {"a": exp})
    exp = prepared["a"]

    def step():
        policy[0], metrics = updater.update(policy[0], exp)
        jax.block_until_ready((policy[0].state.params, metrics))
    return step


def bench_jax(cfg: ModelConfig, rl: RLConfig, samples, seq: int, repeats: int) -> tuple[float, dict]:
    """Seconds per step, and per step: the process's minor page faults and kernel CPU seconds."""
    step = jax_update_step(cfg, rl, samples, seq)
    step()  # compile + warm-up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        step()
    seconds, after = (time.perf_counter() - start) / repeats, resource.getrusage(resource.RUSAGE_SELF)
    return seconds, {"page_faults": (after.ru_minflt - before.ru_minflt) / repeats,
                     "kernel_s": (after.ru_stime - before.ru_stime) / repeats}


def torch_update_step(cfg: ModelConfig, rl: RLConfig, samples):
    """The same update in PyTorch (transformers' model, torch AdamW, the same clipped token-mean
    loss over the same tokens and micro-batches); one optimizer step per call."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"},
                                               model_type=cfg.family)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=rl.learning_rate, betas=(rl.adam_b1, rl.adam_b2),
                            weight_decay=rl.weight_decay, eps=1e-8)
    tokens = torch.tensor([list(s.prompt_ids) + list(s.generated_ids) for s in samples])
    prompt = len(samples[0].prompt_ids)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, prompt:] = True
    old = torch.tensor([[0.0] * prompt + list(s.sampler_logprobs) for s in samples])
    adv = torch.randn(tokens.shape)
    micro = rl.micro_batch_size

    def step():
        opt.zero_grad(set_to_none=True)
        total = mask[:, 1:].sum()
        for i in range(0, len(samples), micro):
            t, m = tokens[i:i + micro], mask[i:i + micro, 1:]
            logits = model(input_ids=t).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, t[:, 1:, None])[..., 0]
            ratio = torch.exp((logp - old[i:i + micro, 1:]) * m)
            a = adv[i:i + micro, 1:]
            loss = -torch.minimum(ratio * a, ratio.clamp(1 - rl.clip_eps_low, 1 + rl.clip_eps_high) * a)
            ((loss * m).sum() / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip)
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="sequences per update (one optimizer step)")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt + generation)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = model_config(args.preset)
    rl = rl_config(args.batch, args.micro)
    samples = synthetic_samples(cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    flops = train_flops(cfg, args.batch, args.seq)
    peak = matmul_peak()
    print(f"model {args.preset}: {cfg.num_params() / 1e6:.1f}M params; batch {args.batch} x {args.seq} tokens, "
          f"micro-batch {args.micro}; backend {jax.default_backend()} ({len(jax.devices())} devices)")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s (float32); update FLOPs {flops / 1e9:.1f} G")
    jax_s, rusage = bench_jax(cfg, rl, samples, args.seq, args.repeats)
    print(f"JAX update:     {jax_s * 1e3:8.1f} ms  {tokens / jax_s:9.0f} tokens/s  MFU {flops / jax_s / peak:6.1%}  "
          f"per step: {rusage['page_faults']:.0f} minor page faults, {rusage['kernel_s']:.2f} s kernel time")


if __name__ == "__main__":
    main()
