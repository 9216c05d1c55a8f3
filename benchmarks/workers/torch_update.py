"""Worker: the same update step in PyTorch (transformers' model, torch AdamW, the same loss, tokens
and micro-batches as mappa_update; benchmarks/update.py defines both)."""
from __future__ import annotations

import common


def prepare(workload: dict, system: str) -> common.Prepared:
    torch = common.require("torch", "pip install torch==2.13.0 (the CPU wheel)")
    common.require("transformers", "pip install transformers")
    import update  # imports jax for the shared definitions; JAX's runtime never starts in this process
    torch.set_num_threads(common.cores())
    cfg = update.model_config(workload["preset"])
    batch, seq = workload["batch"], workload["seq"]
    step = update.torch_update_step(cfg, update.rl_config(batch, workload["micro"]),
                                    update.synthetic_samples(cfg, batch, seq))
    return common.Prepared(lambda seed: step(), batch * seq,
                           {"params": cfg.num_params(), "train_flops": update.train_flops(cfg, batch, seq),
                            "threads": torch.get_num_threads()})


if __name__ == "__main__":
    common.run(prepare)
