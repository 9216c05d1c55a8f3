"""On-policy logprobs at each agent's temperature: the sampler records log softmax(logits / T) of the
tokens it drew, and the trainer (policy and reference) recomputes the same numbers from each row's
temperature, against an independent full forward pass in float64; one compiled program serves every
temperature; the global rl.temperature is gone with a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, positions_from_mask
from mappa_jax.parallel import make_mesh
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, build_experience
from mappa_jax.rl.pipeline import prepare_experiences, train_step
from mappa_jax.rl.update import PolicyUpdater
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.sampling.sample import next_tokens, row_keys

from test_sampling_core import random_state

CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
BUCKETS = SamplerConfig(batch_buckets=(8,), prompt_buckets=(8,), generation_buckets=(16,))
PROMPTS = [[1, 5, 9, 13], [1, 7, 8, 9, 10, 11], [1, 40], [1, 22, 23]]
NEW_TOKENS = 12
RL = RLConfig(train_batch_size=8, micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.0,
              total_optimizer_steps=4, old_logprobs="sampler")
TEMPERATURES = {"solver": 0.7, "verifier": 1.0}


def _experience(samples):
    # As train.py builds it: the sampler's own buckets, "split" layout.
    return build_experience(samples, batch_buckets=[8], batch_multiple=8, padding_side="split",
                            prompt_buckets=BUCKETS.prompt_buckets, generation_buckets=BUCKETS.generation_buckets)


def _exact_logprobs(state, exp, temperature_of_rows):
    """log softmax(logits / T) of every token, from one dense forward pass, in float64."""
    model = nnx.merge(nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))[0], state)
    tokens, mask = jnp.asarray(exp.tokens), jnp.asarray(exp.attention_mask)
    logits = np.asarray(jax.jit(lambda t, m: model(t, positions_from_mask(m), m)[0])(tokens, mask), np.float64)
    z = logits[:, :-1] / np.asarray(temperature_of_rows, np.float64)[:, None, None]
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    out = np.take_along_axis(logp, np.asarray(exp.tokens)[:, 1:, None], axis=-1)[..., 0]
    return np.pad(out, ((0, 0), (1, 0)))


@pytest.fixture(scope="module")
def rollout():
    """Each agent's samples from the real sampler at its own temperature (no stop tokens: every row
    runs its 12 tokens; marked finished so they all train)."""
    state = random_state(CFG, seed=3, scale=0.3)
    sampler = Sampler(CFG, BUCKETS)
    samples = {}
    for seed, (agent, temperature) in enumerate(TEMPERATURES.items()):
        out = sampler.generate(state, PROMPTS, n=2, max_new_tokens=NEW_TOKENS, temperature=temperature,
                               stop_token_ids=[], seed=seed)
        samples[agent] = [Sample(PROMPTS[r // 2], out.tokens[r, :n].tolist(), out.logprobs[r, :n].tolist(),
                                 1.0 - 0.1 * r, False, r // 2, temperature)
                          for r, n in enumerate(out.lengths)]
    return state, samples


def test_sampler_and_trainer_logprobs_agree_at_each_agents_temperature(rollout):
    state, samples = rollout
    graphdef = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))[0]
    updater = PolicyUpdater(graphdef, RL, make_mesh())
    reference = random_state(CFG, seed=5, scale=0.3)
    policies = {agent: updater.new_full_agent(state, reference=reference) for agent in TEMPERATURES}
    experiences = {agent: _experience(rows) for agent, rows in samples.items()}
    prepared, metrics = prepare_experiences(updater, policies, experiences)
    for agent, temperature in TEMPERATURES.items():
        exp = jax.device_get(prepared[agent])
        mask = np.asarray(exp.loss_mask)
        assert mask.sum() == len(PROMPTS) * 2 * NEW_TOKENS
        rows_t = exp.temperatures
        exact = _exact_logprobs(state, exp, rows_t)
        # The sampler's numbers are the tempered policy's (float error of the cached decode, whose
        # matmuls sum in another order: weights first, sampling.engine.decode_layers) ...
        np.testing.assert_allclose(exp.sampler_logprobs[mask], exact[mask], atol=2e-5, rtol=1e-5)
        # ... and not the untempered one's, which the old sampler recorded (the control).
        untempered = _exact_logprobs(state, exp, np.ones_like(rows_t))
        if temperature != 1.0:
            assert np.abs(untempered - exp.sampler_logprobs)[mask].mean() > 0.05
        # The trainer recomputes them, and the reference is taken at the same temperature.
        trainer = np.asarray(updater.policy_logprobs(policies[agent], prepared[agent]))
        np.testing.assert_allclose(trainer[mask], exact[mask], atol=2e-5)
        np.testing.assert_allclose(exp.ref_logprobs[mask], _exact_logprobs(reference, exp, rows_t)[mask], atol=2e-5)
    # Temperature is data: both agents (and the references) ran one compiled logprob program.
    assert updater.compilation_counts()["logprobs"] == 1

    # With the sampler's logprobs as the behaviour policy, the first PPO ratio is 1 for both agents.
    _, step_metrics = train_step(updater, policies, experiences)
    for agent in TEMPERATURES:
        assert float(step_metrics[f"{agent}/ratio"]) == pytest.approx(1.0, abs=2e-5)
        assert abs(float(step_metrics[f"{agent}/approx_kl_old_new"])) < 2e-5
        # the first step's: float rounding only (1e-5 of a logprob of -3 at most, as above)
        assert float(step_metrics[f"{agent}/trainer_sampler_logprob_gap_max"]) < 5e-5


def test_agents_at_different_temperatures_share_one_experience(rollout):
    """Agents on one policy: their rows land in one batch, each recomputed at its own temperature."""
    state, samples = rollout
    mixed = samples["solver"][:4] + samples["verifier"][:4]
    exp = _experience(mixed)
    np.testing.assert_array_equal(exp.temperatures, np.float32([0.7] * 4 + [1.0] * 4))
    updater = PolicyUpdater(nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))[0], RL, make_mesh())
    trainer = np.asarray(updater.logprobs(state, None, updater.place(exp)))
    mask = np.asarray(exp.loss_mask)
    np.testing.assert_allclose(trainer[mask], exp.sampler_logprobs[mask], atol=2e-5, rtol=1e-5)


def test_greedy_records_the_untempered_policy_and_cannot_train():
    logits = jax.random.normal(jax.random.key(0), (3, 64)) * 3.0
    keys = row_keys(0, jnp.arange(3))
    tokens, logp = next_tokens(logits, keys, 0, jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    want = jax.nn.log_softmax(logits)[jnp.arange(3), tokens]
    np.testing.assert_allclose(logp, want, atol=1e-6)
    # Sampled at 0.5: the logprob of the drawn token under softmax(logits / 0.5), not under softmax(logits).
    tokens, logp = next_tokens(logits, keys, 0, jnp.float32(0.5), jnp.int32(0), jnp.float32(1.0))
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits / 0.5)[jnp.arange(3), tokens], atol=1e-6)
    with pytest.raises(ValueError, match="sample 0: temperature 0.0 .greedy decoding."):
        _experience([Sample([1, 2], [3], [0.0], 1.0, False, 0, 0.0)])


def test_removed_rl_temperature_and_greedy_agents_are_config_errors():
    from mappa_jax.config import ConfigError, base_config, validate
    config = base_config()
    config.rl.temperature = 0.7
    with pytest.raises(ConfigError, match=r"'rl.temperature' was removed: .*topology.agents.<name>.temperature"):
        validate(config)
    with pytest.raises(ValueError, match="rl.temperature is no longer a setting"):
        RLConfig.from_dict({"temperature": 0.7})
    config = base_config()
    config.topology.agents.verifier.temperature = 0.0
    with pytest.raises(ConfigError, match=r"'topology.agents.verifier.temperature' is 0.0: greedy"):
        validate(config)
