"""The GGUF tokenizer built without torch (models/gguf_tokenizer.py) against transformers' own GGUF
conversion (which needs torch, from the test extra): same backend, same ids on thousands of seeded
strings, same decoded text, same chat template output."""
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from mappa_jax.models import gguf_tokenizer, weights

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
                  "<jupyter_code>", "<empty_output>"]


@pytest.fixture(scope="session")
def reference(smollm2_gguf):
    """transformers' conversion (it imports torch)."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def ours(smollm2_gguf):
    return gguf_tokenizer.load_gguf_tokenizer(smollm2_gguf)


def _random_text(rng: random.Random, vocab: list[str]) -> str:
    """One string from a seeded mix of the cases a byte-level BPE gets wrong first."""
    kind = rng.randrange(9)
    if kind == 0:  # code
        name = rng.choice(["x", "total_sum", "_private", "CamelCase", "df", "i2"])
        lines = [f"def {name}({rng.choice(['', 'a, b', 'self, *args, **kw'])}):",
                 f"{' ' * rng.choice([2, 4, 8])}return {name} {rng.choice('+-*/%')} {rng.randrange(10 ** 6)}",
                 f"\tprint(f\"{{{name}!r:>10}}\")  # comment", "```python", "```", "if x != y and not z: pass",
                 "for k, v in d.items():", "    s += '\\n'.join(map(str, range(10)))", "arr[::-1][0:3] == [];",
                 "#include <stdio.h>\nint main() { printf(\"%d\\n\", 42); }", "SELECT * FROM t WHERE a>=3;"]
        return "\n".join(rng.choice(lines) for _ in range(rng.randrange(1, 6)))
    if kind == 1:  # digits and numbers
        parts = [str(rng.randrange(10 ** rng.randrange(1, 25))), f"{rng.uniform(-1e6, 1e6):.{rng.randrange(8)}f}",
                 f"{rng.randrange(100)}+{rng.randrange(100)}={rng.randrange(200)}", "1,234,567.89", "3.14e-10",
                 "0x1F", "2026-12-01", "\\boxed{" + str(rng.randrange(-999, 999)) + "}", "½ ² ³ ٣ ४"]
        return rng.choice([" ", "", "  ", "\n"]).join(rng.choice(parts) for _ in range(rng.randrange(1, 6)))
    if kind == 2:  # whitespace runs, newlines, tabs
        pieces = [" " * rng.randrange(1, 9), "\t" * rng.randrange(1, 4), "\n" * rng.randrange(1, 4), "\r\n",
                  "\u00a0", "\u3000", "\u200b", "\f", "\v", rng.choice(["a", "word", "Ünï", "x1", "."])]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
    if kind == 3:  # unicode: CJK, emoji, accents, combining marks, other scripts
        pieces = ["你好，世界", "日本語のテキスト", "한국어 문장", "😀", "👩‍👩‍👧‍👦", "👍🏽", "🇯🇵", "café", "naïve",
                  "e\u0301", "a\u0308\u0323", "Ω≈ç√∫", "Привет мир", "مرحبا بالعالم", "नमस्ते", "ἀλήθεια",
                  "\U0001d54f\U0001d560", "ﬁ", "Å", "A\u030a", "\u202eRTL\u202c", "\ufeff", "🤖✨🚀"]
        return rng.choice(["", " "]).join(rng.choice(pieces) for _ in range(rng.randrange(1, 7)))
    if kind == 4:  # random code points, astral ones too (no surrogates)
        def point():
            c = rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0x3000), rng.randrange(0x4e00, 0x9fff),
                            rng.randrange(0x1f300, 0x1faff), rng.randrange(0x10000, 0x10ffff)])
            return chr(c) if not 0xd800 <= c < 0xe000 else "?"
        return "".join(point() for _ in range(rng.randrange(1, 20)))
    if kind == 5:  # special tokens inside text, whole and broken
        pieces = CONTROL_TOKENS + ["<|im_start", "im_end|>", "< |im_end|>", "<|IM_END|>", "<think>", "</think>",
                                   "user", "\n", " ", "hello", "<<|im_end|>>", "text"]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 10)))
    if kind == 6:  # concatenated vocabulary entries: exercises the merges
        return "".join(rng.choice(vocab) for _ in range(rng.randrange(1, 8)))
    if kind == 7:  # prose with contractions and punctuation
        words = ["I'm", "don't", "they'll", "we've", "it's", "He'd", "YOU'RE", "end.", "(paren)", "[bracket]",
                 "--dash", "\"quote\"", "'single'", "ellipsis...", "semi;colon", "a/b", "e-mail@host.org", "#tag"]
        return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))
    return "".join(chr(rng.randrange(0x20, 0x7f)) for _ in range(rng.randrange(0, 40)))  # printable ASCII


@pytest.fixture(scope="session")
def texts(reference):
    rng = random.Random(20261201)
    vocab = reference.convert_ids_to_tokens(list(range(len(reference))))
    vocab = [reference.convert_tokens_to_string([token]) for token in vocab]
    return [_random_text(rng, vocab) for _ in range(3000)] + ["", " ", "\n", "  \n\n  "]


def _conversations(count: int) -> list[list[dict]]:
    rng = random.Random(7)
    contents = ["What is 3 + 4?", "\\boxed{7}", "```python\nprint(7 * 3)\n```", "  spaced  out  ", "你好 😀",
                "line one\nline two\n", "<|im_end|> inside", "", "Tabs\tand\nnewlines", "The answer is 12."]
    out = []
    for _ in range(count):
        turns = []
        if rng.random() < 0.5:
            turns.append({"role": "system", "content": rng.choice(contents)})
        for n in range(rng.randrange(1, 5)):
            turns.append({"role": "user" if n % 2 == 0 else "assistant",
                          "content": " ".join(rng.choice(contents) for _ in range(rng.randrange(1, 4)))})
        out.append(turns)
    return out


def test_backend_is_the_same_tokenizer(ours, reference):
    """Model, vocabulary, merges, added tokens, pre-tokenizer, post-processor and decoder."""
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(reference.backend_tokenizer.to_str())
    assert type(ours) is type(reference)
    for attribute in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id",
                      "pad_token_id", "unk_token_id", "all_special_ids", "extra_special_tokens",
                      "added_tokens_decoder", "chat_template", "add_bos_token", "add_eos_token",
                      "padding_side", "model_max_length", "clean_up_tokenization_spaces"):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert len(ours) == len(reference) == 49152


def test_encodes_thousands_of_strings_identically(ours, reference, texts):
    expected = reference(texts)["input_ids"]
    assert ours(texts)["input_ids"] == expected
    different = [t for t, e in zip(texts, expected) if ours.encode(t) != e]
    assert not different, different[:5]
    # the same ids with special tokens split as plain text
    assert (ours(texts[:500], split_special_tokens=True)["input_ids"]
            == reference(texts[:500], split_special_tokens=True)["input_ids"])


def test_decodes_identically(ours, reference, texts):
    ids = reference(texts)["input_ids"]
    for skip in (False, True):
        decoded = ours.batch_decode(ids, skip_special_tokens=skip)
        assert decoded == reference.batch_decode(ids, skip_special_tokens=skip)
    # byte-level BPE round-trips every text whose bytes all have a token. SmolLM2 lacks 21 (0xf1, 0xf2:
    # lead bytes of planes 4-11, a few C0 controls, bytes UTF-8 never uses); BPE drops those, as both do.
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = ours.get_vocab()
    missing = {byte for byte, letter in bytes_to_unicode().items() if letter not in vocab}
    assert len(missing) == 21
    whole = [k for k, text in enumerate(texts) if not missing & set(text.encode("utf-8"))]
    assert len(whole) > 0.9 * len(texts)
    assert [ours.decode(ids[k]) for k in whole] == [texts[k] for k in whole]
    # arbitrary id sequences, cut mid-character too: the same replacement characters and specials
    rng = random.Random(3)
    sequences = [[rng.randrange(len(ours)) for _ in range(rng.randrange(1, 30))] for _ in range(1000)]
    sequences += [ids[k][:cut] for k in range(0, 600, 3) for cut in (1, 2, 3)]
    assert ours.batch_decode(sequences) == reference.batch_decode(sequences)
    assert ours.batch_decode(sequences, skip_special_tokens=True) == reference.batch_decode(
        sequences, skip_special_tokens=True)


def test_chat_templates_identical(ours, reference):
    for messages in _conversations(300):
        for prompt in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert text == reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False)
            assert ids == reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                                        return_dict=False)
            assert ids == ours.encode(text)
    assert text.endswith("<|im_start|>assistant\n")


def test_builds_without_torch_and_caches(smollm2_gguf, ours, texts, tmp_path):
    """The fresh-install path: with torch unimportable and an empty model cache, load_tokenizer builds
    the tokenizer and saves it in the cache; the cached copy, reloaded, is the same tokenizer."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        from mappa_jax.models import weights
        tok = weights.load_tokenizer({str(smollm2_gguf)!r})
        print(tok.encode("<|im_start|>user\\nhi<|im_end|>"))
    """)
    env = dict(os.environ, MAPPA_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1, 4093, 198, 6004, 2]"
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1, "the built tokenizer was not cached"
    os.environ["MAPPA_CACHE"], before = str(tmp_path), os.environ.get("MAPPA_CACHE")
    try:
        reloaded = weights.load_tokenizer(smollm2_gguf)
    finally:
        os.environ.pop("MAPPA_CACHE") if before is None else os.environ.update(MAPPA_CACHE=before)
    assert json.loads(reloaded.backend_tokenizer.to_str()) == json.loads(ours.backend_tokenizer.to_str())
    assert reloaded(texts)["input_ids"] == ours(texts)["input_ids"]
    for attribute in ("chat_template", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                      "all_special_ids", "add_bos_token"):
        assert getattr(reloaded, attribute) == getattr(ours, attribute), attribute


def _write_tiny_gguf(path, **tokenizer):
    """A metadata-only llama GGUF with a byte-level vocabulary: every byte, a few merges, and tokens of
    each kind (control, user-defined, one spelled outside the byte alphabet)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2),
                       (writer.add_head_count_kv, 1), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    merges = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "i n", "Ġ in"]
    tokens = (["<|endoftext|>", "<s>", "</s>", "<｜end▁of▁sentence｜>", "<think>", "  "]
              + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges])
    types = [3, 3, 3, 3, 4, 4] + [1] * (len(tokens) - 6)
    writer.add_tokenizer_model(tokenizer.get("model", "gpt2"))
    writer.add_tokenizer_pre(tokenizer.get("pre", "gpt2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(tokenizer.get("add_bos", True))
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_tiny_gguf_with_every_token_kind(tmp_path, add_bos):
    """add-BOS on and off, a user-defined token, a control token outside the byte alphabet (skipped as
    a special token, kept in the vocabulary) and a user-defined one that only exists respelled."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", add_bos=add_bos)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    built = gguf_tokenizer.load_gguf_tokenizer(path)
    assert json.loads(built.backend_tokenizer.to_str()) == json.loads(reference.backend_tokenizer.to_str())
    text = "<s> the <think>  x <｜end▁of▁sentence｜> in the</s>\n\n  in"
    assert built.encode(text) == reference.encode(text)
    assert (built.encode("the in")[0] == 1) is add_bos
    assert built.decode(built.encode(text), skip_special_tokens=True) == reference.decode(
        reference.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "the in"}]
    assert built.apply_chat_template(messages, tokenize=False) == "<s>the in</s>"


def test_unsupported_tokenizer_models_are_named(tmp_path):
    path = _write_tiny_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model = 'llama' is not supported.*gpt2"):
        gguf_tokenizer.load_gguf_tokenizer(path)
    path = _write_tiny_gguf(tmp_path / "qwen.gguf", pre="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf: tokenizer.ggml.pre = 'qwen2' is not supported"):
        gguf_tokenizer.load_gguf_tokenizer(path)
