"""AdamW with global-norm clipping, linear warm-up and cosine decay to a floor, in optimizer steps."""
from __future__ import annotations

import math

import optax

from mappa_jax.rl.config import RLConfig


def learning_rate_schedule(cfg: RLConfig) -> optax.Schedule:
    """0 -> lr over ceil(warmup_ratio * total) steps, then cosine to min_lr_ratio * lr at `total`."""
    total = cfg.total_optimizer_steps
    warmup = math.ceil(cfg.warmup_ratio * total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8,
                    weight_decay=cfg.weight_decay))
