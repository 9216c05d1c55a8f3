"""Agent specs and topologies: ml-collections config in, validated frozen dataclasses out.

A topology is data, not a class per pipeline. In config it is a ConfigDict with an `order` tuple of
agent names and an `agents` ConfigDict keyed by those names (ml-collections cannot freeze or
override lists of dicts, while `--config.topology.agents.verifier.temperature=0.6` just works).
`topology_from_config` checks every key and value and names the offending one.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections

TOOLS = ("none", "python")
UPSTREAM_TEXT = ("full", "no_think", "none")


class TopologyConfigError(ValueError):
    """A topology or agent config is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """One agent of a topology.

    name: key in the topology (also the Action.agent label). role: the human-readable role title
    the coach sees. instructions: the system message. policy: which policy's weights generate for
    this agent (several agents may share one). tools: "python" executes fenced code cells of each
    turn in the episode workspace; "none" takes exactly one turn. upstream_text: how this agent sees
    upstream agents' outputs ("full", "no_think" = with <think>...</think> removed, "none").
    upstream_tool_outputs: whether it also sees their execution outputs. expected_files: files the
    role must leave in the workspace (shown to the coach, checked by the harness). stop_strings:
    each a string, or a tuple of strings that must appear in that order (("```python", "```")
    stops where a Python block closes, not at its opening backticks), as mappa_jax.sampling takes;
    for reasoning models the runner counts them only outside <think> ... </think>. examples:
    worked turns, each a (user message, assistant reply) pair, rendered as earlier chat turns
    between the system message and the task (a small model copies a format it has seen answered
    far more reliably than one it is told about).
    """
    name: str
    role: str
    instructions: str
    policy: str
    max_turns: int = 1
    tools: str = "none"
    upstream_text: str = "no_think"
    upstream_tool_outputs: bool = True
    max_new_tokens: int = 512
    stop_strings: tuple[str | tuple[str, ...], ...] = ()
    temperature: float = 1.0
    expected_files: tuple[str, ...] = ()
    examples: tuple[tuple[str, str], ...] = ()

    @property
    def uses_python(self) -> bool:
        return self.tools == "python"


@dataclasses.dataclass(frozen=True)
class Topology:
    """An ordered list of agents plus how their episode's text and files are framed.

    pipeline: the coach's pipeline label ("mathchat" | "datascience"). answer_agent: the agent whose
    last output is the episode's answer ("" for none). submission_file: the workspace file that is
    the episode's deliverable ("" for none). tool_output_role: the chat role of execution-output
    messages. max_tool_output_chars: execution output shown to agents is cut to this length (head
    and tail kept). max_prompt_tokens: a prompt longer than this fails its episode (0 = no limit).
    """
    name: str
    pipeline: str
    agents: tuple[AgentSpec, ...]
    answer_agent: str = ""
    submission_file: str = ""
    tool_output_role: str = "user"
    max_tool_output_chars: int = 2000
    max_prompt_tokens: int = 0

    def agent(self, name: str) -> AgentSpec:
        for spec in self.agents:
            if spec.name == name:
                return spec
        raise KeyError(f"topology {self.name!r} has no agent {name!r}")

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.policy for spec in self.agents))


_AGENT_FIELDS = {f.name: f for f in dataclasses.fields(AgentSpec)}
_TOPOLOGY_FIELDS = {f.name: f for f in dataclasses.fields(Topology)}
# Keys of the config form of a topology: `agents` is a ConfigDict by name, `order` fixes sequence.
_TOPOLOGY_KEYS = (set(_TOPOLOGY_FIELDS) - {"agents"}) | {"agents", "order"}
_AGENT_REQUIRED = ("role", "instructions", "policy")


def _unknown_key_error(where: str, key: str, known) -> TopologyConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TopologyConfigError(f"{where}: unknown key {key!r}{hint} (known: {', '.join(sorted(known))})")


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise TopologyConfigError(f"{where} must be a ConfigDict or mapping, got {type(value).__name__}")


def _check_type(where: str, value: Any, kind: type | tuple) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TopologyConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")


def _str_tuple(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TopologyConfigError(f"{where} must be a list of strings, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise TopologyConfigError(f"{where}[{i}] must be a non-empty string, got {item!r}")
    return tuple(value)


def _stop_patterns(where: str, value: Any) -> tuple[str | tuple[str, ...], ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TopologyConfigError(f"{where} must be a list of strings or string tuples, got {value!r}")
    patterns = []
    for i, item in enumerate(value):
        if isinstance(item, (list, tuple)) and item:
            patterns.append(_str_tuple(f"{where}[{i}]", item))
        elif isinstance(item, str) and item:
            patterns.append(item)
        else:
            raise TopologyConfigError(f"{where}[{i}] must be a non-empty string or tuple of "
                                      f"strings, got {item!r}")
    return tuple(patterns)


def _worked_turns(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TopologyConfigError(f"{where} must be a list of (user message, assistant reply) pairs, got {value!r}")
    for i, pair in enumerate(value):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(text, str) and text.strip() for text in pair)):
            raise TopologyConfigError(f"{where}[{i}] must be a (user message, assistant reply) pair of "
                                      f"non-empty strings, got {pair!r}")
    return tuple((user, reply) for user, reply in value)


def agent_from_config(name: str, cfg: Any, where: str = "agents") -> AgentSpec:
    """Validates one agent's config (keys, types, ranges) and builds its AgentSpec."""
    where = f"{where}.{name}"
    values = _as_dict(cfg, where)
    for key in values:
        if key not in _AGENT_FIELDS or key == "name":
            raise _unknown_key_error(where, key, set(_AGENT_FIELDS) - {"name"})
    for key in _AGENT_REQUIRED:
        if key not in values:
            raise TopologyConfigError(f"{where}: missing required key {key!r}")
    for key in ("role", "instructions", "policy", "tools", "upstream_text"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], str)
    for key in ("role", "policy"):
        if not values[key].strip():
            raise TopologyConfigError(f"{where}.{key} must be a non-empty string")
    for key in ("max_turns", "max_new_tokens"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], int)
            if values[key] < 1:
                raise TopologyConfigError(f"{where}.{key} must be >= 1, got {values[key]}")
    if "temperature" in values:
        _check_type(f"{where}.temperature", values["temperature"], (int, float))
        if values["temperature"] < 0:
            raise TopologyConfigError(f"{where}.temperature must be >= 0, got {values['temperature']}")
        values["temperature"] = float(values["temperature"])
    if "upstream_tool_outputs" in values:
        _check_type(f"{where}.upstream_tool_outputs", values["upstream_tool_outputs"], bool)
    if "stop_strings" in values:
        values["stop_strings"] = _stop_patterns(f"{where}.stop_strings", values["stop_strings"])
    if "expected_files" in values:
        values["expected_files"] = _str_tuple(f"{where}.expected_files", values["expected_files"])
    if "examples" in values:
        values["examples"] = _worked_turns(f"{where}.examples", values["examples"])
    tools = values.get("tools", "none")
    if tools not in TOOLS:
        raise TopologyConfigError(f"{where}.tools must be one of {TOOLS}, got {tools!r}")
    if values.get("upstream_text", "no_think") not in UPSTREAM_TEXT:
        raise TopologyConfigError(
            f"{where}.upstream_text must be one of {UPSTREAM_TEXT}, got {values['upstream_text']!r}")
    if tools == "none" and values.get("max_turns", 1) != 1:
        # Without a tool nothing new arrives between turns, so a second turn has no new input.
        raise TopologyConfigError(
            f"{where}.max_turns is {values['max_turns']} but tools is 'none': only tool-using "
            f"agents take more than one turn")
    return AgentSpec(name=name, **values)


def topology_from_config(cfg: Any) -> Topology:
    """Validates a topology config (see module doc) and builds the Topology."""
    where = "topology"
    values = _as_dict(cfg, where)
    for key in values:
        if key not in _TOPOLOGY_KEYS:
            raise _unknown_key_error(where, key, _TOPOLOGY_KEYS)
    for key in ("name", "pipeline", "agents", "order"):
        if key not in values:
            raise TopologyConfigError(f"{where}: missing required key {key!r}")
    order = _str_tuple(f"{where}.order", values.pop("order"))
    if not order:
        raise TopologyConfigError(f"{where}.order must name at least one agent")
    duplicates = sorted({n for n in order if order.count(n) > 1})
    if duplicates:
        raise TopologyConfigError(f"{where}.order names agents more than once: {duplicates}")
    agent_cfgs = _as_dict(values.pop("agents"), f"{where}.agents")
    for name in order:
        if name not in agent_cfgs:
            raise TopologyConfigError(
                f"{where}.order names {name!r} but {where}.agents has no such agent "
                f"(defined: {sorted(agent_cfgs)})")
    unused = sorted(set(agent_cfgs) - set(order))
    if unused:
        raise TopologyConfigError(f"{where}.agents defines {unused} but {where}.order does not use them")
    agents = tuple(agent_from_config(name, agent_cfgs[name], f"{where}.agents") for name in order)

    for key in ("name", "pipeline", "answer_agent", "submission_file", "tool_output_role"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], str)
    for key in ("max_tool_output_chars", "max_prompt_tokens"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], int)
            if values[key] < 0:
                raise TopologyConfigError(f"{where}.{key} must be >= 0, got {values[key]}")
    if values.get("answer_agent") and values["answer_agent"] not in order:
        raise TopologyConfigError(
            f"{where}.answer_agent {values['answer_agent']!r} is not in {where}.order {list(order)}")
    if values.get("submission_file") and "/" in values["submission_file"]:
        raise TopologyConfigError(f"{where}.submission_file must be a plain file name, "
                                  f"got {values['submission_file']!r}")
    if values.get("tool_output_role", "user") not in ("user", "tool"):
        raise TopologyConfigError(
            f"{where}.tool_output_role must be 'user' or 'tool', got {values['tool_output_role']!r}")
    return Topology(agents=agents, **values)


def agent_config(**fields: Any) -> ml_collections.ConfigDict:
    """An agent's config with every field present (defaults filled), so overrides type-check."""
    defaults = {f.name: f.default for f in dataclasses.fields(AgentSpec)
                if f.default is not dataclasses.MISSING}
    for key in fields:
        if key not in _AGENT_FIELDS or key == "name":
            raise _unknown_key_error("agent_config", key, set(_AGENT_FIELDS) - {"name"})
    return ml_collections.ConfigDict({**defaults, **fields})


def topology_to_config(topology: Topology) -> ml_collections.ConfigDict:
    """The inverse of topology_from_config (round-trips exactly)."""
    values = {f.name: getattr(topology, f.name) for f in dataclasses.fields(Topology)}
    values.pop("agents")
    agents = {}
    for spec in topology.agents:
        fields = dataclasses.asdict(spec)
        fields.pop("name")
        agents[spec.name] = fields
    return ml_collections.ConfigDict({**values, "order": tuple(agents), "agents": agents})
