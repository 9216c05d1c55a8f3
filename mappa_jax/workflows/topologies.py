"""The two shipped topologies as ml-collections config: MathChat and the data-science pipeline.

Each `*_config()` returns a plain ConfigDict (override any field, then `topology_from_config`).
Instructions are the agents' system messages; the runner adds the task and upstream work as the
user message and renders both through the tokenizer's chat template.
"""
from __future__ import annotations

import ml_collections

from mappa_jax.workflows.specs import agent_config

# Generation of a code turn stops once a Python block closes, so the code runs before the model
# invents its output: "```python", then the next "```" (not the opener's own backticks). For
# reasoning models the runner counts it only outside <think> ... </think> (see workflows/runner.py).
END_OF_CODE_BLOCK = ("```python", "```")

_MATH_TEAM = ("You are one of three agents who solve a competition math problem together: a Problem "
              "Solver drafts a solution, a Code Executor checks it with Python, and a Verifier "
              "states the final answer.")

PROBLEM_SOLVER = _MATH_TEAM + """
You are the Problem Solver. Work the problem out step by step, justify each step, and finish with \
your answer written as \\boxed{answer}."""

CODE_EXECUTOR = _MATH_TEAM + """
You are the Code Executor. Check the Problem Solver's work by computing the answer with Python. \
Write one program in a ```python fenced block that prints what it computes; it is run in a \
fresh Python process as soon as the block closes and you are shown its output. Then you get one \
more turn: fix the code if it failed, or state the computed answer as \\boxed{answer}."""

VERIFIER = _MATH_TEAM + """
You are the Verifier. Compare the Problem Solver's reasoning with the Code Executor's results, \
settle any disagreement by checking the problem statement again, and end your reply with the one \
final answer written as \\boxed{answer}."""

_DS_TEAM = ("You are one of three agents who solve a tabular machine-learning task together in a "
            "shared working directory: a Data Engineer prepares the data, a Modeler trains a model, "
            "and an Analyst writes the predictions. You act by writing Python in ```python fenced "
            "blocks; each block is run in a fresh Python process in the working directory as soon "
            "as it closes and you see its output, for up to four blocks. Variables do not carry "
            "over from one block to the next; files do. pandas, numpy and scikit-learn are installed; "
            "there is no internet. Files are how you hand work to the next agent.")

DATA_ENGINEER = _DS_TEAM + """
You are the Data Engineer. Explore train.csv and test.csv, clean them and turn them into numeric \
features with the same columns for both. Save X_train.csv (features of the training rows), \
y_train.csv (their target) and X_test.csv (features of the test rows, in the original order) in \
the working directory. Say briefly what you did when the files are saved."""

MODELER = _DS_TEAM + """
You are the Modeler. Load X_train.csv and y_train.csv, train a model suited to the task and \
estimate its quality on held-out training rows. Save the fitted model to model.pkl (pickle or \
joblib) and report the validation score."""

ANALYST = _DS_TEAM + """
You are the Analyst. Load model.pkl and X_test.csv, predict the target for every test row, and \
write submission.csv with the id column and the target column named as in the task, one row per \
test row in the original order. Report how many rows you wrote."""


def mathchat_config() -> ml_collections.ConfigDict:
    """MathChat: Problem Solver (1 turn) -> Code Executor (up to 2, Python) -> Verifier (1)."""
    return ml_collections.ConfigDict({
        "name": "mathchat",
        "pipeline": "mathchat",
        "order": ("problem_solver", "code_executor", "verifier"),
        "answer_agent": "verifier",
        "submission_file": "",
        "tool_output_role": "user",
        "max_tool_output_chars": 2000,
        "max_prompt_tokens": 0,
        "agents": {
            "problem_solver": agent_config(
                role="Problem Solver", instructions=PROBLEM_SOLVER, policy="problem_solver",
                max_turns=1, tools="none", max_new_tokens=1024),
            "code_executor": agent_config(
                role="Code Executor", instructions=CODE_EXECUTOR, policy="code_executor",
                max_turns=2, tools="python", max_new_tokens=1024,
                stop_strings=(END_OF_CODE_BLOCK,)),
            "verifier": agent_config(
                role="Verifier", instructions=VERIFIER, policy="verifier",
                max_turns=1, tools="none", max_new_tokens=1024),
        },
    })


def data_science_config() -> ml_collections.ConfigDict:
    """Data Engineer -> Modeler -> Analyst, up to 4 code turns each, sharing one workspace."""
    def code_agent(role: str, instructions: str, policy: str, files: tuple[str, ...]):
        return agent_config(role=role, instructions=instructions, policy=policy, max_turns=4,
                            tools="python", max_new_tokens=1024,
                            stop_strings=(END_OF_CODE_BLOCK,), expected_files=files)

    return ml_collections.ConfigDict({
        "name": "data_science",
        "pipeline": "datascience",
        "order": ("data_engineer", "modeler", "analyst"),
        "answer_agent": "",
        "submission_file": "submission.csv",
        "tool_output_role": "user",
        "max_tool_output_chars": 3000,
        "max_prompt_tokens": 0,
        "agents": {
            "data_engineer": code_agent("Data Engineer", DATA_ENGINEER, "data_engineer",
                                        ("X_train.csv", "y_train.csv", "X_test.csv")),
            "modeler": code_agent("Modeler", MODELER, "modeler", ("model.pkl",)),
            "analyst": code_agent("Analyst", ANALYST, "analyst", ("submission.csv",)),
        },
    })


TOPOLOGIES = {"mathchat": mathchat_config, "data_science": data_science_config}


def get_topology_config(name: str) -> ml_collections.ConfigDict:
    if name not in TOPOLOGIES:
        raise KeyError(f"unknown topology {name!r}; shipped: {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[name]()
