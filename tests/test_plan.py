"""Every file in configs/ is a run that starts: it loads, validates and plans (mesh, sampler buckets,
every program with abstract inputs) without any weight."""
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from mappa_jax.config import ConfigError, config_from_file, validate
from mappa_jax.models.weights import abstract_model
from mappa_jax.models.known import KNOWN_ARCHITECTURES, architecture
from mappa_jax.plan import device_bytes, plan_run, train_unrolls_layers
from mappa_jax.workflows import topology_from_config

CONFIGS = sorted(pathlib.Path(__file__).resolve().parent.parent.glob("configs/*.py"))
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def test_every_config_file_is_found():
    assert {p.name for p in CONFIGS} >= {"base.py", "demo.py", "tiny.py", "mathchat_qwen3_4b.py",
                                        "mathchat_r1_distill_1p5b.py", "datascience_qwen3_4b.py"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_plans(path):
    config = config_from_file(path)
    validate(config)
    plan = plan_run(config, jax.devices()[:1])
    assert math.prod(plan.mesh.shape.values()) == 1
    sc = config.sampler
    assert plan.buckets == {"batch": tuple(sc.batch_buckets), "prompt": tuple(sc.prompt_buckets),
                            "generation": tuple(sc.generation_buckets)}
    names = [p.name for p in plan.programs]
    # The forward passes the step runs: the trainer's for trainer old logprobs, the reference's for a KL term.
    assert "update" in names
    assert any(n.startswith("logprobs (trainer") for n in names) == (config.rl.old_logprobs == "trainer")
    assert any("reference" in n for n in names) == (config.rl.kl_coef > 0)
    for b in sc.batch_buckets:
        assert f"prefill b{b}" in names and f"decode b{b}" in names
    # Nothing is materialized: every input of every program is shape-only.
    for program in plan.programs:
        leaves = jax.tree.leaves((program.args, program.kwargs))
        assert leaves and not any(isinstance(x, jax.Array) for x in leaves), program.name
    # The update sees prompt bucket + generation bucket tokens for the most actions of one policy.
    update = next(p for p in plan.programs if p.name == "update")
    exp = update.args[2]
    assert exp.tokens.shape[1] == plan.workload.rollout_prompt_len + plan.workload.rollout_new_tokens
    assert exp.logprob_start == plan.workload.rollout_prompt_len
    assert exp.tokens.shape[0] % config.rl.train_batch_size == 0

    # Resident bytes against the parameter count (an independent formula, ModelConfig.num_params):
    # full finetuning holds per policy its params, AdamW's two moments and a reference copy.
    policies = len(topology_from_config(config.topology).policies)
    n = plan.model.num_params()
    if config.policy.mode == "full":
        p_bytes, r_bytes = _BYTES[config.model.param_dtype], _BYTES[config.model.dtype]
        # + the sampler's compute-dtype copy when it is not the master itself (mixed precision).
        copy_bytes = r_bytes if config.model.param_dtype != config.model.dtype else 0
        expected = policies * n * (3 * p_bytes + r_bytes + copy_bytes)
        # Norm scales stay in param_dtype in the reference: at most a few thousand values differ.
        assert plan.resident_bytes == pytest.approx(expected, rel=1e-3)
    else:
        cfg, rank = plan.model, config.policy.lora_rank
        widths = {"q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
                  "k_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
                  "v_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
                  "o_proj": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
                  "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
                  "up_proj": (cfg.hidden_size, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
        adapter = sum(rank * (i + o) for i, o in (widths[t] for t in config.policy.lora_targets)) * cfg.num_layers
        expected = n * _BYTES[config.model.dtype] + policies * 3 * adapter * _BYTES[config.model.param_dtype]
        assert plan.resident_bytes == pytest.approx(expected, rel=2e-3)
    assert plan.resident_bytes == pytest.approx(plan.estimate.resident, rel=1e-4)  # + step counters


def test_paper_architectures_without_weights():
    """The paper's models from their published config.json values: parameter counts as published
    (Qwen3-4B: 4.0B with tied embeddings; R1-Distill-Qwen-1.5B: 1.78B, untied)."""
    qwen = architecture(config_from_file(CONFIGS[0].with_name("mathchat_qwen3_4b.py")).model)
    assert (qwen.family, qwen.num_layers, qwen.hidden_size, qwen.rope_theta) == ("qwen3", 36, 2560, 5e6)
    assert qwen.num_params() == pytest.approx(4.02e9, rel=0.01)
    assert qwen.eos_token_ids == (151645, 151643)   # <|im_end|>, then generation_config's <|endoftext|>
    r1 = architecture(config_from_file(CONFIGS[0].with_name("mathchat_r1_distill_1p5b.py")).model)
    assert (r1.family, r1.qkv_bias, r1.tie_word_embeddings) == ("qwen2", True, False)
    assert r1.num_params() == pytest.approx(1.777e9, rel=0.01)
    assert r1.eos_token_ids == (151643,)
    assert "Qwen/Qwen3-4B" in KNOWN_ARCHITECTURES


def test_unknown_hub_model_names_the_key():
    config = config_from_file(CONFIGS[0].with_name("tiny.py"))
    config.model.source = "no-such-org/no-such-model"
    with pytest.raises(FileNotFoundError, match="model.source"):
        architecture(config.model)


def test_rollout_larger_than_the_largest_bucket_is_valid():
    """The sampler splits a call larger than its largest batch bucket: 32 tasks x 2 samples with
    buckets up to 32 is a valid run; one prompt's samples beyond the largest bucket are not."""
    config = config_from_file(CONFIGS[0].with_name("mathchat_qwen3_4b.py"))
    assert config.train.tasks_per_step * config.train.samples_per_task > max(config.sampler.batch_buckets)
    validate(config)
    config.train.samples_per_task = 64
    with pytest.raises(ConfigError, match="train.samples_per_task"):
        validate(config)


def test_device_bytes_counts_one_shard():
    mesh = jax.make_mesh((1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    tree = {"a": jax.ShapeDtypeStruct((4, 3), np.float32, sharding=sharding)}
    assert device_bytes(tree) == 48


def test_update_layer_loop_follows_the_platform():
    """model.train_unroll_layers: "auto" unrolls the update's layers on CPU and keeps the scan for a
    TPU slice (compiled ahead of time from this CPU machine); "on" / "off" force it; anything else
    is refused naming the key."""
    from mappa_jax.compile import target_devices
    from mappa_jax.parallel import make_mesh
    cpu, tpu = make_mesh(devices=jax.devices()[:1]), make_mesh(devices=target_devices("v5e-8"))
    assert train_unrolls_layers("auto", cpu) and not train_unrolls_layers("auto", tpu)
    assert train_unrolls_layers("on", tpu) and not train_unrolls_layers("off", cpu)
    config = config_from_file(CONFIGS[0].parent / "tiny.py")
    plan = plan_run(config, jax.devices()[:1])
    assert nnx.merge(plan.updater.graphdef, abstract_model(plan.model)[1]).cfg.unroll_layers
    assert not nnx.merge(plan.sampler.graphdef, abstract_model(plan.model)[1]).cfg.unroll_layers  # prefill: no gain
    config.model.train_unroll_layers = "yes"
    with pytest.raises(ConfigError, match="model.train_unroll_layers"):
        validate(config)
