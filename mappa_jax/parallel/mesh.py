"""The mesh comes from config (data / fsdp / tensor sizes, -1 = the rest of the devices).

Batches split over ("data", "fsdp"); parameters are fully sharded over "fsdp" (ZeRO-3 style) and
Megatron-split over "tensor": column-parallel for q/k/v/gate/up, row-parallel for o/down, the
vocabulary for the embedding and head. Axes use Auto sharding so XLA propagates shardings through
reshapes (a head split that does not divide evenly still compiles) and inserts the collectives.
The sampler decodes with its own layout (`decode_param_shardings`: whole over "fsdp"), gathered once
per generate call, so the decode loop does not gather weights at every token.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mappa_jax.parallel.cpu_runtime import cpu_pool_warning

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Trailing-dimension rules; a leading layer axis (stacked layers) is never split.
_RULES: dict[str, tuple] = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
    "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp"),
    "q_bias": ("tensor",), "k_bias": ("tensor",), "v_bias": ("tensor",),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all (or the given) devices; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()) or len(devices) % fixed:
        raise ValueError(f"mesh: axis sizes {sizes} do not divide the {len(devices)} devices")
    if free:
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh: axis sizes {sizes} use {math.prod(sizes.values())} of {len(devices)} devices")
    shape = tuple(sizes[a] for a in AXES)
    local_cpu = sum(d.platform == "cpu" and d.process_index == jax.process_index() for d in devices)
    if warning := cpu_pool_warning(local_cpu):
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_platform(mesh) -> str:
    """The platform a mesh's programs run on ("cpu", "tpu", ...): its devices' (for a TPU slice
    compiled ahead of time on a CPU machine, "tpu"), else the default backend's (no mesh, or an
    AbstractMesh). Resolves the platform-dependent "auto" options."""
    devices = getattr(mesh, "devices", None)
    return jax.default_backend() if devices is None else devices.flat[0].platform


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter, by its name (last path entry that names a rule)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    rule = next((_RULES[n] for n in reversed(names) if n in _RULES), None)
    if rule is None:  # LoRA factors: {target}_a [L, in, r] split like W's input, {target}_b like its output
        factor = next((n for n in reversed(names) if n[-2:] in ("_a", "_b") and n[:-2] in _RULES), None)
        if factor is not None and len(shape) == 3:
            in_axis, out_axis = _RULES[factor[:-2]]
            rule = (in_axis, None) if factor.endswith("_a") else (None, out_axis)
    if rule is None:
        return P()  # norms, scalars: replicated
    spec = [None] * (len(shape) - len(rule)) + list(rule)
    # An axis that does not divide its dimension is dropped for that dimension (replicated there).
    spec = [a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)]
    return P(*spec)


def param_shardings(mesh: Mesh, state: Any) -> Any:
    """NamedSharding for every leaf of an nnx.State / pytree of arrays, by parameter name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, mesh)), state)


def decode_param_shardings(mesh: Mesh, state: Any) -> Any:
    """The sampler's layout: each parameter whole over "fsdp" (replicated there), still split over
    "tensor". Decoding one token per step under the training layout would all-gather every layer's
    weights inside the decode loop at every token; in this layout the loop reads local weights."""
    def spec(path, x):
        return P(*(_without_fsdp(a) for a in param_spec(path, x.shape, mesh)))
    return jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec(path, x)), state)


def _without_fsdp(axes):
    if axes is None or isinstance(axes, str):
        return None if axes == "fsdp" else axes
    kept = tuple(a for a in axes if a != "fsdp")
    return kept or None


def shard_state(mesh: Mesh, state: Any) -> Any:
    return jax.device_put(state, param_shardings(mesh, state))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
