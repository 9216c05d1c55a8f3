"""Topology config: shipped topologies validate and round-trip; bad config names the bad key."""
import pytest

from mappa_jax.workflows.specs import (TopologyConfigError, topology_from_config,
                                       topology_to_config)
from mappa_jax.workflows.topologies import data_science_config, get_topology_config, mathchat_config


def test_mathchat_shape():
    topo = topology_from_config(mathchat_config())
    assert [a.name for a in topo.agents] == ["problem_solver", "code_executor", "verifier"]
    assert [a.max_turns for a in topo.agents] == [1, 2, 1]
    assert [a.tools for a in topo.agents] == ["none", "python", "none"]
    assert topo.answer_agent == "verifier" and topo.pipeline == "mathchat"
    assert "\\boxed{" in topo.agent("verifier").instructions


def test_data_science_shape():
    topo = topology_from_config(data_science_config())
    assert [a.name for a in topo.agents] == ["data_engineer", "modeler", "analyst"]
    assert all(a.max_turns == 4 and a.tools == "python" for a in topo.agents)
    assert topo.agent("data_engineer").expected_files == ("X_train.csv", "y_train.csv", "X_test.csv")
    assert topo.submission_file == "submission.csv" and topo.pipeline == "datascience"


@pytest.mark.parametrize("name", ["mathchat", "data_science"])
def test_round_trip(name):
    topo = topology_from_config(get_topology_config(name))
    assert topology_from_config(topology_to_config(topo)) == topo


def test_overrides_apply_and_shared_policy():
    cfg = mathchat_config()
    cfg.agents.verifier.temperature = 0.6
    cfg.agents.verifier.policy = "problem_solver"  # two agents on one set of weights
    topo = topology_from_config(cfg)
    assert topo.agent("verifier").temperature == 0.6
    assert topo.policies == ("problem_solver", "code_executor")


def _error(cfg) -> str:
    with pytest.raises(TopologyConfigError) as info:
        topology_from_config(cfg)
    return str(info.value)


def test_unknown_agent_key_is_named_with_suggestion():
    cfg = mathchat_config()
    cfg.agents.code_executor.max_turn = 3
    msg = _error(cfg)
    assert "topology.agents.code_executor" in msg and "'max_turn'" in msg
    assert "did you mean 'max_turns'" in msg


def test_unknown_topology_key_is_named():
    cfg = mathchat_config()
    cfg.answer_agnet = "verifier"
    assert "'answer_agnet'" in _error(cfg) and "answer_agent" in _error(cfg)


@pytest.mark.parametrize("path,value,expected", [
    ("agents.code_executor.tools", "bash", "topology.agents.code_executor.tools must be one of"),
    ("agents.verifier.max_turns", 2, "only tool-using agents"),
    ("agents.problem_solver.upstream_text", "raw", "upstream_text must be one of"),
    ("agents.modeler.max_new_tokens", 0, "topology.agents.modeler.max_new_tokens must be >= 1"),
    ("agents.analyst.temperature", -0.5, "topology.agents.analyst.temperature must be >= 0"),
    ("agents.analyst.stop_strings", "```", "topology.agents.analyst.stop_strings must be a list"),
    ("agents.modeler.policy", "  ", "topology.agents.modeler.policy must be a non-empty string"),
    ("agents.verifier.examples", "\\boxed{7}", "topology.agents.verifier.examples must be a list of (user"),
    ("agents.verifier.examples", [("What is 3 + 4?",)], "topology.agents.verifier.examples[0] must be a (user"),
    ("agents.verifier.examples", [("What is 3 + 4?", " ")], "examples[0] must be a (user message, assistant"),
    ("submission_file", "out/sub.csv", "submission_file must be a plain file name"),
    ("tool_output_role", "system", "tool_output_role must be 'user' or 'tool'"),
])
def test_bad_values_are_named(path, value, expected):
    uses_ds = any(name in path for name in ("modeler", "analyst", "submission"))
    cfg = (data_science_config() if uses_ds else mathchat_config()).to_dict()
    node = cfg
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    assert expected in _error(cfg)


def test_wrong_type_is_named():
    cfg = mathchat_config().to_dict()
    cfg["agents"]["code_executor"]["max_turns"] = "2"
    assert "topology.agents.code_executor.max_turns must be int" in _error(cfg)
    cfg = mathchat_config().to_dict()
    cfg["agents"]["code_executor"]["upstream_tool_outputs"] = 1
    assert "upstream_tool_outputs must be bool" in _error(cfg)


def test_order_and_agents_must_agree():
    cfg = mathchat_config().to_dict()
    cfg["order"] = ("problem_solver", "verifer")
    assert "order names 'verifer'" in _error(cfg)
    cfg = mathchat_config().to_dict()
    cfg["order"] = ("problem_solver", "verifier")
    assert "defines ['code_executor'] but topology.order does not use them" in _error(cfg)
    cfg = mathchat_config().to_dict()
    cfg["order"] = ("problem_solver", "code_executor", "verifier", "verifier")
    assert "more than once" in _error(cfg)


def test_missing_required_and_bad_answer_agent():
    cfg = mathchat_config().to_dict()
    del cfg["agents"]["verifier"]["instructions"]
    assert "topology.agents.verifier: missing required key 'instructions'" in _error(cfg)
    cfg = mathchat_config().to_dict()
    cfg["answer_agent"] = "judge"
    assert "answer_agent 'judge' is not in topology.order" in _error(cfg)
