"""One workspace per episode, holding a copy of the task's visible files (never its answers)."""
from __future__ import annotations

import os
import pathlib
import re
import uuid
from typing import Any, Callable

from mappa_jax.tools.workspace import Workspace


def workspace_name(episode_id: str) -> str:
    """A fresh directory name the tools accept (ids hold '/' and '#'): readable, and unique even
    when a later batch reuses the root with the same episode ids."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", episode_id).lstrip("._-") or "episode"
    return f"{safe[:100]}-{uuid.uuid4().hex[:12]}"


def task_input_files(task: Any) -> dict[str, pathlib.Path]:
    """{name in workspace: source} for a data-science task's visible files; {} for other tasks."""
    files = getattr(task, "data_science", None)
    if files is None:
        return {}
    task_dir = pathlib.Path(files.task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"task {task.task_id!r}: task_dir {task_dir} does not exist")
    return {p.name: p for p in sorted(task_dir.iterdir()) if p.is_file()}


def workspace_factory(root: str | os.PathLike) -> Callable[[str, Any], Workspace]:
    """make_workspace(episode_id, task) for EpisodeRunner: a fresh directory under root with the
    task's visible files copied in; the hidden answers file is refused even if it sits there."""
    root = pathlib.Path(root)

    def make_workspace(episode_id: str, task: Any) -> Workspace:
        workspace = Workspace.create(root, workspace_name(episode_id))
        inputs = task_input_files(task)
        if inputs:
            hidden = [task.data_science.answers_path] if task.data_science.answers_path else []
            workspace.copy_in(inputs, forbidden=hidden)
        return workspace

    return make_workspace
