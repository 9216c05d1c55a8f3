"""Will the run fit? A per-device memory estimate checked before anything is allocated.

The estimate follows what the code keeps on each device:
- resident for the whole run: every agent's weights (LoRA: one shared frozen base), the frozen
  reference (full finetuning: one copy per agent; LoRA: the base itself, free), LoRA adapters,
  AdamW's two moments per trained parameter, and the sampler's compute copy of each agent's trained
  weights. Trained weights and moments are in model.param_dtype (the master copy: float32 under
  bf16 compute); frozen weights and the sampler's copy in the compute dtype model.dtype (norm
  scales stay in param_dtype: `decoder.compute_copy`), and that copy exists only when the two differ;
- while one agent updates (mappa_jax/rl/update.py): the gradient accumulator, one micro-batch's
  gradients and the optimizer's updates (3 x the trained parameters), the activations the layer
  scan saves for the backward pass (dense attention materializes [T, T] scores; `remat` keeps only
  layer inputs; blockwise attention holds one [T, block] slab at a time), and the float32 logits of
  at most `logits_chunk` generated positions (the trainer's head runs on the generation window only);
- while one agent samples: the sampler's gathered copy of its weights when fsdp > 1 and
  sampler.weight_layout is "gathered" (whole over fsdp, split over tensor, in the dtype the sampler
  reads: mappa_jax/sampling/sampler.py gathers it once per generate call so that the decode loop
  does not communicate over fsdp at every token) and, with sampler.decode_weights unstacked (CPU),
  the per-layer (transposed) copy each generate call makes of it, its KV cache (batch split over
  data x fsdp, not over tensor) and the prefill's layer temporaries, attention scores (dense [P, P] for short prompts; query x key
  blocks past sampler.prefill_block_size) and last-position logits.
Peak = resident + max(update, rollout). Parameter bytes are exact (the real sharding rules applied to
shape-only parameters); activations are an estimate (XLA fuses some buffers and keeps others).

`check_memory` / `check_run` raise InsufficientMemoryError naming the largest terms and the mesh /
LoRA settings that would fit; on CPU (host RAM shared by every device of the process, which swaps
rather than fails) `check_run` returns the estimate with that message in `MemoryEstimate.problem`
instead. `memory_table` prints the estimate for Qwen3-4B over common accelerators (README.md).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import numpy as np

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import PROJECTIONS

GiB = 1024 ** 3
AXES = ("data", "fsdp", "tensor")
# The run-config keys that the suggestions name (the lead's configs/base.py layout).
MESH_KEYS = {"data": "mesh.data", "fsdp": "mesh.fsdp", "tensor": "mesh.tensor"}
LORA_MODE_FLAG = "--config.policy.mode=lora"
SAMPLER_SHARDED_FLAG = "--config.sampler.weight_layout=sharded"
LORA_RANK_KEY = "policy.lora_rank"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Known per-chip memory when the runtime does not report it (bytes).
_KNOWN_DEVICE_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5p": 95 * GiB,
                       "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB}


class InsufficientMemoryError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Workload:
    """What runs on the mesh. Batch sizes are global (whole mesh); lora_rank 0 = full finetuning."""
    model: ModelConfig
    num_agents: int = 1
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = PROJECTIONS
    train_micro_batch: int = 4      # sequences per micro-batch (rl.micro_batch_size)
    train_seq_len: int = 1024       # prompt + generated tokens of a training sequence
    rollout_rows: int = 8           # sequences decoded together (prompts x samples)
    rollout_prompt_len: int = 512
    rollout_new_tokens: int = 512
    # Tokens whose logits the trainer computes: the generation window of the "split" Experience
    # layout. None = the whole sequence (a trainer that scores every position).
    train_generated_len: int | None = None
    logits_chunk: int = 256         # positions whose logits exist at once (PolicyUpdater's logits_chunk)
    cache_dtype: str | None = None  # None: the model's compute dtype
    # How the update's decoder runs (config.model.train_remat / train_attention).
    remat: bool = False             # True: the scan saves only each layer's input, recomputes the rest
    flash_attention: bool = False   # True: blockwise attention, no [T, T] scores in memory
    attention_block: int = 512      # key slots per block of blockwise attention
    # The sampler prefills prompts longer than this with query x key blocks of this size
    # (sampler.prefill_block_size); 0 = always dense [prompt, prompt] scores.
    prefill_block: int = 0
    # sampler.weight_layout: "gathered" = the sampler gathers the sampling agent's weights over fsdp
    # for each generate call (a copy while it samples); "sharded" = it decodes from the training layout.
    sampler_weight_layout: str = "gathered"
    # sampler.decode_weights resolved: True = each generate call copies the weights out of the stack.
    sampler_unstacked: bool = False
    # sampler.reuse_context resolved: True = an agent's next turn starts from the KV cache its last
    # turn kept, which lives next to the new call's cache while that call prefills.
    sampler_keeps_context: bool = False

    def __post_init__(self):
        for key in ("num_agents", "train_micro_batch", "train_seq_len", "rollout_rows",
                    "rollout_prompt_len", "rollout_new_tokens", "logits_chunk", "attention_block"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"memory workload: {key} must be positive, got {getattr(self, key)}")
        if self.sampler_weight_layout not in ("gathered", "sharded"):
            raise ValueError(f"memory workload: sampler_weight_layout must be 'gathered' or 'sharded', "
                             f"got {self.sampler_weight_layout!r}")
        if self.lora_rank < 0:
            raise ValueError(f"memory workload: lora_rank must be >= 0, got {self.lora_rank}")
        if self.train_generated_len is not None and not 0 < self.train_generated_len <= self.train_seq_len:
            raise ValueError(f"memory workload: train_generated_len must be in [1, train_seq_len="
                             f"{self.train_seq_len}], got {self.train_generated_len}")

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    mesh: Mapping[str, int]
    lora_rank: int
    terms: Mapping[str, int]  # bytes per device
    budget: int | None = None  # usable bytes per device, when checked against a device
    # Why the run would not fit, when the check only warns (CPU); None = it fits or was not checked.
    problem: str | None = None
    sampler_weight_layout: str = "gathered"

    RESIDENT = ("weights", "reference", "adapters", "optimizer", "compute_copies")

    @property
    def resident(self) -> int:
        return sum(self.terms[k] for k in self.RESIDENT)

    @property
    def update(self) -> int:
        return self.terms["gradients"] + self.terms["activations"] + self.terms["logits"]

    @property
    def rollout(self) -> int:
        return (self.terms["kv_cache"] + self.terms["prefill"] + self.terms.get("sampler_weights", 0)
                + self.terms.get("kept_context", 0))

    @property
    def peak(self) -> int:
        return self.resident + max(self.update, self.rollout)

    def describe(self) -> str:
        mesh = " ".join(f"{a}={self.mesh[a]}" for a in AXES)
        mode = f"LoRA rank {self.lora_rank}" if self.lora_rank else "full finetuning"
        terms = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(self.terms.items(), key=lambda kv: -kv[1]) if v)
        budget = "" if self.budget is None else f" of {_gib(self.budget)} usable"
        return f"mesh {mesh}, {mode}: peak {_gib(self.peak)}{budget} per device ({terms})"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


# ---- parameters: exact, from the real sharding rules ---------------------------------------------
def _sharded_bytes(state, mesh_sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of `state` (shape-only leaves) under mappa_jax.parallel's rules."""
    import jax
    from jax.sharding import AbstractMesh
    from mappa_jax.parallel.mesh import param_spec
    mesh = AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = tuple(param_spec(path, leaf.shape, mesh)) + (None,) * leaf.ndim
        local = 1
        for dim, axes in zip(leaf.shape, spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            local *= -(-dim // math.prod(mesh_sizes[a] for a in axes))
        total += local * np.dtype(leaf.dtype).itemsize
    return total


def _abstract_params(cfg: ModelConfig, frozen: bool = False):
    from mappa_jax.models.weights import abstract_model
    return abstract_model(cfg, frozen)[1]


def _abstract_adapters(cfg: ModelConfig, rank: int, targets):
    from flax import nnx
    from mappa_jax.models.lora import LoraAdapters
    return nnx.split(nnx.eval_shape(lambda: LoraAdapters(cfg, rank, 1.0, targets, rngs=nnx.Rngs(0))))[1]


def _sampler_weight_bytes(work: Workload, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of the sampler's copies of one agent's weights (LoRA: the base and that
    agent's adapters), as it reads them (compute dtype): the gathered copy, in
    `decode_param_shardings`' layout (the parameter rules on this mesh with fsdp = 1; none without
    fsdp or with the "sharded" layout), and the unstacked copy that generate makes of what decode
    reads (counted whole: the embedding, which decode reads in place, too)."""
    gathered = work.sampler_weight_layout == "gathered" and sizes["fsdp"] > 1
    copies = int(gathered) + int(work.sampler_unstacked)
    if not copies:
        return 0
    from mappa_jax.models.decoder import compute_copy
    whole = dict(sizes, fsdp=1) if gathered else sizes
    total = _sharded_bytes(compute_copy(_abstract_params(work.model), work.model.jnp_dtype), whole)
    if work.lora_rank:
        adapters = _abstract_adapters(work.model, work.lora_rank, work.lora_targets)
        total += _sharded_bytes(compute_copy(adapters, work.model.jnp_dtype), whole)
    return copies * total


# ---- the estimate --------------------------------------------------------------------------------
def estimate(work: Workload, mesh_sizes: Mapping[str, int]) -> MemoryEstimate:
    """Per-device bytes of `work` on a mesh with these data / fsdp / tensor sizes."""
    missing = [a for a in AXES if a not in mesh_sizes]
    if missing or any(int(mesh_sizes[a]) < 1 for a in AXES):
        raise ValueError(f"memory estimate needs positive mesh sizes for {AXES}, got {dict(mesh_sizes)}")
    sizes = {a: int(mesh_sizes[a]) for a in AXES}
    cfg, n_agents = work.model, work.num_agents
    from mappa_jax.models.decoder import compute_copy
    params = _sharded_bytes(_abstract_params(cfg), sizes)            # master: param_dtype
    frozen = _sharded_bytes(_abstract_params(cfg, frozen=True), sizes)  # compute dtype
    if work.lora_rank:
        adapter_state = _abstract_adapters(cfg, work.lora_rank, work.lora_targets)
        trained = _sharded_bytes(adapter_state, sizes)
        copy = _sharded_bytes(compute_copy(adapter_state, cfg.jnp_dtype), sizes)
        weights, reference, adapters = frozen, 0, n_agents * trained
    else:
        trained, copy = params, frozen
        weights, reference, adapters = n_agents * params, n_agents * frozen, 0
    optimizer = 2 * n_agents * trained  # AdamW mu and nu, in the trained parameters' dtype
    compute_copies = n_agents * copy if cfg.param_dtype != cfg.dtype else 0

    dt = _DTYPE_BYTES[cfg.dtype]
    batch_shards = sizes["data"] * sizes["fsdp"]
    t = sizes["tensor"]
    split = lambda n: t if n % t == 0 else 1  # a dimension the tensor axis does not divide stays whole
    heads_t, mlp_t, vocab_t = split(cfg.num_kv_heads), split(cfg.intermediate_size), split(cfg.vocab_size)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    # Training: what the layer scan keeps per layer for the backward pass, for one micro-batch.
    b, seq = -(-work.train_micro_batch // batch_shards), work.train_seq_len
    tokens = b * seq
    per_layer = (4 * h * dt + 2 * h * 4                              # residuals, norm inputs (+ f32)
                 + (2 * (q_width + 2 * kv_width) + q_width) * dt / heads_t  # q/k/v pre and post RoPE, attn out
                 + 4 * f * dt / mlp_t) * tokens                       # gate, up, silu(gate), gated
    scores = b * cfg.num_heads * seq * seq * (4 + dt) / heads_t      # float32 scores + probs
    per_layer += 0 if work.flash_attention else scores
    # The backward pass of a layer holds gradients of its saved activations next to them (+2
    # layers); with remat the scan keeps only layer inputs and rebuilds one layer at a time (its
    # activations and their gradients: 2 layers).
    saved = cfg.num_layers * tokens * h * dt + 2 * per_layer if work.remat else (cfg.num_layers + 2) * per_layer
    # Blockwise attention's backward pass holds one key block's float32 probs, dprobs and dscores.
    block = b * cfg.num_heads * seq * min(work.attention_block, seq) * 4 * 3 / heads_t
    activations = int(saved + 2 * tokens * h * dt + (block if work.flash_attention else 0))
    # Forward only (the trainer's and the reference's logprobs, no gradient): one layer's activations
    # at a time next to the residual stream in and out.
    forward = int(per_layer + 2 * tokens * h * dt)
    # Float32 logits and their gradient (XLA fuses log-softmax and softmax into them), only for the
    # generation window, one chunk at a time (chunks are recomputed in the backward pass).
    live = min(work.train_generated_len or seq, work.logits_chunk)
    logits = int(2 * b * live * v * 4 / vocab_t)
    gradients = 3 * trained

    # Rollout: KV cache of prompt + generation slots, rows split over data x fsdp only.
    cache_dt = _DTYPE_BYTES[work.cache_dtype or cfg.dtype]
    rows = -(-work.rollout_rows // batch_shards)
    prompt, slots = work.rollout_prompt_len, work.rollout_prompt_len + work.rollout_new_tokens
    per_slot = 2 * cfg.num_layers * rows * kv_width * cache_dt
    kv_cache = per_slot * slots
    sampler_weights = _sampler_weight_bytes(work, sizes)
    # Prefill: the prompt-length cache (before it grows), one layer's temporaries (q, k, v, attention
    # output, the MLP's gate / up / product), its attention scores (dense [P, P], or one query block x
    # key block at a time plus the float32 accumulator) and the logits of each row's last position.
    temporaries = rows * prompt * ((2 * q_width + 2 * kv_width) * dt / heads_t + 3 * f * dt / mlp_t)
    if work.prefill_block and prompt > work.prefill_block:
        block = work.prefill_block
        scores = rows * cfg.num_heads * block * (2 * block * 4 + cfg.head_dim * 4) / heads_t
    else:
        scores = rows * cfg.num_heads * prompt * prompt * (4 + dt) / heads_t
    prefill = int(per_slot * prompt + temporaries + scores + rows * v * 4 / vocab_t)

    terms = {"weights": weights, "reference": reference, "adapters": adapters, "optimizer": optimizer,
             "compute_copies": compute_copies, "gradients": gradients, "activations": activations, "logits": logits,
             "kv_cache": kv_cache, "prefill": prefill, "sampler_weights": sampler_weights, "forward": forward,
             "kept_context": kv_cache if work.sampler_keeps_context else 0}
    return MemoryEstimate(sizes, work.lora_rank, terms, sampler_weight_layout=work.sampler_weight_layout)


# ---- device memory -------------------------------------------------------------------------------
def device_memory_bytes(device=None) -> int:
    """Memory of one device: the runtime's limit (GPU/TPU), a known TPU size, or for a CPU device its
    share of host RAM (all CPU devices of a process allocate from the same RAM)."""
    import jax
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    kind = getattr(device, "device_kind", "")
    for name, size in _KNOWN_DEVICE_BYTES.items():
        if kind.startswith(name):
            return size
    if device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // max(1, len(jax.local_devices(backend="cpu")))
    raise ValueError(f"cannot tell the memory of device kind {kind!r}; pass device_bytes explicitly")


# ---- the check -----------------------------------------------------------------------------------
def candidate_meshes(num_devices: int, work: Workload) -> list[dict[str, int]]:
    """Every data x fsdp x tensor factorization of the devices that the batch sizes allow."""
    meshes = []
    for tensor in range(1, num_devices + 1):
        if num_devices % tensor:
            continue
        for fsdp in range(1, num_devices // tensor + 1):
            if (num_devices // tensor) % fsdp:
                continue
            data = num_devices // (tensor * fsdp)
            shards = data * fsdp
            if work.train_micro_batch % shards == 0 and work.rollout_rows % shards == 0:
                meshes.append({"data": data, "fsdp": fsdp, "tensor": tensor})
    return meshes


def suggest(work: Workload, num_devices: int, budget: int, lora_ranks=(16, 64)) -> list[MemoryEstimate]:
    """Settings that fit in `budget` bytes per device: the same LoRA setting on other meshes first,
    then the sampler decoding from the sharded weights (no gathered copy, slower decoding), then
    LoRA ranks; within each, more data parallelism (less sharding) first."""
    ranks = [work.lora_rank] + [r for r in lora_ranks if r != work.lora_rank and work.lora_rank == 0]
    layouts = [work.sampler_weight_layout] + (["sharded"] if work.sampler_weight_layout == "gathered" else [])
    fits = []
    for rank in ranks:
        for layout in layouts:
            for mesh in candidate_meshes(num_devices, work):
                if layout != work.sampler_weight_layout and mesh["fsdp"] == 1:
                    continue  # without fsdp both layouts are the training layout
                est = estimate(work.replace(lora_rank=rank, sampler_weight_layout=layout), mesh)
                if est.peak <= budget:
                    fits.append(est)
    changed = lambda e: (e.lora_rank != work.lora_rank, e.sampler_weight_layout != work.sampler_weight_layout)
    return sorted(fits, key=lambda e: (*changed(e), e.mesh["tensor"], e.mesh["fsdp"], e.peak))


def _overrides(est: MemoryEstimate, work: Workload) -> str:
    flags = [f"--config.{MESH_KEYS[a]}={est.mesh[a]}" for a in AXES]
    if est.lora_rank != work.lora_rank:
        flags += [LORA_MODE_FLAG, f"--config.{LORA_RANK_KEY}={est.lora_rank}"]
    if est.sampler_weight_layout != work.sampler_weight_layout:
        flags.append(SAMPLER_SHARDED_FLAG)
    return " ".join(flags) + f"  (peak {_gib(est.peak)})"


def check_memory(work: Workload, mesh_sizes: Mapping[str, int], device_bytes: int | None = None, *,
                 num_devices: int | None = None, headroom: float = 0.9, enforce: bool = True) -> MemoryEstimate:
    """The estimate for this mesh, checked against `headroom` of the device memory. Over budget, it
    raises InsufficientMemoryError naming the largest terms and up to three settings that would fit
    (enforce=True), or returns the estimate with that message as `problem` (enforce=False)."""
    est = estimate(work, mesh_sizes)
    device_bytes = device_memory_bytes() if device_bytes is None else int(device_bytes)
    budget = int(headroom * device_bytes)
    est = dataclasses.replace(est, budget=budget)
    if est.peak <= budget:
        return est
    num_devices = num_devices or math.prod(est.mesh.values())
    lines = [f"the run needs about {_gib(est.peak)} per device but {headroom:.0%} of the "
             f"{_gib(device_bytes)} device memory is {_gib(budget)}.",
             f"  estimate: {est.describe()}"]
    fits = suggest(work, num_devices, budget)
    if fits:
        lines.append(f"  settings that fit on these {num_devices} devices:")
        lines += [f"    {_overrides(e, work)}" for e in fits[:3]]
    else:
        largest = max(est.terms, key=est.terms.get)
        hint = ""
        if largest == "activations" and not (work.remat and work.flash_attention):
            hint = " (--config.model.train_remat=True and --config.model.train_attention=blockwise shrink it)"
        lines.append(f"  no mesh of {num_devices} devices fits, with or without LoRA; the largest term is "
                     f"{largest} ({_gib(est.terms[largest])}){hint}: lower rl.micro_batch_size, the "
                     "prompt or generation buckets, or the sampler's batch buckets, compute in bfloat16 "
                     "(model.dtype; keep model.param_dtype float32), or add devices.")
    message = "\n".join(lines)
    if enforce:
        raise InsufficientMemoryError(message)
    return dataclasses.replace(est, problem=message)


# ---- from a run config ---------------------------------------------------------------------------
def _bucket(size: int, buckets) -> int:
    buckets = sorted(int(b) for b in buckets)
    return next((b for b in buckets if b >= size), buckets[-1])


def workload_from_config(config, model: ModelConfig, platform: str | None = None) -> Workload:
    """The worst case a run config (mappa_jax/config.py layout) can reach. The trainer pads actions
    in the "split" layout (mappa_jax/train.py -> rl.experience.build_experience): the prompt to a
    sampler prompt bucket, the generation to a sampler generation bucket, and computes logits on the
    generation only. The longest prompt is the smaller of topology.max_prompt_tokens (0 = no limit)
    and the largest prompt bucket; the longest generation is the largest agent max_new_tokens.
    platform: the devices' ("cpu", "tpu", ...), which resolves sampler.decode_weights and
    sampler.reuse_context "auto"."""
    decode_weights = config.sampler.get("decode_weights", "auto")
    unstacked = decode_weights == "unstacked" or (decode_weights == "auto" and platform == "cpu")
    reuse_context = config.sampler.get("reuse_context", "auto")
    keeps_context = reuse_context == "on" or (reuse_context == "auto" and platform == "cpu")
    agents = config.topology.agents
    policies = {agents[name].policy for name in agents}
    new_tokens = max(int(agents[name].max_new_tokens) for name in agents)
    prompt_limit = max(int(b) for b in config.sampler.prompt_buckets)
    if int(config.topology.get("max_prompt_tokens", 0) or 0) > 0:
        prompt_limit = min(prompt_limit, int(config.topology.max_prompt_tokens))
    prompt = _bucket(prompt_limit, config.sampler.prompt_buckets)
    generated = _bucket(new_tokens, config.sampler.generation_buckets)
    lora = config.policy.mode == "lora"
    m = config.model
    return Workload(
        model=model, num_agents=len(policies), lora_rank=int(config.policy.lora_rank) if lora else 0,
        lora_targets=tuple(config.policy.lora_targets), train_micro_batch=int(config.rl.micro_batch_size),
        train_seq_len=prompt + generated, train_generated_len=generated,
        rollout_rows=max(int(b) for b in config.sampler.batch_buckets),
        rollout_prompt_len=prompt, rollout_new_tokens=generated,
        cache_dtype=config.sampler.get("cache_dtype") or config.sampler.get("compute_dtype") or None,
        remat=bool(m.get("train_remat", model.remat)),
        flash_attention=m.get("train_attention", model.attention_impl) == "blockwise",
        attention_block=int(m.get("train_attention_block", model.attention_block_size)),
        prefill_block=int(config.sampler.get("prefill_block_size", 0)),
        sampler_weight_layout=config.sampler.get("weight_layout", "gathered"),
        sampler_unstacked=unstacked, sampler_keeps_context=keeps_context)


def _first_device(mesh):
    """A device of `mesh` in this process, or the first local device (an AbstractMesh has none)."""
    import jax
    if isinstance(mesh, jax.sharding.Mesh):
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        if local:
            return local[0]
    return jax.local_devices()[0]


def check_run(config, model: ModelConfig, mesh, device_bytes: int | None = None, headroom: float = 0.9,
              enforce: bool | None = None) -> MemoryEstimate:
    """check_memory for a run config on a built mesh; call it before loading weights.

    enforce: True raises InsufficientMemoryError when the run would not fit; False returns the
    estimate with the same message in `.problem`. None (default) enforces on accelerators and only
    warns on CPU, whose devices share host RAM and swap rather than fail."""
    device = _first_device(mesh)
    if enforce is None:
        enforce = device.platform != "cpu"
    sizes = {a: int(mesh.shape[a]) for a in AXES}
    return check_memory(workload_from_config(config, model, device.platform), sizes,
                        device_memory_bytes(device) if device_bytes is None else device_bytes,
                        num_devices=math.prod(sizes.values()), headroom=headroom, enforce=enforce)


# ---- the README table: Qwen3-4B agents on common accelerators --------------------------------------
def qwen3_4b_config() -> ModelConfig:
    """Qwen3-4B's architecture (hidden 2560, 36 layers, 32/8 heads of 128, vocab 151936, tied), as the
    paper configs train it: float32 master weights and AdamW moments, bf16 compute."""
    return ModelConfig(family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                       tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
                       param_dtype="float32", dtype="bfloat16")


# (name, per-device memory, mesh); a v5p-8 slice has 4 chips, a v5e-8 has 8. Parameters are
# sharded over all devices (fsdp), the layout that fits the most.
HARDWARE = (("TPU v5e-8", 16 * GiB, {"data": 1, "fsdp": 8, "tensor": 1}),
            ("TPU v5p-8 (4 chips)", 95 * GiB, {"data": 1, "fsdp": 4, "tensor": 1}),
            ("1 x GPU 80 GiB", 80 * GiB, {"data": 1, "fsdp": 1, "tensor": 1}),
            ("2 x GPU 80 GiB", 80 * GiB, {"data": 1, "fsdp": 2, "tensor": 1}),
            ("4 x GPU 80 GiB", 80 * GiB, {"data": 1, "fsdp": 4, "tensor": 1}),
            ("8 x GPU 80 GiB", 80 * GiB, {"data": 1, "fsdp": 8, "tensor": 1}))


def table_workload(model: ModelConfig | None = None, num_agents: int = 3) -> Workload:
    """MathChat at MAPPA's scale: 4096-token prompts, 1024 generated tokens (the trainer's
    sequences are 5120 tokens, logits over the last 1024), 32 rows decoded together, the
    sampler's default blockwise prefill past 1024 prompt tokens."""
    from mappa_jax.sampling.config import SamplerConfig
    return Workload(model or qwen3_4b_config(), num_agents=num_agents, train_seq_len=4096 + 1024,
                    train_generated_len=1024, rollout_rows=32, rollout_prompt_len=4096, rollout_new_tokens=1024,
                    prefill_block=SamplerConfig().prefill_block_size)


def memory_table(work: Workload | None = None, hardware=HARDWARE, lora_rank: int = 64, headroom: float = 0.9) -> str:
    """A Markdown table of GiB per device for every hardware entry, full finetuning and LoRA, with the
    decoder as configured in `work` and with remat + blockwise attention. A micro-batch is one
    sequence per batch shard; "fits" compares the peak with `headroom` of the device memory."""
    work = work or table_workload()
    rows = ["| hardware | mode | resident | update | rollout | peak | peak, remat + blockwise | memory | fits |",
            "|" + "---|" * 9]
    gib = lambda n: f"{n / GiB:.1f}"
    for name, device_bytes, mesh in hardware:
        shards = mesh["data"] * mesh["fsdp"]
        for mode, rank in (("full", 0), ("LoRA", lora_rank)):
            w = work.replace(lora_rank=rank, train_micro_batch=shards)
            plain = estimate(w, mesh)
            fused = estimate(w.replace(remat=True, flash_attention=True), mesh)
            budget = headroom * device_bytes
            fits = ("yes" if plain.peak <= budget else "with remat + blockwise" if fused.peak <= budget else "no")
            rows.append(f"| {name} | {mode} | {gib(plain.resident)} | {gib(plain.update)} | {gib(plain.rollout)} | "
                        f"{gib(plain.peak)} | {gib(fused.peak)} | {gib(device_bytes)} | {fits} |")
    return "\n".join(rows)


def print_memory_table(work: Workload | None = None, **kwargs) -> None:
    print(memory_table(work, **kwargs))
