"""The per-agent policy update: one compiled, sharded program per model architecture.

`PolicyUpdater.update` consumes a whole rollout batch [B, T] in B / train_batch_size optimizer
steps (an outer `lax.scan`), each accumulating gradients over micro-batches (an inner
`lax.scan`), inside one `jax.jit` with explicit in/out shardings and a donated train state.
Parameters are arguments, so every agent with the same architecture (and batch bucket) reuses the
same executable. Two policy layouts:
- full: each agent trains its own parameter set; its reference is a separate frozen copy;
- LoRA: agents share one frozen base and train only their `LoraAdapters`; the reference is the
  base with adapters off, which costs no extra memory.
Mixed precision: trained parameters, their gradients and AdamW's moments stay in the parameters'
own dtype (ModelConfig.param_dtype, the float32 master copy), and each update is added there; the
forward and backward passes run in the model's compute dtype (the decoder casts weights at use).
Frozen weights (the full reference) are held as `decoder.compute_copy`, which gives the same logits.
Logits exist only where logprobs are needed: from `Experience.logprob_start` on (the generation
window of the "split" layout), `logits_chunk` positions at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mappa_jax.models.decoder import compute_copy, positions_from_mask
from mappa_jax.parallel import BATCH_AXES, batch_sharding, param_shardings, replicated
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Experience
from mappa_jax.rl.kl import token_kl
from mappa_jax.rl.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, step_counts
from mappa_jax.rl.optim import learning_rate_schedule, make_optimizer


# Per-token statistics each micro-batch sums (max_*: takes the maximum); see _micro_loss.
_TOKEN_SUMS = ("clip_fraction", "approx_kl_old_new", "approx_kl_old_new_k3", "ratio", "kl_ref", "entropy",
               "abs_log_ratio", "max_abs_log_ratio")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any      # the trained parameters: a full model state, or one agent's LoRA adapter state
    opt_state: Any
    step: jax.Array  # optimizer steps taken (the LR schedule's clock)


@dataclasses.dataclass
class AgentPolicy:
    """One agent's trainable state plus what it reads but never trains."""
    state: TrainState
    frozen: Any | None  # LoRA: the shared base model state; full: None
    reference: Any      # parameters of the reference policy (LoRA: the same shared base)


def window_logprobs(head, hidden, targets, temperatures, with_entropy: bool, chunk: int):
    """log p(targets) and the entropy [B, W] of softmax(logits / temperature), from hidden states
    [B, W, H] through `head` (hidden -> float32 logits) and each row's temperature [B] (data, so
    agents at different temperatures share one compiled program). Windows longer than `chunk` run
    chunk by chunk under `jax.checkpoint`, so at most [B, chunk, V] logits exist at once, in the
    forward and the backward pass."""
    temperatures = jnp.asarray(temperatures, jnp.float32)[:, None, None]

    def one(hidden, targets):
        logits = head(hidden).astype(jnp.float32) / temperatures  # as the sampler scales them
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_norm
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        probs = jnp.exp(logits - log_norm[..., None])
        return logp, log_norm - jnp.sum(probs * logits, axis=-1)

    b, w = targets.shape
    if w <= chunk:
        return one(hidden, targets)
    n = -(-w // chunk)
    to_chunks = lambda x: jnp.moveaxis(
        jnp.pad(x, [(0, 0), (0, n * chunk - w)] + [(0, 0)] * (x.ndim - 2)).reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    logp, entropy = jax.lax.map(jax.checkpoint(lambda xs: one(*xs)), (to_chunks(hidden), to_chunks(targets)))
    from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :w]
    return from_chunks(logp), from_chunks(entropy)


def _constrain_batch(mesh, x: jax.Array, batch_dim: int) -> jax.Array:
    spec = [None] * x.ndim
    spec[batch_dim] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


class PolicyUpdater:
    """Compiled logprob and update functions for one model architecture on one mesh."""

    def __init__(self, graphdef, cfg: RLConfig, mesh, *, lora_graphdef=None, logits_chunk: int = 256):
        """logits_chunk: positions whose [micro_batch, chunk, vocab] logits exist at once (the head,
        log-softmax and entropy run chunk by chunk and are recomputed in the backward pass)."""
        if int(logits_chunk) <= 0:
            raise ValueError(f"logits_chunk must be positive, got {logits_chunk}")
        self.logits_chunk = int(logits_chunk)
        self.graphdef = graphdef
        self.lora_graphdef = lora_graphdef
        self.cfg = cfg
        self.mesh = mesh
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        self.batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg.micro_batch_size % self.batch_shards:
            raise ValueError(f"rl.micro_batch_size={cfg.micro_batch_size} is not a multiple of the "
                             f"{self.batch_shards} batch shards of the mesh (data x fsdp)")
        self._compiled: dict[tuple, Any] = {}

    @property
    def uses_lora(self) -> bool:
        return self.lora_graphdef is not None

    # ---- placement ----------------------------------------------------------------------------
    def place_params(self, params):
        return jax.device_put(params, param_shardings(self.mesh, params))

    def place(self, exp: Experience) -> Experience:
        """Experience arrays onto the mesh, batch split over the data axes."""
        if exp.batch_size % self.batch_shards:
            raise ValueError(f"experience batch {exp.batch_size} is not a multiple of the "
                             f"{self.batch_shards} batch shards of the mesh")
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, np.ndim(x))), exp)

    def sharded_copy(self, params, dtype=None):
        """Fresh sharded buffers holding `params` (host or device arrays); shards go straight to
        their devices, never through one device. dtype: a `compute_copy` in that dtype instead."""
        shardings = param_shardings(self.mesh, params)
        placed = jax.device_put(params, shardings)
        copy = (lambda p: jax.tree.map(jnp.copy, p)) if dtype is None else (lambda p: compute_copy(p, dtype))
        return jax.jit(copy, in_shardings=(shardings,), out_shardings=shardings)(placed)

    def init_state(self, trainable) -> TrainState:
        """A train state owning a sharded copy of `trainable` (the update donates it)."""
        params = self.sharded_copy(trainable)
        opt_shape = jax.eval_shape(self.tx.init, params)
        opt_shardings = param_shardings(self.mesh, opt_shape)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh)))

    def new_full_agent(self, params, reference=None) -> AgentPolicy:
        """An agent with its own full parameter set; its reference is a frozen copy (default: the
        initial params; copied because the train state is donated to the update), held in the
        model's compute dtype (`compute_copy`: the same reference logprobs at fewer bytes)."""
        if self.uses_lora:
            raise ValueError("this updater trains LoRA adapters; use new_lora_agent")
        ref = self.sharded_copy(params if reference is None else reference, self.compute_dtype(params))
        return AgentPolicy(self.init_state(params), None, ref)

    def compute_dtype(self, params):
        """The compute dtype of this updater's decoder (ModelConfig.dtype), read off its graph."""
        return nnx.merge(self.graphdef, params).cfg.jnp_dtype

    def new_lora_agent(self, base, adapters) -> AgentPolicy:
        """An agent training only `adapters` (in their own dtype: the master copy) over the shared
        frozen `base` (place it once with `place_params` and pass the same object to every agent;
        load it in the compute dtype, `weights.load_state(frozen=True)`, to halve its bytes)."""
        if not self.uses_lora:
            raise ValueError("this updater trains full parameters; build it with lora_graphdef to train LoRA")
        return AgentPolicy(self.init_state(adapters), base, base)

    # ---- the forward pass ---------------------------------------------------------------------
    def _token_logprobs(self, base, lora, tokens, attention_mask, temperatures, with_entropy: bool,
                        start: int = 1):
        """log p(tokens[t] | tokens[:t]) and the entropy at t, [B, T] each, at each row's temperature
        [B], for t >= start (0 before: `Experience.logprob_start` promises no action token lies there)."""
        model = nnx.merge(self.graphdef, base)
        adapters = None if lora is None else nnx.merge(self.lora_graphdef, lora)
        hidden, _ = model(tokens, positions_from_mask(attention_mask), attention_mask, lora=adapters,
                          return_hidden=True, activation_sharding=batch_sharding(self.mesh, 3))
        # Position t - 1 predicts token t: the vocabulary head runs on the window only.
        logp, entropy = window_logprobs(model.head, hidden[:, start - 1:-1], tokens[:, start:], temperatures,
                                        with_entropy, self.logits_chunk)
        pad = lambda x: jnp.pad(x, ((0, 0), (start, 0)))
        return pad(logp), pad(entropy)

    def _model_params(self, trainable, frozen):
        """(base, lora) for the forward pass."""
        return (frozen, trainable) if self.uses_lora else (trainable, None)

    def _jit(self, key, fn, args, out_shardings, donate=()):
        """Compile `fn` once per pytree structure, with in_shardings taken from the rules."""
        full_key = (key, jax.tree.structure(args))
        if full_key not in self._compiled:
            def shardings(x, is_batch):
                if x is None:
                    return None
                if is_batch:
                    return jax.tree.map(lambda a: batch_sharding(self.mesh, a.ndim), x)
                return param_shardings(self.mesh, x)
            in_shardings = tuple(shardings(a, isinstance(a, Experience)) for a in args)
            self._compiled[full_key] = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                               donate_argnums=donate)
        return self._compiled[full_key]

    def compilation_counts(self) -> dict[str, int]:
        """Executables compiled so far per function ("update", "logprobs"): after warm-up with
        bucketed shapes these stop growing, and agents of one architecture share them."""
        counts: dict[str, int] = {}
        for (name, _), fn in self._compiled.items():
            counts[name] = counts.get(name, 0) + fn._cache_size()
        return counts

    def logprobs(self, base, lora, exp: Experience) -> tuple[jax.Array, jax.Array]:
        """Token logprobs [B, T] of `exp.tokens` under base (+ lora); see logprobs_fn."""
        return self.logprobs_fn(base, lora, exp)(base, lora, exp)

    def logprobs_fn(self, base, lora, exp: Experience):
        """Token logprobs [B, T] of `exp.tokens` under base (+ lora) at each row's temperature
        (`exp.temperatures`), in micro-batches."""
        mb = self.cfg.micro_batch_size
        if exp.batch_size % mb:
            raise ValueError(f"experience batch {exp.batch_size} is not a multiple of rl.micro_batch_size={mb}")

        def run(base, lora, exp):
            n = exp.batch_size // mb
            split = lambda x: _constrain_batch(self.mesh, x.reshape(n, mb, *x.shape[1:]), 1)
            def one(batch):
                tokens, mask, temperatures = batch
                return self._token_logprobs(base, lora, tokens, mask, temperatures, False, exp.logprob_start)[0]
            out = jax.lax.map(one, (split(exp.tokens), split(exp.attention_mask), split(exp.temperatures)))
            return out.reshape(exp.tokens.shape)

        # The jitted program itself: arguments may be abstract (the run's plan compiles it ahead of time).
        return self._jit("logprobs", run, (base, lora, exp), batch_sharding(self.mesh, 2))

    def policy_logprobs(self, policy: AgentPolicy, exp: Experience) -> jax.Array:
        return self.logprobs(*self._model_params(policy.state.params, policy.frozen), exp)

    def reference_logprobs(self, policy: AgentPolicy, exp: Experience) -> jax.Array:
        return self.logprobs(policy.reference, None, exp)

    # ---- the update ---------------------------------------------------------------------------
    def _micro_loss(self, trainable, frozen, batch: Experience, counts):
        cfg = self.cfg
        base, lora = self._model_params(trainable, frozen)
        logp, entropy = self._token_logprobs(base, lora, batch.tokens, batch.attention_mask, batch.temperatures,
                                             cfg.compute_entropy, batch.logprob_start)
        mask = batch.loss_mask
        aggregate = LOSS_AGGREGATIONS.get(cfg.loss_agg)
        token_loss, clipped = POLICY_LOSSES.get(cfg.policy_loss)(
            logp, batch.old_logprobs, batch.advantages, mask,
            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high)
        policy_loss = aggregate(token_loss, mask, counts)
        kl_ref = token_kl(logp, batch.ref_logprobs, mask, cfg.kl_estimator)
        kl_loss = aggregate(kl_ref, mask, counts) if cfg.kl_mode == "loss" else jnp.zeros(())
        loss = policy_loss + cfg.kl_coef * kl_loss
        log_ratio = jnp.where(mask, logp - batch.old_logprobs, 0.0)
        stop = jax.lax.stop_gradient
        sums = {  # summed over tokens; divided by the token count of the whole update later
            "clip_fraction": jnp.sum(clipped),
            "approx_kl_old_new": stop(jnp.sum(-log_ratio)),
            "approx_kl_old_new_k3": stop(jnp.sum(jnp.where(mask, jnp.expm1(log_ratio) - log_ratio, 0.0))),
            "ratio": stop(jnp.sum(jnp.where(mask, jnp.exp(log_ratio), 0.0))),
            "kl_ref": stop(jnp.sum(kl_ref)),
            "entropy": stop(jnp.sum(jnp.where(mask, entropy, 0.0))),
            "abs_log_ratio": stop(jnp.sum(jnp.abs(log_ratio))),
            "max_abs_log_ratio": stop(jnp.max(jnp.abs(log_ratio))),  # combined by max, not summed
        }
        return loss, (stop(policy_loss), stop(kl_loss), sums)

    def _update(self, state: TrainState, frozen, exp: Experience):
        cfg = self.cfg
        steps = exp.batch_size // cfg.train_batch_size
        micro = cfg.micro_batches_per_step
        split = lambda x: _constrain_batch(
            self.mesh, x.reshape(steps, micro, cfg.micro_batch_size, *x.shape[1:]), 2)
        batches = jax.tree.map(split, exp)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def optimizer_step(state: TrainState, batch: Experience):
            counts = step_counts(batch.loss_mask)

            def micro_step(carry, mb):
                grads, policy_loss, kl_loss, sums = carry
                (_, (pl, kl, s)), g = grad_fn(state.params, frozen, mb, counts)
                combined = {k: (jnp.maximum if k.startswith("max_") else jnp.add)(sums[k], s[k]) for k in sums}
                return (jax.tree.map(jnp.add, grads, g), policy_loss + pl, kl_loss + kl, combined), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in _TOKEN_SUMS}
            (grads, policy_loss, kl_loss, sums), _ = jax.lax.scan(
                micro_step, (zeros, jnp.zeros(()), jnp.zeros(()), zero_sums), batch)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # A step made only of padding rows leaves everything unchanged, the LR clock included.
            has_tokens = counts["tokens"] > 0
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(has_tokens, n, o), new, old)
            new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                                   state.step + has_tokens.astype(jnp.int32))
            step_metrics = {"policy_loss": policy_loss, "kl_loss": kl_loss,
                            "grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(state.step),
                            "tokens": counts["tokens"], "has_tokens": has_tokens.astype(jnp.float32), **sums}
            return new_state, step_metrics

        state, per_step = jax.lax.scan(optimizer_step, state, batches)
        real = per_step["has_tokens"]
        n_real = jnp.maximum(jnp.sum(real), 1.0)
        tokens = jnp.maximum(jnp.sum(per_step["tokens"]), 1.0)
        metrics = {k: jnp.sum(per_step[k] * real) / n_real for k in ("policy_loss", "kl_loss", "grad_norm")}
        metrics.update({k: jnp.sum(per_step[k]) / tokens for k in
                        ("clip_fraction", "approx_kl_old_new", "approx_kl_old_new_k3", "ratio", "kl_ref", "entropy")})
        # The first optimizer step runs on the parameters that sampled: its |logp - old_logprobs| is
        # the trainer/sampler gap when old_logprobs are the sampler's (the pipeline reports it then).
        metrics["first_step_logprob_gap_mean"] = per_step["abs_log_ratio"][0] / jnp.maximum(per_step["tokens"][0], 1.0)
        metrics["first_step_logprob_gap_max"] = per_step["max_abs_log_ratio"][0]
        metrics["learning_rate"] = jnp.max(jnp.where(real > 0, per_step["learning_rate"], 0.0))
        metrics["optimizer_steps"] = jnp.sum(real)
        metrics["trained_tokens"] = jnp.sum(per_step["tokens"])
        mask = exp.loss_mask
        adv_mean = jnp.sum(jnp.where(mask, exp.advantages, 0.0)) / tokens
        metrics["advantage_mean"] = adv_mean
        metrics["advantage_std"] = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(exp.advantages - adv_mean), 0.0)) / tokens)
        metrics["advantage_min"] = jnp.min(jnp.where(mask, exp.advantages, jnp.inf))
        metrics["advantage_max"] = jnp.max(jnp.where(mask, exp.advantages, -jnp.inf))
        return state, metrics

    def update_fn(self, state: TrainState, frozen, exp: Experience):
        """The jitted update `update` runs for these arguments (which may be abstract: the run's
        plan compiles it ahead of time)."""
        return self._jit("update", self._update, (state, frozen, exp),
                         (param_shardings(self.mesh, state), replicated(self.mesh)), donate=(0,))

    def _update_fn(self, policy: AgentPolicy, exp: Experience):
        return self.update_fn(policy.state, policy.frozen, exp)

    def update_memory(self, policy: AgentPolicy, exp: Experience):
        """XLA's memory analysis of the compiled update for this policy and experience shape
        (`.temp_size_in_bytes`: activations and other scratch, per device). Arrays may be abstract
        (jax.ShapeDtypeStruct), so large models can be sized without allocating them."""
        return self._update_fn(policy, exp).lower(policy.state, policy.frozen, exp).compile().memory_analysis()

    def update(self, policy: AgentPolicy, exp: Experience) -> tuple[AgentPolicy, dict[str, jax.Array]]:
        """One pass over `exp` (placed, with advantages and ref/old logprobs filled). The old train
        state is donated: use the returned policy."""
        tb = self.cfg.train_batch_size
        if exp.batch_size % tb:
            raise ValueError(f"experience batch {exp.batch_size} is not a multiple of rl.train_batch_size={tb} "
                             f"(build it with batch_multiple={tb})")
        state, metrics = self._update_fn(policy, exp)(policy.state, policy.frozen, exp)
        return dataclasses.replace(policy, state=state), metrics
