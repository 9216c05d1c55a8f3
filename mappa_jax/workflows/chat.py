"""Prompt token ids through the tokenizer's own chat template, and the exact-prefix continuation.

No chat markers are written here: every marker comes from the template. A later turn's prompt is
the previous prompt ids + the generated ids + the ids of the template's text between "end of the
assistant's message" and "start of the next assistant message" around the tool-output message, so
earlier tokens are never decoded and re-encoded.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from mappa_jax.sampling.stops import REASONING_CLOSE, REASONING_OPEN
from mappa_jax.tools.cells import ends_inside_reasoning

# Marks where the assistant's content sits in a probe rendering; never produced by a model.
_SENTINEL = "\u2063MAPPA_ASSISTANT_CONTENT\u2063"
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


def strip_think(text: str) -> str:
    """Text without <think>...</think> reasoning (an unclosed block runs to the end).

    A text that has a closing tag but no opening one (templates that open the block inside the
    prompt) loses everything up to that tag.
    """
    close = text.find("</think>")
    if close != -1 and "<think>" not in text[:close]:
        text = text[close + len("</think>"):]
    return _THINK_BLOCK.sub("", text).strip()


class ChatFormat:
    """Turns chat messages into prompt ids with a transformers tokenizer's chat template.

    template_kwargs go to every rendering (e.g. {"enable_thinking": False} for Qwen3's hybrid
    templates). Reasoning: `opens_reasoning` tells whether the template's generation prompt leaves
    a <think> block open (Qwen3-Thinking-2507 and DeepSeek-R1-Distill end it with "<think>\\n"),
    so the generated text begins inside reasoning with no opening tag; `reasoning_tokens` whether
    the tokenizer has <think> and </think> as tokens of their own, so the model can open a block
    itself (Qwen3's hybrid models in thinking mode).
    """

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        tag_ids = [self.encode(tag) for tag in (REASONING_OPEN, REASONING_CLOSE)]
        self.reasoning_tokens = all(len(ids) == 1 for ids in tag_ids)
        for tag, ids in zip((REASONING_OPEN, REASONING_CLOSE), tag_ids):
            if self.reasoning_tokens and self.decode(ids) != tag:
                # Stops, code extraction and truncation all read the tags in the decoded text.
                raise ValueError(f"tokenizer {type(tokenizer).__name__} treats {tag!r} (id {ids[0]}) as a special "
                                 f"token that decoding drops; reasoning blocks would be invisible")

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.template_kwargs)

    def generation_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The text the template appends after `messages` to open the assistant's turn (the whole
        rendering where the template does not simply append it)."""
        opened = self.render(messages, add_generation_prompt=True)
        plain = self.render(messages, add_generation_prompt=False)
        return opened[len(plain):] if opened.startswith(plain) else opened

    def opens_reasoning(self, messages: Sequence[dict[str, str]]) -> bool:
        """Whether generation after `messages` starts inside a reasoning block the prompt opened."""
        return ends_inside_reasoning(self.generation_prompt(messages))

    def encode(self, text: str) -> list[int]:
        # The template already placed any BOS; adding special tokens again would duplicate it.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def first_prompt(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], str]:
        """Prompt ids (and their text) for an agent's first turn, ending with the assistant header."""
        text = self.render(messages)
        return self.encode(text), text

    def continuation_ids(self, role: str, content: str, generated_ids: Sequence[int]) -> list[int]:
        """Ids that follow an assistant turn's generated ids: close that turn (unless the model
        already emitted its end-of-turn token), add a `role` message, open the next assistant turn.
        """
        ended = bool(generated_ids) and generated_ids[-1] in self.eos_ids
        return self.encode(self._continuation_text(role, content, ended))

    def _continuation_text(self, role: str, content: str, ended_with_eos: bool) -> str:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": _SENTINEL}, {"role": role, "content": content}]
        text = self.render(probe)
        if text.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not render assistant content verbatim; "
                             "cannot build an exact-prefix continuation")
        suffix = text.split(_SENTINEL, 1)[1]
        if ended_with_eos:
            # The generated ids already hold the end-of-turn token the template would write here.
            for eos_id in self.eos_ids:
                eos_text = self.tokenizer.convert_ids_to_tokens(eos_id)
                if eos_text and suffix.startswith(eos_text):
                    suffix = suffix[len(eos_text):]
                    break
        return suffix
