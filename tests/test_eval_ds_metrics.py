"""Data-science grading: metrics against hand-computed values and scikit-learn, fair aggregates."""
import math
import re

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mappa_jax.data import DataScienceFiles, Task
from mappa_jax.eval import aggregate_ds_results, fair_metric_values, score_submission


def _task(tmp_path, name, task_type, ids, truth, target="y"):
    answers = tmp_path / f"{name}_answers.csv"
    pd.DataFrame({"id": ids, target: truth}).to_csv(answers, index=False)
    metric_names = ("accuracy", "macro_f1", "roc_auc") if task_type == "classification" else (
        "rmse", "mae")
    files = DataScienceFiles(str(tmp_path / name), str(answers), target, "id", metric_names)
    return Task(name, "datascience", task_type, "predict y", data_science=files)


def _submit(tmp_path, name, frame):
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


def test_classification_hand_computed_and_alignment(tmp_path):
    task = _task(tmp_path, "cls", "classification", [10, 11, 12, 13, 14], list("aabbc"))
    # Rows shuffled, one extra id, labels correct except id 11 (a -> b).
    sub = pd.DataFrame({"id": [14, 12, 99, 11, 13, 10], "y": ["c", "b", "a", "b", "b", "a"]})
    result = score_submission(task, _submit(tmp_path, "s", sub))
    assert result.success and result.error is None
    assert result.metrics["accuracy"] == pytest.approx(4 / 5)
    # F1 per class: a = 2/(2+0+1), b = 4/(4+1+0), c = 1.
    assert result.metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert math.isnan(result.metrics["roc_auc"])  # multiclass without probabilities


def test_metrics_match_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    ids = rng.permutation(n) + 1000
    labels = rng.choice(["cat", "dog", "emu"], n)
    proba = rng.dirichlet(np.ones(3), n)
    predicted = np.array(["cat", "dog", "emu"])[proba.argmax(1)]
    task = _task(tmp_path, "multi", "classification", ids, labels)
    sub = pd.DataFrame({"id": ids, "y": predicted, "proba_cat": proba[:, 0],
                        "proba_dog": proba[:, 1], "proba_emu": proba[:, 2]})
    got = score_submission(task, _submit(tmp_path, "m", sub.sample(frac=1, random_state=1)))
    assert got.metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert got.metrics["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted,
                                                                 average="macro"))
    assert got.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(
        labels, proba, multi_class="ovr", labels=["cat", "dog", "emu"]))

    binary = rng.integers(0, 2, n)
    score = np.round(rng.random(n) * 0.5 + binary * 0.3, 1)  # rounding creates ties
    task = _task(tmp_path, "bin", "classification", ids, binary)
    hard = (score > 0.4).astype(float)  # 1.0 / 0.0 labels must match 1 / 0 answers
    sub = pd.DataFrame({"id": ids, "y": hard, "proba_1": score})
    got = score_submission(task, _submit(tmp_path, "b", sub))
    assert got.metrics["accuracy"] == pytest.approx(skm.accuracy_score(binary, hard))
    assert got.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(binary, score))
    only_negative_column = sub.drop(columns=["proba_1"]).assign(proba_0=1 - score)
    got = score_submission(task, _submit(tmp_path, "b0", only_negative_column))
    assert got.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(binary, score))
    got = score_submission(task, _submit(tmp_path, "bh", sub.drop(columns=["proba_1"])))
    assert got.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(binary, hard))

    truth = rng.normal(50, 10, n)
    guess = truth + rng.normal(0, 3, n)
    task = _task(tmp_path, "reg", "regression", ids, truth)
    got = score_submission(task, _submit(tmp_path, "r", pd.DataFrame({"id": ids, "y": guess})))
    assert got.metrics["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(truth, guess)))
    assert got.metrics["mae"] == pytest.approx(skm.mean_absolute_error(truth, guess))
    assert got.no_skill["rmse"] == pytest.approx(np.std(truth))
    assert got.metrics["nrmse"] == pytest.approx(got.metrics["rmse"] / np.std(truth))


def test_regression_hand_computed(tmp_path):
    task = _task(tmp_path, "r", "regression", [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    sub = pd.DataFrame({"id": [4, 3, 2, 1], "y": [4.0, 5.0, 2.0, 2.0]})  # errors 0, 2, 0, 1
    result = score_submission(task, _submit(tmp_path, "s", sub))
    assert result.metrics["mae"] == pytest.approx(0.75)
    assert result.metrics["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert result.no_skill == pytest.approx({"rmse": math.sqrt(1.25), "mae": 1.0})


@pytest.mark.parametrize("frame, message", [
    (None, "no submission file at"),
    (pd.DataFrame({"id": [1, 2, 3, 4], "prediction": [1, 2, 3, 4]}),
     r"missing column\(s\) \['y'\]"),
    (pd.DataFrame({"id": [1, 2, 3], "y": [1, 2, 3]}), r"1 of 4 test ids missing, e.g. \['4'\]"),
    (pd.DataFrame({"id": [1, 1, 2, 3, 4], "y": [1, 1, 2, 3, 4]}), "duplicate ids"),
    (pd.DataFrame({"id": [1, 2, 3, 4], "y": [1, "two", 3, 4]}), "1 predictions are empty"),
])
def test_invalid_submissions_fail_with_reason(tmp_path, frame, message):
    task = _task(tmp_path, "r", "regression", [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    path = tmp_path / "submission.csv"
    if frame is not None:
        frame.to_csv(path, index=False)
    result = score_submission(task, path)
    assert not result.success and result.metrics == {}
    assert result.error is not None and pytest.approx(1.0) == result.no_skill["mae"]
    assert re.search(message, result.error), result.error


def test_fair_aggregate_counts_failures(tmp_path):
    cls = _task(tmp_path, "c", "classification", [1, 2, 3, 4], ["a", "a", "b", "b"])
    reg = _task(tmp_path, "r", "regression", [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    cls_ok = score_submission(cls, _submit(tmp_path, "c1", pd.DataFrame(
        {"id": [1, 2, 3, 4], "y": ["a", "b", "b", "b"]})))  # accuracy 3/4
    cls_fail = score_submission(cls, tmp_path / "missing.csv")
    reg_good = score_submission(reg, _submit(tmp_path, "r1", pd.DataFrame(
        {"id": [1, 2, 3, 4], "y": [1.0, 2.0, 3.0, 5.0]})))  # rmse 0.5, mae 0.25
    reg_bad = score_submission(reg, _submit(tmp_path, "r2", pd.DataFrame(
        {"id": [1, 2, 3, 4], "y": [10.0] * 4})))  # rmse sqrt(57.5), worse than no skill
    reg_fail = score_submission(reg, tmp_path / "missing.csv")

    rows = fair_metric_values([cls_fail, reg_fail])
    assert rows[0] == {"accuracy": 0.0, "macro_f1": 0.0, "roc_auc": 0.0, "success": 0.0}
    assert rows[1]["rmse"] == pytest.approx(math.sqrt(1.25))  # only no-skill known
    summary = aggregate_ds_results([cls_ok, cls_fail, reg_good, reg_bad, reg_fail])
    assert summary["all"] == {"runs": 5.0, "success_rate": pytest.approx(3 / 5)}
    assert summary["classification"]["success_rate"] == 0.5
    assert summary["classification"]["accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    # A failure is as bad as the worst successful run of that task (here worse than no skill).
    worst = math.sqrt(57.5)
    assert summary["regression"]["rmse"] == pytest.approx((0.5 + worst + worst) / 3)
    assert summary["regression"]["mae"] == pytest.approx((0.25 + 7.5 + 7.5) / 3)
    assert summary["regression"]["nrmse"] == pytest.approx(
        (0.5 + 2 * worst) / 3 / math.sqrt(1.25))


def test_float_ids_align_with_integer_answers(tmp_path):
    task = _task(tmp_path, "ids", "regression", [7, 8], [1.0, 3.0])
    sub = pd.DataFrame({"id": [8.0, 7.0], "y": [3.0, 2.0]})
    result = score_submission(task, _submit(tmp_path, "s", sub))
    assert result.success and result.metrics["mae"] == pytest.approx(0.5)


def test_model_trained_on_sklearn_task_files_scores_like_sklearn(tmp_path):
    """The whole data-science path: task files -> a real model -> submission.csv -> metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from mappa_jax.data import write_sklearn_tasks
    task = write_sklearn_tasks(tmp_path, seed=0, names=("breast_cancer",))[0]
    files = task.data_science
    train, test = pd.read_csv(files.train_csv), pd.read_csv(files.test_csv)
    features = [c for c in test.columns if c != files.id_column]
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(
        train[features], train[files.target_column])
    proba = model.predict_proba(test[features])
    submission = pd.DataFrame({files.id_column: test[files.id_column],
                               files.target_column: model.predict(test[features])})
    for column, label in enumerate(model.classes_):
        submission[f"proba_{label}"] = proba[:, column]
    result = score_submission(task, _submit(tmp_path, "submission", submission))
    truth = pd.read_csv(files.answers_path).set_index(files.id_column).loc[
        test[files.id_column], files.target_column]
    assert result.success and result.metrics["accuracy"] > 0.9
    assert result.metrics["accuracy"] == pytest.approx(
        skm.accuracy_score(truth, submission[files.target_column]))
    assert result.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(
        truth == "malignant", submission["proba_malignant"]))


def test_symlinked_submission_is_refused(tmp_path):
    """A workspace link to the hidden answers must not score as a perfect submission."""
    from mappa_jax.data import write_sklearn_tasks
    from mappa_jax.eval import score_submission
    task = next(t for t in write_sklearn_tasks(tmp_path / "tasks", seed=0) if t.task_type == "classification")
    link = tmp_path / "submission.csv"
    link.symlink_to(task.data_science.answers_path)
    result = score_submission(task, link)
    assert not result.success and "symbolic link" in result.error
