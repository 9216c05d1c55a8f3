"""Stop patterns counted only outside reasoning blocks (OutsideReasoning): the token tables and the
jitted decode loop against a brute-force reference written from the definition, and the tables
over a real byte-level tokenizer whose vocabulary has <think> / </think> as tokens."""
import random
import re

import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.sampling.stops import OutsideReasoning, compile_stop_patterns, match_end, token_bytes
from reasoning_templates import QWEN3_THINKING, reasoning_tokenizer

CODE_BLOCK = ("```python", "```")
OPEN, CLOSE = "<think>", "</think>"
# Whole tags, their fragments and the pattern's pieces, so tags and fences also span tokens.
PIECES = [OPEN, CLOSE, "```python", "```", "`", "``", "<", "</", "think", ">", "python", "\n", "x",
          "<th", "ink>", "</th"]


def _stretches(text, starts_inside):
    """The runs of text outside reasoning; a run ends with the open tag that ends it (the tag's own
    characters are outside), the close tag belongs to the block."""
    runs, position, inside = [], 0, starts_inside
    while position <= len(text):
        if inside:
            close = text.find(CLOSE, position)
            if close == -1:
                break
            position, inside = close + len(CLOSE), False
        else:
            opening = text.find(OPEN, position)
            end = len(text) if opening == -1 else opening + len(OPEN)
            runs.append(text[position:end])
            if opening == -1:
                break
            position, inside = end, True
    return runs


def reference_end(text, parts, starts_inside):
    """Length of the shortest prefix in one of whose outside runs the parts occur in order."""
    pattern = re.compile(".*?".join(re.escape(p) for p in parts), re.DOTALL)
    for k in range(len(text) + 1):
        if any(pattern.search(run) for run in _stretches(text[:k], starts_inside)):
            return k
    return None


def _stop_token(pieces, ids, end):
    """Index of the token whose text completes the first `end` characters (None: no stop)."""
    if end is None:
        return None
    return int(np.searchsorted(np.cumsum([len(pieces[i]) for i in ids]), end))


def _walk(table, accept, ids):
    """First token index at which pattern 0's table accepts, as the decode loop steps it."""
    state = 0
    for j, token in enumerate(ids):
        state = table[0, state, token]
        if state == accept[0]:
            return j
    return None


@pytest.mark.parametrize("starts_inside", [False, True])
def test_token_table_matches_the_definition(starts_inside):
    pieces = [p.encode() for p in PIECES]
    pattern = OutsideReasoning(CODE_BLOCK, starts_inside=starts_inside)
    table, accept = compile_stop_patterns([pattern], pieces, len(pieces))
    plain_table, plain_accept = compile_stop_patterns([CODE_BLOCK], pieces, len(pieces))
    rng = random.Random(starts_inside)
    gated_later = 0
    for _ in range(400):
        ids = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 24))]
        text = "".join(PIECES[i] for i in ids)
        end = reference_end(text, CODE_BLOCK, starts_inside)
        assert match_end(text, pattern) == end, text  # the host-side rule (scripted policies)
        assert _walk(table, accept, ids) == _stop_token(PIECES, ids, end), text
        plain = _walk(plain_table, plain_accept, ids)
        gated_later += plain is not None and (end is None or plain < _stop_token(PIECES, ids, end))
    assert gated_later > 20  # the gate decided often: a fence inside reasoning did not stop


def test_plain_patterns_are_unchanged_by_the_gate_outside_reasoning():
    pieces = [p.encode() for p in PIECES]
    table, accept = compile_stop_patterns([OutsideReasoning(CODE_BLOCK)], pieces, len(pieces))
    plain_table, plain_accept = compile_stop_patterns([CODE_BLOCK], pieces, len(pieces))
    rng = random.Random(3)
    no_tags = [i for i, p in enumerate(PIECES) if "<" not in p]
    for _ in range(200):
        ids = [rng.choice(no_tags) for _ in range(rng.randint(1, 24))]
        assert _walk(table, accept, ids) == _walk(plain_table, plain_accept, ids)


def test_bad_gated_patterns_name_the_problem():
    with pytest.raises(ValueError, match="stop_strings entry"):
        compile_stop_patterns([OutsideReasoning(("```python", ""))], [b"a"], 1)
    with pytest.raises(ValueError, match="tags must be non-empty"):
        OutsideReasoning("```", open="")


@pytest.fixture(scope="module")
def tiny_sampler():
    """A random tiny decoder whose 128 token ids spell the pieces above (id i = PIECES[i % n])."""
    cfg = ModelConfig.tiny("qwen2")
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    pieces = [PIECES[i % len(PIECES)].encode() for i in range(cfg.vocab_size)]
    buckets = SamplerConfig(batch_buckets=(16,), prompt_buckets=(16,), generation_buckets=(48,))
    return state, pieces, Sampler(cfg, buckets, token_pieces=pieces)


@pytest.mark.parametrize("starts_inside", [False, True])
def test_decode_loop_stops_where_the_definition_says(tiny_sampler, starts_inside):
    state, pieces, sampler = tiny_sampler
    texts = [p.decode() for p in pieces]
    prompts, n = [[1, 5, 9], [3, 4], [7, 8, 9, 10]], 5
    kw = dict(n=n, max_new_tokens=48, temperature=1.0, stop_token_ids=[], seed=21)
    # The same seed gives the same tokens until a row stops. "Z" is in no token, so this pattern of
    # the same size (one compiled program for both calls) never stops: the free-running reference.
    never = OutsideReasoning(("```pythoZ", "```"), starts_inside=starts_inside)
    free = sampler.generate(state, prompts, stop_strings=[never], **kw)
    assert free.truncated.all()
    pattern = OutsideReasoning(CODE_BLOCK, starts_inside=starts_inside)
    gated = sampler.generate(state, prompts, stop_strings=[pattern], **kw)
    stopped_later = 0
    for row, ids in enumerate(free.sequences()):
        text = "".join(texts[i] for i in ids)
        stop = _stop_token(texts, ids, reference_end(text, CODE_BLOCK, starts_inside))
        expected = ids if stop is None else ids[:stop + 1]
        assert gated.sequences()[row] == expected
        assert bool(gated.truncated[row]) == (stop is None)
        np.testing.assert_array_equal(gated.logprobs[row, :len(expected)], free.logprobs[row, :len(expected)])
        ungated = _stop_token(texts, ids, match_end(text, CODE_BLOCK))  # where a plain pattern stops
        stopped_later += ungated is not None and ungated + 1 < len(expected)
    assert stopped_later >= 1  # some row's fence sat inside reasoning: ungated it would have stopped


def test_tables_over_a_tokenizer_with_reasoning_tokens(smollm2):
    """SmolLM2's byte-level vocabulary plus <think> / </think> as tokens (as Qwen3's has them):
    the single close-tag token opens the gate, a fence spelled across tokens stops after it."""
    tokenizer = reasoning_tokenizer(smollm2[2], QWEN3_THINKING)
    close_id = tokenizer.convert_tokens_to_ids(CLOSE)
    pieces = token_bytes(tokenizer)
    assert pieces[close_id] == CLOSE.encode()
    pattern = OutsideReasoning(CODE_BLOCK, starts_inside=True)
    table, accept = compile_stop_patterns([pattern], pieces, len(tokenizer))
    text = ("Try it:\n```python\nprint(2 + 2)\n```\nthat was reasoning.</think>\nMy check:\n"
            "```python\nprint(17 * 23)\n```\nand the model goes on")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert close_id in ids
    stop = _walk(table, accept, ids)
    assert tokenizer.decode(ids[:stop + 1]) == text[:match_end(text, pattern)]
    assert tokenizer.decode(ids[:stop + 1]).endswith("print(17 * 23)\n```")
