"""A multi-host rollout with real sandboxed code: two JAX processes run the same MathChat episodes
(scripted policy, real tokenizer, real sandbox) with the trainer's OwnerDecides hook, where the
Code Executor's code prints a random draw, so each host running it itself would give the hosts
different prompts. Checked: each code cell ran once across the hosts, on its episode's owner, and
both hosts recorded identical actions (prompt ids, tool results, workspace files).

This file is also the worker: run_local_cluster([python, this file]) runs `_worker()` per process.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
from cluster_workers import REPO, run_workers

EPISODES = 6  # 3 tasks x 2 samples: host 0 owns the first 3 episodes, host 1 the last 3


def _worker(workspace_root: str) -> None:
    import asyncio

    from mappa_jax.data.synthetic import arithmetic_tasks
    from mappa_jax.models import hub, weights
    from mappa_jax.parallel import distributed
    from mappa_jax.tools import Sandbox, SandboxConfig
    from mappa_jax.workflows.chat import ChatFormat
    from mappa_jax.workflows.policy import ScriptedPolicy
    from mappa_jax.workflows.runner import EpisodeRunner
    from mappa_jax.workflows.specs import topology_from_config
    from mappa_jax.workflows.topologies import mathchat_config

    distributed.initialize()
    host = distributed.process_index()
    tokenizer = weights.load_tokenizer(hub.smollm2_gguf_path())
    tasks = arithmetic_tasks(EPISODES // 2, seed=11)
    draw = "```python\nimport random\nopen('draw.txt', 'w').write('x')\nprint(random.random())\n```"
    script = {"problem_solver": ["It is \\boxed{3}."], "code_executor": [draw, "The draw is printed above."],
              "verifier": ["Final answer: \\boxed{3}"]}
    episode_ids = [f"step0/{t.task_id}#{k}" for t in tasks for k in (0, 1)]
    owner = {eid: h for h in range(2) for eid in distributed.host_shard(episode_ids, h, 2)}
    decider = distributed.OwnerDecides("test/rollout/step0")
    sandbox = Sandbox(SandboxConfig(wall_timeout_s=30))
    code_runs = []
    run_cells = sandbox.run_cells

    async def counted(cells, workspace):
        code_runs.append(str(workspace))
        return await run_cells(cells, workspace)

    sandbox.run_cells = counted
    runner = EpisodeRunner(topology_from_config(mathchat_config()), ScriptedPolicy(tokenizer, script),
                           ChatFormat(tokenizer), sandbox=sandbox,
                           workspace_root=pathlib.Path(workspace_root) / f"host{host}",
                           decide=lambda eid, key, compute: decider.decide(owner[eid], f"{eid}/{key}", compute))
    result = asyncio.run(runner.run(tasks, samples_per_task=2, episode_prefix="step0/"))
    distributed.sync_hosts("rollout_read")
    decider.clear()
    decider.close()
    sandbox.close()
    from mappa_jax.train import _action_digest  # what the trainer compares across hosts
    actions = [a for e in result.episodes for a in e.actions]
    print("RESULT " + json.dumps({
        "host": host, "failed": [e.failure_reason for e in result.episodes if e.failed],
        "code_runs": len(code_runs), "owned_runs": sum(f"host{host}" in p for p in code_runs),
        "actions": [[a.episode_id, a.agent, a.turn, list(a.prompt_ids), list(a.generated_ids),
                     a.tool.stdout if a.tool else None, list(a.files_after)] for a in actions],
        "digests": [_action_digest(a) for a in actions]}), flush=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return run_workers(pathlib.Path(__file__), str(root), devices=1, timeout_s=240, env=env)


def test_each_code_cell_ran_once_on_its_owner(hosts):
    assert [h["failed"] for h in hosts] == [[], []]
    assert [h["code_runs"] for h in hosts] == [EPISODES // 2, EPISODES // 2]
    assert [h["owned_runs"] for h in hosts] == [EPISODES // 2, EPISODES // 2]


def test_both_hosts_recorded_identical_actions(hosts):
    first, second = (h["actions"] for h in hosts)
    assert len(first) == EPISODES * 4 and first == second
    assert hosts[0]["digests"] == hosts[1]["digests"]  # so no verdict is masked as host divergence
    draws = [a[5] for a in first if a[5] is not None]
    assert len(draws) == EPISODES and len(set(draws)) == EPISODES  # the draws really differ per run
    assert all("draw.txt" in a[6] for a in first if a[1] != "problem_solver")  # the owner's files


if __name__ == "__main__":
    _worker(sys.argv[1])
