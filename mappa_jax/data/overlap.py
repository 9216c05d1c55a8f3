"""Refuse evaluation sets that leak into training data."""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from mappa_jax.data.task import DataError, Task

_SPACE_OR_DOLLAR = re.compile(r"[\s$]+")
# Asymptote diagram source: one copy of an AIME problem carries it, another copy does not (the
# MAPPA authors' AIME 1983-2024 pool and their aime_eval_32 differ so, e.g. 2022 I #11).
_ASY_DIAGRAM = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL | re.IGNORECASE)
_MAX_LISTED = 20


class DataOverlapError(DataError):
    """An evaluation task also appears in the training data."""


def normalize_problem(text: str) -> str:
    """Text key for "same problem": Unicode NFKC, case-folded, [asy] diagrams, whitespace and $
    removed (so "$11,$ $13,$" and "$11$, $13$," agree)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE_OR_DOLLAR.sub("", _ASY_DIAGRAM.sub("", text))


def find_overlap(train_tasks: Iterable[Task], eval_tasks: Iterable[Task]) -> list[str]:
    """Eval tasks sharing a task id, a normalized prompt or a task directory with a train task."""
    train_ids: dict[str, Task] = {}
    train_texts: dict[str, Task] = {}
    train_dirs: dict[str, Task] = {}
    for task in train_tasks:
        train_ids[task.task_id] = task
        train_texts.setdefault(normalize_problem(task.prompt), task)
        if task.data_science is not None:
            train_dirs.setdefault(task.data_science.task_dir, task)
    problems = []
    for task in eval_tasks:
        if task.task_id in train_ids:
            problems.append(f"eval {task.task_id!r}: same task id in training data")
            continue
        if task.data_science is not None and task.data_science.task_dir in train_dirs:
            twin = train_dirs[task.data_science.task_dir]
            problems.append(f"eval {task.task_id!r} uses the same task directory as train "
                            f"{twin.task_id!r}: {task.data_science.task_dir}")
            continue
        twin = train_texts.get(normalize_problem(task.prompt))
        if twin is not None:
            preview = " ".join(task.prompt.split())[:80]
            problems.append(f"eval {task.task_id!r} has the same problem text as train "
                            f"{twin.task_id!r}: {preview!r}")
    return problems


def check_no_overlap(train_tasks: Iterable[Task], eval_tasks: Iterable[Task]) -> None:
    """Raise DataOverlapError listing every evaluation task found in the training data."""
    problems = find_overlap(train_tasks, eval_tasks)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        hidden = len(problems) - _MAX_LISTED
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        raise DataOverlapError(f"{len(problems)} evaluation task(s) also appear in the training "
                               f"data:\n  {listed}{more}")
