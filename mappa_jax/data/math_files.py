"""Read competition-math problem files (AIME, AMC, MATH and their common re-packagings).

Accepted layouts (MathSource.path is a file or a directory):
  *.jsonl / *.jsonl.gz  one JSON object per line;
  *.json                a list of objects; an object holding such a list under "data",
                        "problems", "examples", "rows", "test", "train" or "items"; a columnar
                        object {field: [values...]}; an object mapping id -> record; or a single
                        problem object (MATH's one-file-per-problem layout);
  *.parquet             one row per problem (read with pandas/pyarrow);
  a directory           every such file below it, sorted by path (e.g. MATH's
                        train/algebra/1.json tree); records without an id are named after
                        their file.
Field names vary between collections; the first present of each alias list is used
(case-insensitive): see PROBLEM_FIELDS, ANSWER_FIELDS, SOLUTION_FIELDS, ID_FIELDS. When there
is no answer field, the answer is the last \\boxed{} of the solution (MATH style).

A source may keep only some of its problems: select_count of them, drawn with select_seed (the
first select_count of numpy's RandomState(seed).permutation, kept in file order). With
select_count=512, select_seed=42 on the authors' AIME_1983_2024.json this gives the 512
positions their run recorded (sampled_training_data_metadata.json in their repository).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib

import numpy as np
from typing import Any, Iterable, Iterator, Mapping

from mappa_jax.data.download import missing_file_hint
from mappa_jax.data.latex import last_boxed
from mappa_jax.data.task import MATH, DataError, Task

PROBLEM_FIELDS = ("problem", "question", "prompt", "problem_text", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "ground_truth", "gold",
                 "target", "label")
SOLUTION_FIELDS = ("solution", "solutions", "output", "response", "reasoning")
ID_FIELDS = ("id", "unique_id", "problem_id", "uid", "idx", "index", "qid")
METADATA_FIELDS = ("year", "level", "type", "subject", "url", "problem number", "problem_number",
                   "part", "source")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")
_LIST_KEYS = ("data", "problems", "examples", "rows", "test", "train", "items")


@dataclasses.dataclass(frozen=True)
class MathSource:
    """A problem file (or directory of them) and the stratum its problems belong to ("aime")."""
    path: str
    task_type: str
    id_prefix: str = ""  # defaults to "<task_type>/"; keeps ids unique across sources
    select_count: int = 0  # keep this many problems, drawn with select_seed; 0 keeps all
    select_seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Record:
    row: dict
    where: str  # "<file>: record <n>", for error messages
    default_id: str  # used when the row has no id field


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
    problem = _first_field(payload, PROBLEM_FIELDS)
    if problem is not None and isinstance(problem[1], str):
        return [payload]  # a single problem per file
    for key in _LIST_KEYS:
        if isinstance(payload.get(key), list):
            return payload[key]
    values = list(payload.values())
    if values and all(isinstance(v, list) for v in values):
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise DataError(f"{path}: columnar JSON has columns of different lengths "
                            f"{sorted(lengths)}")
        return [dict(zip(payload, row)) for row in zip(*values)]
    if values and all(isinstance(v, dict) for v in values):
        return [{"id": key, **record} for key, record in payload.items()]
    raise DataError(f"{path}: cannot find the problem records in this JSON object (expected a "
                    f"list under one of {_LIST_KEYS}, a columnar object, an id -> record map "
                    f"or a single problem)")


def read_file(path: pathlib.Path) -> list[dict]:
    """Raw records of one problem file, whatever its layout."""
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
        raise DataError(f"{path}: unsupported math file type (use one of {FILE_SUFFIXES})")
    if not rows:
        raise DataError(f"{path}: no problems in file")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {number} is a {type(row).__name__}, not an object")
    return rows


def read_records(path: str | pathlib.Path) -> list[_Record]:
    """Records of a problem file or of every problem file below a directory."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"no math problem files ({FILE_SUFFIXES}) under {path}")
        names = [f.relative_to(path).as_posix().split(".")[0] for f in files]
    elif path.is_file():
        files, names = [path], [""]
    else:
        raise DataError(f"math problem file not found: {path}{missing_file_hint(path)}")
    records = []
    for file, name in zip(files, names):
        rows = read_file(file)
        for number, row in enumerate(rows):
            if not name:
                default_id = str(number)
            else:
                default_id = name if len(rows) == 1 else f"{name}/{number}"
            records.append(_Record(row, f"{file}: record {number}", default_id))
    return records


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _first_field(row: Mapping[str, Any], aliases: Iterable[str]) -> tuple[str, Any] | None:
    lowered = {str(key).lower().strip(): key for key in row}
    for alias in aliases:
        key = lowered.get(alias)
        if key is not None and not _is_missing(row[key]):
            return key, row[key]
    return None


def _plain_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns integer columns with gaps into floats
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return str(value).strip()


def _answer_text(value: Any) -> str:
    text = _plain_text(value)
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def tasks_from_records(records: list[_Record], source: MathSource) -> Iterator[Task]:
    prefix = source.id_prefix or f"{source.task_type}/"
    seen: dict[str, str] = {}
    for record in records:
        row = record.row
        problem = _first_field(row, PROBLEM_FIELDS)
        if problem is None:
            raise DataError(f"{record.where} has no problem text: expected one of the fields "
                            f"{PROBLEM_FIELDS} (found fields {sorted(row)})")
        answer = _first_field(row, ANSWER_FIELDS)
        if answer is not None:
            answer_text = _answer_text(answer[1])
        else:
            solution = _first_field(row, SOLUTION_FIELDS)
            answer_text = last_boxed(str(solution[1])) if solution is not None else None
            if answer_text is None:
                raise DataError(f"{record.where} has no answer: expected one of the fields "
                                f"{ANSWER_FIELDS}, or a solution field {SOLUTION_FIELDS} "
                                f"containing \\boxed{{...}} (found fields {sorted(row)})")
        row_id = _first_field(row, ID_FIELDS)
        local_id = _plain_text(row_id[1]) if row_id is not None else record.default_id
        task_id = prefix + local_id
        if task_id in seen:
            raise DataError(f"{record.where}: duplicate id {local_id!r} (also {seen[task_id]})")
        seen[task_id] = record.where
        metadata = {"source_file": record.where.split(": record")[0].rsplit("/", 1)[-1]}
        for field in METADATA_FIELDS:
            found = _first_field(row, (field,))
            if found is not None:
                metadata[field.replace(" ", "_")] = _plain_text(found[1])
        yield Task(task_id=task_id, kind=MATH, task_type=source.task_type,
                   prompt=str(problem[1]).strip(), answer=answer_text, metadata=metadata)


def select_positions(total: int, count: int, seed: int) -> list[int]:
    """Positions of the `count` of `total` problems a seeded draw keeps, in ascending order: the
    first `count` of numpy's legacy RandomState(seed).permutation(total), which reproduces the
    training problems the MAPPA authors' run recorded for seed 42."""
    if not 0 < count <= total:
        raise DataError(f"cannot select {count} of {total} problems")
    return sorted(np.random.RandomState(seed).permutation(total)[:count].tolist())


def source_tasks(source: MathSource) -> list[Task]:
    """The problems of one source, after its selection (select_count, select_seed)."""
    tasks = list(tasks_from_records(read_records(source.path), source))
    if not source.select_count:
        return tasks
    if not isinstance(source.select_count, int) or not 0 < source.select_count <= len(tasks):
        raise DataError(f"{source.path}: select_count must be an integer in [1, {len(tasks)}] "
                        f"(the file's problems), or 0 for all; got {source.select_count!r}")
    return [tasks[i] for i in select_positions(len(tasks), source.select_count,
                                               int(source.select_seed))]


def load_math_tasks(sources: Iterable[MathSource]) -> list[Task]:
    """All problems of all sources as Tasks; ids must be unique across sources."""
    tasks: list[Task] = []
    owner: dict[str, str] = {}
    for source in sources:
        for task in source_tasks(source):
            if task.task_id in owner:
                raise DataError(f"task id {task.task_id!r} appears in both {owner[task.task_id]} "
                                f"and {source.path}; give the sources distinct id_prefix values")
            owner[task.task_id] = source.path
            tasks.append(task)
    return tasks
