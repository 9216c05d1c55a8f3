"""The training loop on several hosts (mappa_jax/train.py), end to end through its CLI.

Two processes on this machine form one JAX cluster over loopback (run_local_cluster: CPU
collectives via gloo, 4 CPU devices each, one 8-device mesh whose batch axis spans both hosts) and
run 2 training steps of configs/tiny.py with scored problems and the project's loopback coach
server (each problem carries its coach score as a `[[score:N]]` marker, so rewards differ and the
updates carry signal rather than normalisation noise). The reference is the same command as one
process with 8 CPU devices. Checked:
- the hosts end with identical parameters (the trainer compares every host's parameter shards
  at the end and prints "hosts agree"; it raises if any differs),
- the final checkpoint equals the single-process run's, array by array (1e-5),
- every action was judged exactly once across the two hosts (the coach ledger's request counts,
  summed over hosts, equal the single-process run's; both hosts judged a share; the coach server
  received exactly the backend calls the ledgers report),
- only process 0 wrote metrics (one row per step).
Several CPU devices in one process need XLA's thread pool sized for their collectives
(mappa_jax/parallel/cpu_runtime.py; the trainer does it before JAX starts).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from scored_tiny import write_scored_tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
RUN_TIMEOUT_S = 480  # generous: the machine is shared with other jobs
PROCESSES, DEVICES_PER_PROCESS = 2, 4
SCORES = (1, 9, 3, 7)  # the coach score of each training problem (2 steps x 2 problems)
DEVICES = PROCESSES * DEVICES_PER_PROCESS
# Batches split over all 8 devices: one 8-row bucket for sampling and for the update.
OVERRIDES = (f"--config.train.steps={STEPS}", "--config.logging.progress=False",
             f"--config.sampler.batch_buckets=({DEVICES},)", f"--config.rl.train_batch_size={DEVICES}",
             f"--config.rl.micro_batch_size={DEVICES}")


def _command(config_file: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "mappa_jax.train", "--config", str(config_file),
            f"--config.workdir={workdir}", *OVERRIDES]


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY") and not k.startswith("MAPPA_")}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mappa_jax.coach.testing import FakeCoachServer
    from mappa_jax.parallel.distributed import run_local_cluster
    root = tmp_path_factory.mktemp("distributed_train")
    single, multi, resumed = root / "single", root / "multi", root / "resumed"
    with FakeCoachServer(record_bodies=False) as server:
        config_file = write_scored_tiny_config(root, server.url, SCORES, "distributed_config.py")
        # One after the other: the machine has 2 cores.
        env = {**_base_env(), "JAX_NUM_CPU_DEVICES": str(DEVICES)}
        done = subprocess.run(_command(config_file, single), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, f"single-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        hits_single = server.hits
        results = run_local_cluster(_command(config_file, multi), num_processes=PROCESSES,
                                    devices_per_process=DEVICES_PER_PROCESS,
                                    timeout_s=RUN_TIMEOUT_S, env=_base_env(), cwd=REPO)
        hits_multi = server.hits - hits_single
        preempted = _preempt_during_step_2(config_file, resumed)
        resumed_results = run_local_cluster(_command(config_file, resumed), num_processes=PROCESSES,
                                            devices_per_process=DEVICES_PER_PROCESS,
                                            timeout_s=RUN_TIMEOUT_S, env=_base_env(), cwd=REPO)
    return {"single": single, "multi": multi, "single_log": done.stdout + done.stderr,
            "multi_logs": [r.stdout + r.stderr for r in results], "coach_hits_multi": hits_multi,
            "resumed": resumed, "preempted": preempted,
            "resumed_logs": [r.stdout + r.stderr for r in resumed_results]}


def _preempt_during_step_2(config_file: pathlib.Path, workdir: pathlib.Path) -> dict:
    """Start the cluster, SIGKILL both processes once step 2's rollout has begun (checkpoint 1 is
    complete by then), and report what the preemption left."""
    from mappa_jax.parallel.distributed import LocalCluster
    with LocalCluster(_command(config_file, workdir), PROCESSES, DEVICES_PER_PROCESS, env=_base_env(), cwd=REPO) as cluster:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (workdir / "workspaces" / "host0" / "step1").exists():
            if any(p.poll() is not None for p in cluster.procs) or time.monotonic() > deadline:
                logs = "\n".join(r.stdout[-2000:] + r.stderr[-3000:] for r in cluster.results())
                pytest.fail(f"the cluster to preempt ended or stalled before step 2:\n{logs}")
            time.sleep(0.05)
        cluster.kill()
        return {"checkpoints": sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
                "metric_steps": [row["step"] for row in _metrics(workdir)],
                "log": cluster.results()[0].stdout}


def _metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_arrays(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp
    path = workdir / "checkpoints" / str(step) / "policies"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path)
    tree = getattr(getattr(tree, "item_metadata", None), "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, restore_args=restore_args)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_hosts_end_with_identical_params(runs):
    logs = runs["multi_logs"]
    assert len(logs) == 2
    agree = [line for line in logs[0].splitlines() if line.startswith("hosts agree:")]
    assert agree, "process 0 did not report the end-of-training parameter comparison:\n" + logs[0][-3000:]
    assert int(agree[-1].split()[2]) > 0  # shards compared
    assert "hosts agree" not in runs["single_log"]  # single process: no cross-host check, no collective
    mesh = "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 cpu devices on "
    assert mesh + "2 host(s)" in logs[0] and mesh + "1 host(s)" in runs["single_log"]
    assert "memory: mesh data=8 fsdp=1 tensor=1, LoRA rank 4: peak" in runs["single_log"]  # checked before loading


def test_final_checkpoint_equals_single_process_run(runs):
    single, multi = _checkpoint_arrays(runs["single"], STEPS), _checkpoint_arrays(runs["multi"], STEPS)
    assert single.keys() == multi.keys()
    lora_b = [k for k in single if "['params']" in k and k.endswith("_b']['value']")]
    assert lora_b and all(np.abs(single[k]).max() > 0 for k in lora_b), "the updates did not move the adapters"
    # Not bit for bit: gloo and XLA:CPU's in-process all-reduce may sum the 8 shards in another order.
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], rtol=0, atol=1e-5, err_msg=key)
    changed = [k for k in lora_b if not np.array_equal(multi[k], 0)]
    assert changed == lora_b


def test_each_action_judged_once_across_hosts(runs):
    single, multi = _metrics(runs["single"]), _metrics(runs["multi"])
    assert [r["step"] for r in multi] == list(range(STEPS + 1)), "process 1 wrote metrics rows too"
    for ref, row in zip(single[1:], multi[1:]):
        actions = sum(v for k, v in row.items() if k.startswith("actions/") and k.endswith("/actions"))
        assert actions > 0
        per_host = [row["coach/requests/host0"], row["coach/requests/host1"]]
        assert all(n > 0 for n in per_host), per_host  # both hosts judged a share
        assert sum(per_host) == row["coach/requests"] == ref["coach/requests"]
        assert row["behaviour/coach_fallback"] == ref["behaviour/coach_fallback"] == 0.0
        for key in (k for k in ref if k.startswith(("reward/", "actions/", "rl/loss"))):
            assert row[key] == pytest.approx(ref[key], abs=1e-6), key
    # Requests between two steps = that step's actions (the baseline eval came before step 1).
    step2 = multi[2]
    actions2 = sum(v for k, v in step2.items() if k.startswith("actions/") and k.endswith("/actions"))
    assert step2["coach/requests"] - multi[1]["coach/requests"] == actions2
    assert "coach/requests/host0" not in single[1]
    # The server saw exactly the backend calls the hosts' ledgers report (eval after the last
    # step included: the summary's final eval ran after the last metrics row's counts).
    assert runs["coach_hits_multi"] >= multi[-1]["coach/calls"] > 0


def test_only_process_zero_writes_outputs(runs):
    multi = runs["multi"]
    assert (multi / "summary.json").is_file() and (multi / "curves.png").is_file()
    assert sorted(p.name for p in (multi / "workspaces").iterdir()) == ["host0", "host1"]
    assert "before training:" not in runs["multi_logs"][1]



def test_preempted_cluster_resumes_to_the_uninterrupted_result(runs):
    """Both hosts killed during step 2 (a preemption), then the same command again: it resumes
    from checkpoint 1 and ends with exactly the uninterrupted cluster's parameters and metrics."""
    preempted = runs["preempted"]
    assert preempted["checkpoints"] == ["1"], "the kill did not land during step 2"
    assert preempted["metric_steps"] == [0, 1] and "step 2/" not in preempted["log"]
    log = runs["resumed_logs"][0]
    assert f"resumed from {runs['resumed'] / 'checkpoints'} at step 1" in log
    assert "hosts agree:" in log
    uninterrupted, resumed = _checkpoint_arrays(runs["multi"], STEPS), _checkpoint_arrays(runs["resumed"], STEPS)
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    rows, reference = _metrics(runs["resumed"]), _metrics(runs["multi"])
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # no step logged twice
    for key in (k for k in reference[-1] if k.startswith(("reward/", "actions/", "rl/loss"))):
        assert rows[-1][key] == reference[-1][key], key
