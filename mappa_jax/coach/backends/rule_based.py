"""A reference coach that scores from verifiable facts only, for offline runs and tests.

Rubric. Each role has weighted checks; checks that cannot be evaluated for this action (no ground
truth, upstream files missing) are left out, and

    score = 10 * sum(weight * passed) / sum(weight of the checks that apply), rounded to an integer.

MathChat (answers are the last \\boxed{...}; equality via math-verify when installed, else an
exact match after normalization: spaces, $, \\left/\\right, \\text{}, \\!, trailing period, case):
  problem_solver  gave a boxed answer (2); answer equals ground truth (8, needs ground truth)
  code_executor   wrote a fenced code block (2); the tool output shows no error (3);
                  answer equals ground truth (5, needs ground truth; the answer is its last boxed
                  value, else the last non-empty line of the tool output)
  verifier        exactly one boxed answer (2); answer equals ground truth (8, needs ground truth;
                  several different boxed answers are a hedge and count as wrong)
Data science (files match by stem, any extension; "errors" are Traceback/Error/Exception lines):
  data_engineer   code ran without error (3); X_train, y_train, X_test present (7, by fraction)
  modeler         code ran without error (3); if X_train and y_train are present: a model file was
                  created (7); if they are missing: the agent reported the missing input (7)
  analyst         code ran without error (3); if X_test and a model file are present:
                  submission.csv present (4) and, when the harness gives a scale-free quality
                  (normalized_score, or accuracy / f1 / roc_auc in [0, 1]), their mean (3);
                  if inputs are missing: the agent reported the missing input (7)
Other roles: code ran without error (when there is tool output); answer equals ground truth.
`correct` is set whenever the answer was compared with a ground truth. An action with no applicable
check is not guessed at: the backend raises and the client records a fallback.
"""
from __future__ import annotations

import json
import re
from typing import Any

from mappa_jax.coach.prompts import Prompt
from mappa_jax.coach.types import BackendError, CoachRequest, RawResult

_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b[:\s]",
                         re.MULTILINE)
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n.*?```", re.DOTALL)
_MISSING = re.compile(r"missing|not found|no such file|does not exist|doesn't exist|cannot find|"
                      r"can't find|FileNotFoundError", re.IGNORECASE)


def boxed_answers(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, with nested braces balanced."""
    answers = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                answers.append(text[start:i].strip())
                break
    return answers


def normalize_answer(text: str) -> str:
    out = text.strip()
    out = re.sub(r"\\text\{([^}]*)\}", r"\1", out)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", " "):
        out = out.replace(token, "")
    out = out.rstrip(".")
    if out.startswith("{") and out.endswith("}"):
        out = out[1:-1]
    return out.lower()


def answers_match(candidate: str, truth: str) -> bool:
    if normalize_answer(candidate) == normalize_answer(truth):
        return True
    try:
        import math_verify  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    gold = math_verify.parse(f"${truth}$", parsing_timeout=None)
    pred = math_verify.parse(f"${candidate}$", parsing_timeout=None)
    return bool(gold) and bool(pred) and bool(math_verify.verify(gold, pred, timeout_seconds=None))


def code_ran_clean(tool_output: str) -> bool:
    return _ERROR_LINE.search(tool_output) is None


def _has_file(files: tuple[str, ...], stem: str) -> bool:
    stem = stem.lower()
    for path in files:
        name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
        if name == stem or name.startswith(stem + "."):
            return True
    return False


def _has_model_file(files: tuple[str, ...]) -> bool:
    return any("model" in path.replace("\\", "/").rsplit("/", 1)[-1].lower() for path in files)


def _math_answer(request: CoachRequest) -> str | None:
    boxed = boxed_answers(request.agent_output)
    if boxed:
        return boxed[-1]
    if request.role == "code_executor" and request.tool_output.strip():
        return request.tool_output.strip().splitlines()[-1].strip()
    return None


def _checks(request: CoachRequest) -> tuple[list[tuple[str, float, float]], bool | None]:
    """[(name, weight, passed in [0, 1])] for the applicable checks, and the correctness bit."""
    r = request
    checks: list[tuple[str, float, float]] = []
    correct = None
    gt = r.ground_truth
    if r.pipeline == "mathchat":
        answer = _math_answer(r)
        if gt is not None:
            correct = answer is not None and answers_match(answer, gt)
        if r.role == "problem_solver":
            checks.append(("gave_boxed_answer", 2, float(bool(boxed_answers(r.agent_output)))))
            if correct is not None:
                checks.append(("answer_correct", 8, float(correct)))
        elif r.role == "code_executor":
            wrote_code = bool(_CODE_BLOCK.search(r.agent_output))
            checks.append(("wrote_code", 2, float(wrote_code)))
            checks.append(("code_ran_clean", 3, float(wrote_code and code_ran_clean(r.tool_output))))
            if correct is not None:
                checks.append(("answer_correct", 5, float(correct)))
        elif r.role == "verifier":
            if len({normalize_answer(b) for b in boxed_answers(r.agent_output)}) > 1 and correct:
                correct = False
            checks.append(("one_boxed_answer", 2, float(len(boxed_answers(r.agent_output)) == 1)))
            if correct is not None:
                checks.append(("answer_correct", 8, float(correct)))
    elif r.pipeline == "datascience":
        present = r.files_present + r.files_created
        if r.role in ("data_engineer", "modeler", "analyst"):
            checks.append(("code_ran_clean", 3, float(code_ran_clean(r.tool_output))))
        reported_missing = float(bool(_MISSING.search(r.agent_output)))
        if r.role == "data_engineer":
            required = ("x_train", "y_train", "x_test")
            checks.append(("saved_required_files", 7,
                           sum(_has_file(present, s) for s in required) / len(required)))
        elif r.role == "modeler":
            if _has_file(present, "x_train") and _has_file(present, "y_train"):
                checks.append(("saved_model_file", 7, float(_has_model_file(r.files_created))))
            else:
                checks.append(("reported_missing_input", 7, reported_missing))
        elif r.role == "analyst":
            if _has_file(present, "x_test") and _has_model_file(present):
                checks.append(("wrote_submission", 4, float(_has_file(present, "submission"))))
                quality = _scale_free_quality(r.harness_metrics or {})
                if quality is not None:
                    checks.append(("submission_quality", 3, quality))
            else:
                checks.append(("reported_missing_input", 7, reported_missing))
    if not checks:  # custom roles
        if r.tool_output:
            checks.append(("code_ran_clean", 3, float(code_ran_clean(r.tool_output))))
        if gt is not None:
            answer = _math_answer(r) or r.agent_output.strip()
            correct = answers_match(answer, gt)
            checks.append(("answer_correct", 7, float(correct)))
    return checks, correct


def _scale_free_quality(metrics: dict[str, Any]) -> float | None:
    if isinstance(metrics.get("normalized_score"), (int, float)):
        return min(max(float(metrics["normalized_score"]), 0.0), 1.0)
    values = [float(metrics[k]) for k in ("accuracy", "f1", "roc_auc")
              if isinstance(metrics.get(k), (int, float)) and 0.0 <= metrics[k] <= 1.0]
    return sum(values) / len(values) if values else None


def score_request(request: CoachRequest) -> dict[str, Any]:
    """The verdict as the JSON object a model coach would return."""
    checks, correct = _checks(request)
    if not checks:
        raise BackendError("backend_error", f"rule-based coach has no verifiable check for role "
                           f"{request.role!r} of pipeline {request.pipeline!r} without ground truth or "
                           f"tool output", retryable=False)
    total = sum(w for _, w, _ in checks)
    score = round(10 * sum(w * p for _, w, p in checks) / total)
    reasoning = "; ".join(f"{name}={p:.2f} (weight {w:g})" for name, w, p in checks)
    return {"reasoning": reasoning, "score": int(score), "correct": correct}


class RuleBasedBackend:
    name = "rule_based"
    output_format = "json"

    def __init__(self, *, model: str = "rules-v1"):
        self.model = model  # the rubric version: part of the cache key

    def check_credentials(self) -> None:
        """No credentials needed."""

    def prepare(self) -> None:
        pass

    async def score(self, prompt: Prompt, schema: dict[str, Any]) -> RawResult:
        del schema
        if prompt.request is None:
            raise BackendError("backend_error", "rule-based coach needs the CoachRequest on the prompt",
                               retryable=False)
        return RawResult(text=json.dumps(score_request(prompt.request)), structured=True)

    async def aclose(self) -> None:
        pass
