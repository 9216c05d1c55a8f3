"""Rule-based grading: math answers (math-verify) and data-science submissions."""
from mappa_jax.eval.ds_metrics import (DSResult, SubmissionError, aggregate_ds_results,
                                       fair_metric_values, score_submission)
from mappa_jax.eval.math_grading import MathGrade, answers_match, grade_math

__all__ = ["DSResult", "MathGrade", "SubmissionError", "aggregate_ds_results", "answers_match",
           "fair_metric_values", "grade_math", "score_submission"]
