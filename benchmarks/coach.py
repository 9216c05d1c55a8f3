"""Coach client throughput against a local fake server with fixed latency, and coach/rollout overlap.

Part 1 (default): N requests, server latency L, concurrency C. The ideal wall time is N / C * L;
we report measured / ideal (target <= 1.25).
  python benchmarks/coach.py [--requests 1000] [--latency 0.2] [--concurrency 64] [--backend openai] [--check]
Client CPU is ~1 ms per request (mostly httpx; google-genai adds ~1.5 ms), so the ratio depends on
how busy the machine's cores are: measure on an otherwise idle machine.

Part 2 (--rollout): one MathChat rollout batch (EpisodeRunner + SamplerPolicy on a real model, real
sandbox) whose actions go to the coach as they finish (CoachHandoff), against the same rollout
(same seed, same tokens) with the actions recorded and scored only after it ends. The coach is the
OpenAI-compatible fake server in its own process with a fixed latency per call.
  python benchmarks/coach.py --rollout [--model random:llama|smollm2] [--latency 0.75] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

from mappa_jax.coach import CoachRequest, coach_config, make_coach
from mappa_jax.coach.testing import FakeCoachServerProcess

TARGET_RATIO = 1.25


def _requests(n: int) -> list[CoachRequest]:
    # Distinct tasks: every request is a cache miss and a real server round trip.
    return [CoachRequest(pipeline="mathchat", task=f"Problem {i}: compute {i} + {i}. [[score:{i % 11}]]",
                         role="verifier", role_instructions="State the final answer in \\boxed{}.",
                         agent_input=f"Problem {i}", agent_output=f"\\boxed{{{2 * i}}}", episode_id=str(i))
            for i in range(n)]


async def _run(client, requests):
    client.backend.prepare()  # SDK import / connection-pool setup is start-up cost, not throughput
    start, cpu_start = time.perf_counter(), time.process_time()
    verdicts = await client.score_all(requests)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    await client.aclose()
    return verdicts, elapsed, cpu


def throughput(n_requests: int = 1000, latency_s: float = 0.2, concurrency: int = 64,
               backend: str = "openai") -> dict:
    """Measured wall time over the ideal for `n_requests` at `concurrency` with `latency_s` per call."""
    # The server runs in its own process, as a remote coach would: its work must not share our GIL.
    with FakeCoachServerProcess(latency_s=latency_s) as server:
        config = coach_config()
        config.backend = backend
        config.concurrency = concurrency
        config.rpm = 0
        config.tpm = 0
        config.timeout_s = 30.0
        config.gemini.base_url = server.url
        config.openai.base_url = server.url + "/v1"
        config.openai.api_key_env = ""
        if backend == "gemini":
            os.environ.setdefault("GEMINI_API_KEY", "benchmark-placeholder-key")
        client = make_coach(config)
        verdicts, elapsed, cpu = asyncio.run(_run(client, _requests(n_requests)))
        stats = server.stats()
    ideal = n_requests / concurrency * latency_s
    ok = sum(v.ok for v in verdicts)
    return {"backend": backend, "requests": n_requests, "concurrency": concurrency,
            "latency_s": latency_s, "server_hits": stats["hits"],
            "server_max_in_flight": stats["max_in_flight"], "ok": ok, "elapsed_s": elapsed,
            "client_cpu_ms_per_request": 1000 * cpu / n_requests, "ideal_s": ideal,
            "ratio": elapsed / ideal if ideal else float("nan"), "metrics": client.metrics()}


def _rollout_model(source: str, layers: int, hidden: int):
    """(cfg, params, tokenizer) through the trainer's loader: "random:llama" or a real model."""
    from mappa_jax.config import base_config  # pylint: disable=import-outside-toplevel
    from mappa_jax.train import load_model  # pylint: disable=import-outside-toplevel
    model_config = base_config().model
    model_config.source = source
    model_config.random_layers = layers
    model_config.random_hidden = hidden
    return load_model(model_config, seed=0)


async def _timed_rollout(runner, tasks, samples, seed, coach, handoff=None, recorded=None):
    """Wall times of (the rollout, the rollout and every verdict). With a handoff the coach runs
    during the rollout; otherwise the recorded actions are scored after it."""
    from mappa_jax.workflows import to_coach_request  # pylint: disable=import-outside-toplevel
    coach.backend.prepare()  # connection-pool setup is start-up cost, not overlap
    start = time.perf_counter()
    result = await runner.run(tasks, samples_per_task=samples, seed=seed)
    rollout_s = time.perf_counter() - start
    if handoff is not None:
        verdicts = list((await handoff.verdicts()).values())
    else:
        by_id = {t.task_id: t for t in tasks}
        verdicts = await coach.score_all(to_coach_request(a, runner.topology, by_id[a.task_id],
                                                          ground_truth_roles=("verifier",))
                                         for a in recorded)
    total_s = time.perf_counter() - start
    await coach.aclose()
    return result, verdicts, rollout_s, total_s


def rollout_overlap(model: str = "random:llama", tasks: int = 4, samples: int = 2,
                    max_new_tokens: int = 64, latency_s: float = 0.75, concurrency: int = 4,
                    random_layers: int = 4, random_hidden: int = 256, seed: int = 0) -> dict:
    """A MathChat rollout batch with the coach overlapping generation vs. generation then coach.

    Both timed runs follow an untimed warm-up batch (compilation), use the same seed (so the same
    actions and coach requests) and each get a fresh coach client (no cache hits between them).
    """
    import tempfile  # pylint: disable=import-outside-toplevel
    from mappa_jax.data.synthetic import arithmetic_tasks  # pylint: disable=import-outside-toplevel
    from mappa_jax.sampling import Sampler, SamplerConfig  # pylint: disable=import-outside-toplevel
    from mappa_jax.tools import Sandbox, SandboxConfig  # pylint: disable=import-outside-toplevel
    from mappa_jax.workflows import (ChatFormat, CoachHandoff, EpisodeRunner,  # pylint: disable=import-outside-toplevel
                                     PolicyWeights, SamplerPolicy, mathchat_config,
                                     topology_from_config)

    cfg, params, tokenizer = _rollout_model(model, random_layers, random_hidden)
    topology_cfg = mathchat_config()
    for name in topology_cfg.order:
        topology_cfg.agents[name].max_new_tokens = max_new_tokens
    topology = topology_from_config(topology_cfg)
    sampler = Sampler(cfg, SamplerConfig(batch_buckets=(8, 16, 32), prompt_buckets=(256, 512, 1024, 2048),
                                         generation_buckets=(max_new_tokens,)), tokenizer=tokenizer)
    policy = SamplerPolicy(sampler, tokenizer, {p: PolicyWeights(params) for p in topology.policies})
    sandbox = Sandbox(SandboxConfig(wall_timeout_s=30.0))
    batch = arithmetic_tasks(tasks, seed=seed)
    workdir = tempfile.mkdtemp(prefix="mappa_coach_overlap_")

    def runner(name, on_action):
        return EpisodeRunner(topology, policy, ChatFormat(tokenizer), sandbox=sandbox,
                             workspace_root=f"{workdir}/{name}", on_action=on_action)

    with FakeCoachServerProcess(latency_s=latency_s) as server:
        config = coach_config()
        config.backend = "openai"
        config.concurrency = concurrency
        config.rpm = 0
        config.tpm = 0
        config.timeout_s = 60.0
        config.openai.base_url = server.url + "/v1"
        config.openai.api_key_env = ""

        async def run_all():
            warm = await runner("warmup", None).run(batch, samples_per_task=samples, seed=seed)
            warm.remove_workspaces()
            recorded = []
            sequential = await _timed_rollout(runner("sequential", recorded.append), batch, samples, seed,
                                              make_coach(config), recorded=recorded)
            coach = make_coach(config)
            handoff = CoachHandoff(coach, topology, batch, ground_truth_roles=("verifier",))
            overlapped = await _timed_rollout(runner("overlapped", handoff), batch, samples, seed, coach,
                                              handoff=handoff)
            return sequential, overlapped

        try:
            (seq_result, seq_verdicts, seq_rollout_s, seq_total_s), \
                (ovl_result, ovl_verdicts, ovl_rollout_s, ovl_total_s) = asyncio.run(run_all())
        finally:
            policy.close()
            sandbox.close()
        hits = server.stats()["hits"]
    for result in (seq_result, ovl_result):
        result.remove_workspaces()
    same_actions = [a.generated_ids for a in seq_result.actions] == [a.generated_ids for a in ovl_result.actions]
    actions = len(ovl_result.actions)
    return {"model": model, "device": str(__import__("jax").devices()[0]), "episodes": tasks * samples,
            "actions": actions, "same_actions": same_actions, "latency_s": latency_s,
            "concurrency": concurrency, "server_hits": hits,
            "ok": (sum(v.ok for v in seq_verdicts), sum(v.ok for v in ovl_verdicts)),
            "generate_calls": ovl_result.timings.policy_calls,
            "generated_tokens": ovl_result.timings.generated_tokens,
            "rollout_s": seq_rollout_s, "coach_after_s": seq_total_s - seq_rollout_s,
            "sequential_s": seq_total_s, "overlapped_rollout_s": ovl_rollout_s,
            "overlapped_s": ovl_total_s, "coach_only_s": -(-actions // concurrency) * latency_s,
            "ratio": ovl_total_s / seq_total_s}


def _print_overlap(r: dict) -> None:
    print(f"model={r['model']} device={r['device']} episodes={r['episodes']} actions={r['actions']} "
          f"generate_calls={r['generate_calls']} tokens={r['generated_tokens']} "
          f"same_actions_in_both_runs={r['same_actions']}")
    print(f"coach: latency={r['latency_s']}s concurrency={r['concurrency']} server_hits={r['server_hits']} "
          f"ok(sequential, overlapped)={r['ok']} (coach alone needs >= {r['coach_only_s']:.2f}s)")
    print(f"sequential: rollout {r['rollout_s']:.2f}s + coach after {r['coach_after_s']:.2f}s "
          f"= {r['sequential_s']:.2f}s")
    print(f"overlapped: {r['overlapped_s']:.2f}s (its rollout part {r['overlapped_rollout_s']:.2f}s); "
          f"overlapped / sequential = {r['ratio']:.3f}; "
          f"load_avg_1min={os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=None, help="seconds per coach call "
                        "(default 0.2; 0.75 with --rollout)")
    parser.add_argument("--concurrency", type=int, default=None, help="coach calls in flight "
                        "(default 64; 4 with --rollout, a rate-limited coach)")
    parser.add_argument("--backend", choices=("openai", "gemini"), default="openai")
    parser.add_argument("--check", action="store_true", help="exit 1 if the ratio exceeds 1.25")
    parser.add_argument("--rollout", action="store_true", help="part 2: coach/rollout overlap")
    parser.add_argument("--model", default="random:llama", help="--rollout: 'random:llama' (tiny "
                        "random decoder, SmolLM2's tokenizer), 'smollm2', a .gguf file or an HF dir")
    parser.add_argument("--tasks", type=int, default=4, help="--rollout: tasks (x --samples episodes)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.rollout:
        _print_overlap(rollout_overlap(args.model, args.tasks, args.samples, args.max_new_tokens,
                                       0.75 if args.latency is None else args.latency,
                                       4 if args.concurrency is None else args.concurrency))
        return
    args.latency = 0.2 if args.latency is None else args.latency
    args.concurrency = 64 if args.concurrency is None else args.concurrency
    result = throughput(args.requests, args.latency, args.concurrency, args.backend)
    m = result["metrics"]
    print(f"backend={result['backend']} requests={result['requests']} concurrency={result['concurrency']} "
          f"latency={result['latency_s']}s server_hits={result['server_hits']} "
          f"server_max_in_flight={result['server_max_in_flight']} ok={result['ok']}")
    print(f"elapsed={result['elapsed_s']:.3f}s ideal={result['ideal_s']:.3f}s "
          f"ratio={result['ratio']:.3f} (target <= {TARGET_RATIO}: "
          f"{'PASS' if result['ratio'] <= TARGET_RATIO else 'FAIL'})")
    print(f"latency p50={m['latency_p50_s']:.3f}s p90={m['latency_p90_s']:.3f}s p99={m['latency_p99_s']:.3f}s "
          f"calls={m['calls']} retries={m['retries']} fallbacks={m['fallbacks']} "
          f"client_cpu={result['client_cpu_ms_per_request']:.2f} ms/request "
          f"load_avg_1min={os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.check and result["ratio"] > TARGET_RATIO:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
