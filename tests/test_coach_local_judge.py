"""SamplerJudge: our decoder through our sampler as the coach's local judge.

A tiny random decoder checks batching, result routing and that the event loop keeps running; the
real SmolLM2-135M-Instruct judges three requests end to end through make_coach / CoachClient.
"""
import asyncio
import time

import pytest
from flax import nnx

from mappa_jax.coach import FALLBACK_REASONS, CoachConfigError, CoachRequest, coach_config, make_coach
from mappa_jax.coach.sampler_judge import SamplerJudge
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder
from mappa_jax.sampling import Sampler, SamplerConfig


@pytest.fixture(scope="module")
def tiny_judge(smollm2):
    """A real decoder with random weights over SmolLM2's vocabulary and chat template."""
    tokenizer = smollm2[2]
    cfg = ModelConfig.tiny("llama", vocab_size=len(tokenizer), max_position_embeddings=1024,
                           eos_token_ids=(tokenizer.eos_token_id,))
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    sampler = Sampler(cfg, SamplerConfig(batch_buckets=(4,), prompt_buckets=(64,),
                                         generation_buckets=(16,)), tokenizer=tokenizer)
    judge = SamplerJudge(sampler, state, tokenizer, max_new_tokens=12, batch_window_s=0.02)
    yield judge
    judge.close()


def _chat(question):
    return [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": question}]


def test_concurrent_requests_share_one_sampler_call_and_get_their_own_answer(tiny_judge, monkeypatch):
    judge = tiny_judge
    questions = ["Is 2 + 2 = 4?", "Score this proof of the Pythagorean theorem.", "Hi"]
    ticks, sampling = [], []
    real_generate = judge.sampler.generate

    def timed_generate(*args, **kwargs):  # when the worker thread was inside the sampler
        start = time.perf_counter()
        out = real_generate(*args, **kwargs)
        sampling.append((start, time.perf_counter()))
        return out
    monkeypatch.setattr(judge.sampler, "generate", timed_generate)

    async def ticker(stop):
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    async def go():
        stop = asyncio.Event()
        tick_task = asyncio.create_task(ticker(stop))
        answers = await asyncio.gather(*(judge.generate_messages(_chat(q)) for q in questions))
        stop.set()
        await tick_task
        return answers

    before = len(judge.batch_sizes)
    answers = asyncio.run(go())
    monkeypatch.undo()
    assert judge.batch_sizes[before:] == [3] and len(sampling) == 1
    # The event loop kept ticking while the worker thread compiled and sampled (a call blocking the
    # loop would leave no tick inside that interval).
    start, end = sampling[0]
    assert sum(start < t < end for t in ticks) >= 3
    # Each request gets the greedy decode of its own chat-templated prompt, as if sampled alone.
    for question, answer in zip(questions, answers):
        ids = judge.encode_messages(_chat(question))
        assert judge.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a judge.")
        alone = judge.sampler.generate(judge.params, [ids], max_new_tokens=12, temperature=0.0)
        assert answer == judge.tokenizer.decode(alone.sequences()[0], skip_special_tokens=True)
        assert (answer.tokens_in, answer.tokens_out) == (len(ids), int(alone.lengths[0]))


def test_too_long_prompt_is_a_fallback_not_a_crash(tiny_judge):
    config = coach_config()
    config.backend = "local"
    client = make_coach(config, local_generator=tiny_judge)
    before = len(tiny_judge.batch_sizes)
    [verdict] = client.score_all_sync([CoachRequest(
        pipeline="mathchat", task="What is 1 + 1?", role="verifier", role_instructions="Box it.",
        agent_input="x", agent_output=r"\boxed{2}")])
    assert (verdict.status, verdict.fallback_reason) == ("fallback", "backend_error")
    assert "largest prompt bucket (64)" in verdict.reasoning
    assert client.metrics()["calls"] == 1 and len(tiny_judge.batch_sizes) == before  # not retried


def test_bad_local_source_names_the_config_key(tmp_path):
    config = coach_config()
    config.backend = "local"
    config.local.source = str(tmp_path / "missing.gguf")
    with pytest.raises(CoachConfigError, match=r"coach\.local\.source.*missing\.gguf"):
        make_coach(config)
    config.local.source = "smollm2"
    config.local.max_new_tokens = 0
    with pytest.raises(CoachConfigError, match=r"coach\.local\.max_new_tokens"):
        make_coach(config)


def test_smollm2_judge_scores_requests_through_the_coach_client():
    config = coach_config()
    config.backend = "local"  # coach.local.source defaults to "smollm2"
    config.local.max_new_tokens = 16
    config.timeout_s = 600.0  # a busy 2-core machine; the judge is not what is timed here
    client = make_coach(config)
    judge = client.backend.generator
    assert isinstance(judge, SamplerJudge) and judge.max_new_tokens == 16
    requests = [CoachRequest(pipeline="mathchat", task=f"What is {a} + {b}?", role="verifier",
                             role_instructions="State the final answer in \\boxed{}.",
                             agent_input=f"What is {a} + {b}?", agent_output=f"\\boxed{{{a + b}}}",
                             episode_id=str(a))
                for a, b in ((2, 3), (10, 7), (4, 4))]
    verdicts = client.score_all_sync(requests)
    m = client.metrics()
    for verdict in verdicts:
        if verdict.ok:
            assert 0 <= verdict.score <= 10 and verdict.reward == verdict.score / 10
        else:  # SmolLM2-135M rarely keeps the PROCESS_SCORE format: repaired once, then a fallback
            assert verdict.score is None and verdict.reward is None
            assert verdict.fallback_reason in FALLBACK_REASONS
    assert m["requests"] == 3 and m["ok"] + m["fallbacks"] == 3
    assert m["ok"] == sum(v.ok for v in verdicts)
    assert m["retries"] == 0 and m["calls"] == 3 + m["repairs"] == sum(judge.batch_sizes)
    assert judge.batch_sizes[0] == 3  # the three concurrent requests were decoded in one call
    assert m["tokens_in"] > 3 * 400 and 0 < m["tokens_out"] <= 16 * m["calls"]
