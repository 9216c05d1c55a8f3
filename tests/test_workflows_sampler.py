"""SamplerPolicy over the real jitted sampler (tiny random decoder with SmolLM2's tokenizer), and 64
MathChat episodes through the runner with real sampling and real sandboxed code execution."""
import asyncio
import re

import numpy as np
import pytest
from flax import nnx

from mappa_jax.data.synthetic import arithmetic_tasks
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.tools import Sandbox, SandboxConfig
from mappa_jax.workflows.chat import ChatFormat
from mappa_jax.workflows.policy import ScriptedPolicy
from mappa_jax.workflows.runner import EpisodeRunner
from mappa_jax.workflows.sampler_policy import (PolicyRouter, PolicyWeights, SamplerPolicy,
                                                group_duplicates)
from mappa_jax.workflows.specs import topology_from_config
from mappa_jax.workflows.topologies import mathchat_config

# Small buckets keep the programs few; the prompts of the MathChat run below fit in them.
BUCKETS = SamplerConfig(batch_buckets=(16, 64), prompt_buckets=(256, 384),
                        generation_buckets=(16,))


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[2]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A real decoder (random weights) over SmolLM2's vocabulary, and its sampler."""
    cfg = ModelConfig.tiny("llama", vocab_size=len(tokenizer), max_position_embeddings=1024,
                           eos_token_ids=(tokenizer.eos_token_id,))
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    return cfg, state, Sampler(cfg, BUCKETS, tokenizer=tokenizer)


def test_group_duplicates():
    a, b, c = [1, 2], [3], [4, 5]
    assert group_duplicates([a, b, a, b]) == ([a, b], 2, [0, 2, 1, 3])
    assert group_duplicates([a, a, b]) == ([a, a, b], 1, [0, 1, 2])  # uneven: no merging
    assert group_duplicates([a, b, c]) == ([a, b, c], 1, [0, 1, 2])


def test_sampler_policy_returns_the_samplers_tokens(tokenizer, tiny):
    _, state, sampler = tiny
    policy = SamplerPolicy(sampler, tokenizer, {"solver": PolicyWeights(state)})
    chat = ChatFormat(tokenizer)
    p1, _ = chat.first_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    p2, _ = chat.first_prompt([{"role": "user", "content": "Name a prime number."}])
    stops = [("```python", "```")]
    for prompts, n in (([p1, p2, p1, p2], 2), ([p1, p2, p2], 1)):
        got = asyncio.run(policy.generate("solver", prompts, 16, stops, 1.0, 7))
        distinct, _, rows = group_duplicates(prompts)
        want = sampler.generate(state, distinct, n=n, max_new_tokens=16, temperature=1.0,
                                stop_strings=stops, seed=7)
        assert policy.last_call_rows == len(distinct) * n
        for gen, row in zip(got, rows):
            length = int(want.lengths[row])
            assert list(gen.token_ids) == want.tokens[row, :length].tolist()
            np.testing.assert_array_equal(gen.logprobs, want.logprobs[row, :length])
            assert gen.truncated == bool(want.truncated[row])
            assert gen.text == tokenizer.decode(list(gen.token_ids), skip_special_tokens=True)
            assert all(lp <= 0.0 for lp in gen.logprobs)
    # Samples of one prompt differ (distinct rows), and a seed reproduces them.
    first = asyncio.run(policy.generate("solver", [p1, p1], 16, stops, 1.0, 3))
    again = asyncio.run(policy.generate("solver", [p1, p1], 16, stops, 1.0, 3))
    assert first == again and first[0].token_ids != first[1].token_ids
    with pytest.raises(KeyError, match="no weights for policy 'verifier'"):
        asyncio.run(policy.generate("verifier", [p1], 16, (), 1.0, 0))
    policy.close()


def test_64_mathchat_episodes_with_sampler_and_sandbox(tokenizer, tiny, tmp_path):
    """Problem Solver and Verifier sample from the real sampler; the Code Executor, which a
    random-weight model cannot play, is scripted so 64 real sandboxed runs happen concurrently."""
    _, state, sampler = tiny
    tasks = arithmetic_tasks(16, seed=11)
    answers = {t.prompt: t.answer for t in tasks}

    def code(text):
        answer = next(a for p, a in answers.items() if p in text)
        return f"```python\nvalue = {answer}\nprint(value)\n```"

    def read_output(text):
        printed = re.findall(r"Output:\n(\S+)", text)[-1]
        return f"\\boxed{{{printed}}}"

    cfg = mathchat_config()
    for agent in ("problem_solver", "verifier"):
        cfg.agents[agent].max_new_tokens = 16
        cfg.agents[agent].policy = "base"  # two agents on one set of weights
    topo = topology_from_config(cfg)
    sampled = SamplerPolicy(sampler, tokenizer, {"base": PolicyWeights(state)})
    scripted = ScriptedPolicy(tokenizer, {"code_executor": [code, read_output]})
    policy = PolicyRouter({"base": sampled, "code_executor": scripted})
    handed = []
    sandbox = Sandbox(SandboxConfig(wall_timeout_s=60))
    runner = EpisodeRunner(topo, policy, ChatFormat(tokenizer), sandbox=sandbox,
                           workspace_root=tmp_path, on_action=handed.append)
    result = asyncio.run(runner.run(tasks, samples_per_task=4, seed=0))
    sampled.close()
    sandbox.close()

    episodes = result.episodes
    assert len(episodes) == 64 and not [e.failure_reason for e in episodes if e.failed]
    for episode in episodes:
        task = next(t for t in tasks if t.task_id == episode.task_id)
        assert [(a.agent, a.turn) for a in episode.actions] == [
            ("problem_solver", 0), ("code_executor", 0), ("code_executor", 1), ("verifier", 0)]
        solver, run, read, verifier = episode.actions
        assert run.tool.stdout == f"{task.answer}\n" and run.tool.exit_code == 0
        assert read.text == f"\\boxed{{{task.answer}}}"
        for action in (solver, verifier):
            assert 1 <= len(action.generated_ids) <= 16
            assert len(action.logprobs) == len(action.generated_ids)
            assert all(lp <= 0.0 for lp in action.logprobs)
        head = run.prompt_ids + run.generated_ids
        assert read.prompt_ids[:len(head)] == head
    # The Problem Solver's 64 prompts are 16 tasks x 4 identical samples: one prefill per task.
    assert len({e.actions[0].prompt_ids for e in episodes}) == 16
    assert len({e.actions[0].generated_ids for e in episodes}) > 16  # the samples differ
    assert len(handed) == 64 * 4
    timings = result.timings
    assert timings.policy_calls == 4 and timings.tool_runs == 64
    assert timings.tool_busy_s > 2 * timings.tool_s  # the 64 runs overlapped
    print("\n64 MathChat episodes:", timings.summary())
