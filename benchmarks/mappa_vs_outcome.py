"""MAPPA's central claim in miniature: per-action coach rewards against an outcome-only reward.

    python benchmarks/mappa_vs_outcome.py [--config configs/demo.py] [--seeds 0 1] [--steps 5]
        [--eval-every 3] [--root runs/mappa_vs_outcome] [--set train.tasks_per_step=4 ...]

Two arms train the same system (the config's topology, model, tasks, steps, rollouts per step and
seed) and differ only in the reward each action trains on:
  mappa    reward.process_weight=1, outcome_weight=0: the coach's score of that action (0-1)
  outcome  reward.process_weight=0, outcome_weight=1: every action of an episode gets the
           episode's outcome, 1.0 when math-verify finds the Verifier's boxed answer correct, else
           0.0 (the authors' outcome-only baseline). The coach still scores every action, for the
           per-agent reward curves only.
Each (arm, seed) is one `mappa-train` process in its own workdir <root>/<arm>_seed<seed>, so the
arms share no compiled programs, caches or state; seed s fixes the task order, the LoRA init and
the sampling of both arms, so their first rollouts are identical. A run that stopped resumes from
its workdir's latest checkpoint when the command is run again; finished runs are skipped. At the
end the command writes <root>/mappa_vs_outcome.png (held-out accuracy and held-out coach reward per
agent against the step, every seed drawn, the arm's mean bold) and <root>/mappa_vs_outcome.md (one
row per run and the arms' means, with wall times).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ARMS = {
    "mappa": {"reward.process_weight": 1.0, "reward.outcome_weight": 0.0},
    "outcome": {"reward.process_weight": 0.0, "reward.outcome_weight": 1.0},
}
RUN_RECORD = "benchmark_run.json"  # per workdir: the arm, seed, command and wall seconds so far
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_dir(root: pathlib.Path, arm: str, seed: int) -> pathlib.Path:
    return root / f"{arm}_seed{seed}"


def train_command(config: str, workdir: pathlib.Path, arm: str, seed: int, steps: int, eval_every: int,
                  extra: list[str]) -> list[str]:
    """The mappa-train command line of one (arm, seed) run."""
    overrides = {"workdir": str(workdir), "seed": seed, "train.steps": steps, "train.eval_every": eval_every,
                 "train.checkpoint_every": eval_every or steps, "train.export_hf": False, **ARMS[arm]}
    return ([sys.executable, "-m", "mappa_jax.train", f"--config={config}"]
            + [f"--config.{key}={value}" for key, value in overrides.items()]
            + [f"--config.{item}" for item in extra])


def _read_record(workdir: pathlib.Path) -> dict:
    path = workdir / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def finished(workdir: pathlib.Path, steps: int) -> bool:
    summary = workdir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("steps") == steps


def run_one(command: list[str], workdir: pathlib.Path, arm: str, seed: int, steps: int) -> dict:
    """Runs (or resumes) one arm/seed in its own process, logging to <workdir>/train.log; the wall
    time adds up over resumptions."""
    workdir.mkdir(parents=True, exist_ok=True)
    record = _read_record(workdir) or {"arm": arm, "seed": seed, "wall_s": 0.0, "attempts": 0}
    record.update(command=command[1:], steps=steps)
    start = time.perf_counter()
    with (workdir / "train.log").open("a") as log:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
    record["wall_s"] += time.perf_counter() - start
    record["attempts"] += 1
    record["returncode"] = process.returncode
    (workdir / RUN_RECORD).write_text(json.dumps(record, indent=2))
    if process.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {process.returncode}); see {workdir / 'train.log'}; "
                         "run the command again to resume it from its last checkpoint")
    return record


def _curves(workdir: pathlib.Path) -> list[dict]:
    from mappa_jax.metrics import read_jsonl
    return [row for row in read_jsonl(workdir / "metrics.jsonl") if "eval/accuracy" in row]


def collect(root: pathlib.Path, seeds: list[int]) -> dict[str, dict[int, dict]]:
    """arm -> seed -> {"evals": eval rows by step, "wall_s": seconds} for the runs that have metrics."""
    out: dict[str, dict[int, dict]] = {}
    for arm in ARMS:
        for seed in seeds:
            workdir = run_dir(root, arm, seed)
            if (workdir / "metrics.jsonl").exists():
                out.setdefault(arm, {})[seed] = {"evals": _curves(workdir),
                                                 "wall_s": _read_record(workdir).get("wall_s", float("nan"))}
    return out


def agent_names(results: dict) -> list[str]:
    return sorted({key.rsplit("/", 1)[1] for runs in results.values() for run in runs.values()
                   for row in run["evals"] for key in row if key.startswith("eval/reward/agent/")})


def plot(results: dict, out: pathlib.Path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ["eval/accuracy"] + [f"eval/reward/agent/{a}" for a in agent_names(results)]
    titles = ["held-out accuracy (greedy)"] + [f"held-out coach reward: {a}" for a in agent_names(results)]
    colors = {"mappa": "tab:blue", "outcome": "tab:orange"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key, title in zip(axes[0], keys, titles):
        for arm, runs in results.items():
            curves = []
            for seed, run in sorted(runs.items()):
                points = [(row["step"], row[key]) for row in run["evals"] if key in row]
                if points:
                    ax.plot(*zip(*points), color=colors[arm], alpha=0.35, lw=1, marker="o", ms=3)
                    curves.append(dict(points))
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                mean = [np.mean([c[s] for c in curves]) for s in steps]
                ax.plot(steps, mean, color=colors[arm], lw=2.5, label=f"{arm} (mean of {len(curves)} seeds)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table(results: dict, command: str) -> str:
    import numpy as np
    agents = agent_names(results)
    head = ["arm", "seed", "accuracy before", "accuracy after"] + [f"{a} reward after" for a in agents] + ["wall"]
    lines = [f"`{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = []
    for arm, runs in results.items():
        rows = []
        for seed, run in sorted(runs.items()):
            if not run["evals"]:
                continue
            first, last = run["evals"][0], run["evals"][-1]
            values = [first["eval/accuracy"], last["eval/accuracy"]] + [
                last.get(f"eval/reward/agent/{a}", float("nan")) for a in agents]
            rows.append(values + [run["wall_s"]])
            lines.append(f"| {arm} | {seed} | " + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {_minutes(run['wall_s'])} |")
        if rows:
            mean = np.nanmean(np.array(rows, dtype=float), axis=0)
            means.append(f"| **{arm}** | mean of {len(rows)} | " + " | ".join(f"{v:.3f}" for v in mean[:-1])
                         + f" | {_minutes(float(np.nansum(np.array(rows, dtype=float)[:, -1])))} total |")
    return "\n".join(lines + means) + "\n"


def _minutes(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.py", help="experiment config both arms train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=3, help="held-out eval (and checkpoint) interval")
    parser.add_argument("--root", default="runs/mappa_vs_outcome", help="one workdir per arm and seed in here")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for both arms, e.g. --set train.tasks_per_step=4")
    parser.add_argument("--report-only", action="store_true", help="only redraw the figure and table")
    args = parser.parse_args(argv)
    if len(args.seeds) != len(set(args.seeds)):
        parser.error(f"--seeds has duplicates: {args.seeds}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = pathlib.Path(args.root).resolve()
    config = str(pathlib.Path(args.config).resolve())
    if not args.report_only:
        for seed in args.seeds:  # seed-major: an interrupted benchmark has both arms of the first seeds
            for arm in args.arms:
                workdir = run_dir(root, arm, seed)
                if finished(workdir, args.steps):
                    print(f"{arm} seed {seed}: done already ({workdir})", flush=True)
                    continue
                print(f"{arm} seed {seed}: training in {workdir} (log: {workdir / 'train.log'})", flush=True)
                record = run_one(train_command(config, workdir, arm, seed, args.steps, args.eval_every, args.set),
                                 workdir, arm, seed, args.steps)
                print(f"{arm} seed {seed}: finished in {_minutes(record['wall_s'])}", flush=True)
    results = collect(root, args.seeds)
    if not results:
        raise SystemExit(f"no runs with metrics under {root}")
    command = "python benchmarks/mappa_vs_outcome.py " + " ".join(argv if argv is not None else sys.argv[1:])
    figure = plot(results, root / "mappa_vs_outcome.png")
    (root / "mappa_vs_outcome.md").write_text(table(results, command.strip()))
    print(f"figure: {figure}\ntable: {root / 'mappa_vs_outcome.md'}\n")
    print((root / "mappa_vs_outcome.md").read_text())
    return results


if __name__ == "__main__":
    main()
