"""Read data-science tasks laid out as DSBench-style task directories.

Accepted layout (one directory per task; the directory name is the task's local id):

    <tasks_root>/<name>/train.csv          features + target column
    <tasks_root>/<name>/test.csv           the same features, no target column
    <tasks_root>/<name>/description.md     task statement (or description.txt, README.md,
                                           README.txt); required
    <tasks_root>/<name>/sample_submission.csv   optional
    <tasks_root>/<name>/task.json          optional: {"target_column", "id_column", "task_type"}
    <answers_root>/<name>.csv              hidden answers: id column + target column
      or <answers_root>/<name>/test_answer.csv   (DSBench's own answers layout)

answers_root must lie outside tasks_root: agents get a copy of the task directory and must not
find the answers in it. Without task.json the id column is the first column of test.csv, the
target is the one answers column that is not the id, and task_type is "classification" when
the target is non-numeric or integer-valued with at most MAX_CLASSES distinct values, else
"regression".
"""
from __future__ import annotations

import json
import pathlib

import pandas as pd

from mappa_jax.data.task import (CLASSIFICATION, DATA_SCIENCE, REGRESSION, DataError,
                                 DataScienceFiles, Task, metrics_for)

DESCRIPTION_FILES = ("description.md", "description.txt", "README.md", "README.txt")
MAX_CLASSES = 20


def _read_csv(path: pathlib.Path, nrows: int | None = None) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    try:
        frame = pd.read_csv(path, nrows=nrows)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from err
    if frame.columns.empty:
        raise DataError(f"{path}: CSV has no columns")
    return frame


def _answers_path(answers_root: pathlib.Path, name: str) -> pathlib.Path:
    for candidate in (answers_root / f"{name}.csv", answers_root / name / "test_answer.csv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"task {name!r}: no hidden answers file; expected {answers_root / name}.csv "
                    f"or {answers_root / name / 'test_answer.csv'}")


def infer_task_type(target: pd.Series) -> str:
    """classification for labels (non-numeric, or few distinct integers), else regression."""
    values = target.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return CLASSIFICATION
    integral = bool((values == values.round()).all())
    return CLASSIFICATION if integral and values.nunique() <= MAX_CLASSES else REGRESSION


def read_task_dir(task_dir: str | pathlib.Path, answers_root: str | pathlib.Path,
                  id_prefix: str = "dsbench/") -> Task:
    """One DSBench-style task directory as a Task (see the module doc for the layout)."""
    task_dir = pathlib.Path(task_dir).resolve()
    answers_root = pathlib.Path(answers_root).resolve()
    name = task_dir.name
    if not task_dir.is_dir():
        raise DataError(f"task directory not found: {task_dir}")
    answers_file = _answers_path(answers_root, name)
    if task_dir in answers_file.parents:
        raise DataError(f"task {name!r}: hidden answers {answers_file} lie inside the task "
                        f"directory {task_dir}, which agents can read")
    description = next((task_dir / f for f in DESCRIPTION_FILES if (task_dir / f).is_file()), None)
    if description is None:
        raise DataError(f"task {name!r}: no description file in {task_dir} (expected one of "
                        f"{DESCRIPTION_FILES})")
    spec = {}
    if (task_dir / "task.json").is_file():
        try:
            spec = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{task_dir / 'task.json'}: not valid JSON ({err.msg})") from err
    train_columns = list(_read_csv(task_dir / "train.csv", nrows=5).columns)
    test_columns = list(_read_csv(task_dir / "test.csv", nrows=5).columns)
    answers = _read_csv(answers_file)
    if answers.empty:
        raise DataError(f"{answers_file}: hidden answers file has no rows")

    id_column = spec.get("id_column", test_columns[0])
    if id_column not in test_columns or id_column not in answers.columns:
        raise DataError(f"task {name!r}: id column {id_column!r} must be in both "
                        f"{task_dir / 'test.csv'} {test_columns} and {answers_file} "
                        f"{list(answers.columns)}")
    target_column = spec.get("target_column")
    if target_column is None:
        others = [c for c in answers.columns if c != id_column]
        if len(others) != 1:
            raise DataError(f"task {name!r}: cannot tell the target column from {answers_file} "
                            f"columns {list(answers.columns)}; set target_column in "
                            f"{task_dir / 'task.json'}")
        target_column = others[0]
    if target_column not in answers.columns:
        raise DataError(f"task {name!r}: target column {target_column!r} missing from "
                        f"{answers_file} (columns {list(answers.columns)})")
    if target_column not in train_columns:
        raise DataError(f"task {name!r}: target column {target_column!r} missing from "
                        f"{task_dir / 'train.csv'} (columns {train_columns})")
    if target_column in test_columns:
        raise DataError(f"task {name!r}: {task_dir / 'test.csv'} contains the target column "
                        f"{target_column!r}; the answers would be visible to agents")
    task_type = spec.get("task_type") or infer_task_type(answers[target_column])
    metric_names = metrics_for(task_type)
    statement = description.read_text(encoding="utf-8").strip()
    files = DataScienceFiles(task_dir=str(task_dir), answers_path=str(answers_file),
                             target_column=target_column, id_column=id_column,
                             metric_names=metric_names, description=statement)
    return Task(task_id=id_prefix + name, kind=DATA_SCIENCE, task_type=task_type,
                prompt=statement, data_science=files,
                metadata={"source_dir": name, "num_test_rows": str(len(answers))})


def load_dsbench_tasks(tasks_root: str | pathlib.Path, answers_root: str | pathlib.Path,
                       id_prefix: str = "dsbench/") -> list[Task]:
    """Every task directory under tasks_root (sorted by name)."""
    tasks_root = pathlib.Path(tasks_root)
    if not tasks_root.is_dir():
        raise DataError(f"DSBench tasks root not found: {tasks_root}")
    answers_root = pathlib.Path(answers_root)
    if not answers_root.is_dir():
        raise DataError(f"DSBench answers root not found: {answers_root}")
    if answers_root.resolve() == tasks_root.resolve() or \
            tasks_root.resolve() in answers_root.resolve().parents:
        raise DataError(f"answers root {answers_root} lies inside tasks root {tasks_root}; keep "
                        "hidden answers outside what agents can see")
    task_dirs = sorted(p for p in tasks_root.iterdir() if p.is_dir())
    if not task_dirs:
        raise DataError(f"no task directories under {tasks_root}")
    return [read_task_dir(d, answers_root, id_prefix) for d in task_dirs]
