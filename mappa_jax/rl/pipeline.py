"""One REINFORCE++ training step for several agents: logprobs -> rewards -> advantages -> updates.

Each agent's actions arrive as an Experience; agents take turns on the one mesh. Advantages are
normalized across agents according to `rl.advantage_scope` before any agent is updated.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mappa_jax.rl.advantages import discounted_returns, normalize_advantages, token_rewards
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Experience
from mappa_jax.rl.kl import token_kl
from mappa_jax.rl.losses import masked_mean
from mappa_jax.rl.update import AgentPolicy, PolicyUpdater


def reinforce_returns(exp: Experience, cfg: RLConfig) -> tuple[jax.Array, jax.Array]:
    """Per-token returns of REINFORCE++ and the per-token KL that shaped them (KL enters the reward
    only when rl.kl_mode == "reward")."""
    mask = exp.loss_mask
    kl = token_kl(exp.old_logprobs, exp.ref_logprobs, mask, cfg.kl_estimator)
    kl_coef = cfg.kl_coef if cfg.kl_mode == "reward" else 0.0
    rewards = token_rewards(exp.rewards, kl, mask, kl_coef, cfg.reward_clip)
    return discounted_returns(rewards, mask, cfg.gamma), kl


_reinforce_returns = jax.jit(reinforce_returns, static_argnums=1)


def uses_reference(cfg: RLConfig) -> bool:
    """Whether the reference policy enters the objective (a KL term with a positive coefficient);
    when it does not, its logprobs are not computed (ref_logprobs = old_logprobs, KL 0)."""
    return cfg.kl_coef > 0


@jax.jit
def _logprob_gap(trainer, sampler, mask):
    diff = jnp.where(mask, jnp.abs(trainer - sampler), 0.0)
    return {"trainer_sampler_logprob_gap_mean": masked_mean(diff, mask),
            "trainer_sampler_logprob_gap_max": jnp.max(diff)}


def prepare_experiences(updater: PolicyUpdater, policies: Mapping[str, AgentPolicy],
                        experiences: Mapping[str, Experience]) -> tuple[dict[str, Experience], dict]:
    """Place each agent's experience on the mesh, fill trainer/reference logprobs and advantages.
    Returns the experiences and metrics keyed "agent/metric"."""
    cfg = updater.cfg
    missing = sorted(set(experiences) - set(policies))
    if missing:
        raise ValueError(f"experiences for agents {missing} have no policy")
    names = list(experiences)
    placed, returns, metrics = {}, [], {}
    for name in names:
        exp = updater.place(experiences[name])
        policy = policies[name]
        # Each forward pass here costs about half an update: run only those the step needs. With the
        # sampler's logprobs as the behaviour policy, the update's first optimizer step (parameters
        # not yet changed) reports the trainer/sampler gap; with no KL term the reference is unused.
        if cfg.old_logprobs == "trainer":
            old = updater.policy_logprobs(policy, exp)
            for key, value in _logprob_gap(old, exp.sampler_logprobs, exp.loss_mask).items():
                metrics[f"{name}/{key}"] = value
        else:
            old = exp.sampler_logprobs
        reference = updater.reference_logprobs(policy, exp) if uses_reference(cfg) else old
        exp = exp.replace(old_logprobs=old, ref_logprobs=reference)
        ret, kl = _reinforce_returns(exp, cfg)
        if uses_reference(cfg):
            metrics[f"{name}/kl_reward"] = masked_mean(kl, exp.loss_mask)
        metrics[f"{name}/reward_mean"] = masked_mean(exp.rewards, exp.valid)
        metrics[f"{name}/valid_fraction"] = jnp.mean(exp.valid)
        placed[name] = exp
        returns.append(ret)
    advantages = normalize_advantages(returns, [placed[n].loss_mask for n in names], cfg.advantage_scope,
                                      cfg.advantage_std, [placed[n].group_ids for n in names])
    return {n: placed[n].replace(advantages=a) for n, a in zip(names, advantages)}, metrics


def train_step(updater: PolicyUpdater, policies: Mapping[str, AgentPolicy],
               experiences: Mapping[str, Experience]) -> tuple[dict[str, AgentPolicy], dict]:
    """Advantages for every agent, then one update pass per agent (each agent's old train state is
    donated). Agents without experience this step keep their policy."""
    cfg = updater.cfg
    prepared, metrics = prepare_experiences(updater, policies, experiences)
    new = dict(policies)
    for name, exp in prepared.items():
        new[name], agent_metrics = updater.update(policies[name], exp)
        gap = {k: agent_metrics.pop(f"first_step_{k}") for k in ("logprob_gap_mean", "logprob_gap_max")}
        if cfg.old_logprobs == "sampler":  # the first optimizer step's logprobs are the trainer's
            metrics.update({f"{name}/trainer_sampler_{k}": v for k, v in gap.items()})
        if not uses_reference(cfg):
            agent_metrics.pop("kl_ref")  # no reference was computed: nothing to report
        metrics.update({f"{name}/{k}": v for k, v in agent_metrics.items()})
    return new, metrics
