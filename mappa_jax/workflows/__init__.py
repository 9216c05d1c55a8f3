"""Agent specs, topologies (MathChat, data-science pipeline), the async episode runner, actions.

    topology = topology_from_config(mathchat_config())          # ml-collections in, validated
    runner = EpisodeRunner(topology, policy, ChatFormat(tokenizer), sandbox=Sandbox(),
                           workspace_root=root, on_action=CoachHandoff(coach, topology, tasks))
    result = await runner.run(tasks, samples_per_task=2, seed=step)
    result.actions          # exact prompt ids, generated ids, sampler logprobs, tool results
    result.timings.summary()
"""
from mappa_jax.workflows.chat import ChatFormat, strip_think
from mappa_jax.workflows.coaching import CoachHandoff, to_coach_request
from mappa_jax.workflows.policy import Generation, Policy, PolicyCall, ScriptedPolicy
from mappa_jax.workflows.records import (Action, EpisodeResult, RunResult, RunTimings, ToolRecord,
                                         episode_record)
from mappa_jax.workflows.runner import EpisodeRunner
from mappa_jax.workflows.sampler_policy import PolicyRouter, PolicyWeights, SamplerPolicy
from mappa_jax.workflows.specs import (AgentSpec, Topology, TopologyConfigError, agent_config,
                                       topology_from_config, topology_to_config)
from mappa_jax.workflows.topologies import (data_science_config, get_topology_config,
                                            mathchat_config)
from mappa_jax.workflows.workspaces import workspace_factory

__all__ = [
    "Action", "AgentSpec", "ChatFormat", "CoachHandoff", "EpisodeResult", "EpisodeRunner",
    "Generation", "Policy", "PolicyCall", "PolicyRouter", "PolicyWeights", "RunResult",
    "RunTimings", "SamplerPolicy", "ScriptedPolicy", "ToolRecord", "Topology",
    "TopologyConfigError", "agent_config", "data_science_config", "episode_record", "get_topology_config",
    "mathchat_config", "strip_think", "to_coach_request", "topology_from_config",
    "topology_to_config", "workspace_factory",
]
