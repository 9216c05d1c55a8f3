"""The README's paper-run memory table: `mappa-compile` on each paper config for TPU v5e-8 and
v5p-8, XLA's per-device figures per program beside the memory estimator's.

    python benchmarks/compile_table.py --out docs/paper_compile_table.md --work runs/compile_table

Each (config, target) compiles in its own process (the target fixes JAX's platform at start-up) and
writes its reports as JSON under --work; the markdown is rebuilt from every JSON there, so an
interrupted run keeps what finished (rerun with --render to rebuild only). Needs the `tpu` extra.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

GiB = 1024 ** 3
CONFIGS = ("configs/mathchat_qwen3_4b.py", "configs/mathchat_r1_distill_1p5b.py", "configs/datascience_qwen3_4b.py")
# Per target, the mesh the paper configs need there: rl.micro_batch_size (4) must be a multiple of
# data x fsdp, so v5e-8's 8 chips split 4-way over fsdp and 2-way over tensor.
TARGETS = {"v5p-8": (), "v5e-8": ("--config.mesh.fsdp=4", "--config.mesh.tensor=2")}


def _name(config: str, target: str) -> str:
    return f"{pathlib.Path(config).stem}__{target}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compile_all(work: pathlib.Path, configs, targets, only: str = "") -> None:
    """Compiles each (config, target) without a report under `work`; with `only`, recompiles just the
    programs whose name contains it in every report (after a change to them) and merges them in."""
    work.mkdir(parents=True, exist_ok=True)
    for config in configs:
        for target in targets:
            out = work / f"{_name(config, target)}.json"
            if out.exists() != bool(only):
                continue
            part = out.with_suffix(".part.json") if only else out
            cmd = [sys.executable, "-m", "mappa_jax.compile", f"--config={config}", f"--target={target}",
                   *TARGETS[target], f"--json={part}"] + ([f"--only={only}"] if only else [])
            print("$", " ".join(cmd), flush=True)
            commit = _commit()  # the code that compiles this report
            start = time.perf_counter()
            log_name = f"{_name(config, target)}{'.' + only.replace(' ', '_') if only else ''}.log"
            with open(work / log_name, "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - start
            print(f"  rc {rc}, {wall:.0f} s", flush=True)
            if not part.exists():
                continue
            data = json.loads(part.read_text())
            for program in data["programs"]:
                program["commit"] = commit
            if only:
                merged = json.loads(out.read_text())
                fresh = {p["name"]: p for p in data["programs"]}
                merged["programs"] = [fresh.pop(p["name"], p) for p in merged["programs"]] + list(fresh.values())
                merged.setdefault("recompiled", []).append({"only": only, "wall_s": wall, "rc": rc})
                part.unlink()
                data = merged
            else:
                data.update(config=config, overrides=list(TARGETS[target]), wall_s=wall, rc=rc)
            out.write_text(json.dumps(data, indent=1))


def _gib(n) -> str:
    return f"{n / GiB:.1f}"


def _why(p: dict) -> str:
    """Why the estimator and XLA differ by more than 15 % on a row, from what XLA reported."""
    gib = lambda n: f"{n / GiB:.1f} GiB"
    if p["error"]:
        return f"XLA refused it (out of HBM) needing {gib(p['temporaries'])} of temporaries"
    if p["name"].startswith("decode"):
        if p["aliases"] < p["outputs"] / 2:
            return (f"XLA did not alias the donated KV cache to the output ({gib(p['outputs'])} copied); "
                    "the estimator counts one cache updated in place")
        return (f"XLA's temporaries ({gib(p['temporaries'])}) hold about one more KV cache ({gib(p['outputs'])}); "
                "the estimator counts one cache updated in place")
    if p["name"].startswith("prefill") and p["needed"] > p["estimate"]:
        gap = p["needed"] - p["estimate"]
        return (f"XLA's temporaries ({gib(p['temporaries'])}) exceed the estimator's prompt cache and one layer's "
                f"work by {gib(gap)}, about {gap / p['outputs']:.1f}x the grown KV cache the program outputs "
                f"({gib(p['outputs'])}): the cache looks built in temporaries, then copied out (not confirmed "
                "from XLA's buffer assignment yet)")
    return "not broken down yet"


def _estimates(config: str, data: dict) -> dict[str, int]:
    """The estimator's figure per program, recomputed by the current code (plan_run on the target's
    devices), so an estimator change shows without compiling again."""
    import os
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from mappa_jax.compile import target_devices
    from mappa_jax.config import config_from_file
    from mappa_jax.plan import plan_run
    cfg = config_from_file(config)
    for flag in data.get("overrides", TARGETS.get(data["target"], ())):
        key, value = flag.removeprefix("--config.").split("=")
        section, name = key.split(".")
        cfg[section][name] = type(cfg[section][name])(value)
    return {p.name: p.estimate for p in plan_run(cfg, target_devices(data["target"])).programs}


def render(work: pathlib.Path) -> str:
    rows = ["| config | target (mesh) | program | XLA: args / temp / out - alias | XLA per device, with resident state "
            "| estimator | est. vs XLA | fits | compile s | commit | note |", "|" + "---|" * 11]
    walls, missing = [], []
    for path in sorted(work.glob("*.json")):
        if path.name.endswith(".part.json"):  # a recompile that did not finish
            continue
        data = json.loads(path.read_text())
        config = path.stem.split("__")[0]
        mesh = "x".join(str(data["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        target = f"{data['target']} (data x fsdp x tensor = {mesh})"
        memory = data.get("device_memory") or 0
        done = {p["name"] for p in data["programs"]}
        left = [n for n in data.get("planned", []) if n not in done]
        if "wall_s" in data:
            walls.append(f"{config} on {data['target']}: {data['wall_s']:.0f} s")
        if left:
            missing.append(f"{config} on {data['target']}: {', '.join(left)}")
        estimates = _estimates(f"configs/{config}.py", data)
        for p in data["programs"]:
            p["estimate"] = estimates[p["name"]]
            if p["error"] and not p["temporaries"] and p["needed"]:  # an older report: needed held the temporaries
                p["temporaries"], p["needed"] = p["needed"], p["needed"] + data["resident"]
            diff = (p["estimate"] - p["needed"]) / p["needed"] if p["needed"] else 0.0
            note = "" if abs(diff) <= 0.15 else _why(p)
            xla = f"refused: temp {_gib(p['temporaries'])}" if p["error"] else \
                f"{_gib(p['arguments'])} / {_gib(p['temporaries'])} / {_gib(p['outputs'])} - {_gib(p['aliases'])}"
            needed = (">= " if p["error"] else "") + _gib(p["needed"]) if p["needed"] else "-"
            fits = {True: "yes", False: "**no**", None: "?"}[p["fits"]]
            rows.append(f"| {config} | {target} | {p['name']} | {xla} | "
                        f"{needed} | {_gib(p['estimate'])} | "
                        f"{diff:+.0%} | {fits} ({_gib(memory)}) | {p['compile_s']:.0f} | {p.get('commit', '-')} | {note} |")
    header = ("GiB per device. XLA's figures are `compiled.memory_analysis()` of each program compiled by "
              "`mappa-compile` for the target (libtpu's topology description, on a CPU-only machine); "
              "\"with resident state\" adds the run's other resident state (every policy's weights, optimizer "
              "state and reference) that the program does not take as arguments. The estimator is "
              "`mappa_jax/parallel/memory_check.py` (resident + that program's term). \"commit\" is the code that "
              "compiled the row (`--only` recompiles some programs after a change; the others keep theirs). Whole-run compile "
              "wall times on 2 shared CPU cores (each program's own time is in its row): "
              + ("; ".join(walls) or "none finished") + ".")
    started = {path.stem for path in work.glob("*.json") if not path.name.endswith(".part.json")}
    missing += [f"{pathlib.Path(c).stem} on {t}: all programs" for c in CONFIGS for t in TARGETS
                if _name(c, t) not in started]
    footer = ("\n\nNot compiled yet (the compiles ran out of time): " + "; ".join(missing) + ".\n") if missing else ""
    return header + "\n\n" + "\n".join(rows) + "\n" + footer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/paper_compile_table.md")
    parser.add_argument("--work", default="runs/compile_table")
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from --work")
    parser.add_argument("--only", default="", help="recompile only the programs whose name contains this "
                        "in every existing report, and merge them in (after a change to those programs)")
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--targets", nargs="*", default=tuple(TARGETS))
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    if not args.render:
        compile_all(work, args.configs, args.targets, args.only)
    pathlib.Path(args.out).write_text(render(work))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
