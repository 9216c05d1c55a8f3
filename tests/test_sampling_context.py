"""An agent's next turn from the KV cache its last turn kept (Sampler.generate keep_context /
context, sampler.reuse_context): the same tokens and logprobs as prefilling the whole prompt, only
the new tokens prefilled, the cache freed once used, and no reuse where it would be wrong."""
import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder
from mappa_jax.parallel import memory_check
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.workflows.sampler_policy import PolicyWeights, SamplerPolicy

PROMPTS = [[1, 5, 9, 13], [1, 7, 8, 9, 10, 11, 12, 3, 4, 5], [1, 100]]
# Small batch buckets, so rows stopping at the stop tokens below compact (and their kept cache rows
# are written back from the smaller buckets).
BUCKETS = dict(batch_buckets=(2, 4, 8), prompt_buckets=(16, 32, 64), generation_buckets=(16,))


def random_state(cfg, seed=0, scale=0.1):
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny("qwen2")
    return cfg, random_state(cfg), Sampler(cfg, SamplerConfig(**BUCKETS))


def stops(cfg):
    return list(range(3, cfg.vocab_size, 7))  # about 1 token in 7 ends a row: rows stop at varied steps


def tool_outputs(count, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 120, size=int(rng.integers(1, 12))).tolist() for _ in range(count)]


def assert_same_samples(got, want):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_turns_from_kept_context_sample_what_full_prefills_sample(tiny):
    cfg, state, sampler = tiny
    kw = dict(max_new_tokens=14, temperature=1.0, stop_token_ids=stops(cfg))
    first = sampler.generate(state, PROMPTS, n=2, seed=3, keep_context=True, **kw)
    assert len(set(first.lengths.tolist())) > 2 and first.decode_row_steps < 8 * first.decode_steps  # compacted
    context = first.context
    assert context.nbytes > 0
    second_prompts = [PROMPTS[r // 2] + s + t for r, (s, t) in enumerate(zip(first.sequences(), tool_outputs(6, 0)))]
    reused = sampler.generate(state, second_prompts, seed=4, keep_context=True, context=context, **kw)
    full = sampler.generate(state, second_prompts, seed=4, **kw)
    assert_same_samples(reused, full)
    assert context.cache is None  # freed by the call that used it
    assert full.prefilled_tokens == sum(map(len, second_prompts))
    assert reused.prefilled_tokens == sum(map(len, tool_outputs(6, 0)))
    # A third turn extends the second's rows, which were themselves extended from kept rows.
    third_prompts = [p + s + t for p, s, t in zip(second_prompts, reused.sequences(), tool_outputs(6, 1))]
    again = sampler.generate(state, third_prompts, seed=5, context=reused.context, **kw)
    assert_same_samples(again, sampler.generate(state, third_prompts, seed=5, **kw))
    assert again.prefilled_tokens == sum(map(len, tool_outputs(6, 1)))
    assert again.context is None  # not asked to keep it


def test_a_turn_compiles_no_new_decode_program(tiny):
    """The extended cache is packed into the prompt bucket a full prefill would use, so the second
    turn's decode reuses the programs a full prefill's decode compiled."""
    cfg, state, sampler = tiny
    kw = dict(max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    first = sampler.generate(state, PROMPTS[:2], keep_context=True, **kw)
    second_prompts = [p + s + [7, 8] for p, s in zip(PROMPTS[:2], first.sequences())]
    sampler.generate(state, second_prompts, **kw)  # full prefill: compiles the decode for this bucket
    decode_programs = sampler.programs().decode._cache_size()
    out = sampler.generate(state, second_prompts, context=first.context, **kw)
    assert out.prefilled_tokens == 4
    assert sampler.programs().decode._cache_size() == decode_programs
    assert sampler.programs().extend._cache_size() >= 1


def test_no_reuse_where_it_would_be_wrong(tiny):
    cfg, state, sampler = tiny
    kw = dict(max_new_tokens=8, temperature=0.0, stop_token_ids=[])

    def kept():
        out = sampler.generate(state, PROMPTS, keep_context=True, **kw)
        return out.context, [p + s + [9] for p, s in zip(PROMPTS, out.sequences())]

    context, follow = kept()
    copied = jax.tree.map(jnp.copy, state)  # the same values, other arrays: the sampler cannot tell
    assert sampler.generate(copied, follow, context=context, **kw).prefilled_tokens == sum(map(len, follow))
    assert context.cache is None  # unused, still freed
    context, follow = kept()
    stranger = follow[:2] + [[1, 2, 3]]  # one prompt extends no kept row
    assert sampler.generate(state, stranger, context=context, **kw).prefilled_tokens == sum(map(len, stranger))
    context, follow = kept()
    assert sampler.generate(state, follow, n=2, context=context, **kw).prefilled_tokens == sum(map(len, follow))
    context, _ = kept()
    assert sampler.generate(state, PROMPTS, context=context, **kw).prefilled_tokens == sum(map(len, PROMPTS))  # not longer


def test_sampler_policy_reuses_its_last_calls_cache(tiny):
    """SamplerPolicy hands a policy's kept cache to its next call (the same samples as without),
    frees it when another policy samples or new weights arrive, and counts the tokens prefilled."""
    cfg, state, sampler = tiny

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    def run(policy, calls):
        async def go():
            results = []
            for name, prompts in calls:
                results.append(await policy.generate(name, prompts, 12, (), 1.0, seed=len(results)))
            return results
        return asyncio.run(go())

    weights = {"a": PolicyWeights(state), "b": PolicyWeights(state)}
    on, off = (SamplerPolicy(sampler, Tokenizer(), weights, reuse_context=r) for r in (True, False))
    first = run(off, [("a", PROMPTS)])[0]
    follow = [p + list(g.token_ids) + [11, 12] for p, g in zip(PROMPTS, first)]
    got = run(on, [("a", PROMPTS), ("a", follow)])
    want = run(off, [("a", PROMPTS), ("a", follow)])
    assert [g.token_ids for g in got[1]] == [g.token_ids for g in want[1]]
    np.testing.assert_allclose(np.concatenate([g.logprobs for g in got[1]]),
                               np.concatenate([g.logprobs for g in want[1]]), atol=1e-4)
    # follow extends each kept row (prompt + generated tokens) by [11, 12]: two tokens a row to prefill.
    asked = sum(map(len, PROMPTS)) + sum(map(len, follow))
    assert on.prompt_tokens == asked and on.prefilled_tokens == sum(map(len, PROMPTS)) + 2 * len(PROMPTS)
    assert off.prefilled_tokens == off.prompt_tokens
    held = on._kept[1]
    on.set_weights("a", state)
    assert on._kept is None and held.cache is None
    run(on, [("a", PROMPTS), ("b", follow)])  # another policy's call: prefills in full, frees a's cache
    assert on.prefilled_tokens == 2 * sum(map(len, PROMPTS)) + 2 * len(PROMPTS) + sum(map(len, follow))
    on.close()
    off.close()
    assert SamplerPolicy(Sampler(cfg, SamplerConfig(**BUCKETS, reuse_context="off")), Tokenizer(), {}).reuse_context is False
    assert SamplerPolicy(sampler, Tokenizer(), {}).reuse_context is (jax.default_backend() == "cpu")


def test_memory_check_counts_the_kept_cache():
    work = memory_check.Workload(model=ModelConfig.tiny("qwen2"), num_agents=3, lora_rank=0, train_micro_batch=2,
                                 train_seq_len=64, rollout_rows=8, rollout_prompt_len=32, rollout_new_tokens=32)
    plain = memory_check.estimate(work, {"data": 1, "fsdp": 1, "tensor": 1})
    kept = memory_check.estimate(work.replace(sampler_keeps_context=True), {"data": 1, "fsdp": 1, "tensor": 1})
    assert plain.terms["kept_context"] == 0 and kept.terms["kept_context"] == plain.terms["kv_cache"] > 0
    assert kept.rollout == plain.rollout + plain.terms["kv_cache"]


def test_bad_reuse_context_value_names_the_key():
    with pytest.raises(ValueError, match="sampler.reuse_context"):
        SamplerConfig(reuse_context="yes")
