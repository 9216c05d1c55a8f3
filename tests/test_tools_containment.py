"""What a run leaves behind and what model code can reach, under every backend this machine has.

Zombies, a venv under /tmp or $HOME, bundled copies of the task datasets, a rebuilt split,
aggregate memory through cgroups, the workspace size limit, and the trainer's config keys.
Each claim is paired with a control showing the probe would see the problem if it were there.
"""
import asyncio
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mappa_jax.tools import (Sandbox, SandboxConfig, SandboxUnavailableError, Workspace,
                             sandbox_config_from)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BASE = SandboxConfig(wall_timeout_s=30, cpu_time_s=20, memory_bytes=2 << 30,
                     max_processes=32, max_output_bytes=8192)
BACKENDS = ["bwrap", "unshare"]


def _make_sandbox(config):
    try:
        return Sandbox(config)
    except SandboxUnavailableError as error:
        pytest.skip(f"backend {config.backend!r} does not work on this machine: {error}")


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request):
    sandbox = _make_sandbox(dataclasses.replace(BASE, backend=request.param))
    yield sandbox
    sandbox.close()


def run(sandbox, cells, workspace):
    return asyncio.run(sandbox.run_cells(cells, workspace))


# --- zombies -----------------------------------------------------------------------------------

# Runs in its own process, made a child subreaper that never reaps: every process a sandbox run
# orphans lands on it and stays a zombie there, so the count is exactly ours (other programs on
# the machine cannot add to it, unlike a count of PID 1's zombies).
_ZOMBIE_HARNESS = r"""
import asyncio, ctypes, dataclasses, json, os, subprocess, sys, tempfile, time
from pathlib import Path
from mappa_jax.tools import Sandbox, SandboxConfig, Workspace, backends

def zombie_children():
    found = 0
    for name in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found += fields[0] == "Z" and int(fields[1]) == os.getpid()
    return found

assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
backend, runs = sys.argv[1], int(sys.argv[2])
config = SandboxConfig(backend=backend, wall_timeout_s=30, max_processes=32)
sandbox, short = Sandbox(config), Sandbox(dataclasses.replace(config, wall_timeout_s=1.0))
root = tempfile.mkdtemp()
# Every tenth run is killed at the wall clock, one raises, one leaves a detached grandchild.
cells = {0: ["import time\ntime.sleep(30)"], 1: ["1/0"],
         2: ["import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(30)'], start_new_session=True)\nprint(1)"]}

async def main():
    gate = asyncio.Semaphore(4)
    async def one(i):
        async with gate:
            runner = short if i % 10 == 0 else sandbox
            return await runner.run_cells(cells.get(i % 10, ["print(1)"]),
                                          Workspace.create(root, f"r{i}"))
    return await asyncio.gather(*(one(i) for i in range(runs)))

results = asyncio.run(main())
report = {"zombies": zombie_children(), "ok": sum(r.exit_code == 0 for r in results),
          "timed_out": sum(r.timed_out for r in results)}
# The control: the same sandbox command started without the reaper.
probe = Path(tempfile.mkdtemp())
if os.geteuid() == 0:
    os.chown(probe, config.sandbox_uid, config.sandbox_gid)
inner = backends.python_command(sandbox.backend.executable, "print(1)")
subprocess.run(sandbox.backend.command(inner, probe), capture_output=True, cwd="/",
               start_new_session=True)
time.sleep(0.3)
report["zombies_without_reaper"] = zombie_children()
print(json.dumps(report))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hundred_runs_leave_no_zombie(backend, tmp_path):
    done = subprocess.run([sys.executable, "-c", _ZOMBIE_HARNESS, backend, "100"],
                          capture_output=True, text=True, timeout=300)
    if "does not work" in done.stderr or "no sandbox backend works" in done.stderr:
        pytest.skip(f"{backend} does not work here")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] == 80 and report["timed_out"] == 10, report
    assert report["zombies"] == 0, report
    if backend == "bwrap":  # bubblewrap's own exit leaves its sandbox init unreaped
        assert report["zombies_without_reaper"] >= 1, report


def test_stop_request_kills_the_whole_run(sandbox, tmp_path):
    """Cancelling a run (as the episode runner does on its own timeout) kills everything."""
    workspace = Workspace.create(tmp_path, "cancelled")
    cell = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True:\\n "
            "open(\"beat.txt\", \"a\").write(\"x\"); time.sleep(0.05)'], start_new_session=True)\n"
            "time.sleep(60)\n")

    async def scenario():
        task = asyncio.ensure_future(sandbox.run_cells([cell], workspace))
        await asyncio.sleep(3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    size = (workspace.path / "beat.txt").stat().st_size
    assert size > 0
    import time
    time.sleep(0.5)
    assert (workspace.path / "beat.txt").stat().st_size == size


# --- the interpreter's own files: a venv under /tmp or under $HOME -----------------------------

_VENV_HOST = r"""
import asyncio, json, sys, tempfile
from mappa_jax.tools import Sandbox, SandboxConfig, Workspace
backend, venv, home = sys.argv[1:4]
sandbox = Sandbox(SandboxConfig(backend=backend, wall_timeout_s=60))
probe = f'''
import json, os
def attempt(action):
    try:
        return action()
    except Exception as error:
        return type(error).__name__
import venv_probe, pandas, sklearn.linear_model
print(json.dumps({{"probe": venv_probe.VALUE, "prefix": __import__("sys").prefix,
    "venv": attempt(lambda: os.listdir({venv!r})),
    "venv_parent": attempt(lambda: os.listdir(os.path.dirname({venv!r}))),
    "home": attempt(lambda: os.listdir({home!r})),
    "root_entries": sorted(os.listdir("/"))}}))
'''
workspace = Workspace.create(tempfile.mkdtemp(dir=sys.argv[4]), "episode")
result = asyncio.run(sandbox.run_cells([probe], workspace))
print(json.dumps({"exit": result.exit_code, "stderr": result.stderr, "stdout": result.stdout,
                  "prefix": sys.prefix}))
sandbox.close()
"""


def _make_venv(path: Path) -> Path:
    """A venv over our interpreter, with a module of its own that model code must import."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(path)], check=True, capture_output=True, timeout=120)
    python = path / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    assert site_dir.startswith(str(path)), site_dir
    Path(site_dir, "venv_probe.py").write_text("VALUE = 'from the venv'\n")
    return python


def _venv_places():
    home = Path.home()
    return {"tmp": Path(tempfile.gettempdir()), "home_cache": home / ".cache"}


@pytest.mark.parametrize("place", ["tmp", "home_cache"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_venv_under_tmp_or_home_works_and_stays_hidden(backend, place, tmp_path):
    parent = _venv_places()[place]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        venv = parent / f"mappa-test-venv-{uuid.uuid4().hex[:8]}"
        python = _make_venv(venv)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make a venv under {parent}: {error}")
    try:
        # Workspaces outside pytest's root-only tmp dir only matter for a non-root host.
        done = subprocess.run([str(python), "-c", _VENV_HOST, backend, str(venv),
                               str(Path.home()), str(tmp_path)],
                              capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    if "no sandbox backend works" in done.stderr:
        pytest.skip(f"{backend} does not work here")
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["prefix"] == str(venv)  # the host side really ran from the venv
    assert outcome["exit"] == 0, outcome["stderr"]
    report = json.loads(outcome["stdout"])
    assert report["probe"] == "from the venv"
    assert report["prefix"].startswith("/opt/python/")
    # Neither the venv's host path nor the home directory exist in there; the venv's parent is
    # missing too, or it is /tmp, the sandbox's own empty one.
    assert report["venv"] == report["home"] == "FileNotFoundError", report
    assert report["venv_parent"] in ("FileNotFoundError", []), report
    assert set(report["root_entries"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64",
                                           "libx32", "opt", "proc", "sbin", "tmp", "usr",
                                           "workspace"}, report["root_entries"]


# --- bundled copies of the task datasets ------------------------------------------------------

# First rows of iris, wine and breast_cancer as their bundled copies write them: a search for
# these finds the labelled rows whatever the file is called.
_SCAN = r"""
import gzip, json, os, sys
SIGNATURES = [b"5.1,3.5,1.4,0.2", b"5.1 3.5 1.4 0.2", b"5.1\t3.5\t1.4\t0.2", b"14.23,1.71,2.43",
              b"17.99,10.38,122.8"]
SUFFIXES = (".csv", ".arff", ".data", ".dat", ".gz", ".tsv")
found = []
for root in dict.fromkeys(p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)):
    for directory, _, names in os.walk(root):
        for name in names:
            if not name.lower().endswith(SUFFIXES):
                continue
            path = os.path.join(directory, name)
            try:
                if os.path.getsize(path) > 2 << 20:
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
                if name.endswith(".gz"):
                    data = gzip.decompress(data)
            except Exception:
                continue
            if any(signature in data for signature in SIGNATURES):
                found.append(path)
loaders = {}
from sklearn import datasets
for loader in ("load_iris", "load_wine", "load_breast_cancer", "load_diabetes", "load_digits",
               "load_linnerud"):
    try:
        rows = len(getattr(datasets, loader)().target)
        loaders[loader] = rows
    except Exception as error:
        loaders[loader] = type(error).__name__
print(json.dumps({"found": found, "loaders": loaders}))
"""


@pytest.fixture(scope="module")
def host_scan():
    """The control: run by the host, the same search finds the labelled rows."""
    done = subprocess.run([sys.executable, "-c", _SCAN], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout)


def test_bundled_datasets_are_unreadable(sandbox, host_scan, tmp_path):
    assert len(host_scan["found"]) >= 3, host_scan
    assert host_scan["loaders"]["load_iris"] == 150
    result = run(sandbox, [_SCAN], Workspace.create(tmp_path, "scan"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["found"] == [], report["found"]
    assert all(not isinstance(outcome, int) for outcome in report["loaders"].values()), report
    assert "bundled dataset paths hidden" in sandbox.describe()


def test_a_venv_hides_the_base_interpreters_site_packages(tmp_path):
    """A venv's sandbox sees the base prefix (its interpreter and stdlib live there), so the base's
    own site-packages, which the venv does not import from, is hidden whole: its scikit-learn's and
    SciPy's datasets would otherwise be readable."""
    import site
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    here = [p for p in site.getsitepackages() if os.path.isdir(p)]  # for the probe's imports
    base = [os.path.realpath(p) for p in site.getsitepackages([sys.base_prefix]) if os.path.isdir(p)]
    probe = ("import json; from mappa_jax.tools import SandboxConfig, backends; "
             "layout = backends.PythonLayout(SandboxConfig()); "
             "print(json.dumps([layout.hidden_dirs, [layout.to_sandbox(p) for p in %r]]))" % base)
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([repo, *here])})
    assert done.returncode == 0, done.stderr[-3000:]
    hidden, base_site = json.loads(done.stdout)
    assert base_site and all(path in hidden for path in base_site), (base_site, hidden)


# --- rebuilding the hidden split --------------------------------------------------------------

# Model code that knows what every agent can know: scikit-learn's iris and wine are sorted by
# class (50/50/50 and 59/71/48 rows), the task was written with a small seed, and how a
# seeded split is usually made. It tries every seed under 32 with two reconstructions (ids as a
# seeded permutation of the original order; rows in train_test_split's order), keeps whichever
# explains train.csv's labels best, and predicts test.csv from it.
_REBUILD = r"""
import json, os
import numpy as np, pandas as pd
from sklearn.model_selection import train_test_split
SIZES = {"iris": [50, 50, 50], "wine": [59, 71, 48]}
out = {}
for task in sorted(f"{root}/{name}" for root in os.listdir(".") for name in SIZES):
    sizes = SIZES[task.split("/")[1]]
    spec = json.load(open(f"{task}/task.json"))
    target, id_column = spec["target_column"], spec["id_column"]
    train, test = pd.read_csv(f"{task}/train.csv"), pd.read_csv(f"{task}/test.csv")
    n = len(train) + len(test)
    block = np.repeat(np.arange(len(sizes)), sizes)
    best = (-1.0, None)
    for seed in range(32):
        guesses = []
        inverse = np.empty(n, int)
        inverse[np.random.default_rng(seed).permutation(n)] = np.arange(n)
        guesses.append((block[inverse[train[id_column]]], block[inverse[test[id_column]]]))
        train_idx, test_idx = train_test_split(np.arange(n), test_size=len(test),
                                               random_state=seed, stratify=block)
        guesses.append((block[train_idx], block[test_idx]))
        codes, classes = pd.factorize(train[target])
        for train_blocks, test_blocks in guesses:
            votes = np.zeros((len(sizes), len(classes)))
            np.add.at(votes, (train_blocks, codes), 1)
            fit = float(np.mean(votes.argmax(1)[train_blocks] == codes))
            if fit > best[0]:
                best = (fit, list(classes[votes.argmax(1)[test_blocks]]))
    pd.DataFrame({id_column: test[id_column], target: best[1]}).to_csv(f"{task}/guess.csv",
                                                                       index=False)
    out[task] = best[0]
print(json.dumps(out))
"""


def _old_style_tasks(out_dir: Path, seed: int):
    """The control: the writer as it was (seeded ids over the original order, seed in task.json)."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    for name, loader in (("iris", datasets.load_iris), ("wine", datasets.load_wine)):
        bunch = loader(as_frame=True)
        frame = bunch.data.assign(label=np.asarray(bunch.target_names)[bunch.target])
        frame.insert(0, "id", np.random.default_rng(seed).permutation(len(frame)))
        train, test = train_test_split(frame, test_size=0.25, random_state=seed,
                                       stratify=frame["label"])
        (out_dir / "tasks" / name).mkdir(parents=True)
        (out_dir / "answers").mkdir(exist_ok=True)
        train.to_csv(out_dir / "tasks" / name / "train.csv", index=False)
        test.drop(columns=["label"]).to_csv(out_dir / "tasks" / name / "test.csv", index=False)
        test[["id", "label"]].to_csv(out_dir / "answers" / f"{name}.csv", index=False)
        (out_dir / "tasks" / name / "task.json").write_text(json.dumps(
            {"target_column": "label", "id_column": "id", "task_type": "classification",
             "seed": seed, "test_fraction": 0.25}))


def _rebuild_accuracy(sandbox, data_dirs: dict, workspace: Workspace) -> dict:
    """{label: (attack accuracy on the hidden labels, accuracy of the train majority)}."""
    for label, data_dir in data_dirs.items():
        for name in ("iris", "wine"):
            task_dir = data_dir / "tasks" / name
            workspace.copy_in({f"{label}/{name}/{p.name}": p for p in task_dir.iterdir()},
                              forbidden=[data_dir / "answers" / f"{name}.csv"])
    result = run(sandbox, [_REBUILD], workspace)
    assert result.exit_code == 0, result.stderr
    scores = {}
    for label, data_dir in data_dirs.items():
        hits = majority = total = 0
        for name in ("iris", "wine"):
            truth = pd.read_csv(data_dir / "answers" / f"{name}.csv").set_index("id")["label"]
            guess = pd.read_csv(workspace.path / label / name / "guess.csv").set_index("id")
            train = pd.read_csv(data_dir / "tasks" / name / "train.csv")
            hits += int((guess["label"].loc[truth.index] == truth).sum())
            majority += int((truth == train["label"].mode().iloc[0]).sum())
            total += len(truth)
        scores[label] = (hits / total, majority / total)
    return scores


def test_the_hidden_split_cannot_be_rebuilt(tmp_path):
    """What model code can see is the same under every backend: one is enough here."""
    from mappa_jax.data import write_sklearn_tasks
    _old_style_tasks(tmp_path / "old_style", seed=7)
    write_sklearn_tasks(tmp_path / "new", seed=7, names=("iris", "wine"))
    for name in ("iris", "wine"):
        spec = json.loads((tmp_path / "new" / "tasks" / name / "task.json").read_text())
        assert set(spec) == {"target_column", "id_column", "task_type"}
    sandbox = _make_sandbox(BASE)
    try:
        scores = _rebuild_accuracy(sandbox, {"old": tmp_path / "old_style", "new": tmp_path / "new"},
                                   Workspace.create(tmp_path, "attack"))
    finally:
        sandbox.close()
    assert scores["old"][0] > 0.95  # the attack is real: it rebuilt the old writer's labels
    accuracy, majority = scores["new"]
    # 83 hidden labels over three balanced classes: chance is ~1/3 (sd ~0.05).
    assert accuracy < max(majority, 1 / 3) + 0.2, scores


# --- aggregate memory: one cgroup per run -----------------------------------------------------

_SPREAD_OUT = """
import subprocess, sys
hog = "import time; block = b'x' * (160 << 20); time.sleep(2)"
children = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
print(sorted(child.wait() for child in children))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_run_as_a_whole_gets_the_memory_limit(backend, tmp_path):
    # Four processes of 160 MiB each: every one is well under its own 1 GiB address space.
    limits = dataclasses.replace(BASE, backend=backend, memory_bytes=1 << 30,
                                 total_memory_bytes=384 << 20)
    unlimited = _make_sandbox(dataclasses.replace(limits, cgroup="off"))
    try:
        assert "NO aggregate memory/process limit" in unlimited.describe()
        control = run(unlimited, [_SPREAD_OUT], Workspace.create(tmp_path, "control"))
    finally:
        unlimited.close()
    assert control.exit_code == 0, control
    assert control.stdout == "[0, 0, 0, 0]\n", control
    limited = _make_sandbox(limits)
    try:
        if limited.cgroups is None:
            assert "NO aggregate memory/process limit" in limited.describe()
            assert limited.cgroup_problem in limited.describe()
            with pytest.raises(SandboxUnavailableError, match="cgroup='require'"):
                Sandbox(dataclasses.replace(limits, cgroup="require"))
            pytest.skip(f"no per-run cgroups here: {limited.cgroup_problem}")
        assert "384 MiB" in limited.describe()
        result = run(limited, [_SPREAD_OUT], Workspace.create(tmp_path, "limited"))
    finally:
        limited.close()
    assert result.exit_code == 0, result.stderr
    codes = json.loads(result.stdout.splitlines()[-1])
    assert -9 in codes, codes  # the kernel killed at least one of them
    assert "together went over 384 MiB" in result.stderr


# --- the workspace size limit -----------------------------------------------------------------

def test_a_full_workspace_takes_no_more_writes(sandbox, tmp_path):
    limits = dataclasses.replace(sandbox.config, workspace_max_bytes=8 << 20,
                                 workspace_max_files=200)
    small = _make_sandbox(limits)
    workspace = Workspace.create(tmp_path, "small")
    write = ("for index in range({count}):\n"
             "    with open(f'{prefix}{{index}}.bin', 'wb') as handle:\n"
             "        handle.write(b'x' * (3 << 20))\n")
    try:
        first = run(small, [write.format(count=2, prefix="a")], workspace)
        assert first.exit_code == 0 and not first.workspace_full, first.stderr
        # 6 MiB there: the next 3 MiB file is cut at the 2 MiB left, and the workspace is full.
        second = run(small, [write.format(count=2, prefix="b")], workspace)
        assert second.exit_code == 1 and "File too large" in second.stderr, second.stderr
        assert workspace.usage()[0] <= limits.workspace_max_bytes
        third = run(small, ["with open('more.txt', 'w') as handle:\n    handle.write('x')\n"],
                    workspace)
        assert third.exit_code == 1 and "File too large" in third.stderr, third.stderr
        # Deleting makes room again, from the next action on (room is measured at its start).
        assert run(small, ["import os\nos.remove('a0.bin')\n"], workspace).exit_code == 0
        freed = run(small, ["with open('more.txt', 'w') as handle:\n    handle.write('x')\n"],
                    workspace)
        assert freed.exit_code == 0 and not freed.workspace_full, freed.stderr
        # Too many entries: the run's result says so and later runs cannot write.
        many = run(small, ["for i in range(400):\n    open(f'f{i}', 'w').close()\n"], workspace)
        assert many.workspace_full and "over its limit" in many.stderr, many
        blocked = run(small, ["with open('f0', 'w') as handle:\n    handle.write('x')\n"],
                      workspace)
        assert blocked.exit_code == 1 and "File too large" in blocked.stderr
    finally:
        small.close()


def test_a_run_filling_the_workspace_is_stopped(sandbox, tmp_path):
    limits = dataclasses.replace(sandbox.config, workspace_max_bytes=4 << 20,
                                 workspace_max_files=100_000)
    small = _make_sandbox(limits)
    try:
        # Many files, each under the per-file limit: only the total is over.
        result = run(small, ["import time\nfor i in range(100_000):\n"
                             "    open(f'f{i}.bin', 'wb').write(b'x' * 65536)\n"
                             "    time.sleep(0.001)\n"], Workspace.create(tmp_path, "filler"))
    finally:
        small.close()
    assert result.killed_reason == "workspace_full" and result.workspace_full, result
    assert "this action was stopped" in result.stderr
    assert result.wall_s < 20


# --- the trainer's config keys ----------------------------------------------------------------

def test_trainer_config_keys_set_the_sandbox():
    from mappa_jax.config import base_config
    train = base_config().train
    config = sandbox_config_from(train)
    assert config.wall_timeout_s == train.sandbox_wall_timeout_s
    assert config.cpu_time_s == train.sandbox_cpu_time_s
    assert config.memory_bytes == train.sandbox_memory_mb << 20
    assert config.total_memory_bytes == train.sandbox_total_memory_mb << 20
    assert config.max_processes == train.sandbox_max_processes
    assert config.workspace_max_bytes == train.sandbox_workspace_mb << 20
    train.sandbox_cgroup = "sometimes"
    with pytest.raises(ValueError, match=r"train\.sandbox_cgroup"):
        sandbox_config_from(train)
    train.sandbox_cgroup = "auto"
    train.sandbox_cpu_time_s = 0
    with pytest.raises(ValueError, match=r"train\.sandbox_cpu_time_s"):
        sandbox_config_from(train)


@pytest.mark.parametrize("name", ["datascience_qwen3_4b", "mathchat_qwen3_4b",
                                  "mathchat_r1_distill_1p5b"])
def test_paper_configs_give_model_code_the_cpu_its_wall_clock_allows(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = sandbox_config_from(module.get_config().train)
    # A single-threaded fit may use all of its wall time; memory fits the processes allowed.
    assert config.cpu_time_s >= config.wall_timeout_s
    assert config.total_memory_bytes >= config.memory_bytes
