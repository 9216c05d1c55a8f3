"""What a rollout produces: one Action per agent turn, one EpisodeResult per episode, run timings."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class ToolRecord:
    """One code execution: the cells run and what came back (see mappa_jax.tools.ExecResult).

    killed_reason: None when the code finished by itself, else why the sandbox stopped it.
    """
    code: tuple[str, ...]
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    files_created: tuple[str, ...]
    files_present: tuple[str, ...]
    wall_s: float
    files_modified: tuple[str, ...] = ()
    killed_reason: str | None = None

    @classmethod
    def from_exec(cls, code: Sequence[str], result: Any) -> "ToolRecord":
        return cls(code=tuple(code), stdout=result.stdout, stderr=result.stderr,
                   exit_code=result.exit_code, timed_out=bool(result.timed_out),
                   files_created=tuple(result.files_created),
                   files_present=tuple(result.files_present), wall_s=float(result.wall_s),
                   files_modified=tuple(getattr(result, "files_modified", ())),
                   killed_reason=getattr(result, "killed_reason", None))


@dataclasses.dataclass(frozen=True)
class Action:
    """One agent turn: the training sequence (exact prompt ids + generated ids + sampler logprobs)
    and what the coach needs to judge it.

    messages: the chat the agent saw (system instructions, upstream context, its own earlier turns
    and their execution outputs) as role/content dicts; prompt_ids is that chat's exact token ids.
    sampling_wall_s is this action's share of its batched generate call; tool_wall_s its code run.
    last_turn: no further turn of this agent follows. files_after: the workspace's files once this
    action (and its code) finished; () for episodes without a workspace (workspace_dir "").
    temperature: what the agent sampled at; `logprobs` are of softmax(logits / temperature).
    """
    episode_id: str
    task_id: str
    agent: str
    policy: str
    turn: int
    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    truncated: bool
    text: str
    messages: tuple[dict, ...]
    tool: ToolRecord | None
    sampling_wall_s: float
    tool_wall_s: float
    seed: int
    last_turn: bool
    files_after: tuple[str, ...] = ()
    workspace_dir: str = ""
    temperature: float = 1.0


@dataclasses.dataclass
class EpisodeResult:
    """One episode: its actions in order and its outcome.

    status "ok" or "failed" (failure_reason says why; its actions so far are kept). final_answer is
    the answer agent's last output without <think> ("" when the topology has none); boxed_answer
    the content of its last \\boxed{}. submission_path is set when the submission file exists.
    """
    episode_id: str
    task_id: str
    sample_index: int
    workspace_dir: str
    actions: list[Action] = dataclasses.field(default_factory=list)
    status: str = "ok"
    failure_reason: str = ""
    final_answer: str = ""
    boxed_answer: str | None = None
    submission_path: str | None = None
    wall_s: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def episode_record(episode: EpisodeResult, task: Any, *, step: int, phase: str, outcome: float,
                   verdicts: Mapping, rewards: Mapping) -> dict:
    """One episode as <workdir>/episodes.jsonl holds it (mappa_jax.metrics.format_episode prints it):
    the problem and its ground truth (None for data science: its answers stay in their hidden
    file), the outcome, and per action the agent's text, its code run, the coach's verdict and the
    reward training gives it. verdicts / rewards are keyed by (episode_id, agent, turn); None where
    there is none (a failed judgement). The workspace path becomes "<workspace>": tracebacks name
    it, and a host path means nothing off this machine."""
    def scrub(text):
        return text.replace(episode.workspace_dir, "<workspace>") if text and episode.workspace_dir else text

    actions = []
    for action in episode.actions:
        key = (action.episode_id, action.agent, action.turn)
        tool, verdict = action.tool, verdicts.get(key)
        actions.append({
            "agent": action.agent, "turn": action.turn, "text": scrub(action.text), "truncated": action.truncated,
            "tool": None if tool is None else {
                "code": [scrub(cell) for cell in tool.code], "stdout": scrub(tool.stdout),
                "stderr": scrub(tool.stderr), "exit_code": tool.exit_code, "killed_reason": tool.killed_reason},
            "coach": None if verdict is None else {
                "score": verdict.score, "reasoning": scrub(verdict.reasoning), "correct": verdict.correct,
                "status": verdict.status, "fallback_reason": verdict.fallback_reason},
            "reward": rewards.get(key)})
    return {"step": step, "phase": phase, "episode_id": episode.episode_id, "task_id": episode.task_id,
            "problem": task.prompt, "ground_truth": task.answer, "outcome": outcome, "status": episode.status,
            "failure_reason": scrub(episode.failure_reason), "actions": actions}


@dataclasses.dataclass(frozen=True)
class RunTimings:
    """Wall-clock breakdown of one batch of episodes.

    sampling_s: time inside generate calls. tool_s: time at least one code run was going (union of
    intervals); tool_busy_s: the sum of all code runs' walls, so tool_busy_s / tool_s is how many
    ran at once on average. overlap_s: time sampling and code runs went on together.
    other_s: the rest of total_s (prompt building, tokenization, bookkeeping).
    """
    total_s: float
    sampling_s: float
    tool_s: float
    tool_busy_s: float
    overlap_s: float
    other_s: float
    policy_calls: int
    tool_runs: int
    generated_tokens: int

    def summary(self) -> str:
        concurrency = self.tool_busy_s / self.tool_s if self.tool_s else 0.0
        return (f"total {self.total_s:.2f}s | sampling {self.sampling_s:.2f}s in {self.policy_calls} "
                f"calls ({self.generated_tokens} tokens) | tools {self.tool_s:.2f}s wall, "
                f"{self.tool_busy_s:.2f}s busy over {self.tool_runs} runs (x{concurrency:.1f} "
                f"concurrent) | sampling/tool overlap {self.overlap_s:.2f}s | other {self.other_s:.2f}s")


@dataclasses.dataclass
class RunResult:
    episodes: list[EpisodeResult]
    timings: RunTimings

    @property
    def actions(self) -> list[Action]:
        return [a for e in self.episodes for a in e.actions]

    def remove_workspaces(self) -> None:
        """Deletes every episode's workspace (once submissions are scored)."""
        for episode in self.episodes:
            if episode.workspace_dir and os.path.isdir(episode.workspace_dir):
                shutil.rmtree(episode.workspace_dir)


def interval_union(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def intersection_length(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Total length of the intersection of two interval unions (each already merged)."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total
