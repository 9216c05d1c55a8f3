"""Remote workdirs (mappa_jax/workdir.py): the local mirror's results reach the remote workdir,
each changed file once, and a resumed run on a fresh VM gets its metrics back. The "remote" here is
a second local directory: OutputMirror goes through etils.epath, which serves gs:// the same way."""
import pathlib
import tempfile

from etils import epath

from mappa_jax.workdir import OutputMirror, is_remote, local_workdir


def test_remote_workdir_keeps_its_scheme():
    """Checkpoints go to the remote path itself (pathlib would make it gs:/...), the host-local
    outputs to a local mirror path."""
    assert str(epath.Path("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert local_workdir("gs://bucket/runs/a/") == pathlib.Path(tempfile.gettempdir()) / "mappa_jax/gs/bucket/runs/a"
    assert local_workdir("runs/tiny") == pathlib.Path("runs/tiny")
    assert is_remote("gs://bucket/run") and not is_remote("runs/tiny")


def _write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_push_copies_results_once_and_skips_local_only_trees(tmp_path):
    local, remote = tmp_path / "mirror", tmp_path / "remote"
    results = {"metrics.jsonl": b'{"step": 0}\n', "curves.png": b"\x89PNG", "summary.json": b"{}",
               "tensorboard/events.out.tfevents.1": b"tb", "exports/solver/model.safetensors": b"w" * 100}
    for rel, data in results.items():
        _write(local / rel, data)
    for rel in ("data/tasks/shard-0.array_record", "workspaces/host0/step0/x.py", "checkpoints/1/meta"):
        _write(local / rel, b"local only")
    mirror = OutputMirror(local, str(remote))
    assert sorted(mirror.push()) == sorted(results)
    for rel, data in results.items():
        assert (remote / rel).read_bytes() == data
    assert not any((remote / d).exists() for d in ("data", "workspaces", "checkpoints"))
    assert mirror.push() == []  # nothing changed
    with (local / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1}\n')
    assert mirror.push() == ["metrics.jsonl"]
    assert (remote / "metrics.jsonl").read_text().count("step") == 2


def test_pull_restores_metrics_on_a_fresh_mirror_only(tmp_path):
    remote = tmp_path / "remote"
    _write(remote / "metrics.jsonl", b'{"step": 0}\n{"step": 1}\n')
    fresh = OutputMirror(tmp_path / "new_vm", str(remote))
    assert fresh.pull() == ["metrics.jsonl"]
    assert (tmp_path / "new_vm" / "metrics.jsonl").read_bytes() == (remote / "metrics.jsonl").read_bytes()
    _write(tmp_path / "same_vm" / "metrics.jsonl", b'{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    assert OutputMirror(tmp_path / "same_vm", str(remote)).pull() == []  # the local copy is newer
    assert (tmp_path / "same_vm" / "metrics.jsonl").read_text().count("step") == 3
