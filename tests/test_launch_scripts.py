"""The launch scripts: syntax (bash -n), shellcheck, the exact gcloud / sbatch / srun command lines
their dry runs print (and that a dry run runs nothing), their input errors, and the Colab notebook's
nbformat-v4 structure."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = [LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch", LAUNCH / "slurm_submit.sh"]


@pytest.fixture
def trap_path(tmp_path):
    """A PATH whose gcloud / sbatch / srun only record that they were called (a dry run must not)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch", "srun"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho {name} >> {tmp_path}/called\nexit 1\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return tmp_path, f"{bin_dir}:{os.environ['PATH']}"


def _run(script, *args, env=None, trap=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "WORKDIR"))}
    full_env.update(env or {})
    if trap is not None:
        full_env["PATH"] = trap[1]
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=30)


def _argv(result) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


TPU_ENV = {"TPU_NAME": "pod1", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-16", "PROJECT": "proj",
           "WORKDIR": "gs://bucket/runs/x", "REPO_URL": "https://example.org/mappa_jax.git", "REPO_REF": "v1"}
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-east5-a", "--project=proj"]


def test_tpu_create_and_delete(trap_path):
    create = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "create", env={**TPU_ENV, "SPOT": "1"}, trap=trap_path))
    assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-east5-a",
                       "--accelerator-type=v5p-16", "--version=tpu-ubuntu2204-base", "--project=proj", "--spot"]]
    delete = _argv(_run(LAUNCH / "tpu_pod.sh", "delete", env={**TPU_ENV, "DRY_RUN": "1"}, trap=trap_path))
    assert delete == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=us-east5-a",
                       "--project=proj", "--quiet"]]
    assert not (trap_path[0] / "called").exists()


def test_without_dry_run_the_commands_really_run(trap_path):
    result = _run(LAUNCH / "tpu_pod.sh", "delete", env=TPU_ENV, trap=trap_path)
    assert result.returncode == 1  # the trap gcloud fails, and set -e stops the script
    assert (trap_path[0] / "called").read_text().split() == ["gcloud"]


def test_tpu_install_runs_on_all_workers(trap_path):
    (line,) = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "install", env=TPU_ENV, trap=trap_path))
    assert line[:-1] == SSH + ["--worker=all"]
    remote = line[-1].removeprefix("--command=")
    assert "git clone --quiet https://example.org/mappa_jax.git mappa_jax" in remote
    assert "checkout --quiet v1" in remote and "pip install --quiet -e mappa_jax 'jax[tpu]'" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # the remote script parses


def test_tpu_run_starts_training_on_every_worker_with_overrides(trap_path):
    (line,) = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "run", "--config.train.steps=3",
                         "--config.run_name=a b", env={**TPU_ENV, "CONFIG": "configs/x.py"}, trap=trap_path))
    assert line[:-1] == SSH + ["--worker=all"]
    remote = line[-1].removeprefix("--command=")
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    train = remote[remote.index("nohup ") + len("nohup "):remote.index(" >")]
    assert shlex.split(train) == ["mappa-train", "--config", "configs/x.py", "--config.workdir=gs://bucket/runs/x",
                                  "--config.distributed.mode=tpu", "--config.train.steps=3", "--config.run_name=a b"]
    assert "< /dev/null &" in remote and ". ~/.mappa_env" in remote
    assert not (trap_path[0] / "called").exists()


def test_tpu_tail_stop_and_push_env(trap_path):
    (tail,) = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "tail", "3", env=TPU_ENV, trap=trap_path))
    assert tail == SSH + ["--worker=3", "--command=tail -n 200 -F ~/mappa_train.log"]
    (stop,) = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "stop", env=TPU_ENV, trap=trap_path))
    assert stop[:-1] == SSH + ["--worker=all"] and "kill $(cat ~/mappa_train.pid)" in stop[-1]
    scp, chmod = _argv(_run(LAUNCH / "tpu_pod.sh", "--dry-run", "push-env", "keys.env", env=TPU_ENV, trap=trap_path))
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "keys.env", "pod1:.mappa_env",
                   "--zone=us-east5-a", "--project=proj", "--worker=all"]
    assert chmod[-1] == "--command=chmod 600 ~/.mappa_env"


@pytest.mark.parametrize("args, env, message", [
    (["run"], {"WORKDIR": ""}, "run needs WORKDIR=gs://"),
    (["run"], {"WORKDIR": "/local/dir"}, "must be a gs:// path"),
    (["tail", "x"], {}, "worker must be a number"),
    (["push-env"], {}, "push-env needs a FILE"),
    (["launch"], {}, "unknown command 'launch'"),
])
def test_tpu_errors_name_the_problem(args, env, message, trap_path):
    result = _run(LAUNCH / "tpu_pod.sh", "--dry-run", *args, env={**TPU_ENV, **env}, trap=trap_path)
    assert result.returncode == 2 and message in result.stderr
    assert not (trap_path[0] / "called").exists()


def test_slurm_submit_dry_run(trap_path):
    (line,) = _argv(_run(LAUNCH / "slurm_submit.sh", "--dry-run", "--nodes", "4", "--gpus-per-node", "4",
                         "--partition", "gpu", "--time", "12:00:00", "--config", "configs/x.py",
                         "--workdir", "/shared/run", "--", "--config.train.steps=9", trap=trap_path))
    repo = str(LAUNCH.parent)
    assert line == ["CONFIG=configs/x.py", "WORKDIR=/shared/run", f"MAPPA_REPO={repo}", "sbatch", "--nodes=4",
                    "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu", "--time=12:00:00",
                    f"{repo}/launch/slurm_gpu.sbatch", "--config.train.steps=9"]
    assert not (trap_path[0] / "called").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--workdir", "w"], "--nodes must be a positive integer"),
    (["--nodes"], "--nodes needs a value"),
    ([], "--workdir is required"),
    (["--gpus", "2"], "unknown option '--gpus'"),
])
def test_slurm_submit_errors(args, message, trap_path):
    result = _run(LAUNCH / "slurm_submit.sh", "--dry-run", *args, trap=trap_path)
    assert result.returncode == 2 and message in result.stderr


def test_slurm_batch_script_dry_run(tmp_path, trap_path):
    env = {"DRY_RUN": "1", "WORKDIR": "/shared/run", "CONFIG": "configs/y.py", "MAPPA_REPO": str(tmp_path)}
    (line,) = _argv(_run(LAUNCH / "slurm_gpu.sbatch", "--config.train.steps=2", env=env, trap=trap_path))
    assert line == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label", "mappa-train", "--config",
                    "configs/y.py", "--config.workdir=/shared/run", "--config.distributed.mode=slurm",
                    "--config.train.steps=2"]
    missing = _run(LAUNCH / "slurm_gpu.sbatch", env={"DRY_RUN": "1"}, trap=trap_path)
    assert missing.returncode == 2 and "set WORKDIR" in missing.stderr
    directives = [l for l in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines() if l.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in directives  # one process per node drives all its GPUs
    assert not (trap_path[0] / "called").exists()


def _notebook_code() -> list[str]:
    nb = json.loads((LAUNCH / "colab_demo.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _python_lines(cell: str) -> str:
    """A code cell without its shell (!) and magic (%) lines."""
    return "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("!", "%")))


def test_colab_notebook_is_nbformat_v4():
    nb = json.loads((LAUNCH / "colab_demo.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 0 and isinstance(nb["metadata"], dict)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = _notebook_code()
    assert any("git clone" in c or '"clone"' in c for c in code) and any("pip install --quiet -e ." in c for c in code)
    for c in code:  # the Python (non-magic) lines of every code cell compile
        compile(_python_lines(c), "cell", "exec")


def test_colab_notebook_trains_configs_demo_through_the_python_api(monkeypatch):
    """The training cell, run with a recording stand-in for Trainer (nothing trains), builds
    Trainer(config) from configs/demo.py's get_config() unchanged, calls train() once and closes it."""
    from absl import logging
    from mappa_jax import train
    from mappa_jax.config import config_from_file
    made = []

    class RecordingTrainer:
        def __init__(self, config):
            self.config, self.calls = config, []
            self.time_split = type("Split", (), {"split": lambda _: {"wall": 1.0}})()
            made.append(self)

        def train(self):
            self.calls.append("train")
            return {}

        def close(self):
            self.calls.append("close")

    (cell,) = [c for c in _notebook_code() if "Trainer(" in c]
    monkeypatch.setattr(train, "Trainer", RecordingTrainer)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the checkout on sys.path
    monkeypatch.chdir(LAUNCH.parent)  # where the install cell's %cd leaves the notebook
    verbosity = logging.get_verbosity()
    try:
        exec(compile(_python_lines(cell), "training cell", "exec"), {})
    finally:
        logging.set_verbosity(verbosity)
    (trainer,) = made
    assert trainer.config.to_dict() == config_from_file(LAUNCH.parent / "configs" / "demo.py").to_dict()
    assert trainer.calls == ["train", "close"]


def test_colab_notebook_validates_against_the_nbformat_schema():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nbformat.validate(nbformat.read(str(LAUNCH / "colab_demo.ipynb"), as_version=4))
