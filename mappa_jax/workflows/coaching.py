"""From a recorded Action to the coach's CoachRequest (mappa_jax.coach.types)."""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Mapping, Sequence

from mappa_jax.coach.types import CoachRequest
from mappa_jax.workflows.records import Action, ToolRecord
from mappa_jax.workflows.specs import Topology


def transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """What an agent saw, as readable text: every message but the system one (the coach gets the
    instructions separately), each under its role."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages if m["role"] != "system")


def tool_output_text(tool: ToolRecord | None) -> str:
    """Raw execution output for the coach (its prompt builder does the truncating)."""
    if tool is None:
        return ""
    status = "timed out" if tool.timed_out else f"exit status {tool.exit_code}"
    parts = [f"[{status}]"]
    if tool.stdout:
        parts.append("stdout:\n" + tool.stdout.rstrip())
    if tool.stderr:
        parts.append("stderr:\n" + tool.stderr.rstrip())
    return "\n".join(parts)


def to_coach_request(action: Action, topology: Topology, task: Any, *,
                     harness_metrics: Mapping[str, Any] | None = None,
                     ground_truth_roles: Sequence[str] = ()) -> CoachRequest:
    """The coach's view of one action.

    task: the episode's Task (its prompt, and its answer for roles in ground_truth_roles, which
    must come from the coach config: `coach.ground_truth_roles`). harness_metrics: the metrics of
    the submission as it stands after this action (the caller computes them for the Analyst).
    The coach's rubric key is the agent name (problem_solver, ..., analyst).
    """
    if action.task_id != task.task_id:
        raise ValueError(f"action of task {action.task_id!r} paired with task {task.task_id!r}")
    spec = topology.agent(action.agent)
    ground_truth = None
    if action.agent in tuple(ground_truth_roles) and getattr(task, "answer", None) is not None:
        ground_truth = str(task.answer)
    return CoachRequest(
        pipeline=topology.pipeline, task=task.prompt, role=spec.name,
        role_instructions=spec.instructions, agent_input=transcript(action.messages),
        agent_output=action.text, tool_output=tool_output_text(action.tool),
        files_present=action.files_after,
        files_created=action.tool.files_created if action.tool else (),
        harness_metrics=dict(harness_metrics) if harness_metrics else None,
        ground_truth=ground_truth, episode_id=action.episode_id, agent=action.agent,
        turn=action.turn)


class CoachHandoff:
    """An `on_action` for EpisodeRunner: builds each action's CoachRequest and submits it to the
    coach client at once; the runner never waits for the verdict.

    tasks: the batch's tasks (looked up by task_id). submission_metrics(task, path) -> metrics:
    the harness score of the submission file (e.g. mappa_jax.eval's score_submission), given to
    the coach for actions of agents that are expected to write it, once it exists.
    """

    def __init__(self, client: Any, topology: Topology, tasks: Sequence[Any], *,
                 ground_truth_roles: Sequence[str] = (),
                 submission_metrics: Callable[[Any, str], Mapping[str, Any] | None] | None = None):
        self.client = client
        self.topology = topology
        self.tasks = {task.task_id: task for task in tasks}
        self.ground_truth_roles = tuple(ground_truth_roles)
        self.submission_metrics = submission_metrics
        self.pending: dict[tuple[str, str, int], Any] = {}

    def __call__(self, action: Action) -> None:
        task = self.tasks[action.task_id]
        metrics = None
        name = self.topology.submission_file
        if (self.submission_metrics is not None and name and action.workspace_dir
                and name in self.topology.agent(action.agent).expected_files
                and name in action.files_after):
            metrics = self.submission_metrics(task, os.path.join(action.workspace_dir, name))
        request = to_coach_request(action, self.topology, task, harness_metrics=metrics,
                                   ground_truth_roles=self.ground_truth_roles)
        self.pending[(action.episode_id, action.agent, action.turn)] = self.client.submit(request)

    async def verdicts(self) -> dict[tuple[str, str, int], Any]:
        """Every submitted action's verdict, keyed by (episode_id, agent, turn)."""
        keys = list(self.pending)
        results = await asyncio.gather(*(self.pending[k] for k in keys))
        return dict(zip(keys, results))
