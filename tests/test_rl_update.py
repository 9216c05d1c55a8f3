"""The experience builder and the per-agent update on a tiny decoder: padding, logprobs vs the
unpadded model, advantages vs the NumPy REINFORCE++ reference, gradients vs finite differences,
micro-batch invariance, skipped empty steps, LoRA."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, positions_from_mask, token_logprobs
from mappa_jax.models.lora import LoraAdapters
from mappa_jax.parallel import make_mesh
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, batch_bucket, build_experience, sample_counts
from mappa_jax.rl.losses import step_counts
from mappa_jax.rl.pipeline import prepare_experiences, train_step
from mappa_jax.rl.update import PolicyUpdater

from test_rl_math import ref_kl, ref_normalize, ref_returns, ref_token_rewards

CFG = ModelConfig.tiny(vocab_size=32, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
RL = RLConfig(train_batch_size=8, micro_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0,
              total_optimizer_steps=20, kl_coef=0.05)
LENGTHS, ROWS = [12], [16]


def random_samples(seed, n=13):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, g = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        reward = None if i == 4 else float(rng.uniform(0, 1))
        out.append(Sample(rng.integers(3, 32, p).tolist(), rng.integers(3, 32, g).tolist(),
                          (-rng.exponential(2.0, g)).tolist(), reward, i == 7, i % 3))
    return out


@pytest.fixture(scope="module")
def setup():
    graphdef, state = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    updater = PolicyUpdater(graphdef, RL, make_mesh())
    return graphdef, state, updater


def test_builder_layout_masks_and_buckets():
    samples = [Sample([5, 6, 7], [8, 9], [-0.5, -0.25], 0.7, False, 1),
               Sample([5], [10, 11, 2], [-1.0, -2.0, -3.0], None, False, 1),  # coach failed
               Sample([4, 4], [12], [-0.1], 1.0, True, 2)]                     # truncated
    right = build_experience(samples, length_buckets=[4, 8], batch_buckets=[2, 4], pad_id=0)
    assert right.tokens.shape == (4, 8)  # 5 tokens -> bucket 8; 3 rows -> bucket 4
    assert right.tokens[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert right.action_mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert right.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(right.sampler_logprobs[0, 3:5], [-0.5, -0.25])
    assert right.valid.tolist() == [True, False, False, False]
    assert right.group_ids.tolist() == [1, 1, 2, 0]
    assert right.rewards.tolist() == pytest.approx([0.7, 0.0, 1.0, 0.0])
    left = build_experience(samples, length_buckets=[8], batch_buckets=[4], padding_side="left")
    assert left.tokens[0].tolist() == [0, 0, 0, 5, 6, 7, 8, 9]
    assert left.action_mask[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert sample_counts(samples) == {"actions": 3, "trained": 1, "truncated": 1, "reward_missing": 1}
    # Never drops: more samples than the largest bucket -> whole multiples of it.
    assert batch_bucket(9, [2, 4]) == 12 and batch_bucket(3, [2, 4], multiple=8) == 8


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        build_experience([([1] * 5, [2] * 5, [0.0] * 5, 1.0, False)], length_buckets=[8], batch_buckets=[1])
    with pytest.raises(ValueError, match="sample 0: 2 generated ids but 1 sampler_logprobs"):
        build_experience([([1], [2, 3], [0.0], 1.0, False)], length_buckets=[8], batch_buckets=[1])
    with pytest.raises(ValueError, match="rl.advantage_scope='x'"):
        RLConfig(advantage_scope="x")
    with pytest.raises(ValueError, match="rl.train_batch_size=6 is not a multiple of rl.micro_batch_size=4"):
        RLConfig(train_batch_size=6)
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        RLConfig.from_dict({"lr": 1.0})


def test_logprobs_match_unpadded_model_for_both_padding_sides(setup):
    graphdef, state, updater = setup
    # Every action is 8 tokens long in all (prompts of 1..6 tokens), so the reference is one
    # forward pass over the unpadded [n, 8] batch; the experience pads them to 12, right or left.
    rng = np.random.default_rng(0)
    seqs = rng.integers(3, 32, (13, 8))
    samples = [Sample(seq[:1 + i % 6].tolist(), seq[1 + i % 6:].tolist(), [0.0] * (7 - i % 6), 1.0, False)
               for i, seq in enumerate(seqs)]
    model = nnx.merge(graphdef, state)
    tokens = jnp.asarray(seqs, jnp.int32)
    full = jnp.ones(tokens.shape, bool)
    logits, _ = jax.jit(lambda t, m: model(t, positions_from_mask(m), m))(tokens, full)
    want = np.asarray(token_logprobs(logits[:, :-1], tokens[:, 1:]))
    for side in ("right", "left"):
        exp = updater.place(build_experience(samples, length_buckets=LENGTHS, batch_buckets=ROWS, padding_side=side))
        lp = np.asarray(updater.logprobs(state, None, exp))
        for i, s in enumerate(samples):
            got = lp[i][np.asarray(exp.action_mask[i])]
            np.testing.assert_allclose(got, want[i, len(s.prompt_ids) - 1:], atol=2e-5)


@pytest.mark.parametrize("scope", ["agent", "global"])
def test_prepared_advantages_match_numpy_reinforce_pp(setup, scope):
    graphdef, state, updater = setup
    up = updater if scope == RL.advantage_scope else PolicyUpdater(graphdef, RL.replace(advantage_scope=scope), updater.mesh)
    ref_state = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape) * 1.0), state)
    policies = {"a": up.new_full_agent(state, reference=ref_state), "b": up.new_full_agent(state, reference=ref_state)}
    exps = {n: build_experience(random_samples(seed), length_buckets=LENGTHS, batch_buckets=ROWS)
            for n, seed in (("a", 1), ("b", 2))}
    prepared, metrics = prepare_experiences(up, policies, exps)
    returns, masks = [], []
    for name in ("a", "b"):
        e = jax.device_get(prepared[name])
        mask = np.asarray(e.action_mask & e.valid[:, None])
        trainer = np.asarray(up.logprobs(state, None, prepared[name]))
        reference = np.asarray(up.logprobs(ref_state, None, prepared[name]))
        np.testing.assert_allclose(e.old_logprobs, trainer, atol=1e-6)
        np.testing.assert_allclose(e.ref_logprobs, reference, atol=1e-6)
        kl = ref_kl(trainer.astype(np.float64), reference.astype(np.float64), mask, "k1")
        assert np.abs(kl).max() > 1e-3, "the reference differs from the policy"
        rewards = ref_token_rewards(e.rewards.astype(np.float64), kl, mask, RL.kl_coef, RL.reward_clip)
        returns.append(ref_returns(rewards, mask, 1.0))
        masks.append(mask)
        gap = np.abs(trainer - e.sampler_logprobs)[mask].mean()
        assert float(metrics[f"{name}/trainer_sampler_logprob_gap_mean"]) == pytest.approx(gap, rel=1e-5)
    if scope == "global":
        want = ref_normalize(returns, masks, True)
    else:
        want = [ref_normalize([r], [m], True)[0] for r, m in zip(returns, masks)]
    for name, w in zip(("a", "b"), want):
        np.testing.assert_allclose(np.asarray(prepared[name].advantages), w, atol=1e-5)


def _prepared(updater, state, seed, n=13):
    policies = {"a": updater.new_full_agent(state)}
    exp = build_experience(random_samples(seed, n), length_buckets=LENGTHS, batch_buckets=ROWS)
    prepared, _ = prepare_experiences(updater, policies, {"a": exp})
    return policies["a"], prepared["a"]


def test_loss_gradient_matches_finite_differences(setup):
    graphdef, state, updater = setup
    _, exp = _prepared(updater, state, 3)
    # Old logprobs off the current policy, so some tokens sit in the clipped region.
    # The KL enters as a loss term (k3) against a reference that differs from the policy.
    noise = lambda seed: 0.3 * jnp.asarray(np.random.default_rng(seed).normal(size=exp.old_logprobs.shape), jnp.float32)
    batch = exp.replace(old_logprobs=exp.old_logprobs + noise(0), ref_logprobs=exp.ref_logprobs + noise(1))
    counts = step_counts(batch.loss_mask)
    kl_updater = PolicyUpdater(graphdef, RL.replace(kl_mode="loss", kl_estimator="k3", kl_coef=0.5), updater.mesh)
    loss = lambda p: kl_updater._micro_loss(p, None, batch, counts)[0]
    h = 1e-2

    @jax.jit
    def probe(params, direction):
        shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * h * d, params, direction)
        fd = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * h)
        grads = jax.grad(loss)(params)
        return fd, sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))

    rng = np.random.default_rng(1)
    for _ in range(3):
        direction = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), state)
        norm = np.sqrt(sum(np.sum(d * d) for d in jax.tree.leaves(direction)))
        fd, analytic = probe(state, jax.tree.map(lambda d: d / norm, direction))
        assert abs(float(analytic)) > 1e-3
        assert float(fd) == pytest.approx(float(analytic), rel=2e-2, abs=2e-4)


def test_micro_batch_count_does_not_change_the_update(setup):
    graphdef, state, updater = setup
    results = []
    _, exp = _prepared(updater, state, 4)
    for micro in (8, 4, 2):  # 1, 2 and 4 micro-batches per optimizer step
        up = updater if micro == RL.micro_batch_size else PolicyUpdater(
            graphdef, RL.replace(micro_batch_size=micro), updater.mesh)
        new, metrics = up.update(up.new_full_agent(state), exp)
        results.append((jax.device_get(new.state.params), {k: float(v) for k, v in metrics.items()}))
    first_params, first_metrics = results[0]
    assert first_metrics["optimizer_steps"] == 2
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first_params), jax.tree.leaves(state)))
    assert moved > 1e-4, "the update must move the parameters"
    for params, metrics in results[1:]:
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first_params)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for key in ("policy_loss", "grad_norm", "clip_fraction", "entropy", "approx_kl_old_new"):
            assert metrics[key] == pytest.approx(first_metrics[key], rel=1e-4, abs=1e-6), key


def test_optimizer_step_of_padding_rows_is_skipped(setup):
    graphdef, state, updater = setup
    policy, exp = _prepared(updater, state, 5, n=6)  # rows 6..15 are padding: step 2 is empty
    new, metrics = updater.update(policy, exp)
    assert int(new.state.step) == 1 and float(metrics["optimizer_steps"]) == 1
    assert float(metrics["trained_tokens"]) == float(jnp.sum(exp.loss_mask))


def test_lora_trains_only_the_adapter_and_reference_is_the_base(setup):
    graphdef, state, _ = setup
    lora_graphdef, adapters = nnx.split(LoraAdapters(CFG, rank=4, alpha=8.0, rngs=nnx.Rngs(2)))
    up = PolicyUpdater(graphdef, RL, make_mesh(), lora_graphdef=lora_graphdef)
    base = up.place_params(state)
    policies = {"a": up.new_lora_agent(base, adapters), "b": up.new_lora_agent(base, adapters)}
    exps = {n: build_experience(random_samples(s), length_buckets=LENGTHS, batch_buckets=ROWS) for n, s in (("a", 6), ("b", 7))}
    prepared, metrics = prepare_experiences(up, policies, exps)
    # A fresh adapter (B = 0) is exactly the base: zero KL to the reference.
    np.testing.assert_array_equal(np.asarray(prepared["a"].old_logprobs), np.asarray(prepared["a"].ref_logprobs))
    base_before = jax.device_get(base)
    new_a, _ = up.update(policies["a"], prepared["a"])
    new_b, _ = up.update(policies["b"], prepared["b"])
    for x, y in zip(jax.tree.leaves(jax.device_get(base)), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(x, y)  # the shared base is neither trained nor donated
    b_factors = lambda p: np.concatenate([np.ravel(v) for k, v in jax.device_get(p.state.params).flat_state() if str(k[0]).endswith("_b")])
    assert np.abs(b_factors(new_a)).max() > 0 and not np.allclose(b_factors(new_a), b_factors(new_b))
    assert new_a.reference is base and new_b.frozen is base
    after = up.policy_logprobs(new_a, prepared["a"])
    assert float(jnp.max(jnp.abs(after - prepared["a"].ref_logprobs))) > 1e-5


def test_sampler_old_logprobs_skip_the_trainer_pass_and_report_the_first_steps_gap(setup):
    """old_logprobs="sampler": no separate trainer forward; the gap comes from the update's first
    optimizer step (parameters as sampled), equal to |trainer - sampler| over that step's rows. kl_coef
    0: no reference forward either, and the update is the one a zero-weight reference gives."""
    graphdef, state, _ = setup
    cfg = RL.replace(old_logprobs="sampler", kl_coef=0.0)
    up = PolicyUpdater(graphdef, cfg, make_mesh())
    exp = build_experience(random_samples(3), length_buckets=LENGTHS, batch_buckets=ROWS)
    trainer = np.asarray(up.logprobs(state, None, up.place(exp)))
    calls_before = up.compilation_counts()["logprobs"]
    new, metrics = train_step(up, {"a": up.new_full_agent(state)}, {"a": exp})
    assert up.compilation_counts()["logprobs"] == calls_before  # neither trainer nor reference forward ran
    first = np.zeros(exp.batch_size, bool)
    first[:cfg.train_batch_size] = True
    mask = np.asarray(exp.action_mask & exp.valid[:, None]) & first[:, None]
    gap = np.abs(trainer - np.asarray(exp.sampler_logprobs))[mask]
    assert float(metrics["a/trainer_sampler_logprob_gap_mean"]) == pytest.approx(gap.mean(), rel=1e-4)
    assert float(metrics["a/trainer_sampler_logprob_gap_max"]) == pytest.approx(gap.max(), rel=1e-4)
    assert "a/kl_ref" not in metrics and "a/kl_reward" not in metrics
    # Same update as the full pipeline with a reference whose KL weight is zero.
    full = PolicyUpdater(graphdef, cfg.replace(kl_coef=1e-30), make_mesh())
    want, _ = train_step(full, {"a": full.new_full_agent(state)}, {"a": exp})
    for a, b in zip(jax.tree.leaves(new["a"].state.params), jax.tree.leaves(want["a"].state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
