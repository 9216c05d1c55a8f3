"""The training loop end to end (mappa_jax/train.py on configs/tiny.py), through its CLI.

One module-scoped pair of runs serves every test: an uninterrupted 3-step run, and the same run
SIGKILLed during step 2 and restarted with the same command. The coach is the project's loopback
HTTP server (mappa_jax.coach.testing) reached through the real OpenAI-compatible backend; each
training problem carries its coach score as a `[[score:N]]` marker, so rewards differ between tasks
and the updates move the adapters. Bad inputs are checked in-process against the finished run's
workdir, with the model loader replaced by a tripwire: each must fail before the model loads and
leave the checkpoints and metrics byte for byte as they were.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scored_tiny import write_scored_tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.py"
AGENTS = ("problem_solver", "code_executor", "verifier")
STEPS = 3  # configs/tiny.py: train.steps
# The coach score of each training problem (one epoch = STEPS batches of 2 problems).
SCORES = (1, 9, 3, 7, 5, 8)
EVAL_SCORE = 7  # the loopback coach's answer when a request carries no marker (the eval problems)
RUN_TIMEOUT_S = 420  # generous: the test machine is shared with other jobs
CREDENTIAL_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY")


def load_tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@dataclasses.dataclass
class RunSetup:
    root: pathlib.Path
    config_file: pathlib.Path
    env: dict

    def command(self, workdir: pathlib.Path, *overrides: str) -> list[str]:
        return [sys.executable, "-m", "mappa_jax.train", "--config", str(self.config_file),
                f"--config.workdir={workdir}", *overrides]

    def start(self, workdir: pathlib.Path, log_name: str) -> subprocess.Popen:
        """The run in its own process group (so a kill takes any sandbox children with it)."""
        with open(self.root / log_name, "w") as log:
            return subprocess.Popen(self.command(workdir), cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, log_name: str) -> str:
        return (self.root / log_name).read_text()


@pytest.fixture(scope="module")
def coach_server():
    from mappa_jax.coach.testing import FakeCoachServer
    with FakeCoachServer(record_bodies=False) as server:
        yield server


@pytest.fixture(scope="module")
def setup(tmp_path_factory, coach_server) -> RunSetup:
    root = tmp_path_factory.mktemp("train_e2e")
    config_file = write_scored_tiny_config(root, coach_server.url, SCORES, "e2e_config.py")
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENVS and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               # Later runs load the programs the first ones compiled (same executables).
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return RunSetup(root, config_file, env)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait(process: subprocess.Popen, setup: RunSetup, log_name: str) -> None:
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill(process)
        pytest.fail(f"{log_name} still running after {RUN_TIMEOUT_S}s:\n{setup.log(log_name)[-4000:]}")
    assert process.returncode == 0, f"{log_name} exited {process.returncode}:\n{setup.log(log_name)[-4000:]}"


@dataclasses.dataclass
class Runs:
    baseline: pathlib.Path
    resumed: pathlib.Path
    killed_log: str
    resumed_log: str
    steps_seen_before_kill: list[int]


@pytest.fixture(scope="module")
def runs(setup) -> Runs:
    """The uninterrupted run and the killed-then-resumed one, started side by side."""
    baseline, resumed = setup.root / "baseline", setup.root / "resumed"
    started = [setup.start(baseline, "baseline.log"), setup.start(resumed, "killed.log")]
    first, victim = started
    try:
        # Step 2's rollout makes its workspace root; checkpoint 1 is complete by then.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (resumed / "workspaces" / "step1").exists():
            if victim.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run to kill ended or stalled before step 2:\n{setup.log('killed.log')[-4000:]}")
            time.sleep(0.05)
        kill(victim)
        steps_before = [r["step"] for r in _rows(resumed)]
        assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["1"], \
            "the kill did not land during step 2"
        started.append(setup.start(resumed, "resumed.log"))
        wait(started[-1], setup, "resumed.log")
        wait(first, setup, "baseline.log")
    finally:
        for process in started:
            kill(process)
    return Runs(baseline, resumed, setup.log("killed.log"), setup.log("resumed.log"), steps_before)


def _rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _restore(workdir: pathlib.Path, step: int) -> dict:
    """{leaf path: array} of every policy's saved state (params and optimizer state)."""
    import warnings

    import jax
    import orbax.checkpoint as ocp
    with warnings.catch_warnings():  # "sharding info not provided": one CPU device, as saved
        warnings.simplefilter("ignore", UserWarning)
        tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "policies")
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _meta(workdir: pathlib.Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


# ---- (1) kill during step 2, resume, and end with exactly the uninterrupted run's params --------
def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(runs):
    assert "step 1/3" in runs.killed_log and "step 2/3" not in runs.killed_log
    assert f"resumed from {runs.resumed / 'checkpoints'} at step 1" in runs.resumed_log
    # Two processes agree before any resume (else the fault is not in resuming).
    first, first_again = _restore(runs.baseline, 1), _restore(runs.resumed, 1)
    assert all(np.array_equal(first[name], first_again[name]) for name in first)
    final = _restore(runs.baseline, STEPS)
    again = _restore(runs.resumed, STEPS)
    assert sorted(final) == sorted(again)
    assert {name.split("']")[0].strip("['") for name in final} == set(AGENTS)
    differing = [name for name in final if not np.array_equal(final[name], again[name])]
    assert not differing, f"{len(differing)} of {len(final)} leaves differ after resume, e.g. {differing[:3]}"
    # Not vacuous: every policy's adapters moved away from step 1, and LoRA B left its zero init.
    for agent in AGENTS:
        params = [n for n in final if n.startswith(f"['{agent}']['params']")]
        assert params and all(not np.array_equal(final[n], first[n]) for n in params), agent
        assert any(np.abs(final[n]).max() > 0 for n in params if "_b'" in n), agent
    assert _meta(runs.baseline, STEPS)["data"] == _meta(runs.resumed, STEPS)["data"]


def test_resumed_steps_reproduce_the_uninterrupted_metrics(runs):
    deterministic = ("reward/", "length/", "behaviour/", "actions/", "outcome", "rl/", "eval/reward/",
                     "eval/length/", "eval/behaviour/", "eval/accuracy")
    for a, b in zip(_rows(runs.baseline), _rows(runs.resumed)):
        assert a["step"] == b["step"]
        picked = lambda row: {k: v for k, v in row.items() if k.startswith(deterministic)}
        assert picked(a) == picked(b), f"step {a['step']}"


# ---- (3) metrics -----------------------------------------------------------------------------
def test_metrics_rows_hold_per_agent_reward_length_tool_use_and_timing(runs):
    rows = _rows(runs.baseline)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    for row in rows[1:]:
        for agent in AGENTS:
            assert 0.0 <= row[f"reward/agent/{agent}"] <= 1.0
            assert 1 <= row[f"length/agent/{agent}"] <= 16  # max_new_tokens in configs/tiny.py
        assert 0.0 <= row["behaviour/tool_use/code_executor"] <= 1.0
        for key in ("time/step_s", "time/rollout_s", "time/update_s", "time/coach_wait_s"):
            assert row[key] >= 0.0, key
        assert row["time/step_s"] >= row["time/update_s"]
        assert 0 < row["rollout/prefilled_tokens"] <= row["rollout/prompt_tokens"]
        assert row["actions/problem_solver/trained"] >= 1  # early stops give real training rows
    # The coach's scores come back as rewards: one epoch visits every problem once, 2 samples each.
    assert all(r["behaviour/coach_fallback"] == 0.0 and r["behaviour/episode_failed"] == 0.0 for r in rows[1:])
    for agent in ("problem_solver", "verifier"):
        per_step = [r[f"reward/agent/{agent}"] for r in rows[1:]]
        assert all(any(np.isclose(v, (a + b) / 20) for i, a in enumerate(SCORES) for b in SCORES[i + 1:])
                   for v in per_step), per_step
        assert np.isclose(2 * sum(per_step), sum(SCORES) / 10)
    for row in (rows[0], rows[-1]):  # held-out evaluation before and after training
        assert "eval/accuracy" in row and row["eval/time_s"] > 0
        for agent in AGENTS:
            assert row[f"eval/reward/agent/{agent}"] == pytest.approx(EVAL_SCORE / 10)


def test_curves_and_summary_are_written(runs):
    png = (runs.baseline / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    summary = json.loads((runs.baseline / "summary.json").read_text())
    assert summary["steps"] == STEPS and "eval/accuracy" in summary["before"]


def _episode_log(workdir: pathlib.Path) -> list[dict]:
    from mappa_jax.metrics import read_jsonl
    return read_jsonl(workdir / "episodes.jsonl")


def test_episode_log_holds_complete_episodes_with_the_coach_scores_their_problems_carry(runs, setup):
    """episodes.jsonl: logging.episodes_per_step complete episodes of every training step and of
    both evaluations; each action's coach score is its problem's [[score:N]] (SCORES, by problem
    index: what the loopback coach was told to answer), EVAL_SCORE for the unmarked held-out
    problems, and the reward is score / 10 (process_weight 1, outcome_weight 0)."""
    from mappa_jax.config import base_config
    from mappa_jax.metrics import format_episode
    per_step, eval_episodes = base_config().logging.episodes_per_step, 2  # configs/tiny.py: 2 eval tasks x 1
    records = _episode_log(runs.baseline)
    counts = collections.Counter((r["phase"], r["step"]) for r in records)
    assert counts == {**{("train", step): per_step for step in range(1, STEPS + 1)},
                      ("eval", 0): min(per_step, eval_episodes), ("eval", STEPS): min(per_step, eval_episodes)}
    for record in records:
        agents = [a["agent"] for a in record["actions"]]  # the whole episode, in order
        assert record["status"] == "ok" and (agents[0], agents[-1]) == (AGENTS[0], AGENTS[-1])
        assert set(agents) == set(AGENTS)
        if record["phase"] == "train":
            index = int(record["task_id"].rsplit("/p", 1)[1])  # "arithmetic/p<index>"
            score = SCORES[index]
            assert f"[[score:{score}]]" in record["problem"]
            assert record["ground_truth"] == str(4 * index + 3)  # as scored_tiny writes problem p<index>
        else:
            score = EVAL_SCORE
            assert re.fullmatch(r"-?\d+", record["ground_truth"])  # the synthetic problems' answers
        assert record["outcome"] in (0.0, 1.0)
        for action in record["actions"]:
            assert action["coach"]["status"] == "ok" and action["coach"]["score"] == score, action
            assert action["reward"] == pytest.approx(score / 10)
        assert format_episode(record).count(f"[coach: {score}/10") == len(record["actions"])
    # Two train episodes of one step come from different problems (spread over the batch).
    assert all(len({r["task_id"] for r in records if (r["phase"], r["step"]) == key}) == n
               for key, n in counts.items() if key[0] == "train")
    assert str(setup.root) not in (runs.baseline / "episodes.jsonl").read_text()  # no host paths


def test_colab_notebook_shows_the_episodes_and_curves_of_a_finished_run(runs, monkeypatch, capsys):
    """launch/colab_demo.ipynb's cells after the training cell, run on this module's finished run
    (stand-ins for the training cell's `trainer` and `time_split` hold what those cells read): the
    held-out episodes before and after training and step 1's print, and the curves are the run's."""
    import types

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mappa_jax.metrics import format_episode
    cells = json.loads((REPO / "launch" / "colab_demo.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    after_training = code[next(i for i, c in enumerate(code) if "Trainer(" in c) + 1:]
    if importlib.util.find_spec("IPython") is None:  # Colab has it; the test extras need not
        display = types.ModuleType("IPython.display")
        display.Image, display.display = str, lambda shown: None
        monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
        monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setattr(plt, "show", lambda: None)
    namespace = {"trainer": types.SimpleNamespace(workdir=runs.baseline),
                 "time_split": {"wall": 120.0, "compilation": 60.0, "other": 60.0}}
    for cell in after_training:
        exec(compile(cell, "notebook cell", "exec"), namespace)
    out = capsys.readouterr().out
    records = _episode_log(runs.baseline)
    printed = [out.find(format_episode(r)) for key in (("eval", 0), ("train", 1), ("eval", STEPS))
               for r in records if (r["phase"], r["step"]) == key]
    assert len(printed) >= 3 and -1 not in printed and printed == sorted(printed), printed
    assert "wall" in out and "2.0 min" in out
    accuracy, reward = namespace["fig"].axes
    rows = _rows(runs.baseline)
    assert list(accuracy.lines[0].get_xdata()) == [0, STEPS]
    assert list(accuracy.lines[0].get_ydata()) == [rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]]
    assert sorted(line.get_label() for line in reward.lines) == sorted(AGENTS)
    for line in reward.lines:
        assert list(line.get_ydata()) == [r[f"reward/agent/{line.get_label()}"] for r in rows[1:]]
    plt.close("all")


def test_resuming_drops_the_episodes_of_steps_after_the_checkpoint(tmp_path):
    """The kill above lands before step 2 logs anything; a kill after a step's episodes were
    written but before its checkpoint leaves rows the resumed run writes again."""
    from mappa_jax.metrics import MetricsWriter, read_jsonl
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(4):
        writer.write(step, {"x": step})
        writer.write_episodes([{"step": step, "phase": "train", "sample": k} for k in range(2)])
    writer.truncate_after(1)
    episodes = read_jsonl(tmp_path / "episodes.jsonl")
    assert [(r["step"], r["sample"]) for r in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_resume_does_not_duplicate_metric_rows(runs):
    assert runs.steps_seen_before_kill[:2] == [0, 1]  # what the killed run had logged
    steps = [r["step"] for r in _rows(runs.resumed)]
    assert steps == list(range(STEPS + 1))
    # Nor episodes: the resumed log is the uninterrupted run's (same episodes, same replies).
    texts = lambda records: [(r["phase"], r["step"], r["episode_id"], [a["text"] for a in r["actions"]])
                             for r in records]
    assert texts(_episode_log(runs.resumed)) == texts(_episode_log(runs.baseline))
    assert (runs.resumed / "curves.png").exists()


# ---- (2) bad inputs: a clear error before the model loads, nothing already written touched -----
def _snapshot(workdir: pathlib.Path) -> dict[str, str]:
    files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]
    files += [workdir / name for name in ("metrics.jsonl", "episodes.jsonl", "summary.json", "curves.png")]
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def trainer_without_model(monkeypatch):
    """Trainer whose model loader fails the test: errors must come before the expensive part."""
    from mappa_jax import train

    def tripwire(*args, **kwargs):
        raise AssertionError("the model started loading before the bad input was reported")

    monkeypatch.setattr(train, "load_model", tripwire)
    for name in CREDENTIAL_ENVS:
        monkeypatch.delenv(name, raising=False)
    return train.Trainer


def _bad_run(trainer_cls, runs, edit, error, match):
    config = load_tiny_config()
    config.workdir = str(runs.baseline)
    edit(config)
    before = _snapshot(runs.baseline)
    with pytest.raises(error, match=match):
        trainer_cls(config)
    assert _snapshot(runs.baseline) == before


def test_unknown_config_key_is_named(trainer_without_model, runs):
    from mappa_jax.config import ConfigError

    def edit(c):
        c.train.stepz = 3
    _bad_run(trainer_without_model, runs, edit, ConfigError, r"unknown config key 'train\.stepz'.*train\.steps")


@pytest.mark.parametrize("override, named", [("--config.foo=1", "foo"),
                                             ("--config.train.stepz=1", "train.stepz")])
def test_unknown_command_line_key_is_named(setup, runs, override, named):
    before = _snapshot(runs.baseline)
    result = subprocess.run(setup.command(runs.baseline, override), cwd=REPO, env=setup.env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode != 0
    assert f"unknown config key '{named}'" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _snapshot(runs.baseline) == before


def test_missing_data_file_is_named(trainer_without_model, runs, tmp_path):
    from mappa_jax.data import DataError
    missing = tmp_path / "no_such_problems.jsonl"

    def edit(c):
        c.data.train = {"source": "math_files", "files": [{"path": str(missing), "task_type": "aime"}]}
    _bad_run(trainer_without_model, runs, edit, DataError, f"not found: {missing}")


def test_empty_dataset_is_named(trainer_without_model, runs, tmp_path):
    from mappa_jax.data import DataError
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    def edit(c):
        c.data.train = {"source": "math_files", "files": [{"path": str(empty), "task_type": "aime"}]}
    _bad_run(trainer_without_model, runs, edit, DataError, f"{empty}: no problems")


def test_eval_train_overlap_is_refused(trainer_without_model, runs):
    from mappa_jax.data import DataError

    def edit(c):
        c.data.eval = dict(c.data.train)
    _bad_run(trainer_without_model, runs, edit, DataError, r"evaluation task\(s\) also appear in the training")


def test_missing_coach_credentials_are_named(trainer_without_model, runs):
    def edit(c):
        c.coach.backend = "gemini"
        c.coach.model = "gemini-2.5-flash"
    from mappa_jax.coach import CoachCredentialsError
    _bad_run(trainer_without_model, runs, edit, CoachCredentialsError, "GEMINI_API_KEY")


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_workdir_is_named(trainer_without_model, tmp_path, where):
    from mappa_jax.config import ConfigError
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = blocker / "run" if where == "under_a_file" else blocker
    config = load_tiny_config()
    config.workdir = str(workdir)
    with pytest.raises(ConfigError, match=f"config key 'workdir': {workdir} is not writable"):
        trainer_without_model(config)
    assert blocker.read_text() == "not a directory"


def test_a_run_that_would_not_fit_stops_before_the_weights_load(monkeypatch, runs):
    """The memory check runs once the architecture is known and before any weight is read; with
    mesh.memory_check=raise (what accelerators get by default) an over-budget run stops there,
    naming settings to change; with "warn" (CPU's default) it goes on with the message logged."""
    from mappa_jax import train
    from mappa_jax.models.config import ModelConfig
    from mappa_jax.parallel.memory_check import InsufficientMemoryError
    loaded = []

    def load_model(model_config, seed, shardings_fn=None, before_weights=None, frozen=False):
        before_weights(ModelConfig.tiny("llama", vocab_size=49152, num_layers=2, hidden_size=64, head_dim=16))
        loaded.append(True)
        raise RuntimeError("weights would load now")

    monkeypatch.setattr(train, "load_model", load_model)
    for name in CREDENTIAL_ENVS:
        monkeypatch.delenv(name, raising=False)

    def tiny_budget(mode):
        def edit(c):
            c.mesh.device_memory_gib = 0.001  # 1 MiB per device
            c.mesh.memory_check = mode
        return edit
    _bad_run(train.Trainer, runs, tiny_budget("raise"), InsufficientMemoryError,
             r"(?s)needs about .* per device.*--config\.")
    assert not loaded
    _bad_run(train.Trainer, runs, tiny_budget("warn"), RuntimeError, "weights would load now")
    assert loaded


def test_library_info_logs_are_quiet_by_default(runs):
    """The console shows progress and results; orbax's and the HTTP client's INFO lines (dozens
    per checkpoint) only with an explicit --verbosity."""
    log = runs.resumed_log
    assert "step 3/3" in log and "after training:" in log
    info = [line for line in log.splitlines() if re.match(r"I\d{4} ", line)]
    assert not info, info[:3]
