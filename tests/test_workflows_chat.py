"""Chat-template prompts and the multi-turn exact-prefix continuation, against the real SmolLM2
tokenizer; the scripted policy's tokenization, stops and call record."""
import asyncio

import pytest

from mappa_jax.workflows.chat import ChatFormat, strip_think
from mappa_jax.workflows.policy import Generation, Policy, ScriptedPolicy


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[2]  # the session's SmolLM2 tokenizer (conftest): loading one costs seconds


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat(tokenizer)


MESSAGES = [{"role": "system", "content": "You check arithmetic with Python."},
            {"role": "user", "content": "What is 17 * 23?"}]
CODE_REPLY = "I will compute it.\n```python\nprint(17 * 23)\n```\n"
TOOL_MESSAGE = "Your code finished with exit status 0.\nOutput:\n391"


def _reference_ids(tokenizer, conversation):
    """The tokenizer's own rendering of the whole conversation, tokenized in one go."""
    out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_first_prompt_is_the_template(chat, tokenizer):
    ids, text = chat.first_prompt(MESSAGES)
    assert ids == _reference_ids(tokenizer, MESSAGES)
    assert chat.encode(text) == ids and text.count(MESSAGES[1]["content"]) == 1


@pytest.mark.parametrize("stop_strings,role", [((("```python", "```"),), "user"), ((), "user"),
                                               ((), "tool")])
def test_continuation_equals_full_conversation(chat, tokenizer, stop_strings, role):
    policy = ScriptedPolicy(tokenizer, {"p": [CODE_REPLY + ("Done." if not stop_strings else "")]})
    prompt, _ = chat.first_prompt(MESSAGES)
    gen = asyncio.run(policy.generate("p", [prompt], 200, stop_strings, 1.0, 0))[0]
    ended_with_eos = gen.token_ids[-1] == tokenizer.eos_token_id
    assert ended_with_eos == (not stop_strings)
    next_prompt = prompt + list(gen.token_ids) + chat.continuation_ids(role, TOOL_MESSAGE,
                                                                      gen.token_ids)
    # Built from ids only, yet identical to tokenizing the rendered conversation as a whole.
    conversation = MESSAGES + [{"role": "assistant", "content": gen.text},
                               {"role": role, "content": TOOL_MESSAGE}]
    assert next_prompt == _reference_ids(tokenizer, conversation)
    assert next_prompt[:len(prompt) + len(gen.token_ids)] == prompt + list(gen.token_ids)


def test_strip_think():
    assert strip_think("<think>try x=3</think>The answer is 4.") == "The answer is 4."
    assert strip_think("a <think>x</think> b <think>y</think> c") == "a  b  c"
    assert strip_think("reasoning without opening</think>final") == "final"
    assert strip_think("shown <think>cut off mid thought") == "shown"
    assert strip_think("no reasoning here") == "no reasoning here"


def test_scripted_policy_stops_eos_truncation_and_record(tokenizer):
    script = {"coder": ["a\n```python\nprint(1)\n```\nafter the block", "plain answer",
                        "word " * 50],
              "other": [lambda prompt_text: f"saw {len(prompt_text)} chars"]}
    policy = ScriptedPolicy(tokenizer, script)
    assert isinstance(policy, Policy)
    prompts = [[1, 2, 3], [4, 5]]
    stop = (("```python", "```"), "never")
    first = asyncio.run(policy.generate("coder", prompts, 64, stop, 0.7, 11))
    assert len(first) == 2 and all(isinstance(g, Generation) for g in first)
    assert first[0].text == "a\n```python\nprint(1)\n```"  # cut where the block closes
    assert first[0].token_ids[-1] != tokenizer.eos_token_id and not first[0].truncated
    assert first[0].logprobs == (0.0,) * len(first[0].token_ids)
    second = asyncio.run(policy.generate("coder", prompts[:1], 64, stop, 0.7, 12))[0]
    assert second.token_ids[-1] == tokenizer.eos_token_id and second.text == "plain answer"
    assert list(second.token_ids[:-1]) == tokenizer.encode("plain answer", add_special_tokens=False)
    third = asyncio.run(policy.generate("coder", prompts[:1], 16, stop, 0.7, 13))[0]
    assert third.truncated and len(third.token_ids) == 16
    other = asyncio.run(policy.generate("other", [[9, 9, 9]], 16, (), 1.0, 0))[0]
    assert other.text == f"saw {len(tokenizer.decode([9, 9, 9]))} chars"
    assert [c.prompts for c in policy.calls] == [((1, 2, 3), (4, 5)), ((1, 2, 3),), ((1, 2, 3),),
                                                 ((9, 9, 9),)]
    assert [c.seed for c in policy.calls] == [11, 12, 13, 0]
    with pytest.raises(IndexError, match="called 4 times but scripted for 3"):
        asyncio.run(policy.generate("coder", prompts, 64, stop, 0.7, 14))
    with pytest.raises(KeyError, match="no script for policy 'nobody'"):
        asyncio.run(policy.generate("nobody", prompts, 64, stop, 0.7, 14))
