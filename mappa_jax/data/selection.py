"""The record of which problems a run trains and evaluates on: <workdir>/data_selection.json.

For each split ("train", "eval"): the data spec as configured, the task ids in the order of the
run's task source (the order the batch pipeline indexes), their fingerprint (the one a pipeline
state carries), and for each math file its size and sha256
and, where the spec keeps a seeded selection of it, the positions kept (comparable with the
`random_indices` the MAPPA authors' runs record).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from mappa_jax.data import math_files
from mappa_jax.data.download import file_digest
from mappa_jax.data.pipeline import index_fields, tasks_fingerprint
from mappa_jax.data.task import Task

SELECTION_FILE = "data_selection.json"
RECORD_VERSION = 1


def _plain(value: Any) -> Any:
    """A ConfigDict / mapping / sequence as plain JSON-able values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _math_file_record(source: math_files.MathSource) -> dict:
    path = pathlib.Path(source.path)
    entry: dict[str, Any] = {"path": source.path, "task_type": source.task_type}
    if path.is_file():
        entry["bytes"], entry["sha256"] = file_digest(path)
    if source.select_count:
        total = len(math_files.read_records(path))
        entry.update(problems_in_file=total, select_count=source.select_count,
                     select_seed=source.select_seed,
                     selected_positions=math_files.select_positions(
                         total, source.select_count, int(source.select_seed)))
    return entry


def selection_record(spec: Any, source: Sequence[Task]) -> dict:
    """What one split of a run holds: its spec, task ids and (math files) file digests."""
    spec = _plain(spec)
    task_ids, task_types = index_fields(source)
    record: dict[str, Any] = {"spec": spec, "num_tasks": len(task_ids),
                              "tasks_fingerprint": tasks_fingerprint(task_ids),
                              "task_types": {t: task_types.count(t) for t in sorted(set(task_types))},
                              "task_ids": task_ids}
    if spec.get("source") == "math_files":
        record["files"] = [_math_file_record(math_files.MathSource(**entry))
                           for entry in spec.get("files", ())]
    return record


def write_data_selection(path: str | os.PathLike,
                         splits: Mapping[str, tuple[Any, Sequence[Task]]]) -> dict:
    """Write {split: selection_record(spec, source)} to `path` atomically; returns it."""
    record = {"version": RECORD_VERSION,
              **{name: selection_record(spec, source) for name, (spec, source) in splits.items()}}
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return record
