"""Reasoning-model turns through the episode runner: chat templates whose generation prompt opens
<think> (Qwen3-Thinking-2507, DeepSeek-R1-Distill), Qwen3's hybrid template with thinking on (the
model opens the block) and off (an empty closed block), with a scripted policy over SmolLM2's
tokenizer plus the reasoning tags, real sandboxed code runs and real workspaces."""
import asyncio
import os

import pytest

from mappa_jax.data.synthetic import arithmetic_tasks
from mappa_jax.sampling.stops import OutsideReasoning
from mappa_jax.tools import Sandbox, SandboxConfig
from mappa_jax.workflows.chat import ChatFormat
from mappa_jax.workflows.policy import ScriptedPolicy
from mappa_jax.workflows.runner import EpisodeRunner
from mappa_jax.workflows.specs import topology_from_config
from mappa_jax.workflows.topologies import END_OF_CODE_BLOCK, mathchat_config
from reasoning_templates import QWEN3_HYBRID, QWEN3_THINKING, R1_DISTILL, reasoning_tokenizer

# Code in the reasoning writes a file; the answer's code prints. Only the latter may run.
REASONING_CODE = "Maybe like this:\n```python\nopen('from_reasoning.txt', 'w').write('ran')\n```\nor not."
ANSWER_CODE = "Here is the check:\n```python\nprint(2 + 2)\n```"


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(SandboxConfig(wall_timeout_s=30))
    yield box
    box.close()


def _run(tokenizer, chat, script, sandbox, tmp_path, max_new_tokens=None):
    config = mathchat_config()
    if max_new_tokens:
        for agent in config.agents.values():
            agent.max_new_tokens = max_new_tokens
    topo = topology_from_config(config)
    policy = ScriptedPolicy(tokenizer, script)
    runner = EpisodeRunner(topo, policy, chat, sandbox=sandbox, workspace_root=tmp_path, tool_timeout_s=20)
    result = asyncio.run(runner.run(arithmetic_tasks(1, seed=1), samples_per_task=1, seed=0))
    (episode,) = result.episodes
    assert not episode.failed, episode.failure_reason
    return policy, episode


def _by_turn(episode):
    return {(a.agent, a.turn): a for a in episode.actions}


def _check_exact_prefix(tokenizer, chat, first, second):
    """The second turn's prompt continues the first's ids exactly, with the template's tool turn."""
    head = list(first.prompt_ids + first.generated_ids)
    assert list(second.prompt_ids[:len(head)]) == head
    tail = chat.continuation_ids("user", second.messages[-1]["content"], first.generated_ids)
    assert list(second.prompt_ids[len(head):]) == tail


@pytest.mark.parametrize("template", ["qwen3_thinking", "r1_distill"])
def test_generation_that_starts_inside_reasoning(smollm2, sandbox, tmp_path, template):
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_THINKING if template == "qwen3_thinking" else R1_DISTILL)
    chat = ChatFormat(tokenizer)
    script = {
        "problem_solver": ["Two and two.</think>\nSo \\boxed{4}."],
        # Turn 0: a fence inside the reasoning neither stops nor runs; the block after </think> does.
        "code_executor": [REASONING_CODE + "\nNow for real.</think>\n" + ANSWER_CODE + "\nnot generated",
                          "It printed 4.</think>\nThe computed answer is \\boxed{4}."],
        # The verifier's reasoning never closes: no answer, a truncated action.
        "verifier": ["Comparing the two... \\boxed{5} maybe"],
    }
    policy, episode = _run(tokenizer, chat, script, sandbox, tmp_path)
    gated = (OutsideReasoning(END_OF_CODE_BLOCK, starts_inside=True),)
    assert [(c.policy_name, c.stop_strings) for c in policy.calls] == [
        ("problem_solver", ()), ("code_executor", gated), ("code_executor", gated), ("verifier", ())]
    actions = _by_turn(episode)
    code_turn = actions["code_executor", 0]
    assert code_turn.tool.code == ("print(2 + 2)\n",) and code_turn.tool.stdout == "4\n"
    assert not os.path.exists(os.path.join(episode.workspace_dir, "from_reasoning.txt"))
    # Generated ids end where the answer's block closes; the text carries the prompt's <think>.
    assert tokenizer.decode(code_turn.generated_ids).endswith(ANSWER_CODE)
    assert code_turn.text == "<think>" + tokenizer.decode(code_turn.generated_ids, skip_special_tokens=True)
    assert not code_turn.truncated and not code_turn.last_turn
    # The continuation's generation prompt opens reasoning again: the second turn starts inside too.
    second = actions["code_executor", 1]
    assert second.tool is None and not second.truncated and second.last_turn
    _check_exact_prefix(tokenizer, chat, code_turn, second)
    assert tokenizer.decode(second.prompt_ids).endswith(chat.generation_prompt(second.messages))
    assert chat.opens_reasoning(second.messages)
    # Downstream agents see answers, not reasoning.
    verifier = actions["verifier", 0]
    assert "Two and two" not in verifier.messages[1]["content"]
    assert "So \\boxed{4}." in verifier.messages[1]["content"]
    assert "Maybe like this" not in verifier.messages[1]["content"]
    assert verifier.truncated and verifier.last_turn
    assert episode.final_answer == "" and episode.boxed_answer is None


def test_reasoning_that_runs_out_of_budget_is_truncated(smollm2, sandbox, tmp_path):
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_THINKING)
    long_reasoning = "Let me think about this carefully. " * 20 + "</think>\n" + ANSWER_CODE
    script = {"problem_solver": ["Four.</think>\n\\boxed{4}"],
              "code_executor": [long_reasoning], "verifier": ["Ok.</think>\n\\boxed{4}"]}
    _, episode = _run(tokenizer, ChatFormat(tokenizer), script, sandbox, tmp_path, max_new_tokens=64)
    code_turn = _by_turn(episode)["code_executor", 0]
    assert len(code_turn.generated_ids) == 64 and code_turn.truncated and code_turn.last_turn
    assert code_turn.tool is None  # the budget ended inside the reasoning: nothing ran
    assert episode.boxed_answer == "4"


def test_model_opened_reasoning_with_the_hybrid_template(smollm2, sandbox, tmp_path):
    """Qwen3's hybrid template in thinking mode: the prompt opens nothing, the model writes <think>
    itself; its vocabulary has the tags, so the stops are gated from outside."""
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_HYBRID)
    chat = ChatFormat(tokenizer)
    assert chat.reasoning_tokens and not chat.opens_reasoning([{"role": "user", "content": "hi"}])
    script = {"problem_solver": ["<think>Two and two.</think>\n\\boxed{4}"],
              "code_executor": ["<think>\n" + REASONING_CODE + "\n</think>\n" + ANSWER_CODE + "\nnot generated",
                                "<think>It printed 4."],
              "verifier": ["<think>Both say 4.</think>\nFinal: \\boxed{4}"]}
    policy, episode = _run(tokenizer, chat, script, sandbox, tmp_path)
    assert policy.calls[1].stop_strings == (OutsideReasoning(END_OF_CODE_BLOCK, starts_inside=False),)
    actions = _by_turn(episode)
    code_turn = actions["code_executor", 0]
    assert code_turn.tool.code == ("print(2 + 2)\n",)
    assert not os.path.exists(os.path.join(episode.workspace_dir, "from_reasoning.txt"))
    assert code_turn.text == tokenizer.decode(code_turn.generated_ids)  # nothing to restore
    assert actions["code_executor", 1].truncated  # its reasoning never closed
    assert episode.boxed_answer == "4"


@pytest.mark.parametrize("template", ["qwen3_thinking_off", "smollm2"])
def test_thinking_off_behaves_as_a_plain_model(smollm2, sandbox, tmp_path, template):
    """Qwen3's hybrid template with enable_thinking=False (an empty closed block in the prompt)
    stops and runs code exactly as SmolLM2's own template, which knows no reasoning tags."""
    if template == "smollm2":
        tokenizer, chat = smollm2[2], ChatFormat(smollm2[2])
    else:
        tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_HYBRID)
        chat = ChatFormat(tokenizer, {"enable_thinking": False})
        assert chat.generation_prompt([{"role": "user", "content": "hi"}]).endswith("<think>\n\n</think>\n\n")
    script = {"problem_solver": ["Four: \\boxed{4}"],
              "code_executor": [ANSWER_CODE + "\nnot generated", "It printed 4, so \\boxed{4}."],
              "verifier": ["Final: \\boxed{4}"]}
    policy, episode = _run(tokenizer, chat, script, sandbox, tmp_path)
    expected_stops = ((END_OF_CODE_BLOCK,) if template == "smollm2"
                      else (OutsideReasoning(END_OF_CODE_BLOCK, starts_inside=False),))
    assert policy.calls[1].stop_strings == expected_stops
    actions = _by_turn(episode)
    code_turn = actions["code_executor", 0]
    assert list(code_turn.generated_ids) == tokenizer.encode(ANSWER_CODE, add_special_tokens=False)
    assert code_turn.text == ANSWER_CODE and not code_turn.truncated
    assert code_turn.tool.code == ("print(2 + 2)\n",) and code_turn.tool.stdout == "4\n"
    _check_exact_prefix(tokenizer, chat, code_turn, actions["code_executor", 1])
    assert not any(a.truncated for a in episode.actions) and episode.boxed_answer == "4"


def test_a_tokenizer_that_drops_the_tags_is_refused(smollm2):
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_THINKING)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    with pytest.raises(ValueError, match="special token that decoding drops"):
        ChatFormat(tokenizer)


def test_the_config_key_turns_qwen3_thinking_off(smollm2):
    from mappa_jax.config import ConfigError, base_config, validate
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_HYBRID)
    config = base_config()
    messages = [{"role": "user", "content": "hi"}]
    assert ChatFormat(tokenizer, config.model.chat_template_kwargs.to_dict()).generation_prompt(messages) == (
        "<|im_start|>assistant\n")
    config.model.chat_template_kwargs.enable_thinking = False
    validate(config)
    assert ChatFormat(tokenizer, config.model.chat_template_kwargs.to_dict()).generation_prompt(messages) == (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    config.model.chat_template_kwargs.tools = [1]
    with pytest.raises(ConfigError, match="model.chat_template_kwargs.tools"):
        validate(config)
