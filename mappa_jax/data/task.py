"""The task record every builder produces and every pipeline yields.

A `Task` is what the episode runner needs to start an episode. Ground truth lives in it too
(`answer` for math, `DataScienceFiles.answers_path` for data science) and must never be put in
an agent's prompt: the workflow shows agents only `prompt` and the files under `task_dir`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

MATH = "math"
DATA_SCIENCE = "datascience"
KINDS = (MATH, DATA_SCIENCE)

CLASSIFICATION = "classification"
REGRESSION = "regression"
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "roc_auc")
REGRESSION_METRICS = ("rmse", "mae")


class DataError(ValueError):
    """Bad or missing data: the message names the file, field or task at fault."""


@dataclasses.dataclass(frozen=True)
class DataScienceFiles:
    """Where a data-science task lives on disk.

    task_dir: what agents may see (train.csv, test.csv, description). answers_path: the hidden
    answers CSV (id column + target column), kept outside task_dir so a workspace copy of
    task_dir never leaks it.
    """
    task_dir: str
    answers_path: str
    target_column: str
    id_column: str
    metric_names: tuple[str, ...]
    description: str = ""

    @property
    def train_csv(self) -> str:
        return f"{self.task_dir}/train.csv"

    @property
    def test_csv(self) -> str:
        return f"{self.task_dir}/test.csv"


@dataclasses.dataclass(frozen=True)
class Task:
    """One problem: a math question or a data-science modelling task.

    task_type is the stratum used for stratified batches and per-type metrics (e.g. "aime",
    "arithmetic", "regression", "classification"). answer is the math ground truth (None for
    data science). metadata holds provenance (source file, year, level...) as strings.
    """
    task_id: str
    kind: str
    task_type: str
    prompt: str
    answer: str | None = None
    data_science: DataScienceFiles | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"task {self.task_id!r}: kind must be one of {KINDS}, "
                            f"got {self.kind!r}")
        if not self.task_id:
            raise DataError("task_id must be a non-empty string")
        if self.kind == MATH and self.answer is None:
            raise DataError(f"math task {self.task_id!r} has no answer")
        if self.kind == DATA_SCIENCE and self.data_science is None:
            raise DataError(f"data-science task {self.task_id!r} has no data_science files")
        # Freeze metadata values to strings so the record round-trips through JSON unchanged.
        object.__setattr__(self, "metadata", {str(k): str(v) for k, v in self.metadata.items()})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.data_science is not None:
            out["data_science"]["metric_names"] = list(self.data_science.metric_names)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Task":
        record = dict(record)
        ds = record.get("data_science")
        if ds is not None:
            ds = dict(ds)
            ds["metric_names"] = tuple(ds["metric_names"])
            record["data_science"] = DataScienceFiles(**ds)
        return cls(**record)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Task":
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls.from_dict(json.loads(text))


def metrics_for(task_type: str) -> tuple[str, ...]:
    """The metrics reported for a data-science task type."""
    if task_type == CLASSIFICATION:
        return CLASSIFICATION_METRICS
    if task_type == REGRESSION:
        return REGRESSION_METRICS
    raise DataError(f"data-science task_type must be {CLASSIFICATION!r} or {REGRESSION!r}, "
                    f"got {task_type!r}")
