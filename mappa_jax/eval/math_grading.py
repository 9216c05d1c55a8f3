"""Rule-based grading of math answers: the last \\boxed{} of a response, checked by math-verify.

No LLM is involved: the boxed expression and the ground truth are parsed to SymPy by
math-verify and compared (numeric equivalence, fractions vs decimals, sets, equations...).
"""
from __future__ import annotations

import dataclasses
import threading

from math_verify import parse, verify

from mappa_jax.data.latex import last_boxed

NO_BOXED_ANSWER = "no_boxed_answer"
UNPARSEABLE_ANSWER = "unparseable_answer"
CORRECT = "correct"
WRONG = "wrong"


@dataclasses.dataclass(frozen=True)
class MathGrade:
    correct: bool
    extracted: str | None  # content of the last \boxed{}, None when there is none
    reason: str  # one of CORRECT, WRONG, NO_BOXED_ANSWER, UNPARSEABLE_ANSWER


def _timeout(seconds: int | None) -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere run
    # without one (callers needing a bound there should grade in a worker process).
    return seconds if threading.current_thread() is threading.main_thread() else None


def answers_match(predicted: str, ground_truth: str, timeout_seconds: int | None = 5) -> bool:
    """Whether a predicted answer (LaTeX, no \\boxed) equals the ground truth, per math-verify."""
    timeout = _timeout(timeout_seconds)
    gold = parse(f"${ground_truth}$", parsing_timeout=timeout)
    if not gold:
        gold = [ground_truth.strip()]  # a plain string answer (e.g. "(B)") compares as text
    guess = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not guess:
        return predicted.strip() == ground_truth.strip()
    return bool(verify(gold, guess, timeout_seconds=timeout))


def grade_math(response: str, ground_truth: str, timeout_seconds: int | None = 5) -> MathGrade:
    """Grade the final answer of a response (e.g. the Verifier's text) against ground truth."""
    extracted = last_boxed(response)
    if extracted is None:
        return MathGrade(False, None, NO_BOXED_ANSWER)
    if not extracted:
        return MathGrade(False, extracted, UNPARSEABLE_ANSWER)
    correct = answers_match(extracted, ground_truth, timeout_seconds)
    return MathGrade(correct, extracted, CORRECT if correct else WRONG)
