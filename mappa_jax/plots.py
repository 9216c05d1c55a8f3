"""Learning curves as PNG from metrics.jsonl: `python -m mappa_jax.plots WORKDIR` (or mappa-plot)."""
from __future__ import annotations

import pathlib
import sys

from mappa_jax.metrics import read_jsonl

# Panel title -> metric-name prefixes it gathers (each matching key is one line).
PANELS = {
    "coach reward per agent (training rollouts, 0-1)": ("reward/agent/",),
    "held-out: accuracy and coach reward per agent": ("eval/accuracy", "eval/reward/agent/"),
    "coach reward per task type": ("reward/task_type/",),
    "response length per agent (tokens)": ("length/agent/",),
    "tool use, truncation, fallbacks (fraction of actions)": ("behaviour/",),
    "time per step (s)": ("time/",),
}


def plot_curves(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    rows = read_jsonl(workdir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{workdir / 'metrics.jsonl'} has no rows to plot")
    panels = {title: sorted({k for r in rows for k in r if k.startswith(prefixes)})
              for title, prefixes in PANELS.items()}
    panels = {t: keys for t, keys in panels.items() if keys}
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), marker="o", markersize=3, label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = pathlib.Path(out) if out else workdir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run():
    if len(sys.argv) != 2:
        sys.exit("usage: mappa-plot WORKDIR   (writes WORKDIR/curves.png from WORKDIR/metrics.jsonl)")
    print(plot_curves(sys.argv[1]))


if __name__ == "__main__":
    run()
