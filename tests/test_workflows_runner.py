"""The episode runner end to end: scripted policy (real tokenizer), real sandboxed code execution,
real workspaces, the real coach client (rule-based backend) fed action by action, eval's metrics."""
import asyncio
import dataclasses
import os
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_squared_error

from mappa_jax.coach.backends.rule_based import RuleBasedBackend
from mappa_jax.coach.client import CoachClient
from mappa_jax.data.latex import last_boxed
from mappa_jax.data.sklearn_tasks import write_sklearn_tasks
from mappa_jax.data.synthetic import arithmetic_tasks
from mappa_jax.eval.ds_metrics import score_submission
from mappa_jax.eval.math_grading import grade_math
from mappa_jax.tools import Sandbox, SandboxConfig
from mappa_jax.workflows.chat import ChatFormat
from mappa_jax.workflows.coaching import CoachHandoff, to_coach_request
from mappa_jax.workflows.policy import ScriptedPolicy
from mappa_jax.workflows.runner import EpisodeRunner
from mappa_jax.workflows.specs import topology_from_config
from mappa_jax.workflows.topologies import data_science_config, mathchat_config


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[2]  # the session's SmolLM2 tokenizer (conftest): loading one costs seconds


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(SandboxConfig(wall_timeout_s=30))
    yield box
    box.close()


def _reference_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _check_recorded_prompts(policy, episodes, order):
    """Each generate call got exactly the recorded prompt ids of that agent turn's episodes, in
    episode order (an episode that failed during the turn has a prompt there but no action)."""
    expected = []
    for agent in order:
        turns = sorted({a.turn for e in episodes for a in e.actions if a.agent == agent})
        for turn in turns:
            prompts = [a.prompt_ids for e in episodes for a in e.actions
                       if a.agent == agent and a.turn == turn]
            expected.append((agent, prompts))
    assert [name for name, _ in expected] == [c.policy_name for c in policy.calls]
    for (_, recorded), call in zip(expected, policy.calls):
        sent = iter(call.prompts)
        assert all(any(p == q for q in sent) for p in recorded)  # in order, each one sent


def _check_prefixes(tokenizer, episodes):
    """Turn k's prompt = turn k-1's prompt + its generated ids + the tool message, and equals the
    tokenizer's own rendering of the chat the agent saw."""
    checked = 0
    for episode in episodes:
        for prev, nxt in zip(episode.actions, episode.actions[1:]):
            if prev.agent != nxt.agent:
                continue
            head = prev.prompt_ids + prev.generated_ids
            assert nxt.prompt_ids[:len(head)] == head
            assert len(nxt.prompt_ids) > len(head)
            assert list(nxt.prompt_ids) == _reference_ids(tokenizer, nxt.messages)
            checked += 1
    return checked


# ---- MathChat ---------------------------------------------------------------------------------

def test_mathchat_end_to_end(tokenizer, sandbox, tmp_path):
    tasks = arithmetic_tasks(3, seed=5)
    answer_of = {t.prompt: t.answer for t in tasks}
    hanging = tasks[2].prompt  # its code never finishes: that episode must fail alone

    def lookup(text):
        return next(answer for prompt, answer in answer_of.items() if prompt in text)

    def solver(text):
        return f"<think>scratch work</think>Adding it up gives \\boxed{{{lookup(text)}}}."

    def executor_code(text):
        if hanging in text:
            return "```python\nimport time\ntime.sleep(60)\n```"
        return f"Checking.\n```python\nresult = {lookup(text)}\nprint(result)\n```\nnot sent"

    def executor_reads_output(text):
        printed = re.findall(r"Output:\n(\S+)", text)[-1]
        return f"The program printed {printed}, so the answer is \\boxed{{{printed}}}."

    def verifier(text):
        return f"Both agents agree. Final answer: \\boxed{{{last_boxed(text)}}}"

    topo = topology_from_config(mathchat_config())
    policy = ScriptedPolicy(tokenizer, {"problem_solver": [solver],
                                        "code_executor": [executor_code, executor_reads_output],
                                        "verifier": [verifier]})
    coach = CoachClient(RuleBasedBackend())
    handoff = CoachHandoff(coach, topo, tasks, ground_truth_roles=("verifier",))
    calls_at_handoff = {}

    def on_action(action):
        calls_at_handoff[(action.episode_id, action.agent, action.turn)] = len(policy.calls)
        handoff(action)

    runner = EpisodeRunner(topo, policy, ChatFormat(tokenizer), sandbox=sandbox,
                           workspace_root=tmp_path, on_action=on_action, tool_timeout_s=4)

    async def go():
        result = await runner.run(tasks, samples_per_task=2, seed=3)
        return result, await handoff.verdicts()

    result, verdicts = asyncio.run(go())
    episodes = result.episodes
    assert [e.episode_id for e in episodes] == [f"{t.task_id}#{k}" for t in tasks for k in (0, 1)]

    failed = [e for e in episodes if e.failed]
    assert [e.task_id for e in failed] == [tasks[2].task_id] * 2
    for episode in failed:
        assert "code_executor turn 0: code run still going" in episode.failure_reason
        assert [a.agent for a in episode.actions] == ["problem_solver"]

    ok = [e for e in episodes if not e.failed]
    assert len(ok) == 4
    for episode in ok:
        task = next(t for t in tasks if t.task_id == episode.task_id)
        assert [(a.agent, a.turn) for a in episode.actions] == [
            ("problem_solver", 0), ("code_executor", 0), ("code_executor", 1), ("verifier", 0)]
        run = episode.actions[1].tool
        assert run.stdout == f"{task.answer}\n" and run.exit_code == 0 and not run.timed_out
        assert run.code == (f"result = {task.answer}\nprint(result)\n",)
        assert episode.actions[1].text.endswith("```")  # generation stopped where the block closed
        assert episode.actions[2].tool is None and episode.actions[2].last_turn
        assert episode.boxed_answer == task.answer and grade_math(episode.final_answer, task.answer).correct
        verifier_saw = episode.actions[3].messages[1]["content"]
        assert "## Problem Solver" in verifier_saw and "scratch work" not in verifier_saw
        assert f"Output:\n{task.answer}" in verifier_saw

    # One generate call per agent turn with all live episodes; the ids recorded are those sent.
    assert [(c.policy_name, len(c.prompts)) for c in policy.calls] == [
        ("problem_solver", 6), ("code_executor", 6), ("code_executor", 4), ("verifier", 4)]
    _check_recorded_prompts(policy, episodes, topo.policies)
    assert _check_prefixes(tokenizer, episodes) == 4
    assert len({c.seed for c in policy.calls}) == 4

    # Every action went to the coach as soon as it finished, before the next generate call.
    for episode in episodes:
        for action in episode.actions:
            key = (action.episode_id, action.agent, action.turn)
            call_index = [i for i, c in enumerate(policy.calls)
                          if c.policy_name == action.policy][action.turn]
            assert calls_at_handoff[key] == call_index + 1
    assert len(verdicts) == sum(len(e.actions) for e in episodes)
    assert all(v.ok for v in verdicts.values())
    for episode in ok:
        verdict = verdicts[(episode.episode_id, "verifier", 0)]
        assert verdict.correct is True and verdict.score == 10

    timings = result.timings
    assert timings.policy_calls == 4 and timings.tool_runs == 6
    assert timings.tool_s >= 4.0 and timings.tool_busy_s >= timings.tool_s
    assert timings.total_s >= timings.sampling_s + timings.tool_s - timings.overlap_s
    print(timings.summary())


# ---- data-science pipeline ----------------------------------------------------------------------

DE_EXPLORE = """Let me look at the data.
```python
import pandas as pd
train = pd.read_csv("train.csv")
print(train.shape)
print(list(train.columns))
```"""

DE_SAVE = """Now the features.
```python
import json
import pandas as pd
meta = json.load(open("task.json"))
train, test = pd.read_csv("train.csv"), pd.read_csv("test.csv")
target, key = meta["target_column"], meta["id_column"]
features = [c for c in train.columns if c not in (target, key)]
train[features].to_csv("X_train.csv", index=False)
train[[target]].to_csv("y_train.csv", index=False)
test[[key] + features].to_csv("X_test.csv", index=False)
print("saved", len(features), "features")
```"""

MODELER_FIT = """```python
import json, pickle
import pandas as pd
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
meta = json.load(open("task.json"))
X, y = pd.read_csv("X_train.csv"), pd.read_csv("y_train.csv").iloc[:, 0]
kind = RandomForestClassifier if meta["task_type"] == "classification" else RandomForestRegressor
model = kind(n_estimators=30, random_state=0).fit(X, y)
pickle.dump(model, open("model.pkl", "wb"))
print("trained", type(model).__name__)
```"""

ANALYST_PREDICT = """```python
import json, pickle
import pandas as pd
meta = json.load(open("task.json"))
model = pickle.load(open("model.pkl", "rb"))
X_test = pd.read_csv("X_test.csv")
key, target = meta["id_column"], meta["target_column"]
pred = model.predict(X_test.drop(columns=[key]))
pd.DataFrame({key: X_test[key], target: pred}).to_csv("submission.csv", index=False)
print(len(pred), "rows")
```"""


def test_data_science_pipeline_end_to_end(tokenizer, sandbox, tmp_path):
    tasks = write_sklearn_tasks(tmp_path / "data", seed=0, names=("iris", "diabetes"))
    broken = dataclasses.replace(tasks[0], task_id="sklearn/missing", data_science=dataclasses.replace(
        tasks[0].data_science, task_dir=str(tmp_path / "data" / "no_such_dir")))
    tasks = tasks + [broken]
    topo = topology_from_config(data_science_config())
    policy = ScriptedPolicy(tokenizer, {
        "data_engineer": [DE_EXPLORE, DE_SAVE, "Saved X_train.csv, y_train.csv and X_test.csv."],
        "modeler": [MODELER_FIT, "The model is in model.pkl."],
        "analyst": [ANALYST_PREDICT, "submission.csv is written."]})

    def harness(task, path):
        scored = score_submission(task, path)
        return {"success": scored.success, **scored.metrics}

    coach = CoachClient(RuleBasedBackend())
    handoff = CoachHandoff(coach, topo, tasks, submission_metrics=harness)
    runner = EpisodeRunner(topo, policy, ChatFormat(tokenizer), sandbox=sandbox,
                           workspace_root=tmp_path / "episodes", on_action=handoff)

    async def go():
        result = await runner.run(tasks, samples_per_task=1, seed=0)
        return result, await handoff.verdicts()

    result, verdicts = asyncio.run(go())
    good, bad = result.episodes[:2], result.episodes[2]
    assert bad.failed and "FileNotFoundError" in bad.failure_reason and "no_such_dir" in bad.failure_reason
    assert bad.actions == [] and bad.submission_path is None
    assert [(c.policy_name, len(c.prompts)) for c in policy.calls] == [
        ("data_engineer", 2)] * 3 + [("modeler", 2)] * 2 + [("analyst", 2)] * 2
    _check_recorded_prompts(policy, good, topo.policies)
    assert _check_prefixes(tokenizer, good) == 4 * 2

    for episode, task in zip(good, tasks):
        assert not episode.failed, episode.failure_reason
        by_turn = {(a.agent, a.turn): a for a in episode.actions}
        assert "(" in by_turn[("data_engineer", 0)].tool.stdout  # printed the shape
        assert set(by_turn[("data_engineer", 1)].tool.files_created) == {
            "X_train.csv", "y_train.csv", "X_test.csv"}
        modeler_saw = by_turn[("modeler", 0)].messages[1]["content"]
        assert "## Data Engineer, turn 2" in modeler_saw and "saved" in modeler_saw
        assert re.search(r"Files in the working directory: .*X_train\.csv", modeler_saw)
        assert by_turn[("modeler", 0)].tool.files_created == ("model.pkl",)
        assert by_turn[("analyst", 0)].tool.files_created == ("submission.csv",)
        assert by_turn[("analyst", 0)].tool.stdout.strip().endswith("rows")
        # Hidden answers never reach the workspace.
        answers = pd.read_csv(task.data_science.answers_path)
        workspace_files = os.listdir(episode.workspace_dir)
        assert os.path.basename(task.data_science.answers_path) not in workspace_files
        assert episode.submission_path == os.path.join(episode.workspace_dir, "submission.csv")

        # eval's metric, checked against scikit-learn on the merged files.
        scored = score_submission(task, episode.submission_path)
        assert scored.success, scored.error
        merged = answers.merge(pd.read_csv(episode.submission_path), on="id", suffixes=("", "_pred"))
        target = task.data_science.target_column
        assert len(merged) == len(answers)
        if task.task_type == "classification":
            reference = accuracy_score(merged[target], merged[target + "_pred"])
            assert scored.metrics["accuracy"] == pytest.approx(reference) and reference > 0.85
        else:
            reference = np.sqrt(mean_squared_error(merged[target], merged[target + "_pred"]))
            assert scored.metrics["rmse"] == pytest.approx(reference)
            assert scored.metrics["nrmse"] < 1.0  # better than predicting the mean

        # What the coach is shown for the Analyst's code turn.
        analyst_action = by_turn[("analyst", 0)]
        request = to_coach_request(analyst_action, topo, task,
                                   harness_metrics=harness(task, episode.submission_path))
        assert (request.pipeline, request.role, request.turn) == ("datascience", "analyst", 0)
        assert request.role_instructions == topo.agent("analyst").instructions
        assert request.agent_input.startswith("[user]\n" + task.prompt.strip()[:40])
        assert request.agent_output == analyst_action.text
        assert "[exit status 0]" in request.tool_output and "rows" in request.tool_output
        assert request.files_created == ("submission.csv",)
        assert {"X_train.csv", "model.pkl", "submission.csv"} <= set(request.files_present)
        assert request.harness_metrics["success"] is True and request.ground_truth is None

        # The coach saw every action; the DE saved all required files, the Analyst got metrics.
        assert verdicts[(episode.episode_id, "data_engineer", 1)].score == 10
        analyst = verdicts[(episode.episode_id, "analyst", 0)]
        assert analyst.ok and analyst.score >= 7
    assert len(verdicts) == sum(len(e.actions) for e in result.episodes)
    assert result.timings.tool_runs == 2 * 4 and result.timings.policy_calls == 7
    print(result.timings.summary())


def test_prompt_over_limit_fails_only_its_episode(tokenizer, sandbox, tmp_path):
    short, = arithmetic_tasks(1, seed=1)
    long = dataclasses.replace(short, task_id="long", prompt=short.prompt + " Also," * 400)
    cfg = mathchat_config()
    cfg.max_prompt_tokens = 600
    topo = topology_from_config(cfg)
    policy = ScriptedPolicy(tokenizer, {"problem_solver": ["\\boxed{1}"],
                                        "code_executor": ["No code needed: \\boxed{1}"],
                                        "verifier": ["\\boxed{1}"]})
    runner = EpisodeRunner(topo, policy, ChatFormat(tokenizer), sandbox=sandbox,
                           workspace_root=tmp_path)
    result = asyncio.run(runner.run([long, short, short]))
    failed, ok, again = result.episodes
    assert [e.episode_id for e in result.episodes] == ["long#0", f"{short.task_id}#0",
                                                       f"{short.task_id}#1"]
    assert again.sample_index == 1 and ok.workspace_dir != again.workspace_dir
    assert failed.failed and "problem_solver turn 0: prompt of" in failed.failure_reason
    assert "exceeds the limit of 600" in failed.failure_reason and failed.actions == []
    assert not ok.failed and ok.boxed_answer == "1"
    assert [len(c.prompts) for c in policy.calls] == [2, 2, 2]
    assert ok.actions[1].last_turn and ok.actions[1].tool is None  # no code: one turn only
    result.remove_workspaces()
    assert not os.path.exists(ok.workspace_dir)


class _CountingSandbox:
    """The real sandbox, counting the code runs that reach it."""

    def __init__(self, sandbox):
        self.sandbox, self.runs = sandbox, 0

    async def run_cells(self, cells, workspace):
        self.runs += 1
        return await self.sandbox.run_cells(cells, workspace)


def _owner_decisions(owner_of: dict[str, int]):
    """Two simulated hosts in one event loop (mappa_jax.parallel.distributed.OwnerDecides across
    processes): the owner of an episode computes, the other host awaits the owner's result."""
    records: dict[str, asyncio.Future] = {}

    def for_host(host):
        async def decide(episode_id, key, compute):
            record = records.setdefault(f"{episode_id}/{key}", asyncio.get_running_loop().create_future())
            if owner_of[episode_id] != host:
                return await record
            try:
                value = await compute()
            except Exception as err:
                record.set_exception(err)
                raise
            record.set_result(value)
            return value
        return decide
    return [for_host(0), for_host(1)]


def test_two_hosts_share_each_code_run_of_its_owner(tokenizer, sandbox, tmp_path):
    """Model-written code whose output differs per run (a random draw) would give two hosts
    different prompts, and so different sampler inputs; with the owner's code run shared, each
    code runs once and both hosts record the same actions."""
    tasks = arithmetic_tasks(2, seed=7)
    draw = "```python\nimport random\nopen('draw.txt', 'w').write('x')\nprint(random.random())\n```"

    def reads_output(text):
        return "The draw was " + re.findall(r"Output:\n(\S+)", text)[-1] + "."

    def script():
        return {"problem_solver": ["It is \\boxed{3}."], "code_executor": [draw, reads_output],
                "verifier": ["Final answer: \\boxed{3}"]}

    topo = topology_from_config(mathchat_config())
    episode_ids = [f"{t.task_id}#{k}" for t in tasks for k in (0, 1)]
    owner_of = {eid: int(i >= 2) for i, eid in enumerate(episode_ids)}

    def run_two_hosts(decisions, tag):
        counting = _CountingSandbox(sandbox)
        runners = [EpisodeRunner(topo, ScriptedPolicy(tokenizer, script()), ChatFormat(tokenizer),
                                 sandbox=counting, workspace_root=tmp_path / tag / f"host{h}",
                                 decide=decisions[h]) for h in (0, 1)]

        async def go():
            return await asyncio.gather(*(r.run(tasks, samples_per_task=2, seed=1) for r in runners))
        results = asyncio.run(go())
        seen = [[(a.prompt_ids, a.generated_ids, a.tool, a.files_after) for e in r.episodes for a in e.actions]
                for r in results]
        assert all(not e.failed for r in results for e in r.episodes)
        return counting.runs, seen

    runs, (host0, host1) = run_two_hosts(_owner_decisions(owner_of), "shared")
    assert runs == 4  # one code run per episode, on its owner only
    assert host0 == host1 and len(host0) == 4 * 4
    # From the code run on, every action lists the owner's file, on both hosts.
    assert [("draw.txt" in files) for *_, files in host0] == [False, True, True, True] * 4
    runs, (host0, host1) = run_two_hosts([None, None], "independent")
    assert runs == 8 and host0 != host1  # each host ran the code itself: the draws differ


def test_worked_example_turns_come_between_system_message_and_task(tokenizer, tmp_path):
    """An agent's `examples` are rendered as earlier user/assistant turns: the prompt ids are the
    tokenizer's own rendering of [system, example user, example reply, task]."""
    task = arithmetic_tasks(1, seed=2)[0]
    config = mathchat_config()
    config.order = ("problem_solver",)
    del config.agents["code_executor"], config.agents["verifier"]
    config.answer_agent = "problem_solver"
    config.agents.problem_solver.examples = (("What is 3 + 4?", "\\boxed{7}"),)
    topo = topology_from_config(config)
    policy = ScriptedPolicy(tokenizer, {"problem_solver": [f"\\boxed{{{task.answer}}}"]})
    runner = EpisodeRunner(topo, policy, ChatFormat(tokenizer), workspace_root=tmp_path)
    result = asyncio.run(runner.run([task], seed=0))
    action = result.episodes[0].actions[0]
    spec = topo.agent("problem_solver")
    expected = [{"role": "system", "content": spec.instructions}, {"role": "user", "content": "What is 3 + 4?"},
                {"role": "assistant", "content": "\\boxed{7}"}, {"role": "user", "content": task.prompt}]
    assert list(action.messages) == expected
    assert list(action.prompt_ids) == _reference_ids(tokenizer, expected)
    assert [list(p) for p in policy.calls[0].prompts] == [list(action.prompt_ids)]
