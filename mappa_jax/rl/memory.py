"""Bytes per device for N agents: parameters, gradients, optimizer state, reference, KV cache and
(rough) activations, for a model config, a mesh shape and a policy layout (full / LoRA).

Assumptions (stated so the numbers can be checked): parameters are sharded over fsdp x tensor and
replicated over data (mappa_jax.parallel's rules); Adam keeps two moments in the training dtype;
agents update one at a time, so gradients and activations exist for one agent at once; the
rollout (KV cache) and the update never overlap, so the peak is the persistent state plus the
larger of the two phases. Activations count what backprop keeps per token and layer, with either
the current decoder (attention scores materialized, no rematerialization) or a flash-attention +
per-layer-remat decoder (only each layer's input kept, one layer live at a time).
"""
from __future__ import annotations

import dataclasses

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import PROJECTIONS, projection_shapes

GB = 1e9
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def qwen3_4b_config() -> ModelConfig:
    """Qwen3-4B's architecture (hidden 2560, 36 layers, 32/8 heads of 128, vocab 151936, tied)."""
    return ModelConfig(family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                       tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
                       param_dtype="bfloat16", dtype="bfloat16")


def lora_num_params(cfg: ModelConfig, rank: int, targets=PROJECTIONS) -> int:
    shapes = projection_shapes(cfg)
    return cfg.num_layers * rank * sum(sum(shapes[t]) for t in targets)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    persistent: float          # trained params + optimizer state + references/base, all agents
    gradients: float           # one agent's gradient accumulator
    activations: float         # backprop residuals of one micro-batch (current decoder)
    activations_flash: float   # the same with flash attention + per-layer remat
    sampling: float            # KV cache (+ a compute-dtype copy of one agent's params if trained in fp32)

    @property
    def peak(self) -> float:
        return self.persistent + max(self.gradients + self.activations, self.sampling)

    @property
    def peak_flash(self) -> float:
        return self.persistent + max(self.gradients + self.activations_flash, self.sampling)


def estimate_memory(cfg: ModelConfig, *, num_agents: int, mesh_shape: tuple[int, int, int], mode: str = "full",
                    train_dtype: str = "float32", frozen_dtype: str = "bfloat16", lora_rank: int = 64,
                    lora_targets=PROJECTIONS, micro_batch: int | None = None, seq_len: int = 4096,
                    kv_batch: int = 64, kv_slots: int = 8192) -> MemoryEstimate:
    """Bytes per device. mesh_shape = (data, fsdp, tensor). micro_batch defaults to one sequence
    per batch shard (data x fsdp); the KV cache holds kv_batch sequences of kv_slots tokens."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode={mode!r} is not 'full' or 'lora'")
    data, fsdp, tensor = mesh_shape
    devices, param_shards, batch_shards = data * fsdp * tensor, fsdp * tensor, data * fsdp
    micro_batch = batch_shards if micro_batch is None else micro_batch
    tb, fb = _BYTES[train_dtype], _BYTES[frozen_dtype]
    cb = cfg.jnp_dtype.dtype.itemsize if hasattr(cfg.jnp_dtype, "dtype") else _BYTES[cfg.dtype]
    n = cfg.num_params()
    if mode == "full":
        trained = n
        persistent = num_agents * (n * tb + 2 * n * tb + n * fb)  # params, Adam moments, reference copy
    else:
        trained = lora_num_params(cfg, lora_rank, lora_targets)
        persistent = n * fb + num_agents * 3 * trained * tb       # shared base; adapters + moments
    persistent /= param_shards
    gradients = trained * tb / param_shards

    tokens = micro_batch * seq_len / batch_shards  # tokens one device runs per micro-batch
    h, f, hq, hkv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Per token and layer: residual/norm streams (5 x hidden), q/k/v before and after RoPE, attention
    # output, and the three MLP intermediates; head- and ffn-sized ones split over tensor.
    per_layer = cb * (5 * h + (2 * (hq + 2 * hkv) * d + hq * d + 3 * f) / tensor)
    scores = hq / tensor * seq_len * (4 + cb)  # float32 scores + softmax probs, per query token
    logits = 3 * 4 * cfg.vocab_size / tensor   # float32 logits, log-softmax and its exp
    activations = tokens * (cfg.num_layers * (per_layer + scores) + logits)
    activations_flash = tokens * (cfg.num_layers * cb * h + per_layer + logits)

    kv = 2 * cfg.num_layers * kv_batch * kv_slots * hkv * d * cb / devices
    sampling = kv + (n * cb / param_shards if mode == "full" and tb != cb else 0.0)
    return MemoryEstimate(persistent, gradients, activations, activations_flash, sampling)


# (name, devices' HBM in GB, mesh (data, fsdp, tensor)); a v5p-8 slice has 4 chips, a v5e-8 has 8.
HARDWARE = [("TPU v5e-8", 16, (1, 8, 1)), ("TPU v5p-8", 95, (1, 4, 1)), ("1x GPU 80GB", 80, (1, 1, 1)),
            ("2x GPU 80GB", 80, (1, 2, 1)), ("4x GPU 80GB", 80, (1, 4, 1)), ("8x GPU 80GB", 80, (1, 8, 1))]


def memory_table(cfg: ModelConfig | None = None, num_agents: int = 3, hardware=HARDWARE, **kwargs) -> str:
    """A Markdown table of GB per device for every hardware entry, full and LoRA."""
    cfg = cfg or qwen3_4b_config()
    rows = ["| hardware | mode | persistent | grads | act (now) | act (flash+remat) | sampling | peak now | "
            "peak flash+remat | HBM | fits (flash+remat) |", "|" + "---|" * 11]
    for name, hbm, mesh in hardware:
        for mode in ("full", "lora"):
            e = estimate_memory(cfg, num_agents=num_agents, mesh_shape=mesh, mode=mode, **kwargs)
            cells = [e.persistent, e.gradients, e.activations, e.activations_flash, e.sampling, e.peak, e.peak_flash]
            fits = "yes" if e.peak_flash <= 0.9 * hbm * GB else "no"
            rows.append(f"| {name} | {mode} | " + " | ".join(f"{c / GB:.1f}" for c in cells) + f" | {hbm} | {fits} |")
    return "\n".join(rows)


def print_memory_table(cfg: ModelConfig | None = None, num_agents: int = 3, **kwargs) -> None:
    print(memory_table(cfg, num_agents, **kwargs))
