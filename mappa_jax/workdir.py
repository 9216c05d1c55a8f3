"""Run directories that may live on GCS (gs://bucket/run, through etils.epath as orbax does).

Checkpoints go straight to the workdir. Everything else a run writes (metrics.jsonl, TensorBoard
events, curves.png, summary.json, HF exports, plus TFDS data and episode workspaces that stay
local) goes to a local mirror; `push_outputs` copies the results to the remote workdir after each
checkpoint and at the end, and `pull_outputs` brings metrics.jsonl back to a fresh VM's mirror
before a resumed run appends to it.
"""
from __future__ import annotations

import pathlib
import shutil
import tempfile

from etils import epath

LOCAL_ONLY = ("data", "workspaces", "checkpoints", "wandb")  # inputs, scratch, written by orbax / W&B
RESUMED_FILES = ("metrics.jsonl",)  # what a resumed run appends to


def is_remote(workdir: str) -> bool:
    return "://" in str(workdir)


def local_workdir(workdir: str) -> pathlib.Path:
    """Where the host-local outputs go: the workdir itself, or for a remote one (gs://bucket/run)
    <tmp>/mappa_jax/gs/bucket/run."""
    if not is_remote(workdir):
        return pathlib.Path(workdir)
    scheme, rest = str(workdir).split("://", 1)
    return pathlib.Path(tempfile.gettempdir()) / "mappa_jax" / scheme / rest.strip("/")


def _copy(src, dst) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, dst.open("wb") as writer:
        shutil.copyfileobj(reader, writer, length=16 << 20)


class OutputMirror:
    """Copies a local mirror's result files to the remote workdir, each only when it changed."""

    def __init__(self, local: pathlib.Path, remote: str):
        self.local = pathlib.Path(local)
        self.remote = epath.Path(remote)
        self._copied: dict[pathlib.Path, tuple[int, int]] = {}

    def push(self) -> list[str]:
        """Copy new or changed result files; returns their paths relative to the workdir."""
        copied = []
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local)
            if not path.is_file() or rel.parts[0] in LOCAL_ONLY:
                continue
            stat = path.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._copied.get(rel) == signature:
                continue
            _copy(path, self.remote / str(rel))
            self._copied[rel] = signature
            copied.append(str(rel))
        return copied

    def pull(self) -> list[str]:
        """Bring RESUMED_FILES from the remote workdir when the mirror lacks them (a resumed run on
        another VM); returns what was copied."""
        pulled = []
        for name in RESUMED_FILES:
            src, dst = self.remote / name, self.local / name
            if src.exists() and not dst.exists():
                _copy(src, epath.Path(dst))
                pulled.append(name)
        return pulled
