"""The tokenizer a GGUF file describes, built with the `tokenizers` library alone (no torch).

A GGUF carries no tokenizer.json. llama.cpp stores the tokenizer as metadata instead: the model
kind (`tokenizer.ggml.model`), the pre-tokenizer name (`tokenizer.ggml.pre`), the vocabulary, the
BPE merges, one type per token (normal, control, user-defined, ...), the special token ids, the
add-BOS/EOS flags and the chat template. transformers can turn these into a fast tokenizer, but its
GGUF reader imports torch, which only this package's test extra installs. This module reads the
same keys with the `gguf` package and builds the same tokenizer: tests/test_models_tokenizer_gguf.py
checks that it encodes, decodes and renders chat templates exactly as transformers' conversion does.

Supported: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, e.g. SmolLM2, GPT-2, StarCoder) with a
GPT-2-style split. Anything else raises a ValueError naming the file and the unsupported value.
"""
from __future__ import annotations

import dataclasses
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

# llama.cpp's token types (llama_token_type): only these two change how a token is matched.
TOKEN_TYPE_CONTROL = 3  # special, e.g. <|im_start|>: matched whole, dropped by skip_special_tokens
TOKEN_TYPE_USER_DEFINED = 4  # added but not special, e.g. <think>: matched whole, kept on decode

SUPPORTED_MODELS = ("gpt2",)
# `tokenizer.ggml.pre` names whose vocabulary was learned on GPT-2's regex split, which a byte-level
# pre-tokenizer with use_regex=True applies. llama.cpp's "smollm", "starcoder" and "refact" also cut
# digits apart first; their vocabularies hold no multi-digit token, so the split changes nothing
# (and transformers' conversion omits it too).
GPT2_SPLIT_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "starcoder", "refact")


@dataclasses.dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer metadata of one GGUF file, under readable names."""
    source: str  # the file, for error messages
    model: str | None  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def read_vocabulary(path: str | pathlib.Path, reader=None) -> GGUFVocabulary:
    """Read the `tokenizer.*` keys of a GGUF file (pass an open `gguf.GGUFReader` to reuse it)."""
    if reader is None:
        import gguf
        reader = gguf.GGUFReader(str(path))

    def field(key, default=None):
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: the GGUF holds no tokenizer (key tokenizer.ggml.tokens is missing)")

    def token_id(key):
        value = field(key)
        if value is not None and not 0 <= int(value) < len(tokens):
            raise ValueError(f"{path}: {key} = {value} is outside the vocabulary of {len(tokens)} tokens")
        return None if value is None else int(value)

    def flag(key):
        value = field(key)
        return None if value is None else bool(value)

    token_types = field("tokenizer.ggml.token_type") or []
    if token_types and len(token_types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries "
                         f"for {len(tokens)} tokens")
    return GGUFVocabulary(
        source=str(path), model=field("tokenizer.ggml.model"), pre=field("tokenizer.ggml.pre"),
        tokens=list(tokens), token_types=[int(t) for t in token_types],
        merges=list(field("tokenizer.ggml.merges") or []),
        bos_id=token_id("tokenizer.ggml.bos_token_id"), eos_id=token_id("tokenizer.ggml.eos_token_id"),
        unk_id=token_id("tokenizer.ggml.unknown_token_id"),
        pad_id=token_id("tokenizer.ggml.padding_token_id"),
        add_bos=flag("tokenizer.ggml.add_bos_token"), add_eos=flag("tokenizer.ggml.add_eos_token"),
        chat_template=field("tokenizer.chat_template"))


def _byte_level_backend(vocab: GGUFVocabulary) -> Tokenizer:
    """Byte-level BPE over the file's vocabulary and merges, split the GPT-2 way."""
    if vocab.pre is not None and vocab.pre not in GPT2_SPLIT_PRE_TOKENIZERS:
        raise ValueError(
            f"{vocab.source}: tokenizer.ggml.pre = {vocab.pre!r} is not supported: its pre-tokenizer "
            f"split is not GPT-2's (supported: {', '.join(GPT2_SPLIT_PRE_TOKENIZERS)}); load the model's "
            f"tokenizer from an HF directory instead (model.tokenizer in the config)")
    if not vocab.merges:
        raise ValueError(f"{vocab.source}: a byte-level BPE GGUF must list its merges "
                         f"(tokenizer.ggml.merges is missing)")
    alphabet = bytes_to_unicode()  # GPT-2's byte -> printable character table
    letters = set(alphabet.values())
    # A token is normally stored already spelled in the byte alphabet; one that is not (a control
    # token such as "<｜end▁of▁sentence｜>") is respelled from its UTF-8 bytes, so its id stays put.
    spelled = {token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8")): index
               for index, token in enumerate(vocab.tokens)}
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    backend = Tokenizer(models.BPE(vocab=spelled, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    types = vocab.token_types or [0] * len(vocab.tokens)
    # Control tokens become special added tokens, matched whole in text. One spelled outside the byte
    # alphabet is a llama.cpp mislabel that the model never saw as one token; it stays unmatched, as
    # in transformers' conversion.
    control = [AddedToken(token, normalized=False, special=True)
               for token, kind in zip(vocab.tokens, types)
               if kind == TOKEN_TYPE_CONTROL and set(token) <= letters]
    backend.add_special_tokens(control)
    user_defined = [AddedToken(token, normalized=False, special=False)
                    for token, kind in zip(vocab.tokens, types)
                    if kind == TOKEN_TYPE_USER_DEFINED and token in spelled]
    backend.add_tokens(user_defined)
    return backend


def build_tokenizer(vocab: GGUFVocabulary):
    """A transformers fast tokenizer (PreTrainedTokenizerFast) with the file's special tokens and chat
    template."""
    from transformers import PreTrainedTokenizerFast
    if vocab.model not in SUPPORTED_MODELS:
        raise ValueError(
            f"{vocab.source}: tokenizer.ggml.model = {vocab.model!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODELS)}); load the model's tokenizer from an HF directory instead "
            f"(model.tokenizer in the config)")
    backend = _byte_level_backend(vocab)
    name = lambda index: None if index is None else vocab.tokens[index]
    flags = {key: value for key, value in (("add_bos_token", vocab.add_bos), ("add_eos_token", vocab.add_eos))
             if value is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=name(vocab.bos_id), eos_token=name(vocab.eos_id),
        unk_token=name(vocab.unk_id), pad_token=name(vocab.pad_id), chat_template=vocab.chat_template,
        **flags)


def load_gguf_tokenizer(path: str | pathlib.Path, reader=None):
    """The tokenizer of a GGUF file as a transformers PreTrainedTokenizerFast, without torch."""
    return build_tokenizer(read_vocabulary(path, reader))
