"""The sampler against independent references: transformers' PyTorch greedy decoding, a full forward
pass's logprobs, and the exact filtered sampling distribution (chi-square)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

from mappa_jax.models import weights
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import WEIGHTS_FIRST_MAX_ROWS, Decoder, positions_from_mask, token_logprobs
from mappa_jax.models.lora import LoraAdapters
from mappa_jax.sampling import Sampler, SamplerConfig

# One bucket per dimension: every call below (different lengths, n, settings) reuses one program.
BUCKETS = SamplerConfig(batch_buckets=(8,), prompt_buckets=(16,), generation_buckets=(16,))
PROMPTS = [[1, 5, 9, 13], [1, 7, 8, 9, 10, 11, 12, 3, 4, 5], [1, 100]]

_compiles = {"count": 0, "on": False}


def _on_event(event, duration, **kwargs):
    if _compiles["on"] and event == "/jax/core/compile/backend_compile_duration":
        _compiles["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def random_state(cfg, seed=0, scale=0.1):
    """Every parameter random (norm scales too), larger than init so the logits are far from uniform."""
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, leaves)


def letter_pieces(vocab_size):
    return [bytes([97 + i % 26]) for i in range(vocab_size)]  # token i spells one letter


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny("qwen2")
    return cfg, random_state(cfg), Sampler(cfg, BUCKETS, token_pieces=letter_pieces(cfg.vocab_size))


@jax.jit
def _sequence_logprobs(state, lora_state, tokens, mask):
    model = nnx.merge(_GRAPHDEF, state)
    lora = None if lora_state is None else nnx.merge(_LORA_GRAPHDEF, lora_state)
    logits, _ = model(tokens, positions_from_mask(mask), mask, lora=lora)
    return token_logprobs(logits[:, :-1], tokens[:, 1:])


_GRAPHDEF = weights.abstract_model(ModelConfig.tiny("qwen2"))[0]
_LORA_GRAPHDEF = None


def full_logprobs(cfg, state, prompt, generated, lora=None):
    """Logprobs of `generated` from one forward pass over prompt + generated (right-padded to 48)."""
    global _LORA_GRAPHDEF
    seq = np.zeros((1, 48), np.int32)
    seq[0, :len(prompt) + len(generated)] = prompt + generated
    mask = np.ones_like(seq, bool)  # right padding cannot affect earlier positions (causal)
    lora_state = None
    if lora is not None:
        _LORA_GRAPHDEF, lora_state = nnx.split(lora)
    lp = _sequence_logprobs(state, lora_state, seq, mask)[0]
    return np.asarray(lp[len(prompt) - 1:len(prompt) - 1 + len(generated)])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_transformers(family):
    cfg = ModelConfig.tiny(family, tie_word_embeddings=family == "qwen3")
    state = random_state(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict()), dtype=torch.float32).eval()
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.hf_tensors(cfg, state).items()}, strict=False)
    out = Sampler(cfg, BUCKETS).generate(state, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    for prompt, ours in zip(PROMPTS, out.sequences()):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, min_new_tokens=12, eos_token_id=None,
                                 pad_token_id=0)
        assert ours == theirs[0, len(prompt):].tolist()
    assert out.truncated.all() and (out.lengths == 12).all()


def test_logprobs_match_full_forward(tiny):
    cfg, state, sampler = tiny
    out = sampler.generate(state, PROMPTS, n=2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    for row, seq in enumerate(out.sequences()):
        expected = full_logprobs(cfg, state, PROMPTS[row // 2], seq)
        np.testing.assert_allclose(out.logprobs[row, :len(seq)], expected, atol=1e-4)
        assert (out.logprobs[row, len(seq):] == 0).all()


def test_lora_adapters_change_the_policy_and_logprobs_follow(tiny):
    cfg, state, sampler = tiny
    lora = LoraAdapters(cfg, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), rngs=nnx.Rngs(3))
    for name in lora.targets:  # B starts at zero; make the adapter do something
        b = getattr(lora, f"{name}_b")
        b[...] = 0.5 * jax.random.normal(jax.random.key(len(name)), b.shape)
    base = sampler.generate(state, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    adapted = sampler.generate(state, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[], lora=lora)
    assert base.sequences() != adapted.sequences()
    as_pair = sampler.generate(state, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[],
                               lora=nnx.split(lora))
    assert as_pair.sequences() == adapted.sequences()
    for row, seq in enumerate(adapted.sequences()):
        np.testing.assert_allclose(adapted.logprobs[row, :len(seq)],
                                   full_logprobs(cfg, state, PROMPTS[row], seq, lora=lora), atol=1e-4)


def _filtered_distribution(logits, temperature, top_k, top_p):
    """NumPy reference: softmax(logits / T), keep the top-k, then the smallest nucleus of mass >= p."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    probs = np.exp(z[order] - z.max())
    if top_k > 0:
        probs[top_k:] = 0
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    keep[order[(mass_before < top_p) & (probs > 0)]] = True
    out = np.where(keep, np.exp(z - z.max()), 0.0)
    return out / out.sum()


@pytest.fixture(scope="module")
def wide_sampler(tiny):
    return Sampler(tiny[0], SamplerConfig(batch_buckets=(8, 2048), prompt_buckets=(8,), generation_buckets=(1,)))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.8), (1.3, 6, 1.0), (1.0, 0, 1.0)])
def test_sampling_frequencies_match_filtered_distribution(tiny, wide_sampler, temperature, top_k, top_p):
    cfg, state, _ = tiny
    sampler = wide_sampler
    prompt = [1, 5, 9, 13]
    out = sampler.generate(state, [prompt] * 8, n=256, max_new_tokens=1, temperature=temperature,
                           top_k=top_k, top_p=top_p, stop_token_ids=[], seed=11)
    model = nnx.merge(weights.abstract_model(cfg)[0], state)
    mask = jnp.ones((1, 4), bool)
    logits, _ = model(jnp.asarray([prompt]), positions_from_mask(mask), mask)
    expected = _filtered_distribution(np.asarray(logits[0, -1], np.float64), temperature, top_k, top_p)
    counts = np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k / nucleus"
    support = expected > 0
    if top_p < 1 or top_k > 0:
        assert support.sum() < cfg.vocab_size // 2  # the filter really removed most tokens
    # Pool the rarest tokens so every chi-square cell expects >= 5 samples.
    exp_counts = expected[support] * counts.sum()
    obs = counts[support]
    order = np.argsort(exp_counts)
    exp_sorted, obs_sorted = exp_counts[order], obs[order]
    small = np.cumsum(exp_sorted) < 5 * 4
    cells_exp, cells_obs = exp_sorted[~small], obs_sorted[~small]
    if small.any():
        cells_exp = np.append(cells_exp, exp_sorted[small].sum())
        cells_obs = np.append(cells_obs, obs_sorted[small].sum())
    _, p_value = scipy.stats.chisquare(cells_obs, cells_exp)
    assert p_value > 1e-3, (p_value, cells_obs, cells_exp)


def test_seeded_reproducible_and_independent_of_batch(tiny):
    cfg, state, sampler = tiny
    kw = dict(n=2, max_new_tokens=12, temperature=1.0, stop_token_ids=[])
    a = sampler.generate(state, PROMPTS, seed=5, **kw)
    b = sampler.generate(state, PROMPTS, seed=5, **kw)
    c = sampler.generate(state, PROMPTS, seed=6, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens[0] != a.tokens[1]).any(), "the n samples of one prompt must differ"
    alone = sampler.generate(state, PROMPTS[:1], seed=5, **kw)  # other rows and batch bucket differ
    np.testing.assert_array_equal(alone.tokens, a.tokens[:2])


def test_n_samples_share_prefill_and_padding_does_not_matter(tiny):
    cfg, state, sampler = tiny
    grouped = sampler.generate(state, PROMPTS, n=3, max_new_tokens=9, temperature=0.0, stop_token_ids=[])
    for i, prompt in enumerate(PROMPTS):
        alone = sampler.generate(state, [prompt], max_new_tokens=9, temperature=0.0, stop_token_ids=[])
        for j in range(3):
            assert grouped.sequences()[3 * i + j] == alone.sequences()[0]


def test_long_prompts_prefill_blockwise_with_the_same_result(tiny):
    """Prompt buckets over sampler.prefill_block_size prefill with query- and key-blocked attention
    (linear memory in the prompt): the same greedy tokens and logprobs as the dense prefill."""
    cfg, state, dense = tiny
    assert dense.config.prefill_block_size >= 16  # the fixture's 16-token bucket prefills dense
    blocked = Sampler(cfg, dataclasses.replace(BUCKETS, prefill_block_size=6))  # 16 = 3 blocks (2 filler)
    for n in (1, 2):
        ref = dense.generate(state, PROMPTS, n=n, max_new_tokens=9, temperature=0.0, stop_token_ids=[])
        got = blocked.generate(state, PROMPTS, n=n, max_new_tokens=9, temperature=0.0, stop_token_ids=[])
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    # What it buys: the compiled prefill's scratch memory at a 1024-token prompt.
    temp = {}
    for name, block in (("dense", 0), ("blockwise", 128)):
        sampler = Sampler(cfg, SamplerConfig(batch_buckets=(4,), prompt_buckets=(1024,), generation_buckets=(16,),
                                             prefill_block_size=block))
        prefill = sampler._programs_for(None)[0]
        tokens = jax.ShapeDtypeStruct((4, 1024), jnp.int32)
        lowered = prefill.lower(state, None, tokens, jax.ShapeDtypeStruct((4, 1024), bool),
                                jax.ShapeDtypeStruct((4,), jnp.int32), generation_slots=16)
        temp[name] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp["blockwise"] * 4 <= temp["dense"], temp


def test_stops_on_tokens_and_strings_and_exits_early(tiny):
    cfg, state, sampler = tiny
    pieces = letter_pieces(cfg.vocab_size)
    free = sampler.generate(state, PROMPTS, max_new_tokens=16, temperature=0.0, stop_token_ids=[])
    seq0 = free.sequences()[0]
    # EOS-like stop id: the row stops on (and includes) its first occurrence.
    stop_id = seq0[5]
    out = sampler.generate(state, PROMPTS, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop_id])
    assert out.sequences()[0] == seq0[:seq0.index(stop_id) + 1]
    assert not out.truncated[0]
    assert (out.tokens[0, out.lengths[0]:] == 0).all()
    # A stop string spanning two tokens; a two-part pattern needs its opener first.
    text = "".join(chr(p[0]) for p in (pieces[t] for t in seq0))
    target = text[6:8]
    first = text.find(target)
    two_part = (text[2], text[9])
    expect_two = text.find(two_part[1], text.find(two_part[0]) + 1)
    out = sampler.generate(state, PROMPTS, max_new_tokens=16, temperature=0.0, stop_token_ids=[],
                           stop_strings=[target])
    assert out.sequences()[0] == seq0[:first + 2] and not out.truncated[0]
    out = sampler.generate(state, PROMPTS[:1], max_new_tokens=16, temperature=0.0, stop_token_ids=[],
                           stop_strings=[two_part])
    assert out.sequences()[0] == seq0[:expect_two + 1]
    # Every row stopping early ends the loop early.
    out = sampler.generate(state, PROMPTS, max_new_tokens=16, temperature=0.0,
                           stop_token_ids=[s[1] for s in free.sequences()])
    assert out.decode_steps <= 2 and (out.lengths <= 2).all()
    assert free.decode_steps == 16 and free.truncated.all()


def test_multi_turn_continuation_matches_one_long_generation(tiny):
    cfg, state, sampler = tiny
    first = sampler.generate(state, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    followups = [p + s[:5] + [42] for p, s in zip(PROMPTS, first.sequences())]  # + a "tool" token
    second = sampler.generate(state, followups, max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    for prompt, seq in zip(followups, second.sequences()):
        model_lp = full_logprobs(cfg, state, prompt, seq)
        np.testing.assert_allclose(second.logprobs[followups.index(prompt), :len(seq)], model_lp, atol=1e-4)
    resumed = sampler.generate(state, [p + s[:5] for p, s in zip(PROMPTS, first.sequences())],
                               max_new_tokens=7, temperature=0.0, stop_token_ids=[])
    assert [s[5:] for s in first.sequences()] == resumed.sequences()


def test_no_recompilation_across_lengths_settings_and_agents(tiny):
    cfg, state, sampler = tiny
    other_agent = random_state(cfg, seed=7)
    lora = LoraAdapters(cfg, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
    other_lora = LoraAdapters(cfg, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    sampler.generate(state, [[1, 2, 3]], n=2, max_new_tokens=5)  # warm-up: one bucket each
    sampler.generate(state, [[1, 2, 3]], n=2, max_new_tokens=5, lora=lora)
    warm = sampler.num_compiled()
    _compiles["count"], _compiles["on"] = 0, True
    try:
        sampler.generate(state, [[1, 2, 3, 4, 5, 6, 7]], n=2, max_new_tokens=8, temperature=0.3, top_p=0.5, seed=1)
        sampler.generate(other_agent, [[9, 8]], n=2, max_new_tokens=3, temperature=0.0, stop_strings=["ab"])
        sampler.generate(other_agent, [[9, 8], [4]], n=1, max_new_tokens=6, top_k=3, stop_token_ids=[5, 6, 7])
        sampler.generate(state, [[5]], n=2, max_new_tokens=7, lora=other_lora, stop_strings=[("a", "bc")])
    finally:
        _compiles["on"] = False
    assert _compiles["count"] == 0
    assert sampler.num_compiled() == warm


def test_bad_input_names_the_problem(tiny):
    cfg, state, sampler = tiny
    with pytest.raises(ValueError, match="prompt_buckets"):
        sampler.generate(state, [[1] * 17], max_new_tokens=2)
    with pytest.raises(ValueError, match="generation_buckets"):
        sampler.generate(state, [[1]], max_new_tokens=17)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(state, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        Sampler(cfg, BUCKETS).generate(state, [[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="batch_buckets"):
        sampler.generate(state, [[1]], n=9, max_new_tokens=2)


def test_rows_that_stop_early_are_dropped_with_the_same_tokens(tiny):
    """With compact_rows, the loop continues in smaller batch buckets as rows stop; the tokens,
    logprobs and stop flags equal one loop over every row, and the rows x steps computed follow
    the schedule that the stopping steps imply (a NumPy reference of it)."""
    cfg, state, _ = tiny
    buckets = dict(batch_buckets=(2, 4, 8), prompt_buckets=(16,), generation_buckets=(16,))
    compacting = Sampler(cfg, SamplerConfig(**buckets))
    whole = Sampler(cfg, SamplerConfig(compact_rows=False, **buckets))
    prompts = PROMPTS + [[1, 2, 3], [4, 5, 6, 7], [9]]  # 6 prompts x 1, plus 2 filler rows in bucket 8
    budget = 16
    # Frequent stop tokens: rows stop at different steps, some never.
    kw = dict(max_new_tokens=budget, temperature=1.0, seed=11, stop_token_ids=list(range(3, cfg.vocab_size, 9)))
    got, ref = compacting.generate(state, prompts, **kw), whole.generate(state, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)  # other batch shapes: other sum orders
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    np.testing.assert_array_equal(got.truncated, ref.truncated)
    assert len(set(ref.lengths.tolist())) >= 3, ref.lengths  # the seed gives a spread of stopping steps
    # Reference schedule: a row runs until the iteration where it stops (its length) or the end.
    finish = np.where(ref.truncated, budget, ref.lengths)
    rows, steps, expected = 8, 0, 0
    while steps < budget and (finish > steps).any():
        smaller = [b for b in buckets["batch_buckets"] if b < rows]
        limit = smaller[-1] if smaller else 0
        end = steps
        while end < budget and (finish > end).sum() > limit:
            end += 1
        expected += rows * (end - steps)
        steps = end
        if smaller:
            rows = min(b for b in buckets["batch_buckets"] if b >= max((finish > steps).sum(), 1))
    assert got.decode_row_steps == expected
    assert ref.decode_row_steps == 8 * ref.decode_steps > expected
    assert got.decode_steps == ref.decode_steps


def test_stacked_and_unstacked_decode_weights_sample_the_same(tiny):
    """sampler.decode_weights only changes where each layer's weights are sliced out of the stack
    (once per decode call, or inside the loop at every token): same tokens and logprobs, with and
    without LoRA adapters (sliced the same way)."""
    cfg, state, sampler = tiny
    assert sampler.unstacks_weights  # "auto" on CPU
    stacked = Sampler(cfg, dataclasses.replace(sampler.config, decode_weights="stacked"))
    assert not stacked.unstacks_weights
    lora = LoraAdapters(cfg, rank=4, alpha=8.0, targets=("k_proj", "up_proj"), rngs=nnx.Rngs(5))
    for name in lora.targets:
        b = getattr(lora, f"{name}_b")
        b[...] = 0.5 * jax.random.normal(jax.random.key(len(name)), b.shape)
    for adapters in (None, lora):
        kw = dict(max_new_tokens=12, temperature=1.0, seed=3, stop_token_ids=[], lora=adapters)
        got, ref = sampler.generate(state, PROMPTS, **kw), stacked.generate(state, PROMPTS, **kw)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        # Two XLA programs sum in different orders: a few float32 ulps apart (1.4e-6 seen on AVX-512).
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="decode_weights"):
        SamplerConfig(decode_weights="per_layer")


def test_decode_weights_layout_switch_at_the_weights_first_cut(tiny):
    """Decode calls of more than WEIGHTS_FIRST_MAX_ROWS rows read the layer copies as stored, smaller
    ones read them transposed (weights-first matmuls): a 128-row call whose rows stop and compact
    below the cut changes layout mid-generation and samples what the stacked decode samples."""
    cfg, state, _ = tiny
    buckets = dict(batch_buckets=(16, 32, WEIGHTS_FIRST_MAX_ROWS, 128), prompt_buckets=(16,),
                   generation_buckets=(16,))
    unstacked = Sampler(cfg, SamplerConfig(**buckets))
    stacked = Sampler(cfg, SamplerConfig(decode_weights="stacked", **buckets))
    assert unstacked.unstacks_weights and not stacked.unstacks_weights
    made = []
    decode_layers = unstacked.programs().decode_layers
    unstacked._programs[None] = unstacked._programs[None]._replace(
        decode_layers=lambda *a, **kw: made.append(kw["weights_first"]) or decode_layers(*a, **kw))
    kw = dict(n=30, max_new_tokens=16, temperature=1.0, seed=5, stop_token_ids=list(range(3, cfg.vocab_size, 7)))
    got, ref = unstacked.generate(state, PROMPTS, **kw), stacked.generate(state, PROMPTS, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    assert made == [False, True], made  # 90 rows in bucket 128 as stored, then transposed (made once)
