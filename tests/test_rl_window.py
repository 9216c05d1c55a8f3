"""The "split" experience layout (prompts left-padded to a prompt bucket, generations right-padded
to a generation bucket) and the trainer's windowed, chunked logprobs: same numbers as the full
forward pass and as the right-padded layout, less compiled memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, positions_from_mask, token_logprobs
from mappa_jax.parallel import make_mesh
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, build_experience
from mappa_jax.rl.pipeline import prepare_experiences
from mappa_jax.rl.update import PolicyUpdater

CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
RL = RLConfig(train_batch_size=4, micro_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0,
              total_optimizer_steps=10, kl_coef=0.05)
PROMPTS, GENERATIONS = (4, 8), (4, 10)  # prompt bucket 8, generation bucket 10 -> T = 18, window 10


def random_samples(seed, n=7):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, g = int(rng.integers(1, 9)), int(rng.integers(1, 11))
        out.append(Sample(rng.integers(3, 64, p).tolist(), rng.integers(3, 64, g).tolist(),
                          (-rng.exponential(2.0, g)).tolist(), None if i == 3 else float(rng.uniform()), False, i % 2))
    return out


@pytest.fixture(scope="module")
def model():
    return nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))


def split_experience(samples, multiple=4):
    return build_experience(samples, batch_buckets=[4, 8], batch_multiple=multiple, padding_side="split",
                            prompt_buckets=PROMPTS, generation_buckets=GENERATIONS)


def test_split_layout():
    samples = [Sample([5, 6, 7], [8, 9], [-0.5, -0.25], 0.7, False), Sample([4], [10, 11, 12, 13, 14], [-1.0] * 5, 1.0, False)]
    exp = build_experience(samples, batch_buckets=[2], padding_side="split", prompt_buckets=(2, 4),
                           generation_buckets=(4, 8))
    assert exp.tokens.shape == (2, 4 + 8) and exp.logprob_start == 4
    assert exp.tokens[0].tolist() == [0, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0]
    assert exp.action_mask[1].tolist() == [0] * 4 + [1] * 5 + [0] * 3
    assert exp.attention_mask[1].tolist() == [0] * 3 + [1] * 6 + [0] * 3
    np.testing.assert_allclose(exp.sampler_logprobs[0, 4:6], [-0.5, -0.25])
    # The window start is static metadata: it is part of the pytree structure, not a leaf.
    assert len(jax.tree.leaves(exp)) == 11
    with pytest.raises(ValueError, match="generation length .generation_buckets.: 9 exceeds"):
        build_experience([([1], [2] * 9, [0.0] * 9, 1.0, False)], batch_buckets=[1], padding_side="split",
                         prompt_buckets=(4,), generation_buckets=(8,))
    with pytest.raises(ValueError, match="needs non-empty prompt_buckets and generation_buckets"):
        build_experience(samples, batch_buckets=[2], padding_side="split", length_buckets=[16])


@pytest.mark.parametrize("chunk", [3, 256])  # 3: the 10-token window runs in 4 chunks, the last padded
def test_windowed_logprobs_equal_full_forward(model, chunk):
    graphdef, state = model
    exp = split_experience(random_samples(0))
    updater = PolicyUpdater(graphdef, RL, make_mesh(), logits_chunk=chunk)
    got = np.asarray(updater.logprobs(state, None, updater.place(exp)))
    # Reference: the whole [B, T, V] logits of the same tokens, log-softmax, shifted by one.
    tokens, mask = jnp.asarray(exp.tokens), jnp.asarray(exp.attention_mask)
    logits, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)
    ref = np.asarray(token_logprobs(logits[:, :-1], tokens[:, 1:]))
    start = exp.logprob_start
    np.testing.assert_allclose(got[:, start:], ref[:, start - 1:], atol=1e-5, rtol=0)
    assert np.all(got[:, :start] == 0.0)


def test_split_update_equals_right_padded_update(model):
    graphdef, state = model
    samples = random_samples(1)
    right = build_experience(samples, length_buckets=[18], batch_buckets=[4, 8], batch_multiple=4)
    split = split_experience(samples)
    results = []
    for exp in (right, split):
        updater = PolicyUpdater(graphdef, RL, make_mesh(), logits_chunk=4)
        policies = {"a": updater.new_full_agent(state)}
        prepared, prep_metrics = prepare_experiences(updater, policies, {"a": exp})
        new, metrics = updater.update(policies["a"], prepared["a"])
        # Per-token arrays in action order (row, generated index): layouts differ only in placement.
        e = prepared["a"]
        per_token = {k: np.asarray(getattr(e, k))[np.asarray(e.loss_mask)] for k in ("old_logprobs", "ref_logprobs", "advantages")}
        results.append((jax.device_get(new.state.params), jax.device_get(metrics), per_token))
    (params_r, metrics_r, tok_r), (params_s, metrics_s, tok_s) = results
    for k in tok_r:
        np.testing.assert_allclose(tok_s[k], tok_r[k], atol=1e-5, rtol=0)
    for k in metrics_r:
        np.testing.assert_allclose(metrics_s[k], metrics_r[k], atol=1e-5, rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(params_r), jax.tree.leaves(params_s)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert float(metrics_r["optimizer_steps"]) == 2.0 and float(metrics_r["trained_tokens"]) > 0


def test_compiled_update_memory_drops_with_the_window():
    """A vocabulary-heavy model, long prompts, short generations. Blockwise attention and remat
    keep the decoder's share small, so the trainer's logits dominate (with dense attention the
    [T, T] scores hide the difference: 123.8 MB right vs 63.6 MB split)."""
    cfg = ModelConfig.tiny(vocab_size=8192, max_position_embeddings=1024, attention_impl="blockwise",
                           attention_block_size=64, remat=True)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    rl = RLConfig(train_batch_size=4, micro_batch_size=4)
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(3, 8192, 200).tolist(), rng.integers(3, 8192, 60).tolist(), [-1.0] * 60, 1.0, False)
               for _ in range(4)]
    right = build_experience(samples, length_buckets=[320], batch_buckets=[4])
    split = build_experience(samples, batch_buckets=[4], padding_side="split", prompt_buckets=[256],
                             generation_buckets=[64])
    sizes = {}
    for name, exp, chunk in (("right, all positions", right, 10**6), ("split window", split, 10**6),
                             ("split window, 16-token chunks", split, 16)):
        updater = PolicyUpdater(graphdef, rl, make_mesh(), logits_chunk=chunk)
        policy = updater.new_full_agent(state)
        sizes[name] = updater.update_memory(policy, exp).temp_size_in_bytes
    print("compiled update temp MB (vocab 8192, blockwise+remat, micro-batch 4, 256 + 64 tokens): "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items()))
    assert sizes["split window"] * 3 <= sizes["right, all positions"]
    assert sizes["split window, 16-token chunks"] < sizes["split window"]
