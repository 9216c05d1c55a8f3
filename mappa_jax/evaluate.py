"""mappa-eval: held-out evaluation of a run's latest checkpoint (or of the untrained agents).

    mappa-eval --config configs/demo.py [--config.train.eval_samples=4]

Builds the same agents as mappa-train (restoring <workdir>/checkpoints when present), runs every
eval task through the topology at the eval temperature, grades the final answers rule-based
(math-verify; data-science submissions against hidden answers, failures counted), asks the coach
for per-agent rewards, prints them and writes <workdir>/eval_step<N>.json.
"""
from __future__ import annotations

import json

from absl import app


def main(argv) -> None:
    del argv
    from mappa_jax.cli import CONFIG
    from mappa_jax.train import Trainer, _summary
    trainer = Trainer(CONFIG.value)
    try:
        metrics = trainer.evaluate()
        print(f"step {trainer.step}: " + _summary(metrics))
        out = trainer.workdir / f"eval_step{trainer.step}.json"
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"wrote {out}")
    finally:
        trainer.close()


def run() -> None:
    from mappa_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
