"""Strict parsing of coach answers. Never guesses: no "first number in the text" fallback."""
from __future__ import annotations

import dataclasses
import json
import math
import re

from mappa_jax.coach.types import ParseError

SCORE_MIN, SCORE_MAX = 0.0, 10.0

# A whole line `PROCESS_SCORE: <n>`, optionally in markdown bold and with a trailing "/10".
_SCORE_LINE = re.compile(
    r"^[ \t>*_`]*PROCESS_SCORE[ \t*_`]*:[ \t*_`]*(?P<value>[-+]?\d+(?:\.\d+)?)[ \t*_`]*(?:/[ \t]*10)?[ \t*_`.]*$",
    re.MULTILINE)
_CORRECT_LINE = re.compile(r"^[ \t>*_`]*CORRECT[ \t*_`]*:[ \t*_`]*(?P<value>yes|no|true|false)\b",
                           re.MULTILINE | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(?P<body>.*?)\n\s*```\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedVerdict:
    score: float
    reasoning: str
    correct: bool | None


def _check_range(value: float) -> float:
    if not math.isfinite(value) or not SCORE_MIN <= value <= SCORE_MAX:
        raise ParseError("out_of_range", f"score {value} is outside {SCORE_MIN:g}..{SCORE_MAX:g}")
    return float(value)


def parse_json_verdict(text: str) -> ParsedVerdict:
    """A JSON object with an integer `score` 0-10, `reasoning` and optional boolean `correct`."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:  # models sometimes wrap JSON in a code fence even in JSON mode
        body = fenced.group("body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ParseError("malformed_json", f"answer is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(data, dict):
        raise ParseError("malformed_json", f"answer is JSON {type(data).__name__}, expected an object")
    if "score" not in data:
        raise ParseError("malformed_json", "answer JSON has no 'score' field")
    score = data["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ParseError("malformed_json", f"'score' must be a number, got {type(score).__name__}")
    reasoning = data.get("reasoning", "")
    if not isinstance(reasoning, str):
        raise ParseError("malformed_json", "'reasoning' must be a string")
    correct = data.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise ParseError("malformed_json", "'correct' must be true, false or null")
    return ParsedVerdict(_check_range(float(score)), reasoning, correct)


def parse_text_verdict(text: str) -> ParsedVerdict:
    """Free text ending in a `PROCESS_SCORE: <n>` line (and optionally `CORRECT: yes|no`)."""
    visible = _THINK.sub("", text)
    values = [m.group("value") for m in _SCORE_LINE.finditer(visible)]
    if not values:
        raise ParseError("no_score", "answer has no line of the form 'PROCESS_SCORE: <0-10>'")
    if len({float(v) for v in values}) > 1:
        raise ParseError("no_score", f"answer has conflicting PROCESS_SCORE lines: {values}")
    score = _check_range(float(values[-1]))
    correct_match = list(_CORRECT_LINE.finditer(visible))
    correct = None
    if correct_match:
        correct = correct_match[-1].group("value").lower() in ("yes", "true")
    reasoning = _SCORE_LINE.sub("", visible)
    reasoning = _CORRECT_LINE.sub("", reasoning).strip()
    return ParsedVerdict(score, reasoning, correct)


def parse_verdict(text: str, output_format: str) -> ParsedVerdict:
    if output_format == "json":
        return parse_json_verdict(text)
    if output_format == "text":
        return parse_text_verdict(text)
    raise ValueError(f"unknown output_format {output_format!r}")
