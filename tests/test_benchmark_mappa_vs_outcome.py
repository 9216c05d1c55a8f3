"""benchmarks/mappa_vs_outcome.py, the machinery (not the result): both arms train one step of the
scored tiny config (configs/tiny.py whose problems carry their coach score, answered by the loopback
coach), each in its own process and workdir; the MAPPA arm trains on the coach's scores, the
outcome arm on the episodes' outcomes; the figure and table cover both; a second call skips the
finished runs."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from scored_tiny import write_scored_tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCORES = (6, 8, 7, 9, 6, 8)  # every action of a training problem gets score / 10 >= 0.6 from the coach
AGENTS = ("problem_solver", "code_executor", "verifier")


def _benchmark():
    spec = importlib.util.spec_from_file_location("mappa_vs_outcome", REPO / "benchmarks" / "mappa_vs_outcome.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    from mappa_jax.coach.testing import FakeCoachServer
    root = tmp_path_factory.mktemp("mappa_vs_outcome")
    bench = _benchmark()
    with FakeCoachServer(record_bodies=False) as server:
        config = write_scored_tiny_config(root, server.url, SCORES, "scored_tiny.py")
        argv = ["--config", str(config), "--seeds", "0", "--steps", "1", "--eval-every", "1",
                "--root", str(root / "runs"), "--set", f"compilation_cache={root / 'xla'}"]
        results = bench.main(argv)
        again = bench.main(argv)  # everything finished: nothing trains again
    return bench, root / "runs", results, again


def test_each_arm_trains_one_step_in_its_own_process_and_workdir(ablation):
    bench, runs, results, _ = ablation
    assert set(results) == {"mappa", "outcome"}
    for arm, weights in bench.ARMS.items():
        workdir = runs / f"{arm}_seed0"
        record = json.loads((workdir / bench.RUN_RECORD).read_text())
        assert record["arm"] == arm and record["seed"] == 0 and record["returncode"] == 0
        assert record["attempts"] == 1 and record["wall_s"] > 0
        for key, value in weights.items():
            assert f"--config.{key}={value}" in record["command"]
        assert f"--config.workdir={workdir}" in record["command"]
        assert [r["step"] for r in _rows(workdir)] == [0, 1]
        assert json.loads((workdir / "summary.json").read_text())["steps"] == 1


def test_the_arms_train_on_coach_scores_and_on_outcomes(ablation):
    _, runs, _, _ = ablation
    mappa, outcome = (_rows(runs / f"{arm}_seed0")[1] for arm in ("mappa", "outcome"))
    # Same seed, same first rollout: the step-1 episodes (and so their outcomes) are identical.
    assert mappa["outcome"] == outcome["outcome"]
    assert outcome["outcome"] == 0.0  # a random 2-layer decoder never boxes the right sum
    for agent in AGENTS:
        key = f"rl/{agent}/reward_mean"
        if key in mappa:  # the coach's score / 10 (an agent whose actions were all truncated trains on nothing)
            assert min(SCORES) / 10 - 1e-6 <= mappa[key] <= max(SCORES) / 10 + 1e-6
        if key in outcome:  # the episode's outcome, whatever the coach said
            assert outcome[key] == 0.0
    assert any(f"rl/{agent}/reward_mean" in mappa for agent in AGENTS)


def test_figure_and_table_cover_both_arms_and_rerun_skips(ablation):
    _, runs, results, again = ablation
    figure = runs / "mappa_vs_outcome.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (runs / "mappa_vs_outcome.md").read_text()
    assert "| mappa | 0 |" in table and "| outcome | 0 |" in table
    assert "| **mappa** | mean of 1 |" in table and "| **outcome** | mean of 1 |" in table
    assert again == results
    for arm in ("mappa", "outcome"):
        assert json.loads((runs / f"{arm}_seed0" / "benchmark_run.json").read_text())["attempts"] == 1


def test_finished_means_the_requested_steps(tmp_path):
    bench = _benchmark()
    assert not bench.finished(tmp_path, 2)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 1}))
    assert bench.finished(tmp_path, 1) and not bench.finished(tmp_path, 2)  # --steps 2 resumes it
