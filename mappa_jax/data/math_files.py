"""Read competition-math problem files (AIME, AMC, MATH and their common re-packagings).

Accepted layouts:
    *.jsonl / *.jsonl.gz  one JSON object per line;
    *.json                a list of objects, an object holding such a list under "data",
                                                "problems", "examples", "rows", "test" or "train", a columnar object
                                                {field: [values...]}, or an object mapping id -> record;
    *.parquet             one row per problem (read with pandas/pyarrow).
Field names vary between collections; the first present of each alias list is used
(case-insensitive): see PROBLEM_FIELDS, ANSWER_FIELDS, SOLUTION_FIELDS, ID_FIELDS, YEAR_FIELDS.
When there is no answer field, the answer is the last \\boxed{} of the solution (MATH style).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib
from typing import Any, Iterable, Iterator, Mapping

from mappa_jax.data.latex import last_boxed
from mappa_jax.data.task import MATH, DataError, Task

PROBLEM_FIELDS = ("problem", "question", "prompt", "problem_text", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "ground_truth", "gold",
                                  "target", "label")
SOLUTION_FIELDS = ("solution", "solutions", "output", "response", "reasoning")
ID_FIELDS = ("id", "unique_id", "problem_id", "uid", "idx", "index", "qid")
YEAR_FIELDS = ("year",)
EXTRA_FIELDS = ("level", "type", "subject", "url", "problem number", "part", "source")
_LIST_KEYS = ("data", "problems", "examples", "rows", "test", "train", "items")


@dataclasses.dataclass(frozen=True)
class MathSource:
    """One problem file and the stratum (task_type) its problems belong to, e.g. "aime"."""
    path: str
    task_type: str
    id_prefix: str = ""  # defaults to "<task_type>/"; keeps ids unique across files


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg})") from err
    return rows


def _rows_from_json(path: pathlib.Path, payload: Any) -> list[dict]:
    if isinstance(payload, list):
        return payload
    if not isinstance(payload, dict):
        raise DataError(f"{path}: expected a JSON list or object of problems, got "
                                        f"{type(payload).__name__}")
    for key in _LIST_KEYS:
        if isinstance(payload.get(key), list):
            return payload[key]
    values = list(payload.values())
    if values and all(isinstance(v, list) for v in values):
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise DataError(f"{path}: columnar JSON has columns of different lengths {sorted(lengths)}")
        columns = list(payload)
        return [dict(zip(columns, row)) for row in zip(*values)]
    if values and all(isinstance(v, dict) for v in values):
        return [{"id": key, **record} for key, record in payload.items()]
    raise DataError(f"{path}: cannot find the problem records in this JSON object (expected a "
                                    f"list under one of {_LIST_KEYS}, a columnar object or an id -> record map)")


def read_records(path: str | pathlib.Path) -> list[dict]:
    """Raw records of a problem file, whatever its layout."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"math problem file not found: {path}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        rows = _read_jsonl(path)
    elif name.endswith(".json"):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        rows = _rows_from_json(path, payload)
    elif name.endswith(".parquet"):
        import pandas as pd  # heavy import, only for parquet
        rows = pd.read_parquet(path).to_dict(orient="records")
    else:
        raise DataError(f"{path}: unsupported math file type (use .jsonl, .json or .parquet)")
    if not rows:
        raise DataError(f"{path}: no problems in file")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {number} is a {type(row).__name__}, not an object")
    return rows


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _first_field(row: Mapping[str, Any], aliases: Iterable[str]) -> tuple[str, Any] | None:
    lowered = {key.lower().strip(): key for key in row}
    for alias in aliases:
        key = lowered.get(alias)
        if key is not None and not _is_missing(row[key]):
            return key, row[key]
    return None


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/pandas turns integer answer columns with gaps into floats
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    text = str(value).strip()
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def tasks_from_records(rows: list[dict], source: MathSource) -> Iterator[Task]:
    prefix = source.id_prefix or f"{source.task_type}/"
    seen: dict[str, int] = {}
    for number, row in enumerate(rows):
        where = f"{source.path}: record {number}"
        problem = _first_field(row, PROBLEM_FIELDS)
        if problem is None:
            raise DataError(f"{where} has no problem text: expected one of the fields "
                                            f"{PROBLEM_FIELDS} (found fields {sorted(row)})")
        answer = _first_field(row, ANSWER_FIELDS)
        if answer is not None:
            answer_text = _answer_text(answer[1])
        else:
            solution = _first_field(row, SOLUTION_FIELDS)
            boxed = last_boxed(str(solution[1])) if solution is not None else None
            if boxed is None:
                raise DataError(f"{where} has no answer: expected one of the fields {ANSWER_FIELDS}, "
                                                f"or a solution field {SOLUTION_FIELDS} containing \\boxed{{...}} "
                                                f"(found fields {sorted(row)})")
            answer_text = boxed
        row_id = _first_field(row, ID_FIELDS)
        local_id = str(row_id[1]) if row_id is not None else str(number)
        task_id = prefix + local_id
        if task_id in seen:
            raise DataError(f"{where}: duplicate id {local_id!r} (also record {seen[task_id]})")
        seen[task_id] = number
        metadata = {"source_file": pathlib.Path(source.path).name}
        for field in YEAR_FIELDS + EXTRA_FIELDS:
            found = _first_field(row, (field,))
            if found is not None:
                metadata[field.replace(" ", "_")] = str(found[1])
        yield Task(task_id=task_id, kind=MATH, task_type=source.task_type,
                              prompt=str(problem[1]).strip(), answer=answer_text, metadata=metadata)


def load_math_tasks(sources: Iterable[MathSource]) -> list[Task]:
    """All problems of all sources as Tasks; ids must be unique across sources."""
    tasks: list[Task] = []
    owner: dict[str, str] = {}
    for source in sources:
        for task in tasks_from_records(read_records(source.path), source):
            if task.task_id in owner:
                raise DataError(f"task id {task.task_id!r} appears in both {owner[task.task_id]} and "
                                                f"{source.path}; give the sources distinct id_prefix values")
            owner[task.task_id] = source.path
            tasks.append(task)
    return tasks
