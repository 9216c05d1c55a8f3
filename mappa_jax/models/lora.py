"""Per-agent LoRA adapters over a shared frozen base decoder.

W x becomes W x + (alpha / rank) * B (A x) for each targeted projection, in every layer. B starts at
zero, so a fresh adapter leaves the base model's outputs unchanged, and "adapters off" is exactly
the frozen reference policy that MAPPA's KL term needs, at no extra memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import PROJECTIONS, projection_shapes


class LoraAdapters(nnx.Module):
    def __init__(self, cfg: ModelConfig, rank: int, alpha: float, targets=PROJECTIONS, *, rngs: nnx.Rngs):
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"lora.targets has unknown projections {unknown}; choose from {PROJECTIONS}")
        if rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {rank}")
        self.targets = tuple(targets)
        self.scale = float(alpha) / rank
        shapes = projection_shapes(cfg)
        pdt = cfg.jnp_param_dtype  # the adapters are what LoRA trains: the master dtype
        for name in self.targets:
            fan_in, fan_out = shapes[name]
            a = nnx.initializers.normal(1.0 / fan_in ** 0.5)(rngs.params(), (cfg.num_layers, fan_in, rank), pdt)
            setattr(self, f"{name}_a", nnx.Param(a))
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((cfg.num_layers, rank, fan_out), pdt)))

    def layer_params(self) -> dict[str, tuple]:
        return {name: (getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...]) for name in self.targets}


def merge_lora(cfg: ModelConfig, base_state: nnx.State, adapters: LoraAdapters, dtype=None) -> nnx.State:
    """The base state with W + scale * A B folded in (in float32): a plain decoder state for
    export/serving, the merged projections in `dtype` (None: the base's own, e.g. the compute dtype
    of a frozen base). The base itself is left untouched (other agents share it)."""
    merged = nnx.to_pure_dict(base_state)
    for name, (a, b) in adapters.layer_params().items():
        w = merged[name]
        delta = adapters.scale * jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
        merged[name] = (w.astype(jnp.float32) + delta).astype(dtype or w.dtype)
    state = jax.tree.map(lambda x: x, base_state)  # a new State container over the same arrays
    nnx.replace_by_pure_dict(state, merged)
    return state
