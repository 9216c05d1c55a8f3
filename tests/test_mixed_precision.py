"""Mixed precision: float32 master weights and AdamW moments under bfloat16 compute.

At MAPPA's learning rate (1e-6) one AdamW step moves a weight by ~1e-6, far below half a bf16 step
of a weight of size 0.02 (~6e-5). The update here is the real one (PolicyUpdater on a tiny random
llama decoder, ModelConfig.tiny: the architecture `model.source="random:llama"` builds, with a small
vocabulary); a float32 run is the reference and pure bf16 (bf16 parameters and moments) the control.
`python -m pytest tests/test_mixed_precision.py -k one_update -s` prints the measured fractions.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import FLOAT32_PARAMS, Decoder, compute_copy, positions_from_mask
from mappa_jax.models.lora import LoraAdapters, merge_lora
from mappa_jax.models.weights import abstract_model, save_hf
from mappa_jax.parallel import make_mesh
from mappa_jax.parallel import memory_check as mc
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, build_experience
from mappa_jax.rl.pipeline import prepare_experiences
from mappa_jax.rl.update import PolicyUpdater

VOCAB = 256
BASE = ModelConfig.tiny("llama", vocab_size=VOCAB)
PRECISIONS = {"float32": ("float32", "float32"), "mixed": ("float32", "bfloat16"), "bfloat16": ("bfloat16", "bfloat16")}
RL = RLConfig(train_batch_size=8, micro_batch_size=4, learning_rate=1e-6, warmup_ratio=0.0,
              total_optimizer_steps=10, kl_coef=0.0)
LENGTHS, ROWS = [24], [8]


def model_cfg(precision: str) -> ModelConfig:
    param_dtype, dtype = PRECISIONS[precision]
    return BASE.replace(param_dtype=param_dtype, dtype=dtype)


def samples(seed=0, n=8):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, g = int(rng.integers(2, 8)), int(rng.integers(8, 16))
        out.append(Sample(rng.integers(3, VOCAB, p).tolist(), rng.integers(3, VOCAB, g).tolist(),
                          [0.0] * g, float(rng.uniform(0, 1)), False, i % 2))
    return out


def floats(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)).astype(np.float32)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@pytest.fixture(scope="module")
def master():
    """One random initialization (float32), shared by every precision."""
    return nnx.state(Decoder(model_cfg("float32"), rngs=nnx.Rngs(0)))


def one_update(precision: str, master):
    """(params before, params after, the policy after, its reference) of one real update step."""
    cfg = model_cfg(precision)
    graphdef = abstract_model(cfg)[0]
    updater = PolicyUpdater(graphdef, RL, make_mesh())
    params = jax.tree.map(lambda x: x.astype(cfg.jnp_param_dtype), master)
    policy = updater.new_full_agent(params)
    before = floats(params)
    prepared, _ = prepare_experiences(updater, {"a": policy}, {
        "a": build_experience(samples(), length_buckets=LENGTHS, batch_buckets=ROWS)})
    reference = policy.reference
    new, metrics = updater.update(policy, prepared["a"])
    assert float(metrics["optimizer_steps"]) == 1
    return before, floats(new.state.params), new, reference


@pytest.fixture(scope="module")
def updates(master):
    return {precision: one_update(precision, master) for precision in PRECISIONS}


def changed_fraction(before, after) -> float:
    """Of the weights that receive a gradient (every parameter but the embedding, whose rows of
    tokens absent from the batch get none), the fraction one update changed."""
    names = [n for n in before if "embed" not in n]
    return float(sum(np.sum(after[n] != before[n]) for n in names) / sum(before[n].size for n in names))


def test_one_update_at_lr_1e6_moves_fp32_master_weights_as_fp32_does(updates):
    deltas = {p: {n: after[n] - before[n] for n in before} for p, (before, after, _, _) in updates.items()}
    fractions = {p: changed_fraction(before, after) for p, (before, after, _, _) in updates.items()}
    flat = lambda d: np.concatenate([d[n].ravel() for n in sorted(d)])
    reference, mixed = flat(deltas["float32"]), flat(deltas["mixed"])
    relative = float(np.linalg.norm(mixed - reference) / np.linalg.norm(reference))
    cosine = float(mixed @ reference / (np.linalg.norm(mixed) * np.linalg.norm(reference)))
    print(f"\nweights changed by one update at lr 1e-6: float32 {fractions['float32']:.4f}, "
          f"fp32 master + bf16 compute {fractions['mixed']:.4f}, pure bf16 {fractions['bfloat16']:.4f}; "
          f"applied update vs float32's: relative difference {relative:.4f}, cosine {cosine:.4f}")
    # AdamW's first step is ~lr * sign(g) per weight: the applied update is lr-sized in both runs.
    assert np.abs(reference).max() == pytest.approx(1e-6, rel=0.05)
    assert fractions["float32"] > 0.95 and fractions["mixed"] > 0.95
    # bf16 compute perturbs the gradient a little; only weights whose gradient is near zero differ.
    assert relative < 0.2 and cosine > 0.98
    # The control: the same update added in bf16 rounds away for almost every weight.
    assert fractions["bfloat16"] < 0.1


def test_mixed_precision_keeps_master_and_moments_in_float32(updates):
    _, _, policy, reference = updates["mixed"]
    assert {x.dtype for x in jax.tree.leaves(policy.state.params)} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(policy.state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    # The frozen reference is held as the forward pass reads it: bf16, norm scales float32.
    for path, leaf in jax.tree_util.tree_leaves_with_path(reference):
        norm = any(getattr(k, "key", None) in FLOAT32_PARAMS for k in path)
        assert leaf.dtype == (jnp.float32 if norm else jnp.bfloat16), jax.tree_util.keystr(path)
    _, _, bf16_policy, _ = updates["bfloat16"]
    bf16_moments = [x for x in jax.tree.leaves(bf16_policy.state.opt_state) if x.ndim > 0]
    assert {x.dtype for x in bf16_moments} == {jnp.dtype(jnp.bfloat16)}


def test_compute_copy_gives_exactly_the_logits_of_the_master_weights(master):
    cfg = model_cfg("mixed")
    graphdef = abstract_model(cfg)[0]
    lora_graphdef, adapters = nnx.split(LoraAdapters(cfg, 4, 8.0, rngs=nnx.Rngs(1)))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0: the adapters change the logits
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 12)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)

    @jax.jit
    def logits(params, lora):
        model = nnx.merge(graphdef, params)
        return model(tokens, positions_from_mask(mask), mask, lora=nnx.merge(lora_graphdef, lora))[0]

    copy, lora_copy = compute_copy(master, jnp.bfloat16), compute_copy(adapters, jnp.bfloat16)
    assert nbytes(copy) < 0.55 * nbytes(master) and {x.dtype for x in jax.tree.leaves(lora_copy)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(logits(master, adapters)), np.asarray(logits(copy, lora_copy)))
    # In the same dtype nothing is copied (the trainer's float32 runs hand the sampler the state itself).
    assert all(a is b for a, b in zip(jax.tree.leaves(compute_copy(master, jnp.float32)), jax.tree.leaves(master)))


def test_memory_estimate_counts_master_moments_reference_and_sampler_copy(updates, master):
    cfg = model_cfg("mixed")
    _, _, policy, reference = updates["mixed"]
    est = mc.estimate(mc.Workload(cfg, num_agents=3), {"data": 1, "fsdp": 1, "tensor": 1})
    moments = [x for x in jax.tree.leaves(policy.state.opt_state) if x.ndim > 0]
    assert est.terms["weights"] == 3 * nbytes(policy.state.params)         # float32 master
    assert est.terms["optimizer"] == 3 * nbytes(moments)                   # float32 mu and nu
    assert est.terms["reference"] == 3 * nbytes(reference)                 # bf16 compute copy
    assert est.terms["compute_copies"] == 3 * nbytes(compute_copy(policy.state.params, jnp.bfloat16))
    n = cfg.num_params()
    assert est.resident == pytest.approx(3 * n * (4 + 8 + 2 + 2), rel=0.01)
    # LoRA: the shared base is frozen in bf16, each agent's adapters (and moments) in float32.
    lora = mc.estimate(mc.Workload(cfg, num_agents=3, lora_rank=4), {"data": 1, "fsdp": 1, "tensor": 1})
    adapters = nnx.state(LoraAdapters(cfg, 4, 8.0, rngs=nnx.Rngs(0)))
    assert lora.terms["weights"] == nbytes(compute_copy(master, jnp.bfloat16))
    assert lora.terms["adapters"] == 3 * nbytes(adapters) and lora.terms["optimizer"] == 6 * nbytes(adapters)
    assert lora.terms["compute_copies"] == 3 * nbytes(adapters) // 2
    # One dtype: no extra copy.
    assert mc.estimate(mc.Workload(model_cfg("float32")), {"data": 1, "fsdp": 1, "tensor": 1}).terms["compute_copies"] == 0


def test_checkpoint_stores_master_weights_and_resume_continues_bitwise(tmp_path, master):
    from mappa_jax.checkpoint import RunCheckpointer
    cfg = model_cfg("mixed")
    updater = PolicyUpdater(abstract_model(cfg)[0], RL, make_mesh())
    exp = build_experience(samples(1), length_buckets=LENGTHS, batch_buckets=ROWS)

    def step(policy):
        prepared, _ = prepare_experiences(updater, {"a": policy}, {"a": exp})
        return updater.update(policy, prepared["a"])[0]

    policy = step(updater.new_full_agent(master))
    checkpointer = RunCheckpointer(tmp_path / "ckpt", keep=1)
    checkpointer.save(1, {"a": policy.state}, {"step": 1})
    fresh = updater.new_full_agent(master)  # a restarted run: same init, then the restore
    restored, _ = checkpointer.restore(1, {"a": fresh.state})
    checkpointer.close()
    saved, loaded = floats(policy.state), floats(restored["a"])
    assert all(np.array_equal(saved[n], loaded[n]) for n in saved)
    assert {x.dtype for x in jax.tree.leaves(restored["a"].params)} == {jnp.dtype(jnp.float32)}
    resumed = step(type(fresh)(restored["a"], fresh.frozen, fresh.reference))
    uninterrupted = step(policy)
    a, b = floats(uninterrupted.state), floats(resumed.state)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_export_writes_the_configured_dtype(tmp_path, master):
    from safetensors import safe_open
    cfg = model_cfg("mixed")
    out = save_hf(cfg, master, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        norm = f.get_tensor("model.norm.weight")
    assert q.dtype == jnp.bfloat16 and norm.dtype == jnp.bfloat16
    np.testing.assert_array_equal(q, np.asarray(master["q_proj"][...][1].T.astype(jnp.bfloat16)))
    # LoRA merged onto a bf16 base in float32, so a float32 export keeps the adapters' full delta.
    adapters = LoraAdapters(cfg, 4, 8.0, rngs=nnx.Rngs(1))
    adapters.q_proj_b[...] = jnp.full(adapters.q_proj_b.shape, 1e-3, jnp.float32)
    base = compute_copy(master, jnp.bfloat16)
    merged = merge_lora(cfg, base, adapters, "float32")
    delta = adapters.scale * jnp.einsum("lir,lro->lio", adapters.q_proj_a[...], adapters.q_proj_b[...])
    np.testing.assert_allclose(np.asarray(merged["q_proj"][...]),
                               np.asarray(base["q_proj"][...].astype(jnp.float32) + delta), rtol=1e-6)


def test_trainer_samples_from_the_compute_copy_and_exports_the_export_dtype(tmp_path):
    """configs/tiny.py as full finetuning under bf16 compute, in process: one real step (rollout,
    update), then the sampler's weights, the master copy and the HF export."""
    import pathlib

    from safetensors import safe_open

    from mappa_jax.config import config_from_file
    from mappa_jax.train import Trainer
    config = config_from_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    config.workdir = str(tmp_path / "run")
    config.policy.mode = "full"
    config.model.param_dtype, config.model.dtype = "float32", "bfloat16"
    config.train.export_hf, config.train.export_dtype = True, "bfloat16"
    config.logging.tensorboard = False
    trainer = Trainer(config)
    try:
        before = {name: floats(p.state.params) for name, p in trainer.policies.items()}
        metrics = trainer.train_one_step()
        for name, policy in trainer.policies.items():
            assert {x.dtype for x in jax.tree.leaves(policy.state.params)} == {jnp.dtype(jnp.float32)}
            sampled = trainer.policy.weights[name].params
            assert {str(x.dtype) for x in jax.tree.leaves(sampled)} == {"bfloat16", "float32"}
            want = compute_copy(policy.state.params, jnp.bfloat16)  # cast from the updated master
            for a, b in zip(jax.tree.leaves(sampled), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            if metrics.get(f"actions/{name}/trained", 0):
                after = floats(policy.state.params)
                assert any(not np.array_equal(after[n], before[name][n]) for n in after), name
        print(f"\ntiny full finetuning, bf16 compute: trainer/sampler logprob gap "
              f"{ {k: round(v, 4) for k, v in metrics.items() if 'logprob_gap_mean' in k} }")
        trainer.metrics.write(1, metrics)
        trainer._write_outputs({})
        name = next(iter(trainer.policies))
        export = pathlib.Path(config.workdir) / "exports" / name
        assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
        with safe_open(str(export / "model.safetensors"), framework="numpy") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {jnp.dtype(jnp.bfloat16)}
    finally:
        trainer.close()


def test_lora_trains_float32_adapters_over_a_bf16_base(master):
    cfg = model_cfg("mixed")
    lora_graphdef, adapters = nnx.split(LoraAdapters(cfg, 4, 8.0, rngs=nnx.Rngs(1)))
    updater = PolicyUpdater(abstract_model(cfg)[0], RL, make_mesh(), lora_graphdef=lora_graphdef)
    base = updater.place_params(compute_copy(master, jnp.bfloat16))  # as Trainer loads it (frozen)
    base_before = floats(base)
    policy = updater.new_lora_agent(base, adapters)
    prepared, _ = prepare_experiences(updater, {"a": policy}, {
        "a": build_experience(samples(), length_buckets=LENGTHS, batch_buckets=ROWS)})
    new, _ = updater.update(policy, prepared["a"])
    assert {x.dtype for x in jax.tree.leaves(new.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new.state.opt_state) if x.ndim > 0} == {jnp.dtype(jnp.float32)}
    b = {n: v for n, v in floats(new.state.params).items() if "_b'" in n}
    assert b and all(np.abs(v).max() == pytest.approx(1e-6, rel=0.05) for v in b.values())  # one lr-sized step from 0
    after = floats(base)
    assert all(np.array_equal(after[n], base_before[n]) for n in after)  # the shared base is frozen


@pytest.mark.parametrize("dtype,out_dtype", [("bfloat16", "float32"), ("bfloat16", None), ("float32", None)])
def test_decoder_matmul_backward_equals_autodiff_of_dot(dtype, out_dtype):
    """The decoder's `matmul` (a hand-written backward pass) against autodiff of jnp.dot: the same
    gradients in the inputs' dtypes, with bf16 inputs and float32 outputs (the logits head) too."""
    from mappa_jax.models.decoder import matmul
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 3, 16)).astype(dtype)
    w = jax.random.normal(keys[1], (16, 8)).astype(dtype)
    cotangent = jax.random.normal(keys[2], (2, 3, 8))
    out = None if out_dtype is None else jnp.dtype(out_dtype)
    ours = jax.grad(lambda x, w: jnp.sum(matmul(x, w, out).astype(jnp.float32) * cotangent), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w, preferred_element_type=out).astype(jnp.float32)
                                          * cotangent), (0, 1))(x, w)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        tol = 1e-2 if dtype == "bfloat16" else 1e-5
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
