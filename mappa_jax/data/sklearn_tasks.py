"""Offline data-science tasks built from the small datasets shipped inside scikit-learn's wheel.

write_sklearn_tasks() materializes them in the DSBench layout read by `dsbench.py`:
a seeded train/test split per dataset, train.csv/test.csv/description.md/task.json/
sample_submission.csv under <out_dir>/tasks/<name>/ and the hidden answers under
<out_dir>/answers/<name>.csv (outside the task directory).

Nothing an agent can see determines the hidden labels: the split, the row order and the ids all
come from a generator keyed by a digest of (split key, dataset name), where the split key is the
seed unless a private `split_key` is given; task.json holds neither, and the sandbox hides the
datasets' bundled copies and this package's source. Without that, the class-sorted order of
scikit-learn's datasets plus a guessable seed would rebuild every test label.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable

import numpy as np
import pandas as pd

from mappa_jax.data.dsbench import load_dsbench_tasks
from mappa_jax.data.task import CLASSIFICATION, REGRESSION, DataError, Task

ID_COLUMN = "id"


@dataclasses.dataclass(frozen=True)
class SklearnTaskSpec:
    name: str
    task_type: str
    load: Callable[[], tuple[pd.DataFrame, pd.Series, str]]  # features, target, dataset DESCR
    goal: str


def _bunch(loader_name: str):
    from sklearn import datasets
    return getattr(datasets, loader_name)(as_frame=True)


def _labelled(loader_name: str) -> Callable[[], tuple[pd.DataFrame, pd.Series, str]]:
    """A classifier task whose target is the class name (strings, as in real Kaggle data)."""
    def load():
        bunch = _bunch(loader_name)
        names = np.asarray(bunch.target_names)
        target = pd.Series(names[bunch.target.to_numpy()], name="label")
        return bunch.data, target, bunch.DESCR
    return load


def _numeric_target(loader_name: str, column: str | None, new_name: str):
    """A regression task: the bunch's target, or one feature column predicted from the rest."""
    def load():
        bunch = _bunch(loader_name)
        if column is None:
            return bunch.data, bunch.target.rename(new_name), bunch.DESCR
        features = bunch.data.drop(columns=[column])
        return features, bunch.data[column].rename(new_name), bunch.DESCR
    return load


SKLEARN_TASKS = (
    SklearnTaskSpec("iris", CLASSIFICATION, _labelled("load_iris"),
                    "Predict the iris species (column `label`) from flower measurements."),
    SklearnTaskSpec("wine", CLASSIFICATION, _labelled("load_wine"),
                    "Predict the wine cultivar (column `label`) from its chemical analysis."),
    SklearnTaskSpec("breast_cancer", CLASSIFICATION, _labelled("load_breast_cancer"),
                    "Predict whether a tumour is malignant or benign (column `label`) from "
                    "cell-nucleus measurements."),
    SklearnTaskSpec("diabetes", REGRESSION, _numeric_target("load_diabetes", None, "progression"),
                    "Predict disease progression one year after baseline (column "
                    "`progression`) from baseline patient measurements."),
    SklearnTaskSpec("wine_alcohol", REGRESSION,
                    _numeric_target("load_wine", "alcohol", "alcohol"),
                    "Predict the alcohol content of a wine (column `alcohol`) from its other "
                    "chemical measurements."),
    SklearnTaskSpec("iris_petal_width", REGRESSION,
                    _numeric_target("load_iris", "petal width (cm)", "petal_width"),
                    "Predict the petal width in cm (column `petal_width`) from the other "
                    "flower measurements."),
)


def _clean_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns=lambda c: c.replace(" (cm)", "_cm").replace(" ", "_"))


def _description(spec: SklearnTaskSpec, target: str, descr: str) -> str:
    metrics = ("accuracy, macro-F1 and ROC-AUC" if spec.task_type == CLASSIFICATION
               else "RMSE and MAE")
    return (f"# {spec.name}\n\n{spec.goal}\n\n"
            f"Files: train.csv (features, `{ID_COLUMN}` and the target `{target}`) and test.csv "
            f"(the same without `{target}`).\nWrite submission.csv with columns `{ID_COLUMN}` "
            f"and `{target}`, one row per test.csv row. Scored by {metrics}.\n\n"
            f"## Dataset notes\n\n{descr.strip()}\n")


def _split_generator(split_key: str, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"mappa_jax.sklearn_tasks/{name}/{split_key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def write_sklearn_task(spec: SklearnTaskSpec, out_dir: pathlib.Path, seed: int,
                       test_fraction: float, split_key: str | None = None) -> None:
    from sklearn.model_selection import train_test_split
    features, target, descr = spec.load()
    features = _clean_columns(features).reset_index(drop=True)
    frame = features.assign(**{target.name: target.to_numpy()})
    rng = _split_generator(str(seed) if split_key is None else split_key, spec.name)
    # sklearn's datasets are sorted by class: rows are shuffled and ids drawn independently of
    # both the original order and the split, so neither a row's place nor its id tells its label.
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    frame.insert(0, ID_COLUMN, rng.permutation(len(frame)))
    stratify = frame[target.name] if spec.task_type == CLASSIFICATION else None
    train, test = train_test_split(frame, test_size=test_fraction,
                                   random_state=int(rng.integers(2**31)), stratify=stratify)
    task_dir = out_dir / "tasks" / spec.name
    answers_dir = out_dir / "answers"
    task_dir.mkdir(parents=True, exist_ok=True)
    answers_dir.mkdir(parents=True, exist_ok=True)
    train.to_csv(task_dir / "train.csv", index=False)
    test.drop(columns=[target.name]).to_csv(task_dir / "test.csv", index=False)
    test[[ID_COLUMN, target.name]].to_csv(answers_dir / f"{spec.name}.csv", index=False)
    placeholder = (train[target.name].mode().iloc[0] if spec.task_type == CLASSIFICATION
                   else float(train[target.name].mean()))
    pd.DataFrame({ID_COLUMN: test[ID_COLUMN], target.name: placeholder}).to_csv(
        task_dir / "sample_submission.csv", index=False)
    (task_dir / "description.md").write_text(_description(spec, target.name, descr),
                                             encoding="utf-8")
    (task_dir / "task.json").write_text(json.dumps(
        {"target_column": target.name, "id_column": ID_COLUMN, "task_type": spec.task_type},
        indent=1), encoding="utf-8")


def write_sklearn_tasks(out_dir: str | pathlib.Path, seed: int = 0, test_fraction: float = 0.25,
                        names: tuple[str, ...] | None = None,
                        split_key: str | None = None) -> list[Task]:
    """Write the sklearn tasks (all, or those in names) under out_dir and return them.

    The same seed (or split_key, which replaces it) gives the same files anywhere."""
    known = {spec.name: spec for spec in SKLEARN_TASKS}
    names = tuple(known) if names is None else tuple(names)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise DataError(f"unknown sklearn task(s) {unknown}; known: {sorted(known)}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out_dir = pathlib.Path(out_dir)
    for name in names:
        write_sklearn_task(known[name], out_dir, seed, test_fraction, split_key)
    tasks = load_dsbench_tasks(out_dir / "tasks", out_dir / "answers", id_prefix="sklearn/")
    wanted = {f"sklearn/{name}" for name in names}
    return [task for task in tasks if task.task_id in wanted]
