"""Stop strings matched on device, one table lookup per generated token.

A stop pattern is a string (stop where it first appears in the generated text) or a tuple of
strings that must appear in order: ("```python", "```") stops at the fence that closes a Python
block, not at the opener's own backticks. Each pattern compiles to a byte-level automaton (one
KMP automaton per part, chained); lifting it to tokens gives a table next_state[state, token] by
running every token's bytes through the automaton from every state. Decoding then only needs
`state = table[state, token]` per row and step, so a row stops on exactly the token that completes
the pattern, without a host round trip or wasted decode steps.

Trade-off against host-side checks between decode chunks: the table costs states x vocab int32
per pattern (a few MB for a 150k vocabulary) and is built once per pattern set (~0.1-1 s, cached),
but it needs the bytes of every token (byte-level BPE and SentencePiece byte-fallback are exact;
other tokenizers fall back to decoding single tokens) and patterns are literal strings, not regexes.
Host checks would allow arbitrary predicates but either stall the device every few tokens or
decode past the stop and throw the tokens away.

Reasoning models write <think> ... </think> before their answer, and chat templates of
Qwen3-Thinking or DeepSeek-R1-Distill open that block in the prompt. `OutsideReasoning(pattern)`
counts a pattern only in text outside such blocks: its automaton is the product of the pattern's
and the tags' automata (the pattern's progress is dropped when a block opens; the close tag's own
bytes never count), so it is still one table lookup per token, with states for "inside" as well.
`starts_inside=True` is the variant for generations that begin inside a block the prompt opened.
`match_end` applies the same rules to a string (scripted policies, references in tests).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class OutsideReasoning:
    """A stop pattern that counts only outside reasoning blocks (open ... close tags).

    pattern: a string or tuple of strings in order, as a plain stop pattern. starts_inside: the
    generation begins inside a block (the chat template's generation prompt opened it), so nothing
    counts until the first close tag. A pattern half-matched when a block opens starts over after
    the block closes; a block that opens inside a block is part of it (the first close ends it).
    """
    pattern: str | tuple[str, ...]
    starts_inside: bool = False
    open: str = REASONING_OPEN
    close: str = REASONING_CLOSE

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", tuple(self.pattern))
        if not (isinstance(self.open, str) and self.open and isinstance(self.close, str) and self.close):
            raise ValueError(f"OutsideReasoning tags must be non-empty strings, got {self.open!r} / {self.close!r}")


StopPattern = str | tuple[str, ...] | OutsideReasoning


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer) -> list[bytes]:
    """The raw bytes each token id contributes to the text; special tokens contribute nothing."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder is not None else ""
    byte_of = _bytes_to_unicode()
    out = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif decoder == "ByteLevel" and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
            out.append(bytes([int(piece[3:5], 16)]))
        elif "▁" in piece:  # SentencePiece word boundary
            out.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def _byte_automaton(parts: tuple[bytes, ...]) -> np.ndarray:
    """[states, 256] transitions; state = offset of the current part + matched prefix length;
    the last state (everything matched) is absorbing."""
    offsets = np.cumsum([0] + [len(p) for p in parts])
    accept = int(offsets[-1])
    table = np.zeros((accept + 1, 256), np.int32)
    for part, start in zip(parts, offsets[:-1]):
        m = len(part)
        local = np.zeros((m, 256), np.int32)  # KMP automaton over local states 0..m
        local[0, part[0]] = 1
        restart = 0
        for j in range(1, m):
            local[j] = local[restart]
            local[j, part[j]] = j + 1
            restart = local[restart, part[j]]
        table[start:start + m] = local + start  # local state m == the next part's start
    table[accept] = accept
    return table


def _token_table(automaton: np.ndarray, pieces: list[bytes], vocab_size: int) -> np.ndarray:
    """[states, vocab]: the automaton state after feeding each token's bytes from each state."""
    lengths = np.array([len(p) for p in pieces[:vocab_size]] + [0] * (vocab_size - len(pieces)), np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: the live tokens of column c are a prefix
    width = int(lengths.max(initial=0))
    matrix = np.zeros((vocab_size, max(width, 1)), np.uint8)
    for row, i in enumerate(order[:np.count_nonzero(lengths)]):
        matrix[row, :lengths[i]] = np.frombuffer(pieces[i], np.uint8)
    sorted_lengths = lengths[order]
    states = np.repeat(np.arange(automaton.shape[0], dtype=np.int32)[:, None], vocab_size, axis=1)
    for col in range(width):
        live = int(np.count_nonzero(sorted_lengths > col))
        states[:, :live] = automaton[states[:, :live], matrix[None, :live, col]]
    table = np.empty_like(states)
    table[:, order] = states
    return table


def _gated_automaton(parts: tuple[bytes, ...], open_tag: bytes, close_tag: bytes, starts_inside: bool) -> np.ndarray:
    """[states, 256] for `parts` counted only outside open ... close blocks; state 0 is the start
    (inside a block when starts_inside), the last state accepts. Built as the product of the
    pattern's automaton with the open tag's (outside) and the close tag's (inside), reduced to
    the states reachable from the start."""
    stop, opener, closer = _byte_automaton(parts), _byte_automaton((open_tag,)), _byte_automaton((close_tag,))
    done, opened, closed = len(stop) - 1, len(opener) - 1, len(closer) - 1
    outside = done * opened  # OUT(p, q) = p * opened + q, neither the pattern nor the open tag complete
    inside0, accept = outside, outside + closed  # IN(r) = inside0 + r
    table = np.empty((accept + 1, 256), np.int32)
    p, q = np.divmod(np.arange(outside), opened)
    p2, q2 = stop[p], opener[q]
    table[:outside] = np.where(p2 == done, accept, np.where(q2 == opened, inside0, p2 * opened + q2))
    r2 = closer[:closed]
    table[inside0:accept] = np.where(r2 == closed, 0, inside0 + r2)  # a closed block: OUT(0, 0) = 0
    table[accept] = accept
    start = inside0 if starts_inside else 0
    order, seen = [start], {start, accept}
    for state in order:  # breadth-first; `order` grows while it is walked
        for nxt in np.unique(table[state]).tolist():
            if nxt not in seen:
                seen.add(nxt)
                order.append(nxt)
    order.append(accept)
    renumber = np.full((accept + 1,), -1, np.int32)
    renumber[order] = np.arange(len(order), dtype=np.int32)
    return renumber[table[order]]


def _automaton(pattern: StopPattern) -> np.ndarray:
    if isinstance(pattern, OutsideReasoning):
        return _gated_automaton(_as_parts(pattern.pattern), pattern.open.encode("utf-8"),
                                pattern.close.encode("utf-8"), pattern.starts_inside)
    return _byte_automaton(_as_parts(pattern))


def _as_parts(pattern: StopPattern) -> tuple[bytes, ...]:
    if isinstance(pattern, OutsideReasoning):
        return _as_parts(pattern.pattern)
    parts = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"stop_strings entry {pattern!r} must be a non-empty string or a tuple of non-empty strings")
    return tuple(p.encode("utf-8") for p in parts)


def _normalized(pattern) -> StopPattern:
    return pattern if isinstance(pattern, (str, OutsideReasoning)) else tuple(pattern)


def _chain_end(text: str, parts: tuple[str, ...]) -> int | None:
    position = 0
    for part in parts:
        found = text.find(part, position)
        if found == -1:
            return None
        position = found + len(part)
    return position


def match_end(text: str, pattern: StopPattern) -> int | None:
    """Where `pattern` first completes in `text` (the index just past it), by the rules the device
    tables follow; None when it does not. For hosts that see text: scripted policies, tests."""
    pattern = _normalized(pattern)
    _as_parts(pattern)
    if not isinstance(pattern, OutsideReasoning):
        return _chain_end(text, (pattern,) if isinstance(pattern, str) else pattern)
    parts = (pattern.pattern,) if isinstance(pattern.pattern, str) else pattern.pattern
    position, inside = 0, pattern.starts_inside
    while True:
        if inside:
            close = text.find(pattern.close, position)
            if close == -1:
                return None
            position, inside = close + len(pattern.close), False
            continue
        opening = text.find(pattern.open, position)
        stretch_end = len(text) if opening == -1 else opening + len(pattern.open)
        end = _chain_end(text[position:stretch_end], parts)
        if end is not None:
            return position + end
        if opening == -1:
            return None
        position, inside = stretch_end, True


def _round_up_pow2(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


@functools.lru_cache(maxsize=32)
def _compiled(patterns: tuple, pieces: tuple[bytes, ...], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    tables = [_token_table(_automaton(p), list(pieces), vocab_size) for p in patterns]
    return stop_table_arrays(tables, vocab_size)


def stop_table_arrays(tables: list[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacks per-pattern tables into [patterns, states, vocab] and the accepting state of each.

    Pattern and state counts are rounded up to powers of two so that different stop strings reuse
    the same compiled program. Padding patterns never accept (accept = -1)."""
    num = _round_up_pow2(max(len(tables), 1), 1)
    states = _round_up_pow2(max([t.shape[0] for t in tables] + [1]), 8)
    stacked = np.zeros((num, states, vocab_size), np.int32)
    accept = np.full((num,), -1, np.int32)
    for i, t in enumerate(tables):
        stacked[i, :t.shape[0]] = t
        accept[i] = t.shape[0] - 1
    return stacked, accept


def compile_stop_patterns(patterns, pieces, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(next_state [patterns, states, vocab] int32, accept [patterns] int32) for `patterns`, given
    each token's bytes (`token_bytes(tokenizer)`). Every row starts in state 0 of every pattern."""
    patterns = tuple(_normalized(p) for p in patterns)
    for p in patterns:
        _as_parts(p)  # validate before the (cached) build
    return _compiled(patterns, tuple(pieces), vocab_size)
