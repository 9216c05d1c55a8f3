"""REINFORCE++ learns: a tiny policy learns to emit a target pattern, and on a two-agent pipeline
per-action rewards reach a target success rate in fewer steps than a shared outcome reward.
Fixed seeds; a minimal jitted categorical sampler lives here (no KV cache: shapes are tiny)."""
import functools

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
from mappa_jax.rl.pipeline import train_step
from mappa_jax.rl.update import PolicyUpdater

CFG = ModelConfig.tiny(vocab_size=16, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
BATCH, LENGTH = 32, 4
RL = RLConfig(train_batch_size=16, micro_batch_size=8, learning_rate=1e-2, warmup_ratio=0.0,
              total_optimizer_steps=200, min_lr_ratio=1.0)


@pytest.fixture(scope="module")
def setup():
    graphdef, state = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    return graphdef, state, PolicyUpdater(graphdef, RL, make_mesh())


@functools.partial(jax.jit, static_argnums=(0, 3))
def sample(graphdef, params, prompts, new_tokens, key):
    """Ancestral sampling at temperature 1: tokens [B, P + new] and the sampled tokens' logprobs."""
    model = nnx.merge(graphdef, params)
    b, p = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)

    def step(i, carry):
        tokens, logprobs, key = carry
        mask = jnp.broadcast_to(jnp.arange(p + new_tokens) < p + i, tokens.shape)
        logits, _ = model(tokens, positions_from_mask(mask), mask)
        logp = jax.nn.log_softmax(logits[:, p + i - 1], axis=-1)
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, logp).astype(jnp.int32)
        tokens = tokens.at[:, p + i].set(nxt)
        logprobs = logprobs.at[:, i].set(jnp.take_along_axis(logp, nxt[:, None], axis=1)[:, 0])
        return tokens, logprobs, key

    tokens, logprobs, _ = jax.lax.fori_loop(0, new_tokens, step, (tokens, jnp.zeros((b, new_tokens)), key))
    return tokens, logprobs


def to_samples(prompts, tokens, logprobs, rewards):
    p = prompts.shape[1]
    return [Sample(prompts[i].tolist(), tokens[i, p:].tolist(), logprobs[i].tolist(), float(rewards[i]), False)
            for i in range(len(rewards))]


def experience(samples):
    return build_experience(samples, length_buckets=[LENGTH], batch_buckets=[BATCH])


def test_policy_learns_a_target_pattern(setup):
    graphdef, state, updater = setup
    target = np.array([5, 9, 5])
    policies = {"solo": updater.new_full_agent(state)}
    prompts = np.ones((BATCH, 1), np.int32)
    key = jax.random.key(0)
    history = []
    for _ in range(12):
        key, sub = jax.random.split(key)
        tokens, logprobs = jax.device_get(sample(graphdef, policies["solo"].state.params, prompts, 3, sub))
        rewards = (tokens[:, 1:] == target).mean(axis=1)
        history.append(rewards.mean())
        policies, metrics = train_step(updater, policies, {"solo": experience(to_samples(prompts, tokens, logprobs, rewards))})
    assert history[0] < 0.2, history
    # Stated margin: mean reward at least 0.5 higher over the last 3 steps than the first step.
    assert np.mean(history[-3:]) >= history[0] + 0.5, history
    assert float(metrics["solo/trainer_sampler_logprob_gap_max"]) < 1e-4  # sampler and trainer agree


def steps_to_target(setup, per_action: bool, target_success=0.5, max_steps=20):
    """Agent A emits one token, agent B (seeing A's token) emits one; the episode succeeds only if A
    emitted 5 and B emitted 9. Per-action rewards score each agent's own action; the shared outcome
    reward gives both agents the episode's success."""
    graphdef, state, updater = setup
    policies = {"A": updater.new_full_agent(state), "B": updater.new_full_agent(state)}
    key = jax.random.key(1)
    prompts_a = np.ones((BATCH, 1), np.int32)
    for step in range(max_steps):
        key, ka, kb = jax.random.split(key, 3)
        tok_a, lp_a = jax.device_get(sample(graphdef, policies["A"].state.params, prompts_a, 1, ka))
        prompts_b = np.concatenate([prompts_a, tok_a[:, 1:]], axis=1)
        tok_b, lp_b = jax.device_get(sample(graphdef, policies["B"].state.params, prompts_b, 1, kb))
        a_ok, b_ok = tok_a[:, 1] == 5, tok_b[:, 2] == 9
        success = (a_ok & b_ok).astype(float)
        if success.mean() >= target_success:
            return step
        r_a, r_b = (a_ok.astype(float), b_ok.astype(float)) if per_action else (success, success)
        policies, _ = train_step(updater, policies, {
            "A": experience(to_samples(prompts_a, tok_a, lp_a, r_a)),
            "B": experience(to_samples(prompts_b, tok_b, lp_b, r_b))})
    return None


def test_per_action_rewards_beat_a_shared_outcome_reward(setup):
    per_action = steps_to_target(setup, per_action=True)
    shared = steps_to_target(setup, per_action=False)
    # Both agents and every step ran one compiled update and one compiled logprob program.
    assert setup[2].compilation_counts() == {"update": 1, "logprobs": 1}
    assert per_action is not None and per_action <= 15, per_action
    assert shared is None or shared > per_action, (per_action, shared)
