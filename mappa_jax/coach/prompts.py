"""Coach prompts: one rubric per (pipeline, role), rendered into a chat Prompt.

The coach judges ONE action of ONE agent. Every rubric tells it to blame the agent actually at fault:
an agent is scored on what it controlled given what it received, not on upstream mistakes it could
not fix (but it is rewarded for noticing and reporting them).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from mappa_jax.coach.types import CoachRequest

# JSON schema of a structured verdict. `correct` is null unless ground truth was given.
SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "description": "Short analysis of this action."},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "correct": {"type": ["boolean", "null"],
                    "description": "Whether the final answer matches the ground truth; null if none."},
    },
    "required": ["reasoning", "score", "correct"],
    "additionalProperties": False,
}

OUTPUT_FORMATS = ("json", "text")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A chat prompt: a system message and alternating user/assistant turns.

    `request` travels along for backends that judge from facts (rule-based); it is not prompt text and
    is excluded from `cache_text()`, so the ids inside it never reach the cache key.
    """
    system: str
    turns: tuple[tuple[str, str], ...]  # (role in {"user", "assistant"}, text)
    output_format: str = "json"
    request: CoachRequest | None = dataclasses.field(default=None, compare=False)

    def cache_text(self) -> str:
        return json.dumps({"system": self.system, "turns": self.turns, "format": self.output_format},
                          sort_keys=True, ensure_ascii=False)

    def flat_text(self) -> str:
        """One string for plain text-completion generators (local judge)."""
        parts = [f"[system]\n{self.system}"]
        parts += [f"[{role}]\n{text}" for role, text in self.turns]
        parts.append("[assistant]\n")
        return "\n\n".join(parts)

    def with_repair(self, bad_answer: str, problem: str) -> "Prompt":
        """The same conversation plus the bad answer and a correction request (format-repair retry)."""
        fix = (f"Your previous answer could not be used: {problem}. Judge the same action again and "
               f"answer ONLY in the required format. {_format_instructions(self.output_format)}")
        return dataclasses.replace(self, turns=self.turns + (("assistant", bad_answer), ("user", fix)))


_COMMON_SYSTEM = """\
You are a strict, fair coach for a team of AI agents that work one after another on a task.
You judge ONE action of ONE agent and give it a process score from 0 to 10:
  0-2  harmful or useless: wrong, broken, ignored its instructions, or made things worse;
  3-4  serious mistakes that the rest of the team must repair;
  5-6  partly useful: right direction with real errors or gaps;
  7-8  good: correct and useful with minor issues;
  9-10 excellent: correct, complete, efficient, exactly what its role asks for.
Blame the agent actually at fault. Judge this agent only on what it controlled given what it
received. Do not punish it for an upstream agent's mistake; do reward it for noticing, reporting or
fixing such a mistake. Do not reward an agent for a good final result that an upstream agent produced.
Evidence beats claims: trust tool output, files and metrics over what the agent says it did."""

# Role rubrics, in our own words. Keys: (pipeline, role).
_ROLE_RUBRICS: dict[tuple[str, str], str] = {
    ("mathchat", "problem_solver"): """\
The Problem Solver drafts a full solution without tools. Score the mathematics: a sound plan, valid
steps, correct algebra and arithmetic, cases not missed, a clearly stated candidate answer. A
confident wrong answer scores lower than an honest partial solution that flags its uncertainty.""",
    ("mathchat", "code_executor"): """\
The Code Executor checks or computes the answer with Python in fenced code blocks that are run.
Score whether the code tests the right thing (not a restatement of the draft), runs without errors,
and whether the agent reads the real execution output correctly. It should correct the draft when
the output disagrees with it. Code that crashes, or claims about output that the tool output does not
show, score low. If the draft was wrong and the agent caught it, score high.""",
    ("mathchat", "verifier"): """\
The Verifier reviews the team's work and states the final answer in \\boxed{}. Score whether it
checked the reasoning and the execution output instead of copying, resolved disagreements between
the draft and the code correctly, and boxed exactly one final answer in the asked form. A missing or
multiple \\boxed{} answer is a serious error.""",
    ("datascience", "data_engineer"): """\
The Data Engineer explores the data and prepares it. It must save X_train, y_train and X_test to the
workspace for the Modeler. Score correct loading, sensible handling of missing values, types and
categorical columns, no leakage of the target into the features, the same preprocessing applied to
train and test, and that the required files really exist in the workspace afterwards (see the file
lists and tool output). Not saving a required file is a serious error of THIS agent.""",
    ("datascience", "modeler"): """\
The Modeler loads the prepared data, trains and tunes a model suited to the task type
(classification or regression) and saves the model file. Score a sensible model choice, honest
validation (held-out data or cross-validation, no fitting on test data), code that runs, and a model
file that exists afterwards. If the upstream files are missing or broken, reward clear diagnosis and
a reasonable recovery; do not blame the Modeler for the upstream failure itself.""",
    ("datascience", "analyst"): """\
The Analyst predicts on X_test with the trained model and writes submission.csv in the required
format. Score a submission file that exists, has the right rows and columns, and predictions of the
right kind; use the harness metrics when present. If an upstream agent left a required file missing,
an Analyst that correctly reports it and does what is possible is NOT at fault.""",
}

_GENERIC_RUBRIC = """\
Score how well this action fulfils the agent's instructions below, using the evidence shown."""


def known_roles(pipeline: str) -> list[str]:
    return [role for (p, role) in _ROLE_RUBRICS if p == pipeline]


def role_rubric(pipeline: str, role: str) -> str:
    """The rubric for a role; roles without one (custom topologies) get a generic rubric."""
    return _ROLE_RUBRICS.get((pipeline, role), _GENERIC_RUBRIC)


def _format_instructions(output_format: str) -> str:
    if output_format == "json":
        return ('Reply with a JSON object {"reasoning": <short analysis>, "score": <integer 0-10>, '
                '"correct": <true/false if a ground truth was given, else null>} and nothing else.')
    return ("Write a short analysis, then end with a line exactly of the form `PROCESS_SCORE: <integer "
            "0-10>`. If a ground truth was given, add a line `CORRECT: yes` or `CORRECT: no`.")


def truncate_middle(text: str, limit: int) -> str:
    """Keep the head and the tail: the command echo starts the output, the error ends it."""
    if limit <= 0 or len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n...[{len(text) - limit} characters truncated]...\n{text[-tail:]}"


def build_prompt(request: CoachRequest, *, output_format: str = "json",
                 tool_output_chars: int = 4000, agent_input_chars: int = 24000) -> Prompt:
    """Render a request into the coach conversation. Pure: same request and settings, same prompt."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    r = request
    sections = [
        f"## Pipeline\n{r.pipeline}",
        f"## Task\n{r.task}",
        f"## Agent being judged\nrole: {r.role}\n\ninstructions given to the agent:\n"
        f"{r.role_instructions or '(none)'}",
        f"## Rubric for this role\n{role_rubric(r.pipeline, r.role)}",
        f"## What the agent saw (its input)\n{truncate_middle(r.agent_input, agent_input_chars)}",
        f"## What the agent produced (its output)\n{r.agent_output}",
        f"## Tool output (stdout / stderr / errors)\n"
        f"{truncate_middle(r.tool_output, tool_output_chars) if r.tool_output else '(no tool output)'}",
    ]
    if r.pipeline == "datascience" or r.files_present or r.files_created:
        sections.append("## Workspace files\npresent: " + (", ".join(r.files_present) or "(none)") +
                        "\ncreated by this action: " + (", ".join(r.files_created) or "(none)"))
    if r.harness_metrics:
        metrics = json.dumps(dict(r.harness_metrics), sort_keys=True, default=str)
        sections.append(f"## Harness metrics of the submission\n{metrics}")
    if r.ground_truth is not None:
        sections.append(f"## Ground truth (reference answer)\n{r.ground_truth}\n"
                        "Also report whether the agent's final answer matches it.")
    sections.append(f"## Your answer\n{_format_instructions(output_format)}")
    return Prompt(system=_COMMON_SYSTEM, turns=(("user", "\n\n".join(sections)),),
                  output_format=output_format, request=request)
