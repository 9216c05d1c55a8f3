"""Score data-science submissions against hidden answers, and aggregate runs fairly.

A submission is a CSV with the task's id column and target column (one row per test row;
extra rows are ignored). Classification may add probability columns named
`proba_<label>`; ROC-AUC uses them (binary: the positive label's column, or 1 - the other
one; multiclass: one column per class, one-vs-rest macro average as in scikit-learn). Without
them a binary task's ROC-AUC is computed from the hard labels (score 1 for the positive
label) and a multiclass task's ROC-AUC is not reported. The positive label of a binary task is
the larger of the two in sorted order (scikit-learn's convention).

Metrics are written out in NumPy here; the tests check them against scikit-learn.

Fair aggregation: a failed run (no submission, unreadable, wrong columns, missing ids,
non-numeric regression predictions) is not dropped. It counts as success 0 with the worst
value of each metric: accuracy, macro-F1 and ROC-AUC 0; for RMSE/MAE (unbounded) the larger
of the no-skill value (predicting the answers' mean for RMSE, their median for MAE) and the
worst value any successful run of the same task reached in the aggregated set. nrmse and nmae
are RMSE and MAE divided by the no-skill values, comparable across tasks (1.0 = no skill).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Iterable

import numpy as np
import pandas as pd

from mappa_jax.data.task import CLASSIFICATION, REGRESSION, DataError, Task

PROBA_PREFIX = "proba_"
CLASSIFICATION_FAILURE = {"accuracy": 0.0, "macro_f1": 0.0, "roc_auc": 0.0}
LOWER_IS_BETTER = ("rmse", "mae", "nrmse", "nmae")


class SubmissionError(ValueError):
    """The submission cannot be scored; the run counts as a failure."""


@dataclasses.dataclass(frozen=True)
class DSResult:
    task_id: str
    task_type: str
    success: bool
    metrics: dict[str, float]  # empty on failure; roc_auc may be NaN (not computable)
    error: str | None = None
    no_skill: dict[str, float] = dataclasses.field(default_factory=dict)  # regression only


# ---- metric formulas -------------------------------------------------------------------

def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over every label seen in y_true or y_pred of 2TP / (2TP + FP + FN)."""
    scores = []
    for label in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == label) & (y_true == label))
        fp = np.sum((y_pred == label) & (y_true != label))
        fn = np.sum((y_pred != label) & (y_true == label))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def binary_roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > a random negative), ties counting 1/2 (Mann-Whitney U)."""
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    rank_sum = ranks[is_positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(y_true - y_pred)))


def no_skill(y_true: np.ndarray) -> dict[str, float]:
    """RMSE of predicting the mean and MAE of predicting the median of the true values."""
    return {"rmse": rmse(y_true, np.full_like(y_true, y_true.mean())),
            "mae": mae(y_true, np.full_like(y_true, np.median(y_true)))}


# ---- reading and aligning ----------------------------------------------------------------

def _label_strings(values: pd.Series) -> np.ndarray:
    """Labels (or ids) as comparable strings: 1, 1.0 and "1" agree; text is stripped."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return np.array([str(int(v)) if float(v).is_integer() else repr(float(v))
                         for v in numeric])
    return values.astype(str).str.strip().to_numpy()


def _read_submission(path: pathlib.Path, id_column: str, target_column: str) -> pd.DataFrame:
    if path.is_symlink():
        # Model code writes the workspace: a link could point the host-side scorer at the hidden
        # answers themselves. Only a regular file written in the workspace counts.
        raise SubmissionError(f"{path} is a symbolic link, not a submission file")
    if not path.is_file():
        raise SubmissionError(f"no submission file at {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise SubmissionError(f"{path}: unreadable CSV ({err})") from err
    missing = [c for c in (id_column, target_column) if c not in frame.columns]
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    duplicated = frame[id_column][frame[id_column].duplicated()]
    if len(duplicated):
        raise SubmissionError(f"{path}: duplicate ids, e.g. {duplicated.iloc[:5].tolist()}")
    return frame


def _align(answers: pd.DataFrame, submission: pd.DataFrame, id_column: str,
           path: pathlib.Path) -> pd.DataFrame:
    """Submission rows in the answers' order; every answer id must be present."""
    keyed = submission.assign(_key=_label_strings(submission[id_column]))
    if keyed["_key"].duplicated().any():
        raise SubmissionError(f"{path}: ids repeat after normalization (e.g. 7 and 7.0)")
    keys = pd.Series(_label_strings(answers[id_column]))
    missing = keys[~keys.isin(keyed["_key"])]
    if len(missing):
        raise SubmissionError(f"{path}: {len(missing)} of {len(keys)} test ids missing, e.g. "
                              f"{missing.iloc[:5].tolist()}")
    return keyed.set_index("_key").loc[keys.to_numpy()].reset_index(drop=True)


def _classification_metrics(truth: pd.Series, aligned: pd.DataFrame,
                            target: str, path: pathlib.Path) -> dict[str, float]:
    if aligned[target].isna().any():
        raise SubmissionError(f"{path}: {int(aligned[target].isna().sum())} empty predictions")
    y_true, y_pred = _label_strings(truth), _label_strings(aligned[target])
    metrics = {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred)}
    classes = np.unique(y_true)
    proba = {label: column for column in aligned.columns if column.startswith(PROBA_PREFIX)
             for label in _label_strings(pd.Series([column[len(PROBA_PREFIX):]]))}
    auc = math.nan
    if len(classes) == 2:
        negative, positive = classes
        if positive in proba:
            scores = pd.to_numeric(aligned[proba[positive]], errors="coerce").to_numpy()
        elif negative in proba:
            scores = 1.0 - pd.to_numeric(aligned[proba[negative]], errors="coerce").to_numpy()
        else:
            scores = (y_pred == positive).astype(float)
        if np.isfinite(scores).all():
            auc = binary_roc_auc(y_true == positive, scores)
    elif len(classes) > 2 and all(label in proba for label in classes):
        per_class = []
        for label in classes:
            scores = pd.to_numeric(aligned[proba[label]], errors="coerce").to_numpy()
            per_class.append(binary_roc_auc(y_true == label, scores) if np.isfinite(scores).all()
                             else math.nan)
        auc = float(np.mean(per_class))
    metrics["roc_auc"] = auc
    return metrics


def _regression_metrics(y_true: np.ndarray, aligned: pd.DataFrame, target: str,
                        reference: dict[str, float], path: pathlib.Path) -> dict[str, float]:
    y_pred = pd.to_numeric(aligned[target], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(y_pred)
    if bad.any():
        raise SubmissionError(f"{path}: {int(bad.sum())} predictions are empty, non-numeric or "
                              f"infinite")
    metrics = {"rmse": rmse(y_true, y_pred), "mae": mae(y_true, y_pred)}
    metrics["nrmse"] = metrics["rmse"] / reference["rmse"] if reference["rmse"] else math.nan
    metrics["nmae"] = metrics["mae"] / reference["mae"] if reference["mae"] else math.nan
    return metrics


def score_submission(task: Task, submission_path: str | pathlib.Path) -> DSResult:
    """Score one run's submission.csv against the task's hidden answers.

    A bad submission gives success=False with the reason in `error`; a bad answers file (our
    data, not the agents') raises.
    """
    files = task.data_science
    if files is None:
        raise ValueError(f"task {task.task_id!r} is not a data-science task")
    if not pathlib.Path(files.answers_path).is_file():
        raise DataError(f"task {task.task_id!r}: hidden answers file not found: "
                        f"{files.answers_path}")
    answers = pd.read_csv(files.answers_path)
    target, id_column = files.target_column, files.id_column
    path = pathlib.Path(submission_path)
    reference: dict[str, float] = {}
    if task.task_type == REGRESSION:
        y_true = answers[target].to_numpy(dtype=float)
        reference = no_skill(y_true)
    try:
        aligned = _align(answers, _read_submission(path, id_column, target), id_column, path)
        if task.task_type == CLASSIFICATION:
            metrics = _classification_metrics(answers[target], aligned, target, path)
        elif task.task_type == REGRESSION:
            metrics = _regression_metrics(y_true, aligned, target, reference, path)
        else:
            raise ValueError(f"task {task.task_id!r}: unknown data-science task_type "
                             f"{task.task_type!r}")
    except SubmissionError as err:
        return DSResult(task.task_id, task.task_type, False, {}, str(err), reference)
    return DSResult(task.task_id, task.task_type, True, metrics, None, reference)


# ---- fair aggregation ---------------------------------------------------------------------

def _regression_failure_values(results: list[DSResult]) -> dict[str, dict[str, float]]:
    """Per task: the largest of the no-skill value and every successful run's value."""
    worst: dict[str, dict[str, float]] = {}
    for result in results:
        if result.task_type != REGRESSION:
            continue
        values = worst.setdefault(result.task_id, {"nrmse": 1.0, "nmae": 1.0})
        for source in (result.no_skill, result.metrics if result.success else {}):
            for name in LOWER_IS_BETTER:
                value = source.get(name, math.nan)
                if math.isfinite(value):
                    values[name] = max(values.get(name, -math.inf), value)
    return worst


def fair_metric_values(results: Iterable[DSResult]) -> list[dict[str, float]]:
    """Each run's metrics with failures replaced by the documented worst-case values."""
    results = list(results)
    regression_failure = _regression_failure_values(results)
    rows = []
    for result in results:
        if result.success:
            values = dict(result.metrics)
        elif result.task_type == CLASSIFICATION:
            values = dict(CLASSIFICATION_FAILURE)
        else:
            values = dict(regression_failure[result.task_id])
        values["success"] = float(result.success)
        rows.append(values)
    return rows


def aggregate_ds_results(results: Iterable[DSResult]) -> dict[str, dict[str, float]]:
    """Means per task type (and "all" for success) with failures counted, never dropped.

    Keys per type: runs, success_rate, then the metric means. A successful multiclass run
    without probabilities has no ROC-AUC; roc_auc_runs says how many runs the mean covers.
    """
    results = list(results)
    rows = fair_metric_values(results)
    summary: dict[str, dict[str, float]] = {
        "all": {"runs": float(len(results)),
                "success_rate": float(np.mean([r["success"] for r in rows])) if rows else math.nan}}
    for task_type, metric_names in ((CLASSIFICATION, ("accuracy", "macro_f1", "roc_auc")),
                                    (REGRESSION, ("rmse", "mae", "nrmse", "nmae"))):
        typed = [row for row, result in zip(rows, results) if result.task_type == task_type]
        if not typed:
            continue
        entry = {"runs": float(len(typed)),
                 "success_rate": float(np.mean([row["success"] for row in typed]))}
        for name in metric_names:
            values = [row[name] for row in typed if math.isfinite(row.get(name, math.nan))]
            entry[name] = float(np.mean(values)) if values else math.nan
            if name == "roc_auc":
                entry["roc_auc_runs"] = float(len(values))
        summary[task_type] = entry
    return summary
