"""The MAPPA training loop: rollout -> coach verdicts -> experience -> per-agent updates -> metrics.

    mappa-train --config configs/demo.py --config.train.steps=4

`Trainer(config)` checks everything cheap first (config keys, workdir, coach credentials, data,
train/eval overlap), then loads the model, builds one policy per topology policy name (a LoRA
adapter over a shared frozen base, or a full copy), and resumes from the latest checkpoint in
the workdir if there is one. Usable from Python/Colab as well: `Trainer(config).train()`.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mappa_jax import compile_cache, parallel
from mappa_jax.checkpoint import RunCheckpointer, decode_bytes, encode_bytes
from mappa_jax.coach import make_coach
from mappa_jax.config import ConfigError, validate
from mappa_jax.data import (SELECTION_FILE, TaskPipeline, builder_from_spec, check_no_overlap, task_source,
                            write_data_selection)
from mappa_jax.eval import grade_math, score_submission
from mappa_jax.metrics import MetricsWriter, Progress, TimeSplit
from mappa_jax.models import hub, weights
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, compute_copy
from mappa_jax.models.lora import merge_lora
from mappa_jax import plan as run_plan
from mappa_jax.parallel import distributed, memory_check
from mappa_jax.rl.experience import Sample, build_experience, sample_counts
from mappa_jax.rl.pipeline import train_step
from mappa_jax.sampling import Sampler
from mappa_jax.tools import Sandbox, sandbox_config_from
from mappa_jax.workdir import OutputMirror, is_remote, local_workdir
from mappa_jax.workflows import (ChatFormat, CoachHandoff, EpisodeRunner, SamplerPolicy, episode_record,
                                 topology_from_config)


# ---- loading ------------------------------------------------------------------------------------
def load_model(model_config, seed: int, shardings_fn=None, before_weights=None, frozen: bool = False):
    """(ModelConfig, params state, tokenizer) for `config.model` (see mappa_jax/config.py).
    before_weights(cfg) runs once the architecture is known, before any weight is read or made.
    frozen: weights that are never trained (LoRA's base) come in the compute dtype (compute_copy)."""
    source = model_config.source
    dtypes = dict(param_dtype=model_config.param_dtype, dtype=model_config.dtype)
    before_weights = before_weights or (lambda cfg: None)
    if source.startswith("random:"):
        tokenizer = weights.load_tokenizer(_resolve_source(model_config.tokenizer or "smollm2"))
        cfg = ModelConfig.tiny(source.split(":", 1)[1], vocab_size=len(tokenizer),
                               num_layers=model_config.random_layers, hidden_size=model_config.random_hidden,
                               head_dim=model_config.random_hidden // 4,
                               eos_token_ids=(tokenizer.eos_token_id,), **dtypes)
        before_weights(cfg)
        state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))
        state = compute_copy(state, cfg.jnp_dtype) if frozen else state
        if shardings_fn is not None:
            state = jax.device_put(state, shardings_fn(state))
        return cfg, state, tokenizer
    path = _resolve_source(source)
    if path.endswith(".gguf"):
        import gguf
        before_weights(weights.gguf_config(gguf.GGUFReader(path), **dtypes))
        cfg, state = weights.load_gguf(path, shardings_fn, frozen, **dtypes)
    else:
        before_weights(ModelConfig.from_hf(pathlib.Path(path) / "config.json", **dtypes))
        cfg, state = weights.load_hf(path, shardings_fn, frozen, **dtypes)
    tokenizer = weights.load_tokenizer(_resolve_source(model_config.tokenizer) if model_config.tokenizer else path)
    return cfg, state, tokenizer


def _resolve_source(source: str) -> str:
    if source == "smollm2":
        return str(hub.smollm2_gguf_path())
    if source.endswith(".gguf"):
        if not pathlib.Path(source).exists():
            raise FileNotFoundError(f"config key 'model.source': GGUF file {source} does not exist")
        return source
    return str(hub.resolve_model_dir(source))


def _check_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}"  # per process: hosts may share the workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"config key 'workdir': {workdir} is not writable ({err.strerror})") from err


class ReportingPolicy:
    """A Policy that prints one line per batched generate call, so a long rollout shows progress."""

    def __init__(self, inner, enabled: bool):
        self.inner, self.enabled = inner, enabled

    @property
    def max_prompt_tokens(self):
        return self.inner.max_prompt_tokens

    async def generate(self, policy_name, prompts, max_new_tokens, stop_strings, temperature, seed):
        start = time.perf_counter()
        out = await self.inner.generate(policy_name, prompts, max_new_tokens, stop_strings, temperature, seed)
        seconds = time.perf_counter() - start
        if self.enabled:
            tokens = sum(len(g.token_ids) for g in out)
            print(f"  {policy_name}: {len(prompts)} prompts, {tokens} tokens in {seconds:.1f} s "
                  f"({tokens / max(seconds, 1e-9):.0f} tokens/s)", flush=True)
        return out


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        self.config = config
        self.time_split = TimeSplit()  # printed at the end of train(): where the wall time went
        self.workdir = local_workdir(config.workdir)
        self.checkpoint_dir = epath.Path(config.workdir) / "checkpoints"  # gs:// stays gs://
        _check_workdir(self.workdir)
        distributed.initialize(config)
        self.is_main = jax.process_index() == 0
        # Before the first jit: programs compiled by an earlier run (or before a restart) are loaded.
        cache = compile_cache.enable(config.compilation_cache, config.workdir)
        self._log(f"compilation cache: {cache or 'off'}")
        # Remote workdir: results are mirrored locally and copied up after each checkpoint.
        self.mirror = OutputMirror(self.workdir, config.workdir) if is_remote(config.workdir) and self.is_main else None
        if self.mirror:
            self.mirror.pull()
        self.topology = topology_from_config(config.topology)
        self.eval_topology = dataclasses.replace(self.topology, agents=tuple(
            dataclasses.replace(a, temperature=config.train.eval_temperature) for a in self.topology.agents))

        # Cheap checks that can fail come before the model: coach credentials, then the data.
        self.coach = make_coach(config.coach)
        self.coach.check_credentials()
        data_dir = pathlib.Path(config.data.dir or self.workdir / "data")
        self.train_tasks, eval_tasks = _open_task_data((config.data.train, config.data.eval), data_dir)
        self.eval_tasks = list(eval_tasks)
        check_no_overlap(list(self.train_tasks), self.eval_tasks)
        if self.is_main:  # which problems this run trains and evaluates on: ids, file digests
            write_data_selection(self.workdir / SELECTION_FILE, {
                "train": (config.data.train, self.train_tasks), "eval": (config.data.eval, self.eval_tasks)})
        self.pipeline = TaskPipeline(self.train_tasks, config.train.tasks_per_step, seed=config.seed,
                                     stratify=config.data.stratify)
        uses_python = any(a.uses_python for a in self.topology.agents)
        self.sandbox = Sandbox(sandbox_config_from(config.train)) if uses_python else None

        self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self._log(f"mesh: {dict(self.mesh.shape)} over {self.mesh.size} {jax.devices()[0].platform} devices "
                  f"on {jax.process_count()} host(s)")
        shardings_fn = lambda state: parallel.param_shardings(self.mesh, state)
        self.model_cfg, self.base, self.tokenizer = load_model(config.model, config.seed, shardings_fn,
                                                               before_weights=self._check_memory,
                                                               frozen=config.policy.mode == "lora")
        # The same constructors build the run's plan (mappa_jax/plan.py), which mappa-compile compiles.
        self.updater = run_plan.build_updater(config, self.model_cfg, self.topology, self.mesh)
        self.rl_cfg, self.lora_graphdef = self.updater.cfg, self.updater.lora_graphdef
        if self.model_cfg.param_dtype != "float32":
            self._log(f"precision warning: model.param_dtype={self.model_cfg.param_dtype} keeps the trained weights "
                      f"and AdamW moments in {self.model_cfg.param_dtype}; at rl.learning_rate={self.rl_cfg.learning_rate} "
                      "most updates are below half a step of the weight and round away (float32 keeps them)")
        self._build_policies()
        sc = config.sampler
        pad = self.tokenizer.pad_token_id
        self.sampler = Sampler(self.model_cfg, run_plan.sampler_config(
            config, self.model_cfg.eos_token_ids[0] if pad is None else pad), mesh=self.mesh, tokenizer=self.tokenizer)
        self.policy = SamplerPolicy(self.sampler, self.tokenizer, {}, top_p=sc.top_p, top_k=sc.top_k)
        self._refresh_sampler_weights()
        self.chat = ChatFormat(self.tokenizer, config.model.chat_template_kwargs.to_dict())

        self.step = 0
        self.baseline_eval: dict[str, float] = {}
        self.checkpointer = RunCheckpointer(self.checkpoint_dir, config.train.keep_checkpoints)
        self.metrics = MetricsWriter(self.workdir, tensorboard=config.logging.tensorboard,
                                     wandb_project=config.logging.wandb_project,
                                     run_name=config.run_name or self.workdir.name,
                                     config=config.to_dict(), is_main=self.is_main)
        self._maybe_resume()

    # -- policies --------------------------------------------------------------------------------
    def _build_policies(self) -> None:
        c = self.config
        if self.updater.uses_lora:
            self.policies = {name: self.updater.new_lora_agent(
                self.base, nnx.state(run_plan.make_adapters(c, self.model_cfg, i)))
                for i, name in enumerate(self.topology.policies)}
        else:
            self.policies = {name: self.updater.new_full_agent(self.base) for name in self.topology.policies}
            self.base = None  # each agent holds its own copy and reference: free the loaded one

    def _check_memory(self, model_cfg: ModelConfig) -> None:
        """Before any weight is loaded: will the run fit on each device? On accelerators an
        over-budget run stops here, naming mesh / LoRA settings that fit; on CPU it is a warning."""
        mesh_cfg = self.config.mesh
        enforce = {"auto": None, "raise": True, "warn": False}[mesh_cfg.memory_check]
        device_bytes = int(mesh_cfg.device_memory_gib * memory_check.GiB) or None
        estimate = memory_check.check_run(self.config, model_cfg, self.mesh, device_bytes, enforce=enforce)
        self._log(f"memory: {estimate.describe()}")
        if estimate.problem:
            self._log(f"memory warning: {estimate.problem}")

    def _refresh_sampler_weights(self) -> None:
        """The sampler samples from each policy's compute-dtype copy, cast once here per update
        (a no-op when param_dtype is the compute dtype) instead of at every decoded token."""
        dtype = self.sampler.cfg.jnp_dtype
        for name, policy in self.policies.items():
            trained = compute_copy(policy.state.params, dtype)
            if self.lora_graphdef is not None:
                self.policy.set_weights(name, self.base, nnx.merge(self.lora_graphdef, trained))
            else:
                self.policy.set_weights(name, trained)

    # -- checkpoints -----------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        step = self.checkpointer.latest_step()
        if step is None:
            return
        abstract = {name: p.state for name, p in self.policies.items()}
        restored, meta = self.checkpointer.restore(step, abstract)
        for name, state in restored.items():
            self.policies[name] = dataclasses.replace(self.policies[name], state=state)
        self._refresh_sampler_weights()
        self.step = int(meta["step"])
        self.pipeline.set_state(meta["data"])
        self.coach.import_cache(decode_bytes(meta["coach_cache"]))
        self.baseline_eval = meta.get("baseline_eval", {})
        self.metrics.truncate_after(self.step)
        self._log(f"resumed from {self.checkpoint_dir} at step {self.step}")

    def save_checkpoint(self) -> None:
        if distributed.process_count() > 1:  # each host judged its share: checkpoint every verdict
            for blob in distributed.gather_from_hosts([self.coach.export_cache()]):
                self.coach.import_cache(blob)
        meta = {"step": self.step, "data": self.pipeline.get_state(),
                "coach_cache": encode_bytes(self.coach.export_cache()), "baseline_eval": self.baseline_eval,
                "seed": self.config.seed}
        self.checkpointer.save(self.step, {name: p.state for name, p in self.policies.items()}, meta)
        self.push_outputs()

    def push_outputs(self) -> None:
        if self.mirror:
            self.mirror.push()

    # -- rollout ---------------------------------------------------------------------------------
    def rollout(self, tasks, step: int, *, evaluation: bool = False):
        """Runs the episodes of `tasks` and waits for every action's verdict:
        (result, verdicts, outcome per episode id, timing)."""
        c = self.config
        topology = self.eval_topology if evaluation else self.topology
        samples = c.train.eval_samples if evaluation else c.train.samples_per_task
        handoff = CoachHandoff(self.coach, topology, tasks, ground_truth_roles=tuple(c.coach.ground_truth_roles),
                               submission_metrics=lambda task, path: score_submission(task, path).metrics)
        tag = f"eval{step}" if evaluation else f"step{step}"
        hosts = distributed.process_count()
        workspaces = self.workdir / "workspaces" / (f"host{jax.process_index()}" if hosts > 1 else "") / tag
        on_action, decide, decider = handoff, None, None
        if hosts > 1:  # each episode's coach calls, code runs and timeouts happen on its owner host
            episode_ids = _episode_ids(tasks, samples, f"{tag}/")
            on_action = _OwnedActions(handoff, episode_ids)
            owner = {eid: host for host in range(hosts) for eid in distributed.host_shard(episode_ids, host, hosts)}
            decider = distributed.OwnerDecides(f"mappa/rollout/{tag}")
            decide = lambda eid, key, compute: decider.decide(owner[eid], f"{eid}/{key}", compute)
        policy = ReportingPolicy(self.policy, self.is_main and c.logging.progress)
        runner = EpisodeRunner(topology, policy, self.chat, sandbox=self.sandbox,
                               workspace_root=workspaces, on_action=on_action,
                               episode_timeout_s=c.train.episode_timeout_s, decide=decide)
        seed = (c.seed * 1_000_003 + step * 2 + int(evaluation)) % (2 ** 31)

        async def run():
            start = time.perf_counter()
            result = await runner.run(tasks, samples_per_task=samples, seed=seed, episode_prefix=f"{tag}/")
            rollout_s = time.perf_counter() - start
            verdicts = await handoff.verdicts()
            return result, verdicts, rollout_s, time.perf_counter() - start - rollout_s

        compiled_before = self.time_split.compile_s()
        result, verdicts, rollout_s, coach_wait_s = asyncio.run(run())
        timing = {"time/rollout_s": rollout_s, "time/coach_wait_s": coach_wait_s}
        t = result.timings  # programs compile inside generate calls: counted as compilation
        self.time_split.add("sampling", t.sampling_s, self.time_split.compile_s() - compiled_before)
        self.time_split.add("sandbox", t.tool_s - t.overlap_s)
        self.time_split.add("coach wait", coach_wait_s)
        if hosts == 1:
            by_id = {t.task_id: t for t in tasks}
            outcomes = {e.episode_id: self.outcome(by_id[e.task_id], e) for e in result.episodes}
            return result, verdicts, outcomes, timing
        try:
            return (*self._merge_hosts(tasks, result, verdicts, on_action), timing)
        finally:
            decider.clear()  # every host has read the records: the merge's collectives came first
            decider.close()

    def _merge_hosts(self, tasks, result, verdicts, owned: _OwnedActions):
        """Multi-host: every host ran every episode (each feeds its own devices in every sampler
        call) with the code runs and timeouts of each episode settled by its owner host, so the
        hosts' episodes agree. Still, process 0's episodes are what every host trains on, and each
        episode's outcome is scored by its owner (whose workspace holds the submission). Each
        action was judged once, by its owner; the verdicts are exchanged, and one judged on an
        action that differs from process 0's counts as a failed judgement (masked). Collectives,
        in the same order on every host."""
        by_id = {t.task_id: t for t in tasks}
        outcomes = {}
        for host_outcomes in distributed.gather_from_hosts([{
                e.episode_id: self.outcome(by_id[e.task_id], e) for e in result.episodes if e.episode_id in owned.owned}]):
            outcomes.update(host_outcomes)
        digests = owned.digests
        result.remove_workspaces()  # submissions are scored; the paths mean nothing on other hosts
        result = distributed.broadcast_from_host0(result)
        judged = {key: (verdict, digest) for key, verdict, digest in distributed.gather_from_hosts(
            [(key, verdict, digests[key]) for key, verdict in verdicts.items()])}
        merged = {}
        for action in (a for e in result.episodes for a in e.actions):
            key = (action.episode_id, action.agent, action.turn)
            if key in judged:
                verdict, digest = judged[key]
                if digest != _action_digest(action):
                    verdict = dataclasses.replace(verdict, status="fallback", score=None, reward=None,
                                                  fallback_reason="host_divergence")
                merged[key] = verdict
        return result, merged, outcomes

    def outcome(self, task, episode) -> float:
        """1.0 when the episode's deliverable is right (rule-based), else 0.0; failures count as 0."""
        if episode.failed:
            return 0.0
        if task.kind == "math":
            return float(grade_math(episode.final_answer, str(task.answer)).correct)
        if not episode.submission_path:
            return 0.0
        return float(score_submission(task, episode.submission_path).success)

    def episode_stats(self, tasks, result, verdicts, prefix: str, outcomes=None) -> tuple[dict, list]:
        """Per-agent / per-task-type rewards and behaviour metrics, and each action's reward.
        outcomes: episode_id -> outcome when computed already (multi-host: by process 0)."""
        by_id = {t.task_id: t for t in tasks}
        sums = collections.defaultdict(list)
        rewarded = []
        process_w, outcome_w = self.config.reward.process_weight, self.config.reward.outcome_weight
        for episode in result.episodes:
            task = by_id[episode.task_id]
            outcome = outcomes[episode.episode_id] if outcomes is not None else self.outcome(task, episode)
            sums[f"{prefix}outcome"].append(outcome)
            sums[f"{prefix}behaviour/episode_failed"].append(float(episode.failed))
            for action in episode.actions:
                verdict = verdicts.get((action.episode_id, action.agent, action.turn))
                ok = verdict is not None and verdict.status == "ok"
                sums[f"{prefix}behaviour/coach_fallback"].append(float(not ok))
                sums[f"{prefix}behaviour/truncated"].append(float(action.truncated))
                sums[f"{prefix}length/agent/{action.agent}"].append(len(action.generated_ids))
                if self.topology.agent(action.agent).uses_python:
                    sums[f"{prefix}behaviour/tool_use/{action.agent}"].append(float(action.tool is not None))
                if ok:
                    sums[f"{prefix}reward/agent/{action.agent}"].append(verdict.reward)
                    sums[f"{prefix}reward/task_type/{task.task_type}"].append(verdict.reward)
                if process_w > 0 and not ok:
                    reward = None  # a failed judgement is not a score: masked out of the loss
                else:
                    reward = (process_w * verdict.reward if ok and process_w > 0 else 0.0) + outcome_w * outcome
                rewarded.append((action, reward, episode))
        return {k: float(np.mean(v)) for k, v in sums.items()}, rewarded

    def log_episodes(self, phase: str, step: int, tasks, result, verdicts, outcomes, rewarded) -> None:
        """logging.episodes_per_step complete episodes, spread over the batch, to episodes.jsonl
        under `step`, the metrics.jsonl row they belong to (process 0 writes; on several hosts every
        argument is already process 0's)."""
        n = self.config.logging.episodes_per_step
        if not n or not result.episodes:
            return
        by_id = {t.task_id: t for t in tasks}
        rewards = {(a.episode_id, a.agent, a.turn): reward for a, reward, _ in rewarded}
        picked = result.episodes[::max(1, len(result.episodes) // n)][:n]
        self.metrics.write_episodes([episode_record(e, by_id[e.task_id], step=step, phase=phase,
                                                    outcome=outcomes[e.episode_id], verdicts=verdicts,
                                                    rewards=rewards) for e in picked])

    # -- one step --------------------------------------------------------------------------------
    def train_one_step(self) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        tasks = next(self.pipeline)
        asked_before, prefilled_before = self.policy.prompt_tokens, self.policy.prefilled_tokens
        result, verdicts, outcomes, timing = self.rollout(tasks, self.step)
        # Prompt tokens the agents' calls asked for vs those the sampler ran (the rest came from a
        # kept KV cache: sampler.reuse_context).
        prompt_counts = {"rollout/prompt_tokens": self.policy.prompt_tokens - asked_before,
                         "rollout/prefilled_tokens": self.policy.prefilled_tokens - prefilled_before}
        stats, rewarded = self.episode_stats(tasks, result, verdicts, prefix="", outcomes=outcomes)
        group_of = {t.task_id: i for i, t in enumerate(tasks)}
        samples = collections.defaultdict(list)
        for action, reward, episode in rewarded:
            samples[action.policy].append(Sample(action.prompt_ids, action.generated_ids, action.logprobs,
                                                 reward, action.truncated, group_of[episode.task_id],
                                                 action.temperature))
        pad = self.sampler.config.pad_token_id
        tb = self.rl_cfg.train_batch_size
        # Prompts and generations snap to the sampler's own buckets ("split" layout), so the trainer
        # computes logits only over the generation window.
        experiences = {name: build_experience(
            rows, batch_buckets=run_plan.update_batch_buckets(tb), batch_multiple=tb, pad_id=pad,
            padding_side="split", prompt_buckets=tuple(c.sampler.prompt_buckets),
            generation_buckets=tuple(c.sampler.generation_buckets)) for name, rows in samples.items()}
        t_update, compiled_before = time.perf_counter(), self.time_split.compile_s()
        self.policies, rl_metrics = train_step(self.updater, self.policies, experiences)
        rl_metrics = {f"rl/{k}": float(v) for k, v in jax.device_get(rl_metrics).items()}
        self._refresh_sampler_weights()
        result.remove_workspaces()
        update_s = time.perf_counter() - t_update
        self.time_split.add("update", update_s, self.time_split.compile_s() - compiled_before)
        counts = {f"actions/{name}/{k}": v for name, rows in samples.items() for k, v in sample_counts(rows).items()}
        coach = {f"coach/{k}": v for k, v in self.coach_metrics().items()}
        self.step += 1
        self.log_episodes("train", self.step, tasks, result, verdicts, outcomes, rewarded)
        return {**stats, **rl_metrics, **counts, **coach, **timing, **prompt_counts, "time/update_s": update_s,
                "time/step_s": time.perf_counter() - t0, "rollout/generated_tokens": result.timings.generated_tokens}

    def coach_metrics(self) -> dict[str, float]:
        """The coach ledger's numbers; multi-host: counters summed over hosts (each judged its own
        share), requests per host, latency percentiles of process 0."""
        local = {k: v for k, v in self.coach.metrics().items() if isinstance(v, (int, float))}
        if distributed.process_count() == 1:
            return local
        per_host = distributed.gather_from_hosts([local])
        total = dict(local)
        for key in _SUMMED_COACH_COUNTERS + tuple(k for k in local if k.startswith(("fallbacks/", "retries/"))):
            total[key] = sum(host.get(key, 0) for host in per_host)
        total["fallback_rate"] = total["fallbacks"] / total["requests"] if total["requests"] else 0.0
        total.update({f"requests/host{i}": host["requests"] for i, host in enumerate(per_host)})
        return total

    def evaluate(self) -> dict[str, float]:
        result, verdicts, outcomes, timing = self.rollout(self.eval_tasks, self.step, evaluation=True)
        stats, rewarded = self.episode_stats(self.eval_tasks, result, verdicts, prefix="eval/", outcomes=outcomes)
        self.log_episodes("eval", self.step, self.eval_tasks, result, verdicts, outcomes, rewarded)
        stats["eval/accuracy"] = stats.pop("eval/outcome")
        result.remove_workspaces()
        return {**stats, "eval/time_s": timing["time/rollout_s"] + timing["time/coach_wait_s"]}

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        c = self.config
        if self.step == 0:
            self.baseline_eval = self.evaluate()
            self.metrics.write(0, self.baseline_eval)
            self._log("before training: " + _summary(self.baseline_eval))
        progress = Progress(c.train.steps, start=self.step, enabled=self.is_main and c.logging.progress)
        final_eval: dict[str, float] = {}
        while self.step < c.train.steps:
            metrics = self.train_one_step()
            last = self.step == c.train.steps
            if last or (c.train.eval_every and self.step % c.train.eval_every == 0):
                final_eval = self.evaluate()
                metrics.update(final_eval)
            self.metrics.write(self.step, metrics)
            progress.update(self.step, metrics, keys=[k for k in metrics if k.startswith("reward/agent/")]
                            + ["eval/accuracy"])
            if last or self.step % c.train.checkpoint_every == 0:
                self.save_checkpoint()
        if not final_eval:
            final_eval = self.evaluate()
        self._log("before training: " + _summary(self.baseline_eval))
        self._log("after training:  " + _summary(final_eval))
        self._log("time: " + self.time_split.describe())
        self._log(f"compilation: {compile_cache.stats().describe()}")
        self.check_hosts_agree()
        if self.is_main:
            self._write_outputs(final_eval)
        return final_eval

    def check_hosts_agree(self) -> int:
        """Multi-host: every host must hold the same parameters (each computed the same update).
        Compares digests of every host's parameter shards (same shard index: same bytes) and raises
        naming those that differ; returns how many shards were compared (0 on a single host)."""
        if distributed.process_count() == 1:
            return 0
        local: dict[tuple, set] = collections.defaultdict(set)
        for name, policy in self.policies.items():
            for path, leaf in jax.tree_util.tree_leaves_with_path(policy.state.params):
                for shard in leaf.addressable_shards:
                    digest = hashlib.sha256(np.asarray(shard.data).tobytes()).hexdigest()
                    local[(name, jax.tree_util.keystr(path), str(shard.index))].add(digest)
        merged: dict[tuple, set] = collections.defaultdict(set)
        for digests in distributed.gather_from_hosts([dict(local)]):
            for key, values in digests.items():
                merged[key] |= values
        differing = sorted(key for key, values in merged.items() if len(values) > 1)
        if differing:
            raise RuntimeError(f"hosts hold different parameters after step {self.step} (a host-dependent "
                               f"input reached the update): {differing[:5]}")
        self._log(f"hosts agree: {len(merged)} parameter shards identical on all "
                  f"{distributed.process_count()} hosts")
        return len(merged)

    def _write_outputs(self, final_eval) -> None:
        from mappa_jax.plots import plot_curves
        (self.workdir / "summary.json").write_text(json.dumps(
            {"before": self.baseline_eval, "after": final_eval, "steps": self.step}, indent=2))
        self._log(f"curves: {plot_curves(self.workdir)}")
        if self.config.train.export_hf:
            for name, policy in self.policies.items():
                state = policy.state.params
                if self.lora_graphdef is not None:
                    state = merge_lora(self.model_cfg, self.base, nnx.merge(self.lora_graphdef, state), "float32")
                out = weights.save_hf(self.model_cfg, state, self.workdir / "exports" / name, self.tokenizer,
                                      dtype=self.config.train.export_dtype or self.model_cfg.dtype)
                self._log(f"exported policy {name!r} to {out}")
        self.push_outputs()

    def _log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
        self.policy.close()
        self.time_split.compiles.close()  # jax keeps the listener; it stops counting


_SUMMED_COACH_COUNTERS = ("requests", "ok", "fallbacks", "calls", "retries", "repairs", "cache_hits",
                          "tokens_in", "tokens_out", "cost_usd", "cache_entries")


def _open_task_data(specs, data_dir: pathlib.Path) -> list:
    """The task sources of `specs`. Process 0 prepares the TFDS files first and the other hosts
    open them after a barrier (preparing at once in a shared data dir races on the final rename);
    a host whose data dir is not shared prepares its own identical copy then."""
    open_all = lambda: [task_source(builder_from_spec(spec, data_dir)) for spec in specs]
    if distributed.process_count() == 1:
        return open_all()
    sources = open_all() if jax.process_index() == 0 else None
    distributed.sync_hosts("mappa_task_data_prepared")
    return sources or open_all()  # a builder made before the files exist would not see them


def _episode_ids(tasks, samples_per_task: int, prefix: str) -> list[str]:
    """The ids EpisodeRunner gives the episodes of `tasks`, in its order."""
    seen: dict[str, int] = {}
    ids = []
    for task in tasks:
        first = seen.get(task.task_id, 0)
        seen[task.task_id] = first + samples_per_task
        ids += [f"{prefix}{task.task_id}#{k}" for k in range(first, first + samples_per_task)]
    return ids


class _OwnedActions:
    """A multi-host `on_action`: only the actions of this host's episodes (a contiguous block, as
    `host_shard` splits them) go to the coach, so each action is judged once across hosts; the
    judging still overlaps the rollout. Keeps a digest of each submitted action."""

    def __init__(self, handoff: CoachHandoff, episode_ids: list[str]):
        self.handoff = handoff
        self.owned = set(distributed.host_shard(episode_ids))
        self.digests: dict[tuple[str, str, int], str] = {}

    def __call__(self, action) -> None:
        if action.episode_id in self.owned:
            self.digests[(action.episode_id, action.agent, action.turn)] = _action_digest(action)
            self.handoff(action)


def _action_digest(action) -> str:
    """What the coach sees of an action (timings left out), to tell whether two hosts' copies agree.
    JSON, not pickle: pickle's bytes depend on which equal objects happen to be shared."""
    tool = None if action.tool is None else dataclasses.asdict(dataclasses.replace(action.tool, wall_s=0.0))
    fields = [list(action.prompt_ids), list(action.generated_ids), action.text, tool, list(action.files_after)]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _summary(metrics: dict[str, float]) -> str:
    parts = [f"accuracy {metrics.get('eval/accuracy', float('nan')):.3f}"]
    parts += [f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in sorted(metrics.items()) if k.startswith("eval/reward/agent/")]
    return ", ".join(parts) + " (coach reward per agent, 0-1)"


# ---- CLI ------------------------------------------------------------------------------------------
def main(argv) -> None:
    del argv
    from mappa_jax.cli import CONFIG
    trainer = Trainer(CONFIG.value)
    try:
        trainer.train()
    finally:
        trainer.close()


def run() -> None:
    from absl import app
    from mappa_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
