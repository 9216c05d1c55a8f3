"""DSBench-format task directories and the scikit-learn tasks built from sklearn's wheel."""
import json
import pathlib

import numpy as np
import pandas as pd
import pytest
from sklearn import datasets

from mappa_jax.data import (DataError, DSBenchTasks, SklearnTasks, load_dsbench_tasks,
                            task_source, write_sklearn_tasks)


def _write_task(root, answers_root, name, target_values, description="Predict y.",
                answers_layout="flat", task_json=None):
    task_dir = root / name
    task_dir.mkdir(parents=True)
    n = len(target_values)
    ids = np.arange(100, 100 + n)
    train = pd.DataFrame({"Id": ids, "x": np.arange(n) * 0.5, "y": target_values})
    train.to_csv(task_dir / "train.csv", index=False)
    train.drop(columns=["y"]).to_csv(task_dir / "test.csv", index=False)
    (task_dir / "description.md").write_text(description)
    if task_json is not None:
        (task_dir / "task.json").write_text(json.dumps(task_json))
    answers = train[["Id", "y"]]
    if answers_layout == "flat":
        answers_root.mkdir(parents=True, exist_ok=True)
        answers.to_csv(answers_root / f"{name}.csv", index=False)
    else:  # DSBench's own layout
        (answers_root / name).mkdir(parents=True)
        answers.to_csv(answers_root / name / "test_answer.csv", index=False)
    return task_dir


def test_dsbench_dirs_round_trip_with_inferred_fields(tmp_path):
    tasks_root, answers_root = tmp_path / "tasks", tmp_path / "answers"
    _write_task(tasks_root, answers_root, "houses", [1.5, 2.25, 3.0, 7.75, 9.1, 10.2])
    _write_task(tasks_root, answers_root, "churn", ["yes", "no", "no", "yes"],
                answers_layout="dsbench", description="Will they churn?")
    _write_task(tasks_root, answers_root, "grades", [1, 2, 3, 1], task_json={
        "target_column": "y", "id_column": "Id", "task_type": "regression"})
    tasks = {t.task_id: t for t in load_dsbench_tasks(tasks_root, answers_root)}
    assert sorted(tasks) == ["dsbench/churn", "dsbench/grades", "dsbench/houses"]
    houses, churn = tasks["dsbench/houses"], tasks["dsbench/churn"]
    assert (houses.kind, houses.task_type) == ("datascience", "regression")
    assert houses.data_science.metric_names == ("rmse", "mae")
    assert (houses.data_science.id_column, houses.data_science.target_column) == ("Id", "y")
    assert churn.task_type == "classification" and churn.prompt == "Will they churn?"
    assert churn.data_science.answers_path.endswith("answers/churn/test_answer.csv")
    assert tasks["dsbench/grades"].task_type == "regression"  # task.json overrides inference
    assert not churn.data_science.answers_path.startswith(churn.data_science.task_dir)

    stored = task_source(DSBenchTasks(tasks_root, answers_root, data_dir=tmp_path / "tfds"))
    assert sorted(stored, key=lambda t: t.task_id) == [tasks[k] for k in sorted(tasks)]


def test_dsbench_errors_name_the_path(tmp_path):
    tasks_root, answers_root = tmp_path / "tasks", tmp_path / "answers"
    task_dir = _write_task(tasks_root, answers_root, "t", [1.0, 2.0, 3.5])
    (task_dir / "test.csv").unlink()
    with pytest.raises(DataError, match=r"missing data file: .*t/test\.csv"):
        load_dsbench_tasks(tasks_root, answers_root)
    (answers_root / "t.csv").unlink()
    with pytest.raises(DataError, match=r"task 't': no hidden answers file; expected .*t\.csv"):
        load_dsbench_tasks(tasks_root, answers_root)
    with pytest.raises(DataError, match=r"DSBench tasks root not found: .*nowhere"):
        load_dsbench_tasks(tmp_path / "nowhere", answers_root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no task directories under .*empty"):
        load_dsbench_tasks(empty, answers_root)
    with pytest.raises(DataError, match="answers root .* lies inside tasks root"):
        load_dsbench_tasks(tasks_root, tasks_root / "t")
    leaky_root = tmp_path / "leaky"
    leaky = _write_task(leaky_root, tmp_path / "leaky_answers", "l", [1.0, 2.0, 3.5])
    pd.read_csv(leaky / "train.csv").to_csv(leaky / "test.csv", index=False)
    with pytest.raises(DataError, match="contains the target column 'y'"):
        load_dsbench_tasks(leaky_root, tmp_path / "leaky_answers")


@pytest.fixture(scope="session")
def sklearn_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sklearn_tasks")
    return root, write_sklearn_tasks(root / "files", seed=7)


def test_sklearn_tasks_split_and_hide_answers(sklearn_dir):
    root, tasks = sklearn_dir
    by_name = {t.task_id.split("/")[1]: t for t in tasks}
    assert {n for n, t in by_name.items() if t.task_type == "classification"} == {
        "iris", "wine", "breast_cancer"}
    assert {n for n, t in by_name.items() if t.task_type == "regression"} >= {"diabetes"}
    for name, loader in (("iris", datasets.load_iris), ("diabetes", datasets.load_diabetes)):
        task = by_name[name]
        files = task.data_science
        train, test = pd.read_csv(files.train_csv), pd.read_csv(files.test_csv)
        answers = pd.read_csv(files.answers_path)
        assert len(train) + len(test) == len(loader().target)
        assert files.target_column in train.columns and files.target_column not in test.columns
        assert set(answers[files.id_column]) == set(test[files.id_column])
        assert not set(train[files.id_column]) & set(test[files.id_column])
        visible = {p.name for p in pathlib.Path(files.task_dir).iterdir()}
        assert visible == {"train.csv", "test.csv", "description.md", "task.json",
                           "sample_submission.csv"}
    iris_answers = pd.read_csv(by_name["iris"].data_science.answers_path)
    # Stratified split: all three species in the hidden test set, labelled by name.
    assert set(iris_answers["label"]) == {"setosa", "versicolor", "virginica"}
    # Same seed, same split; another seed, another split.
    again = write_sklearn_tasks(root / "again", seed=7, names=("iris",))[0]
    other = write_sklearn_tasks(root / "other", seed=8, names=("iris",))[0]
    same = pd.read_csv(again.data_science.answers_path)
    assert same.equals(iris_answers)
    assert not pd.read_csv(other.data_science.answers_path)["id"].equals(iris_answers["id"])


def test_sklearn_builder_round_trip_and_unknown_name(tmp_path):
    builder = SklearnTasks(tmp_path / "files", seed=1, names=("wine", "diabetes"),
                           data_dir=tmp_path / "tfds")
    source = task_source(builder)
    assert sorted(t.task_id for t in source) == ["sklearn/diabetes", "sklearn/wine"]
    with pytest.raises(DataError, match=r"unknown sklearn task\(s\) \['nope'\]"):
        write_sklearn_tasks(tmp_path / "x", names=("nope",))
