"""Chat templates of reasoning models for tests, as short Jinja strings modeled on the published
ones (our own text, same generation prompts): Qwen3's hybrid template (thinking on by default, an
empty closed block with enable_thinking=False), Qwen3-Thinking-2507's (the generation prompt opens
<think>) and DeepSeek-R1-Distill's (its own role markers; the generation prompt opens <think>).
Earlier assistant turns drop their reasoning, as the published templates do.

`reasoning_tokenizer(base, template)` copies a tokenizer (SmolLM2's in the tests), adds <think>
and </think> as ordinary tokens (as Qwen3's and R1-Distill's vocabularies have them) and sets the
template; the R1 style also gets its role markers and end-of-sentence token as special tokens.
"""
import copy

_CHATML_TURNS = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set content = message.content -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}")

QWEN3_HYBRID = (_CHATML_TURNS +
                "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
                "{%- if enable_thinking is defined and enable_thinking is false -%}"
                "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")

QWEN3_THINKING = (_CHATML_TURNS +
                  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}")

R1_USER, R1_ASSISTANT, R1_END = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
R1_DISTILL = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{- message.content -}}"
    "{%- elif message.role == 'user' -%}{{- '" + R1_USER + "' + message.content -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set content = message.content -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '" + R1_ASSISTANT + "' + content + '" + R1_END + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + R1_ASSISTANT + "<think>\\n' -}}{%- endif -%}")


def reasoning_tokenizer(base, template: str):
    tokenizer = copy.deepcopy(base)
    tokenizer.add_tokens(["<think>", "</think>"])
    if template == R1_DISTILL:
        tokenizer.add_special_tokens({"additional_special_tokens": [R1_USER, R1_ASSISTANT],
                                      "eos_token": R1_END})
    tokenizer.chat_template = template
    return tokenizer
