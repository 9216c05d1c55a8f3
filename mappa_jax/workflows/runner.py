"""The async episode runner: a batch of episodes (tasks x samples) through a topology.

For each agent in order and each of its turns, the prompts of all live episodes go to the policy in
ONE generate call; the code of those turns then runs concurrently in each episode's workspace; each
finished action goes at once to `on_action` (e.g. the coach's submit), whose result is not awaited.
An episode that fails (exception, timeout, prompt too long) is marked failed with the reason and
leaves the batch; the others go on.

Reasoning models: where the chat template's generation prompt opens a <think> block, or the
tokenizer has the reasoning tags as tokens (the model may open one itself), every stop pattern of
the agent counts only outside reasoning (`OutsideReasoning`, matched on device), so a code fence
inside the reasoning neither ends the turn nor runs. The action's text then carries the <think>
the prompt opened, so every reader (code extraction, downstream agents, the coach, the final
answer) sees the same reasoning block; an action whose reasoning never closes is truncated.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any, Awaitable, Callable, Sequence

from mappa_jax.coach.prompts import truncate_middle
from mappa_jax.data.latex import last_boxed
from mappa_jax.sampling.stops import REASONING_OPEN, OutsideReasoning
from mappa_jax.tools import extract_code_cells
from mappa_jax.tools.cells import ends_inside_reasoning
from mappa_jax.workflows.chat import ChatFormat, strip_think
from mappa_jax.workflows.policy import Generation, Policy
from mappa_jax.workflows.records import (Action, EpisodeResult, RunResult, RunTimings, ToolRecord,
                                         intersection_length, interval_union)
from mappa_jax.workflows.specs import AgentSpec, Topology
from mappa_jax.workflows.workspaces import workspace_factory


class EpisodeFailure(Exception):
    """Ends one episode; the message is its recorded failure reason."""


def execution_message(tool: ToolRecord, max_chars: int) -> str:
    """How an execution result is shown to the agent (and to downstream agents)."""
    if tool.timed_out:
        status = "was stopped at the time limit"
    elif tool.killed_reason:
        status = f"was killed ({tool.killed_reason})"
    else:
        status = f"finished with exit status {tool.exit_code}"
    parts = [f"Your code {status}."]
    if tool.stdout.strip():
        parts.append("Output:\n" + truncate_middle(tool.stdout.rstrip(), max_chars))
    if tool.stderr.strip():
        parts.append("Errors:\n" + truncate_middle(tool.stderr.rstrip(), max_chars))
    if not tool.stdout.strip() and not tool.stderr.strip():
        parts.append("It printed nothing.")
    if tool.files_created:
        parts.append("Files written: " + ", ".join(tool.files_created))
    return "\n".join(parts)


def list_files(root: str) -> list[str]:
    """Relative paths of the files under root, sorted."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


@dataclasses.dataclass
class _Turn:
    """One finished turn as downstream agents see it."""
    agent: AgentSpec
    turn: int
    text: str
    tool: ToolRecord | None


@dataclasses.dataclass
class _Episode:
    result: EpisodeResult
    task: Any
    workspace: Any
    started: float
    history: list[_Turn] = dataclasses.field(default_factory=list)
    # The current agent's conversation: its exact prompt ids and the same chat as messages.
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    messages: list[dict] = dataclasses.field(default_factory=list)
    agent_active: bool = False
    # The current prompt's generation prompt left a reasoning block open (see ChatFormat).
    starts_in_reasoning: bool = False
    # The workspace's files as of the last code run (only code runs change them): what prompts and
    # actions show, the same on every host even where another host ran the code.
    files: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        return not self.result.failed


class EpisodeRunner:
    """Runs batches of episodes through one topology.

    policy: a Policy (one generate call per agent turn). chat: the ChatFormat of the policies'
    tokenizer. sandbox: a mappa_jax.tools.Sandbox (needed when an agent uses python).
    workspace_root: where each episode gets its workspace (data-science task files copied in);
    make_workspace(episode_id, task) replaces that default. extract_cells(text): the code an agent
    asked to run (default: mappa_jax.tools.extract_code_cells, which skips <think>).
    on_action(action): called once per finished action, never awaited (hand it to the coach).
    episode_timeout_s: an episode still running after this long fails. tool_timeout_s: host-side
    bound on one code run (the sandbox has its own limit; this guards against a hung sandbox).
    decide(episode_id, key, compute): how steps whose result could differ between two runs of the
    same episode (a code run, a wall-clock timeout) are settled; None awaits compute() here.
    Multi-host training passes the owning host's result to every host
    (mappa_jax.parallel.distributed.OwnerDecides), so all hosts build the same prompts.
    """

    def __init__(self, topology: Topology, policy: Policy, chat: ChatFormat, *,
                 sandbox: Any = None, workspace_root: str | os.PathLike | None = None,
                 make_workspace: Callable[[str, Any], Any] | None = None,
                 extract_cells: Callable[[str], list[str]] = extract_code_cells,
                 on_action: Callable[[Action], Any] | None = None,
                 episode_timeout_s: float | None = None, tool_timeout_s: float | None = None,
                 decide: Callable[[str, str, Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None):
        uses_python = [spec.name for spec in topology.agents if spec.uses_python]
        if uses_python and sandbox is None:
            raise ValueError(f"agents {uses_python} of topology {topology.name!r} run Python: "
                             f"EpisodeRunner needs sandbox=")
        if uses_python and make_workspace is None:
            if workspace_root is None:
                raise ValueError(f"agents {uses_python} of topology {topology.name!r} run Python: "
                                 f"EpisodeRunner needs workspace_root= (or make_workspace=)")
            make_workspace = workspace_factory(workspace_root)
        for name, value in (("episode_timeout_s", episode_timeout_s),
                            ("tool_timeout_s", tool_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        self.topology = topology
        self.policy = policy
        self.chat = chat
        self.sandbox = sandbox
        self.make_workspace = make_workspace
        self.extract_cells = extract_cells
        self.on_action = on_action
        self.episode_timeout_s = episode_timeout_s
        self.tool_timeout_s = tool_timeout_s
        self._decide = decide or (lambda episode_id, key, compute: compute())
        # A prompt the sampler cannot take would fail the whole batched call: fail its episode first.
        limits = [n for n in (topology.max_prompt_tokens, getattr(policy, "max_prompt_tokens", None))
                  if n]
        self.max_prompt_tokens = min(limits) if limits else 0
        self._running = False

    async def run(self, tasks: Sequence[Any], samples_per_task: int = 1, seed: int = 0,
                  episode_prefix: str = "") -> RunResult:
        """Runs len(tasks) * samples_per_task episodes; returns their results and the timings.

        One batch at a time per runner (the timings are the batch's own).
        """
        if samples_per_task < 1:
            raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
        if self._running:
            raise RuntimeError("EpisodeRunner.run is already running a batch; use another runner")
        self._running = True
        try:
            return await self._run(tasks, samples_per_task, seed, episode_prefix)
        finally:
            self._running = False

    async def _run(self, tasks, samples_per_task, seed, episode_prefix) -> RunResult:
        start = time.perf_counter()
        self._sampling_intervals: list[tuple[float, float]] = []
        self._tool_intervals: list[tuple[float, float]] = []
        self._generated_tokens = 0
        # A task listed twice (sampling with replacement) continues its sample numbering, so
        # episode ids stay unique within the batch.
        seen: dict[str, int] = {}
        episodes = []
        for task in tasks:
            first = seen.get(task.task_id, 0)
            seen[task.task_id] = first + samples_per_task
            episodes += [self._new_episode(task, k, episode_prefix)
                         for k in range(first, first + samples_per_task)]
        for agent_index, spec in enumerate(self.topology.agents):
            for episode in episodes:
                if episode.live:
                    self._guard(episode, self._start_agent, episode, spec)
            for turn in range(spec.max_turns):
                active = [e for e in episodes if e.live and e.agent_active]
                await asyncio.gather(*(self._check_before_turn(e, spec, turn) for e in active))
                active = [e for e in active if e.live]
                if not active:
                    break
                call_seed = _call_seed(seed, agent_index, turn)
                generations = await self._generate(spec, active, call_seed)
                share = (self._sampling_intervals[-1][1] - self._sampling_intervals[-1][0]) / len(active)
                await asyncio.gather(*(
                    self._finish_turn(e, spec, turn, g, share, call_seed)
                    for e, g in zip(active, generations)))
        for episode in episodes:
            self._finalize(episode)
        return RunResult([e.result for e in episodes], self._timings(time.perf_counter() - start))

    # -- episode lifecycle -------------------------------------------------------------------
    def _new_episode(self, task: Any, sample_index: int, prefix: str) -> _Episode:
        episode_id = f"{prefix}{task.task_id}#{sample_index}"
        result = EpisodeResult(episode_id=episode_id, task_id=task.task_id,
                               sample_index=sample_index, workspace_dir="")
        episode = _Episode(result=result, task=task, workspace=None, started=time.perf_counter())
        if any(spec.uses_python for spec in self.topology.agents):
            def create():
                episode.workspace = self.make_workspace(episode_id, task)
                result.workspace_dir = str(_workspace_dir(episode.workspace))
                episode.files = tuple(list_files(result.workspace_dir))
            self._guard(episode, create)
        return episode

    def _guard(self, episode: _Episode, fn: Callable, *args) -> None:
        """Runs a synchronous step of one episode; an exception fails that episode only."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - any episode-level error is recorded, not raised
            self._fail(episode, err)

    def _fail(self, episode: _Episode, err: BaseException) -> None:
        if isinstance(err, EpisodeFailure):
            reason = str(err)
        else:
            reason = f"{type(err).__name__}: {err}"
        episode.result.status = "failed"
        episode.result.failure_reason = reason
        episode.agent_active = False

    def _start_agent(self, episode: _Episode, spec: AgentSpec) -> None:
        messages = [{"role": "system", "content": spec.instructions}]
        for user, reply in spec.examples:  # worked turns, as if answered before
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": self._context(episode, spec)})
        episode.prompt_ids, _ = self.chat.first_prompt(messages)
        episode.messages = messages
        episode.starts_in_reasoning = self.chat.opens_reasoning(messages)
        episode.agent_active = True

    async def _check_before_turn(self, episode: _Episode, spec: AgentSpec, turn: int) -> None:
        """Fails the episode (never raises) if it ran out of time or its prompt is too long."""
        try:
            await self._check_time_left(episode, spec, turn)
            self._check_prompt_length(episode, spec, turn)
        except Exception as err:  # noqa: BLE001 - one episode's failure must not stop the batch
            self._fail(episode, err)

    async def _check_time_left(self, episode: _Episode, spec: AgentSpec, turn: int) -> None:
        if self.episode_timeout_s is None:
            return

        async def overdue():
            elapsed = time.perf_counter() - episode.started
            return elapsed if elapsed > self.episode_timeout_s else None

        elapsed = await self._decide(episode.result.episode_id, f"{spec.name}/{turn}/overdue", overdue)
        if elapsed is not None:
            raise EpisodeFailure(f"episode timed out after {elapsed:.1f}s (episode_timeout_s="
                                 f"{self.episode_timeout_s}) before {spec.name} turn {turn}")

    def _check_prompt_length(self, episode: _Episode, spec: AgentSpec, turn: int) -> None:
        limit = self.max_prompt_tokens
        if limit and len(episode.prompt_ids) > limit:
            raise EpisodeFailure(f"{spec.name} turn {turn}: prompt of {len(episode.prompt_ids)} "
                                 f"tokens exceeds the limit of {limit} (topology.max_prompt_tokens="
                                 f"{self.topology.max_prompt_tokens}, policy's largest prompt: "
                                 f"{getattr(self.policy, 'max_prompt_tokens', None)})")

    def _context(self, episode: _Episode, spec: AgentSpec) -> str:
        """The user message of an agent's first turn: the task, upstream work, workspace files."""
        parts = [episode.task.prompt.strip()]
        upstream = []
        for done in episode.history:
            text = "" if spec.upstream_text == "none" else done.text
            if spec.upstream_text == "no_think":
                text = strip_think(text)
            block = []
            if text.strip():
                block.append(text.strip())
            if spec.upstream_tool_outputs and done.tool is not None:
                block.append("[Execution result]\n" + execution_message(
                    done.tool, self.topology.max_tool_output_chars))
            if block:
                turns = done.agent.max_turns
                title = done.agent.role + (f", turn {done.turn + 1}" if turns > 1 else "")
                upstream.append(f"## {title}\n" + "\n\n".join(block))
        if upstream:
            parts.append("# Work of the agents before you\n\n" + "\n\n".join(upstream))
        if spec.uses_python and episode.workspace is not None:
            files = episode.files
            parts.append("Files in the working directory: " + (", ".join(files) if files else "none"))
        return "\n\n".join(parts)

    def _reasoning_gated(self, episode: _Episode) -> bool:
        """Whether this episode's turn is read as a reasoning model's (see the module doc)."""
        return episode.starts_in_reasoning or self.chat.reasoning_tokens

    def _stop_strings(self, spec: AgentSpec, episode: _Episode) -> tuple:
        if not self._reasoning_gated(episode):
            return spec.stop_strings
        return tuple(OutsideReasoning(p, starts_inside=episode.starts_in_reasoning)
                     for p in spec.stop_strings)

    async def _generate(self, spec: AgentSpec, episodes: list[_Episode], seed: int) -> list[Generation]:
        """One generate call per distinct stop set (a single one unless prompts of the same turn
        differ in whether they open reasoning), generations in the order of `episodes`."""
        t0 = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        for index, episode in enumerate(episodes):
            groups.setdefault(self._stop_strings(spec, episode), []).append(index)
        generations: list[Generation | None] = [None] * len(episodes)
        for stops, members in groups.items():
            prompts = [episodes[i].prompt_ids for i in members]
            out = await self.policy.generate(spec.policy, prompts, spec.max_new_tokens, stops,
                                             spec.temperature, seed)
            if len(out) != len(prompts):
                raise RuntimeError(f"policy {spec.policy!r} returned {len(out)} generations "
                                   f"for {len(prompts)} prompts")
            for i, gen in zip(members, out):
                generations[i] = gen
        self._sampling_intervals.append((t0, time.perf_counter()))
        self._generated_tokens += sum(len(g.token_ids) for g in generations)
        return generations

    async def _finish_turn(self, episode: _Episode, spec: AgentSpec, turn: int, gen: Generation,
                           sampling_share: float, seed: int) -> None:
        try:
            tool = None
            # The turn as the template framed it: the <think> the prompt opened, then the reply.
            text = REASONING_OPEN + gen.text if episode.starts_in_reasoning else gen.text
            # Reasoning that never closed within the budget leaves no answer: a truncated action.
            truncated = gen.truncated or (self._reasoning_gated(episode) and ends_inside_reasoning(text))
            cells = self.extract_cells(text) if spec.uses_python else []
            if cells:
                tool = await self._decide(episode.result.episode_id, f"{spec.name}/{turn}/code",
                                          lambda: self._run_code(episode, spec, turn, cells))
                episode.files = tool.files_present
            # Another turn only when code ran, the turn ended properly and turns remain.
            last_turn = tool is None or truncated or turn + 1 >= spec.max_turns
            files_after = episode.files if episode.workspace is not None else ()
            action = Action(
                episode_id=episode.result.episode_id, task_id=episode.result.task_id,
                agent=spec.name, policy=spec.policy, turn=turn,
                prompt_ids=tuple(episode.prompt_ids), generated_ids=gen.token_ids,
                logprobs=gen.logprobs, truncated=truncated, text=text,
                messages=tuple(dict(m) for m in episode.messages), tool=tool,
                sampling_wall_s=sampling_share, tool_wall_s=tool.wall_s if tool else 0.0,
                seed=seed, last_turn=last_turn, files_after=files_after,
                workspace_dir=episode.result.workspace_dir, temperature=spec.temperature)
            episode.result.actions.append(action)
            episode.history.append(_Turn(spec, turn, text, tool))
            if self.on_action is not None:
                self.on_action(action)
            if last_turn:
                episode.agent_active = False
                return
            content = execution_message(tool, self.topology.max_tool_output_chars)
            role = self.topology.tool_output_role
            episode.prompt_ids = (list(episode.prompt_ids) + list(gen.token_ids)
                                  + self.chat.continuation_ids(role, content, gen.token_ids))
            episode.messages = episode.messages + [{"role": "assistant", "content": text},
                                                   {"role": role, "content": content}]
            episode.starts_in_reasoning = self.chat.opens_reasoning(episode.messages)
        except Exception as err:  # noqa: BLE001 - one episode's failure must not stop the batch
            self._fail(episode, err)

    async def _run_code(self, episode: _Episode, spec: AgentSpec, turn: int,
                        cells: list[str]) -> ToolRecord:
        timeout = self.tool_timeout_s
        if self.episode_timeout_s is not None:
            left = self.episode_timeout_s - (time.perf_counter() - episode.started)
            timeout = left if timeout is None else min(timeout, left)
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.sandbox.run_cells(cells, episode.workspace),
                                            timeout=max(timeout, 0.0) if timeout is not None else None)
        except asyncio.TimeoutError:
            raise EpisodeFailure(f"{spec.name} turn {turn}: code run still going after {timeout:.1f}s "
                                 f"(tool_timeout_s={self.tool_timeout_s}, episode_timeout_s="
                                 f"{self.episode_timeout_s})") from None
        except Exception as err:
            raise EpisodeFailure(f"{spec.name} turn {turn}: sandbox raised "
                                 f"{type(err).__name__}: {err}") from err
        finally:
            self._tool_intervals.append((t0, time.perf_counter()))
        return ToolRecord.from_exec(cells, result)

    def _finalize(self, episode: _Episode) -> None:
        result = episode.result
        result.wall_s = time.perf_counter() - episode.started
        answer_agent = self.topology.answer_agent
        if answer_agent:
            outputs = [a.text for a in result.actions if a.agent == answer_agent]
            if outputs:
                result.final_answer = strip_think(outputs[-1])
                result.boxed_answer = last_boxed(result.final_answer)
        if self.topology.submission_file and result.workspace_dir:
            path = os.path.join(result.workspace_dir, self.topology.submission_file)
            if os.path.isfile(path):
                result.submission_path = path

    def _timings(self, total: float) -> RunTimings:
        sampling = interval_union(self._sampling_intervals)
        tools = interval_union(self._tool_intervals)
        sampling_s = sum(e - s for s, e in sampling)
        tool_s = sum(e - s for s, e in tools)
        overlap = intersection_length(sampling, tools)
        return RunTimings(
            total_s=total, sampling_s=sampling_s, tool_s=tool_s,
            tool_busy_s=sum(e - s for s, e in self._tool_intervals), overlap_s=overlap,
            other_s=max(0.0, total - (sampling_s + tool_s - overlap)),
            policy_calls=len(self._sampling_intervals), tool_runs=len(self._tool_intervals),
            generated_tokens=self._generated_tokens)


def _workspace_dir(workspace: Any) -> str:
    for attr in ("path", "root", "dir"):
        value = getattr(workspace, attr, None)
        if value is not None:
            return str(value)
    if isinstance(workspace, (str, os.PathLike)):
        return str(workspace)
    raise TypeError(f"workspace {workspace!r} has no path/root/dir attribute")


def _call_seed(seed: int, agent_index: int, turn: int) -> int:
    """A distinct seed per generate call of a run, reproducible from the run seed."""
    return (seed * 1_000_003 + agent_index * 1_009 + turn) % (2**31 - 1)
