"""A run's plan: from its config alone (no weights), the mesh, the sampler's buckets and every
program the run executes, each with its abstract inputs.

    plan = plan_run(config_from_file("configs/tiny.py"))
    for program in plan.programs:
        print(program.name, program.lower().compile().memory_analysis())

The programs are the training loop's own jitted functions, built by the same constructors the
Trainer uses (`build_updater`, `sampler_config`, `Sampler`), fed jax.ShapeDtypeStructs that carry
the shardings the run would give the real arrays: nothing is allocated, so a 4B-parameter run can be
planned (and compiled, mappa_jax/compile.py) on a laptop for a TPU slice it is not. Shapes are the
largest the run can reach: the longest prompt and generation buckets, every batch bucket of the
sampler, the update's batch for the most actions one policy takes per step.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mappa_jax import parallel
from mappa_jax.config import ConfigError, validate
from mappa_jax.models import weights
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import WEIGHTS_FIRST_MAX_ROWS, compute_copy
from mappa_jax.models.known import architecture
from mappa_jax.models.lora import LoraAdapters
from mappa_jax.parallel import memory_check
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, batch_bucket, build_experience
from mappa_jax.rl.pipeline import uses_reference
from mappa_jax.rl.update import PolicyUpdater
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.sampling.engine import DecodeProgress
from mappa_jax.workflows import topology_from_config


# ---- what the Trainer builds (mappa_jax/train.py uses these) --------------------------------------
def rl_config(config, topology, data_shards: int) -> RLConfig:
    """config.rl as an RLConfig; total_optimizer_steps 0 is derived from the run's size."""
    values = config.rl.to_dict()
    if not values["total_optimizer_steps"]:
        # The LR horizon in optimizer steps: the most actions one policy can take per step, in
        # train batches, times the steps (MAPPA's released code counted prompts instead).
        values["total_optimizer_steps"] = config.train.steps * math.ceil(
            max_policy_actions(config, topology) / values["train_batch_size"])
    cfg = RLConfig.from_dict(values)
    if cfg.micro_batch_size % data_shards:
        raise ConfigError(f"config key 'rl.micro_batch_size'={cfg.micro_batch_size} is not a multiple of "
                          f"the mesh's {data_shards} batch shards (mesh.data x mesh.fsdp)")
    return cfg


def max_policy_actions(config, topology) -> int:
    """The most actions one policy can take in a training step (every agent at its max_turns)."""
    turns = collections.Counter()
    for spec in topology.agents:
        turns[spec.policy] += spec.max_turns
    return max(turns.values()) * config.train.tasks_per_step * config.train.samples_per_task


def update_batch_buckets(train_batch_size: int) -> tuple[int, ...]:
    """Rows an update's Experience snaps to: whole train batches, doubling."""
    return tuple(train_batch_size * 2 ** k for k in range(12))


def train_unrolls_layers(setting: str, mesh) -> bool:
    """config.model.train_unroll_layers ("auto" | "on" | "off") resolved for `mesh`'s platform:
    "auto" unrolls on CPU, where it makes the update 11-13 % faster (benchmarks/update.py)."""
    return setting == "on" or (setting == "auto" and parallel.mesh_platform(mesh) == "cpu")


def train_graphdef(config, model_cfg: ModelConfig, mesh):
    """The update's decoder graph: the same parameters, the memory and layer-loop settings of
    config.model (the layer loop's "auto" resolved for `mesh`'s platform)."""
    m = config.model
    return weights.abstract_model(model_cfg.replace(
        remat=m.train_remat, attention_impl=m.train_attention, attention_block_size=m.train_attention_block,
        unroll_layers=train_unrolls_layers(m.train_unroll_layers, mesh)))[0]


def make_adapters(config, model_cfg: ModelConfig, index: int) -> LoraAdapters:
    """Policy `index`'s LoRA adapters (its own initialisation seed)."""
    p = config.policy
    return LoraAdapters(model_cfg, p.lora_rank, p.lora_alpha, tuple(p.lora_targets),
                        rngs=nnx.Rngs(config.seed * 1000 + index))


def build_updater(config, model_cfg: ModelConfig, topology, mesh) -> PolicyUpdater:
    """The run's PolicyUpdater (its compiled logprob and update programs), LoRA or full."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    lora_graphdef = None
    if config.policy.mode == "lora":
        lora_graphdef = nnx.split(nnx.eval_shape(lambda: make_adapters(config, model_cfg, 0)))[0]
    return PolicyUpdater(train_graphdef(config, model_cfg, mesh), rl_config(config, topology, shards), mesh,
                         lora_graphdef=lora_graphdef)


def sampler_config(config, pad_token_id: int) -> SamplerConfig:
    """config.sampler as the Sampler's SamplerConfig."""
    sc = config.sampler
    extra = {key: sc[key] for key in ("weight_layout", "compact_rows", "decode_weights", "reuse_context") if key in sc}
    return SamplerConfig(
        batch_buckets=tuple(sc.batch_buckets), prompt_buckets=tuple(sc.prompt_buckets),
        generation_buckets=tuple(sc.generation_buckets), compute_dtype=sc.compute_dtype or None,
        cache_dtype=sc.cache_dtype or None, prefill_block_size=sc.prefill_block_size,
        pad_token_id=pad_token_id, **extra)


# ---- abstract arrays ------------------------------------------------------------------------------
def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or shape-only) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(mesh, tree):
    """`tree` as the run lays parameters and optimizer state out (mappa_jax.parallel's rules)."""
    return abstract(tree, parallel.param_shardings(mesh, tree))


def device_bytes(tree) -> int:
    """Bytes one device holds of the ShapeDtypeStructs in `tree` (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _same_abstract(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype and x.sharding.is_equivalent_to(y.sharding, x.ndim)
                            for x, y in zip(la, lb))


# ---- the plan ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    """One compiled program of the run with abstract inputs. `resident_arg_bytes`: the part of its
    arguments (per device) that is resident state of the run (weights, optimizer), which the run
    holds whether or not this program is running."""
    name: str
    kind: str                  # "prefill" | "decode" | "logprobs" | "update"
    fn: Any                    # the jitted function the run calls
    args: tuple
    kwargs: dict
    resident_arg_bytes: int
    shapes: str                # the shape bucket in words
    estimate: int = 0          # the memory estimator's per-device bytes for it (memory_check)
    rows: int = 0              # sampler programs: the batch bucket

    def lower(self):
        return self.fn.lower(*self.args, **self.kwargs)


@dataclasses.dataclass
class RunPlan:
    config: Any
    model: ModelConfig
    mesh: Any
    sampler: Sampler
    updater: PolicyUpdater
    policies: tuple[str, ...]
    programs: list[Program]
    resident_bytes: int        # per device: every policy's train state, references / shared base
    workload: memory_check.Workload
    estimate: memory_check.MemoryEstimate

    @property
    def buckets(self) -> dict[str, tuple[int, ...]]:
        sc = self.sampler.config
        return {"batch": sc.batch_buckets, "prompt": sc.prompt_buckets, "generation": sc.generation_buckets}

    def describe(self) -> str:
        lines = [f"model: {self.model.family}, {self.model.num_params() / 1e9:.2f}B parameters, "
                 f"{self.model.param_dtype} params / {self.model.dtype} compute; "
                 f"policies: {', '.join(self.policies)} ({self.config.policy.mode})",
                 f"mesh: {dict(self.mesh.shape)} over {self.mesh.size} {self.mesh.devices.flat[0].device_kind} devices",
                 f"sampler buckets: batch {self.buckets['batch']}, prompt {self.buckets['prompt']}, "
                 f"generation {self.buckets['generation']}",
                 f"resident per device: {self.resident_bytes / memory_check.GiB:.2f} GiB (estimator: "
                 f"{self.estimate.resident / memory_check.GiB:.2f} GiB)",
                 f"programs ({len(self.programs)}):"]
        lines += [f"  {p.name}: {p.shapes}" for p in self.programs]
        return "\n".join(lines)


def _stop_table_shape(topology, vocab_size: int) -> tuple[tuple, tuple]:
    """Shapes of the decode's stop tables for the largest stop set of any agent. States are the
    byte automaton's (an upper bound of the token table's), also read inside reasoning blocks."""
    from mappa_jax.sampling import stops
    sets = [spec.stop_strings for spec in topology.agents if spec.stop_strings]
    if not sets:
        table, accept = stops.stop_table_arrays([], vocab_size)
        return table.shape, accept.shape
    states = max(max(stops._automaton(p).shape[0], stops._automaton(stops.OutsideReasoning(p, starts_inside=True)).shape[0])
                 for s in sets for p in s)
    num = stops._round_up_pow2(max(len(s) for s in sets), 1)
    return (num, stops._round_up_pow2(states, 8), vocab_size), (num,)


def plan_run(config, devices=None, *, check: bool = True) -> RunPlan:
    """The plan of `config` on `devices` (default: this process's jax.devices(); any device list,
    e.g. a jax.experimental.topologies description of a TPU slice)."""
    if check:
        validate(config)
    topology = topology_from_config(config.topology)
    model_cfg = architecture(config.model)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    updater = build_updater(config, model_cfg, topology, mesh)
    sampler = Sampler(model_cfg, sampler_config(config, model_cfg.eos_token_ids[0] if model_cfg.eos_token_ids else 0),
                      mesh=mesh)
    work = memory_check.workload_from_config(config, model_cfg, sampler.platform)
    estimate = memory_check.estimate(work, {a: int(mesh.shape[a]) for a in parallel.AXES})
    policies = topology.policies
    replicated = parallel.replicated(mesh)

    # Resident state, as the Trainer builds it (_build_policies), shape-only: per policy its train
    # state (master weights, AdamW moments), its reference (full: a compute-dtype copy; LoRA: the
    # shared base, loaded in the compute dtype) and the compute-dtype copy the sampler reads
    # (Trainer._refresh_sampler_weights; the same buffers when param_dtype is the compute dtype).
    if updater.uses_lora:
        params = abstract_params(mesh, weights.abstract_model(model_cfg, frozen=True)[1])
        lora = abstract_params(mesh, nnx.split(nnx.eval_shape(lambda: make_adapters(config, model_cfg, 0)))[1])
        trainable, frozen = lora, params
    else:
        params = abstract_params(mesh, weights.abstract_model(model_cfg)[1])
        lora, trainable, frozen = None, params, None
    state = abstract_params(mesh, jax.eval_shape(updater.init_state, trainable))
    sampler_copy = compute_copy(trainable, sampler.cfg.jnp_dtype)
    copy_bytes = 0 if _same_abstract(sampler_copy, trainable) else device_bytes(sampler_copy)
    if updater.uses_lora:
        reference = params
        resident = device_bytes(params) + len(policies) * (device_bytes(state) + copy_bytes)
    else:
        reference = abstract_params(mesh, jax.eval_shape(lambda p: updater.new_full_agent(p).reference, params))
        resident = len(policies) * (device_bytes(state) + device_bytes(reference) + copy_bytes)

    # The update's Experience: the most actions of one policy, longest prompt + generation buckets.
    rows = batch_bucket(max_policy_actions(config, topology), update_batch_buckets(updater.cfg.train_batch_size),
                        updater.cfg.train_batch_size)
    prompt_len, new_tokens = work.rollout_prompt_len, work.rollout_new_tokens
    one = build_experience([Sample([0] * prompt_len, [0] * new_tokens, [0.0] * new_tokens, 0.0, False, 0)],
                           batch_buckets=(1,), padding_side="split", prompt_buckets=(prompt_len,),
                           generation_buckets=(new_tokens,))
    exp = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype,
                                                      sharding=parallel.batch_sharding(mesh, x.ndim)), one)
    seq = f"{rows} x {prompt_len}+{new_tokens} tokens"
    programs: list[Program] = []
    trainer_args = (frozen, lora, exp) if updater.uses_lora else (params, None, exp)
    # Forward only: one layer's activations and the float32 logits of one chunk (no gradient).
    logprob_estimate = estimate.resident + estimate.terms["forward"] + estimate.terms["logits"] // 2
    # Only the forward passes the step runs (rl.pipeline): the trainer's when it supplies the old
    # logprobs, the reference's when a KL term uses it; one program when their arguments coincide.
    logprob_runs = [(name, args, size) for name, args, size, runs in (
        ("trainer", trainer_args, device_bytes(trainer_args[:2]), updater.cfg.old_logprobs == "trainer"),
        ("reference", (reference, None, exp), device_bytes(reference), uses_reference(updater.cfg))) if runs]
    if len(logprob_runs) == 2 and _same_abstract(logprob_runs[0][1], logprob_runs[1][1]):
        logprob_runs = [("trainer, reference", *logprob_runs[0][1:])]
    for name, args, size in logprob_runs:
        programs.append(Program(f"logprobs ({name})", "logprobs", updater.logprobs_fn(*args), args, {}, size, seq,
                                logprob_estimate))
    update_args = (state, frozen, exp)
    programs.append(Program("update", "update", updater.update_fn(*update_args), update_args, {},
                            device_bytes((state, frozen)), seq, estimate.resident + estimate.update))

    # The sampler: prefill and decode per batch bucket at the longest prompt and generation buckets.
    lora_graphdef = updater.lora_graphdef
    # compact: a row gather, no memory of its own; decode_layers: a copy, counted as sampler_weights;
    # extend: a prefill of the new tokens next to the kept cache, counted as kept_context.
    sampler_programs = sampler.programs(lora_graphdef)
    prefill, decode, decode_layers = (sampler_programs.prefill, sampler_programs.decode,
                                      sampler_programs.decode_layers)
    shardings_of = getattr(sampler, "weight_shardings", None)
    place = lambda tree: tree if tree is None or shardings_of is None else abstract(tree, shardings_of(tree))
    held = (params, sampler_copy) if updater.uses_lora else (sampler_copy, None)  # what SamplerPolicy holds
    sampler_params, sampler_lora = place(held[0]), place(held[1])
    # Arguments already resident (the layout the sampler wants is the one they are held in).
    sampler_resident = sum(device_bytes(t) for t, h in zip((sampler_params, sampler_lora), held)
                           if t is not None and _same_abstract(t, h))
    batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    table_shape, accept_shape = _stop_table_shape(topology, model_cfg.vocab_size)
    stop_ids = jax.ShapeDtypeStruct((max(4, 1 << (len(model_cfg.eos_token_ids) - 1).bit_length()),), jnp.int32,
                                    sharding=replicated)
    shared = (stop_ids, jax.ShapeDtypeStruct(table_shape, jnp.int32, sharding=replicated),
              jax.ShapeDtypeStruct(accept_shape, jnp.int32, sharding=replicated))
    scalars = (scalar(jnp.uint32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32))
    cache_sharding = NamedSharding(mesh, P(parallel.BATCH_AXES, None, None, None))
    layer_copies = lambda rows: (jax.eval_shape(functools.partial(
        decode_layers, weights_first=rows <= WEIGHTS_FIRST_MAX_ROWS), sampler_params, sampler_lora)
        if sampler.unstacks_weights else None)
    for b in sampler.config.batch_buckets:
        prefill_args = (sampler_params, sampler_lora, batch((b, prompt_len), jnp.int32),
                        batch((b, prompt_len), jnp.bool_), batch((b,), jnp.int32))
        kwargs = {"generation_slots": new_tokens}
        rollout = memory_check.estimate(work.replace(rollout_rows=b), {a: int(mesh.shape[a]) for a in parallel.AXES})
        sampler_copy = rollout.terms.get("sampler_weights", 0)
        programs.append(Program(f"prefill b{b}", "prefill", prefill, prefill_args, kwargs, sampler_resident,
                                f"{b} rows x {prompt_len} prompt tokens, +{new_tokens} cache slots",
                                rollout.resident + rollout.rollout, rows=b))
        cache, logits = jax.eval_shape(functools.partial(prefill, **kwargs), *prefill_args)
        cache = cache.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=cache_sharding))
        logits = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=parallel.batch_sharding(mesh, 2))
        progress = DecodeProgress(scalar(jnp.int32), batch((b,), jnp.bool_), batch((b,), jnp.bool_),
                                  batch((b,), jnp.int32), batch((b, table_shape[0]), jnp.int32),
                                  batch((b, new_tokens), jnp.int32), batch((b, new_tokens), jnp.float32))
        decode_args = (sampler_params, sampler_lora, layer_copies(b), cache, logits,
                       batch((b, prompt_len), jnp.bool_), batch((b,), jnp.int32), progress, scalar(jnp.int32),
                       *scalars, *shared)
        programs.append(Program(f"decode b{b}", "decode", decode, decode_args, {}, sampler_resident,
                                f"{b} rows, {new_tokens} new tokens after {prompt_len}",
                                rollout.resident + rollout.terms["kv_cache"] + sampler_copy, rows=b))
    return RunPlan(config, model_cfg, mesh, sampler, updater, policies, programs, resident, work, estimate)
