"""Worker: mappa_jax's compiled policy update (benchmarks/update.py's workload: REINFORCE++ with the
PPO-clipped token-mean loss, AdamW, grad clipping; B sequences x T tokens, one optimizer step)."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402


def prepare(workload: dict, system: str) -> common.Prepared:
    import update
    cfg = update.model_config(workload["preset"])
    batch, seq = workload["batch"], workload["seq"]
    step = update.jax_update_step(cfg, update.rl_config(batch, workload["micro"]),
                                  update.synthetic_samples(cfg, batch, seq), seq)
    return common.Prepared(lambda seed: step(), batch * seq,
                           {"params": cfg.num_params(), "train_flops": update.train_flops(cfg, batch, seq)})


if __name__ == "__main__":
    common.run(prepare)
