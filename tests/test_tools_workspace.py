"""Workspace: per-episode directory, file listing, snapshot diffs, task inputs in, answers out."""
import os
import time

import pytest

from mappa_jax.tools import Workspace


def test_create_list_and_refuse_reuse(tmp_path):
    workspace = Workspace.create(tmp_path / "runs", "episode-0")
    (workspace.path / "sub").mkdir()
    (workspace.path / "sub" / "b.txt").write_text("b")
    (workspace.path / "a.csv").write_text("a")
    assert workspace.list_files() == ["a.csv", "sub/b.txt"]
    with pytest.raises(FileExistsError):
        Workspace.create(tmp_path / "runs", "episode-0")
    for bad in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="episode_id"):
            Workspace.create(tmp_path / "runs", bad)


def test_snapshot_diff_created_modified_deleted(tmp_path):
    workspace = Workspace.create(tmp_path, "ep")
    (workspace.path / "keep.txt").write_text("same")
    (workspace.path / "change.txt").write_text("old")
    (workspace.path / "gone.txt").write_text("x")
    before = workspace.snapshot()
    time.sleep(0.01)
    (workspace.path / "change.txt").write_text("new and longer")
    (workspace.path / "gone.txt").unlink()
    (workspace.path / "new.pkl").write_bytes(b"\0")
    diff = Workspace.diff(before, workspace.snapshot())
    assert diff.created == ("new.pkl",)
    assert diff.modified == ("change.txt",)
    assert diff.deleted == ("gone.txt",)


def test_copy_in_task_inputs_and_refuse_hidden_answers(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    (task / "train.csv").write_text("x,y\n1,2\n")
    (task / "test.csv").write_text("x\n3\n")
    answers = tmp_path / "answers.csv"
    answers.write_text("y\n6\n")
    workspace = Workspace.create(tmp_path / "runs", "ep")
    copied = workspace.copy_in({"train.csv": task / "train.csv", "data/test.csv": task / "test.csv"},
                               forbidden=[answers])
    assert copied == ["train.csv", "data/test.csv"]
    assert workspace.read_text("data/test.csv") == "x\n3\n"
    # The answers file itself, or a copy of its bytes under another name, is refused.
    (task / "leak.csv").write_bytes(answers.read_bytes())
    for source in (answers, task / "leak.csv"):
        with pytest.raises(ValueError, match="hidden"):
            workspace.copy_in({"extra.csv": source, "ok.csv": task / "train.csv"},
                              forbidden=[answers])
    assert "ok.csv" not in workspace.list_files()  # nothing copied when any input is refused
    with pytest.raises(ValueError, match="outside workspace"):
        workspace.copy_in({"../escape.csv": task / "train.csv"})
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        workspace.copy_in({"m.csv": task / "missing.csv"})


def test_symlinks_are_not_listed(tmp_path):
    workspace = Workspace.create(tmp_path, "ep")
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    os.symlink(secret, workspace.path / "link.txt")
    assert workspace.list_files() == []
    with pytest.raises(ValueError, match="outside workspace"):
        workspace.read_text("link.txt")
