"""Side-by-side speed: mappa_jax against what a user would pick instead, each system in its own process.

For every workload, every system runs in a fresh worker process (benchmarks/workers/), the processes
alternating round-robin (the order rotates each round and workload, so no system always runs first
or right after another). Each worker builds its system, warms up (compilation included, timed apart),
then times `--repeats` full calls and prints one JSON line. The parent records the 1-minute load
average before and after each process, measures this machine's ceilings (memory bandwidth, float32
matmul peak) in a process of its own, and writes a markdown report with medians, min-max spread,
ratios to mappa_jax and the decode fraction of the memory roofline, plus the raw results as JSON.

    python benchmarks/compare.py                      # everything; writes docs/benchmarks.md (+ .json)
    python benchmarks/compare.py --quick --out smoke.md   # smoke sizes: checks the machinery only
    python benchmarks/compare.py --systems mappa_sampler llama_cpp_f32 --workloads sample_b32
    python benchmarks/compare.py --workloads update_small update_smollm2 --merge   # re-measure these,
                                                      # keep the other sections (each says its commit)

A system that cannot run here (package missing, build failed) is reported with its reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import numpy as np

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
WORKERS = BENCHMARKS / "workers"
RESULT_PREFIX = "BENCH_RESULT "  # benchmarks/workers/common.py prints it


@dataclasses.dataclass(frozen=True)
class System:
    worker: str        # file in benchmarks/workers/, or a path
    kinds: tuple       # the workload kinds it runs: "sample", "sample_eos", "update"
    label: str


SYSTEMS = {
    "mappa_sampler": System("mappa_sampler.py", ("sample", "sample_eos", "second_turn"), "mappa_jax Sampler"),
    "mappa_sampler_reprefill": System("mappa_sampler.py", ("second_turn",),
                                      "mappa_jax Sampler, second turn prefilled in full (reuse_context off)"),
    "mappa_sampler_whole_batch": System("mappa_sampler.py", ("sample_eos",),
                                        "mappa_jax Sampler, every row to the end (compact_rows=False)"),
    "hf_generate": System("hf_generate.py", ("sample",), "transformers generate (eager)"),
    "hf_generate_compiled": System("hf_generate.py", ("sample",), "transformers generate (static cache + torch.compile)"),
    "llama_cpp_f32": System("llamacpp.py", ("sample",), "llama.cpp (llama-cpp-python), F32 GGUF"),
    "llama_cpp_q4_1": System("llamacpp.py", ("sample",), "llama.cpp (llama-cpp-python), the Q4_1 GGUF as shipped"),
    "tunix_sampler": System("tunix_sampler.py", ("sample",), "Tunix sampler"),
    "mappa_update": System("mappa_update.py", ("update",), "mappa_jax policy update"),
    "torch_update": System("torch_update.py", ("update",), "PyTorch step (transformers + torch AdamW)"),
}
OURS = {"sample": "mappa_sampler", "sample_eos": "mappa_sampler", "second_turn": "mappa_sampler",
        "update": "mappa_update"}
NOT_ROOFLINE = {"llama_cpp_q4_1": "Q4_1 weights: reads ~1/6 of the float32 bytes"}


def workloads(quick: bool) -> list[dict]:
    """The sampler workload of benchmarks/sampler.py (SmolLM2-135M-Instruct, float32, ~100-token chat
    prompts, temperature 1, EOS masked so every row decodes new_tokens steps) and the update workload
    of benchmarks/update.py (one optimizer step over B x T tokens, micro-batches of 4). sample_eos:
    the same prompts with EOS ending a row, as in training, where rows stop at different steps: our
    sampler with and without dropping stopped rows (same seeds, so the same tokens). second_turn: an
    agent's turn after a tool output, from the first turn's kept KV cache or prefilled in full."""
    if quick:
        return [dict(name="sample_b2", kind="sample", batch=2, prompt_tokens=100, new_tokens=8),
                dict(name="sample_b3_eos", kind="sample_eos", batch=3, prompt_tokens=0, new_tokens=64),
                dict(name="second_turn_b2", kind="second_turn", batch=2, prompt_tokens=100, new_tokens=8),
                dict(name="update_tiny", kind="update", preset="tiny", batch=2, micro=2, seq=32)]
    # 128 new tokens (not 256) keeps the whole comparison near an hour on a 2-core machine.
    return [dict(name="sample_b8", kind="sample", batch=8, prompt_tokens=100, new_tokens=128),
            dict(name="sample_b32", kind="sample", batch=32, prompt_tokens=100, new_tokens=128),
            dict(name="sample_b32_eos", kind="sample_eos", batch=32, prompt_tokens=0, new_tokens=256),
            dict(name="second_turn_b16", kind="second_turn", batch=16, prompt_tokens=100, new_tokens=128),
            dict(name="update_small", kind="update", preset="small", batch=8, micro=4, seq=256),
            dict(name="update_smollm2", kind="update", preset="smollm2", batch=8, micro=4, seq=256)]


def roofline_workload(quick: bool) -> dict:
    return dict(name="roofline", kind="roofline", copy_mb=64 if quick else 2048, matmul_n=256 if quick else 4096,
                repeats=2 if quick else 5)


def worker_path(system: System) -> pathlib.Path:
    path = pathlib.Path(system.worker)
    return path if path.is_absolute() else WORKERS / path


def run_worker(name: str, system: System, workload: dict, warmup: int, repeats: int, timeout: float) -> dict:
    """One fresh process: the worker's JSON line, plus the load average around it."""
    # a worker still running shortly before the timeout prints its Python stack and exits (see
    # common.run), so the report says where it hung
    dump_after = timeout - min(30.0, timeout * 0.1)
    spec = json.dumps(dict(system=name, workload=workload, warmup=warmup, repeats=repeats,
                           dump_stack_after_s=dump_after))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(worker_path(system)), "--spec", spec], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if lines:
            result = json.loads(lines[-1][len(RESULT_PREFIX):])
        elif "Timeout (" in proc.stderr:  # faulthandler's stack dump: the worker hung
            stack = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("File ")]
            result = dict(system=name, workload=workload["name"], ok=False,
                          reason=f"worker hung (no result after {dump_after:.0f} s) in: {' <- '.join(stack[:3])}")
        else:
            tail = (proc.stderr.strip() or proc.stdout.strip())[-400:]
            result = dict(system=name, workload=workload["name"], ok=False,
                          reason=f"worker exited {proc.returncode} without a result: {tail}")
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        result = dict(system=name, workload=workload["name"], ok=False,
                      reason=f"worker ran past {timeout:.0f} s: {stderr.strip()[-300:]}")
    result.update(load_before=load_before, load_after=os.getloadavg()[0], wall_s=time.perf_counter() - start)
    return result


def schedule(names: list[str], loads: list[dict], rounds: int) -> list[tuple[dict, str]]:
    """(workload, system) launches: per round and workload every system once, the order rotated by
    one each round and workload."""
    order = []
    for r in range(rounds):
        for w, workload in enumerate(loads):
            group = [n for n in names if workload["kind"] in SYSTEMS[n].kinds]
            if group:
                shift = (r + w) % len(group)
                order += [(workload, n) for n in group[shift:] + group[:shift]]
    return order


def summarize(runs: list[dict]) -> dict:
    """Median and spread of one system's rate (units per second) over all its timed repeats."""
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return dict(ok=False, reason=runs[0]["reason"] if runs else "not run")
    rates = np.array([u / s for r in ok for u, s in zip(r.get("units", [r["units_per_call"]] * len(r["seconds"])),
                                                         r["seconds"])])
    seconds = np.array([s for r in ok for s in r["seconds"]])
    return dict(ok=True, median=float(np.median(rates)), min=float(rates.min()), max=float(rates.max()),
                seconds_median=float(np.median(seconds)), repeats=int(rates.size), processes=len(ok),
                units_per_call=ok[0]["units_per_call"],
                pids=[r["pid"] for r in ok], failed=[r["reason"] for r in runs if not r["ok"]],
                warmup_s=[round(w, 1) for r in ok for w in r["warmup_s"]],
                loads=[(round(r["load_before"], 2), round(r["load_after"], 2)) for r in ok], info=ok[0]["info"])


def versions() -> dict:
    names = ["mappa_jax", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "accelerate",
             "tokenizers", "safetensors", "gguf", "google-tunix", "qwix", "llama_cpp_python"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO)
    return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), python=platform.python_version(),
                commit=(commit.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else ""))


def previous_sections(raw: dict, md_text: str) -> dict:
    """{workload name: provenance} of an earlier report's sections (its raw JSON, and its markdown
    for the commit and machine of reports written before sections recorded them)."""
    if "sections" in raw:
        return raw["sections"]
    match = re.search(r"; commit ([^.]+)\.", md_text)
    commit = match.group(1) if match else "unknown"
    match = re.search(r"^Machine: (.+?), Python", md_text, re.M)
    return {r["workload"]: dict(commit=commit, started=raw["started"], command=raw["command"],
                                ceilings=raw["ceilings"], machine=match.group(1) if match else "not recorded")
            for r in raw["runs"]}


def decode_roofline(workload: dict, summary: dict, ceilings: dict) -> tuple[float, str] | None:
    """(tokens/s, the binding limit) if every decode step took only the longer of reading the float32
    weights once plus the live KV cache (mean context: prompt + half the generation) at the best
    measured copy bandwidth, and its FLOPs (every weight one multiply-add per row, plus attention
    over the context) at the best measured float32 matmul rate."""
    if not ceilings or "prompt_tokens_mean" not in summary.get("info", {}):
        return None
    bandwidth = max(ceilings["bandwidth_gbs"], ceilings["bandwidth_1thread_gbs"]) * 1e9
    peak = max(ceilings["numpy_matmul_gflops"], ceilings["jax_matmul_gflops"]) * 1e9
    batch, context = workload["batch"], summary["info"]["prompt_tokens_mean"] + workload["new_tokens"] / 2
    memory_s = (ceilings["param_bytes_f32"] + batch * context * ceilings["kv_bytes_per_token_f32"]) / bandwidth
    compute_s = batch * (ceilings.get("matmul_flops_per_token", 0)
                         + context * ceilings.get("attention_flops_per_token_per_slot", 0)) / peak
    return batch / max(memory_s, compute_s), ("memory" if memory_s >= compute_s else "compute")


def _ratio(ours: dict, theirs: dict) -> str:
    if not (ours.get("ok") and theirs.get("ok")):
        return "-"
    return (f"{ours['median'] / theirs['median']:.2f}x "
            f"({ours['min'] / theirs['max']:.2f}-{ours['max'] / theirs['min']:.2f})")


def _greedy(ours: dict, theirs: dict) -> str:
    a, b = ours.get("info", {}).get("greedy_tokens"), theirs.get("info", {}).get("greedy_tokens")
    if a is None or b is None:
        return "-"
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{same}/{n} same"


def _loads(summary: dict) -> str:
    return ", ".join(f"{a:.1f}->{b:.1f}" for a, b in summary["loads"])


def _table(header: list[str], rows: dict, cells) -> list[str]:
    """One markdown row per system: `cells(name, summary)`, or the reason it did not run."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n, s in rows.items():
        body = cells(n, s) if s["ok"] else [f"not run: {s['reason']}"] + [""] * (len(header) - 2)
        out.append("| " + " | ".join([SYSTEMS[n].label] + body) + " |")
    return out


def report(args, command: str, host: dict, loads: list[dict], summaries: dict, ceilings: dict, ceiling_run: dict,
           order: list[dict], started: datetime.datetime, elapsed: float, sections: dict | None = None) -> str:
    """host: `machine()`. sections: {workload name: provenance} of sections kept from an earlier run
    (--merge); they are reported with that run's commit, date and machine ceilings."""
    sections = sections or {}
    lines = ["# Benchmarks", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`): tiny sizes that check the machinery, not a measurement.**", ""]
    lines += [f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} min; "
              f"commit {host['commit']}.", "",
              f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}. "
              f"Every system gets all cores (torch.set_num_threads, llama.cpp n_threads, XLA's default).", "",
              f"Method: each (workload, system) runs in a fresh process; the processes alternate round-robin "
              f"({args.rounds} round(s), the order rotating every round and workload); each process warms up "
              f"({args.warmup} call(s), compilation included) and then times {args.repeats} full calls. Figures are "
              f"the median over all timed calls of all rounds, with min-max in brackets; 'load' is the 1-minute "
              f"load average before -> after each process. Ratios are mappa_jax's median over the peer's (in "
              f"brackets: ours' slowest over theirs' fastest, ours' fastest over theirs' slowest).", ""]
    if sections:
        kept = sorted({(p["commit"], p["started"][:16].replace("T", " "), p.get("machine", "not recorded"))
                       for p in sections.values()})
        lines += ["Sections kept from earlier runs (`--merge`), each measured as it says: "
                  + "; ".join(f"commit {c} on {d} UTC, machine {m}" for c, d, m in kept)
                  + ". Compare figures within one section only.", ""]
    lines += ["## Machine ceilings", ""]
    if ceilings:
        lines += ["| memory bandwidth, copy, all cores | one thread | float32 matmul, NumPy | float32 matmul, jax.jit | load |",
                  "|---|---|---|---|---|",
                  f"| {ceilings['bandwidth_gbs']:.1f} GB/s | {ceilings['bandwidth_1thread_gbs']:.1f} GB/s | "
                  f"{ceilings['numpy_matmul_gflops']:.1f} GFLOP/s | {ceilings['jax_matmul_gflops']:.1f} GFLOP/s | "
                  f"{ceiling_run['load_before']:.1f}->{ceiling_run['load_after']:.1f} |", "",
                  f"Bandwidth: read + write bytes of a {ceilings['copy_mb']} MB NumPy copy split over one thread per "
                  f"core (and over one thread), best of {roofline_workload(args.quick)['repeats']}; matmul: "
                  f"{ceilings['matmul_n']}x{ceilings['matmul_n']} float32, best of the same. The decode roofline uses "
                  f"the higher of the two bandwidths.", ""]
    else:
        lines += [f"Not measured: {ceiling_run.get('reason', 'skipped')}", ""]
    for workload in loads:
        kind, name = workload["kind"], workload["name"]
        rows = {n: s for (w, n), s in summaries.items() if w == name}
        if not rows:
            continue
        ours = rows.get(OURS[kind], {})
        kept = sections.get(name)
        section_ceilings = ceilings
        if kept:  # the run that measured this section, with its own ceilings
            section_ceilings = kept["ceilings"]["info"] if kept["ceilings"].get("ok") else {}
        if kind == "sample":
            lines += [f"## Sampler, batch {workload['batch']}: ~{workload['prompt_tokens']}-token chat prompts, "
                      f"{workload['new_tokens']} new tokens", "",
                      "SmolLM2-135M-Instruct, weights dequantized from the project's GGUF to float32 (llama.cpp "
                      "F32: the same tensors written back as an F32 GGUF), temperature 1, no top-k/top-p, EOS masked "
                      "(or ignored) so every row decodes every step. Tokens/s = generated tokens / wall time of the "
                      "generate call (prefill included). 'greedy' compares the first greedy tokens of prompt 0 with "
                      "mappa_jax's (a correctness check of each peer's setup).", ""]
            roofline, bound = decode_roofline(workload, ours if ours.get("ok") else next(
                (s for s in rows.values() if s.get("ok")), {}), section_ceilings) or (None, None)
            def sample_cells(n, s):
                fraction = NOT_ROOFLINE.get(n) or (f"{s['median'] / roofline:.0%}" if roofline else "-")
                return [f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{s['repeats']} ({s['processes']})",
                        "-" if n == OURS[kind] else _ratio(ours, s), fraction,
                        "-" if n == OURS[kind] else _greedy(ours, s), ", ".join(map(str, s["warmup_s"])), _loads(s),
                        s["info"].get("settings", "")]
            lines += _table(["system", "tokens/s", "timed calls (processes)", "mappa_jax / system",
                             "% of decode roofline", "greedy", "warm-up s", "load", "settings"], rows, sample_cells)
            if roofline:
                lines += ["", f"Decode roofline: {roofline:.1f} tokens/s, bound by {bound}: the longer of reading the "
                              f"float32 weights ({section_ceilings['param_bytes_f32'] / 1e6:.0f} MB) and the KV cache at the "
                              f"mean context once per step at the measured bandwidth, and the step's FLOPs (2 per "
                              f"weight per row, plus attention) at the measured matmul peak. The measured rate "
                              f"includes prefill, so its fraction is a lower bound."]
                alone = ours.get("info", {}).get("decode_tokens_per_s") if ours.get("ok") else None
                if alone:
                    lines += ["", f"mappa_jax's decode loop alone (prefill excluded, the timed calls): "
                                  f"{np.median(alone):.1f} tokens/s ({min(alone):.1f}-{max(alone):.1f}), "
                                  f"{np.median(alone) / roofline:.0%} of the decode roofline."]
        elif kind == "sample_eos":
            lines += [f"## Sampler, batch {workload['batch']}, rows stopping at EOS: up to {workload['new_tokens']} "
                      "new tokens", "",
                      "SmolLM2-135M-Instruct as above, temperature 1, EOS ending a row, as in training; the chat "
                      "requests (benchmarks/sampler.py REQUESTS) ask for a yes/no, a name, three bullet points or a "
                      "step-by-step explanation, so rows stop at very different steps. Both runs use the same seeds and so "
                      "produce the same tokens; one drops the rows that stopped whenever the rest fit a smaller batch "
                      "bucket (powers of two), the other decodes every row until the last one stops. Tokens/s = "
                      "generated tokens (up to each row's EOS) / wall time; row-steps = rows x decode steps computed "
                      "in the last timed call.", ""]
            def eos_cells(n, s):
                return [f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{s['repeats']} ({s['processes']})",
                        "-" if n == OURS[kind] else _ratio(ours, s), str(s["info"].get("row_steps", "-")),
                        str(s["info"].get("generated_tokens", "-")), ", ".join(map(str, s["warmup_s"])), _loads(s)]
            lines += _table(["system", "tokens/s", "timed calls (processes)", "mappa_jax / system", "row-steps",
                             "tokens", "warm-up s", "load"], rows, eos_cells)
        elif kind == "second_turn":
            lines += [f"## Sampler, an agent's second turn, batch {workload['batch']}: {workload['new_tokens']} new "
                      "tokens after the first turn and a tool output", "",
                      f"SmolLM2-135M-Instruct as above. An untimed first turn samples {workload['new_tokens']} tokens "
                      f"after each ~{workload['prompt_tokens']}-token chat prompt; the timed second turn's prompt is "
                      "that prompt, the generated tokens and a ~150-token tool output, as the episode runner builds "
                      "it (the Code Executor's turn after its code ran), and samples as many again (EOS masked). "
                      "The mappa_jax Sampler row starts from the first turn's KV cache (sampler.reuse_context) and "
                      "prefills only the new tokens; the other prefills the whole prompt. Tokens/s = second-turn tokens / wall time of that call.", ""]
            def turn_cells(n, s):
                info = s["info"]
                return [f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", f"{s['repeats']} ({s['processes']})",
                        "-" if n == OURS[kind] else _ratio(ours, s),
                        f"{info.get('prefilled_tokens', '-')} of {info.get('prompt_tokens', '-')}",
                        ", ".join(map(str, s["warmup_s"])), _loads(s)]
            lines += _table(["system", "tokens/s", "timed calls (processes)", "mappa_jax / system",
                             "prompt tokens prefilled", "warm-up s", "load"], rows, turn_cells)
        else:
            lines += [f"## Update: preset {workload['preset']}, {workload['batch']} x {workload['seq']} tokens, "
                      f"micro-batches of {workload['micro']}", "",
                      "One optimizer step (PPO-clipped token-mean loss, AdamW, grad clipping) over the same "
                      "synthetic tokens (benchmarks/update.py). MFU: the model FLOPs (6 x matmul params x tokens "
                      "+ attention) over the jax.jit matmul peak above.", ""]
            def update_cells(n, s):
                units = s["units_per_call"]
                mfu = (f"{s['info']['train_flops'] * s['median'] / units / (section_ceilings['jax_matmul_gflops'] * 1e9):.0%}"
                       if section_ceilings and "train_flops" in s["info"] else "-")
                return [f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})", f"{s['median'] / units:.3f}",
                        f"{s['repeats']} ({s['processes']})", "-" if n == OURS[kind] else _ratio(ours, s), mfu,
                        ", ".join(map(str, s["warmup_s"])), _loads(s)]
            lines += _table(["system", "tokens/s", "steps/s", "timed steps (processes)", "mappa_jax / system", "MFU",
                             "warm-up s", "load"], rows, update_cells)
        if kept:
            line = (f"Kept from `{kept['command']}` at commit {kept['commit']} ({kept['started'][:16].replace('T', ' ')} "
                    f"UTC, machine {kept.get('machine', 'not recorded')})")
            if section_ceilings:
                line += (f", with that run's ceilings ({section_ceilings['bandwidth_gbs']:.1f} GB/s, "
                         f"{section_ceilings['jax_matmul_gflops']:.1f} GFLOP/s jax.jit matmul)")
            lines += ["", line + "."]
        failed = [(n, f) for n, s in rows.items() if s.get("ok") for f in s["failed"]]
        lines += [""] + [f"- {SYSTEMS[n].label}: a process failed: {f}" for n, f in failed] + ([""] if failed else [])
    lines += ["## Order of runs", "", "| # | workload | system | pid | load | wall s | result |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(order):
        lines.append(f"| {i + 1} | {r['workload']} | {r['system']} | {r.get('pid', '-')} | "
                     f"{r['load_before']:.1f}->{r['load_after']:.1f} | {r['wall_s']:.0f} | "
                     f"{'ok' if r['ok'] else r['reason'][:120]}"
                     f"{' (kept: commit ' + sections[r['workload']]['commit'] + ')' if r['workload'] in sections else ''} |")
    lines += ["", "## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions().items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (checks the machinery, measures nothing)")
    parser.add_argument("--systems", nargs="+", default=None, help=f"default: all of {sorted(SYSTEMS)}")
    parser.add_argument("--workloads", nargs="+", default=None, help="names from workloads(); default: all")
    parser.add_argument("--rounds", type=int, default=1, help="processes per (workload, system), alternating; "
                        "2 halves the effect of load drift and doubles the time")
    parser.add_argument("--warmup", type=int, default=1, help="untimed-for-the-median calls per process")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process (default 3600, quick 600)")
    parser.add_argument("--no-roofline", action="store_true", help="skip measuring the machine's ceilings")
    parser.add_argument("--extra-system", action="append", default=[], metavar="NAME:KIND:WORKER",
                        help="add a system run by worker file WORKER on workloads of KIND (tests use this)")
    parser.add_argument("--merge", action="store_true", help="keep the sections of the existing report (--out) "
                        "that this run does not measure, each labelled with its own commit, date and ceilings")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"), help="markdown report; raw results "
                        "go next to it as .json")
    args = parser.parse_args(argv)
    timeout = args.timeout or (600 if args.quick else 3600)
    for extra in args.extra_system:
        name, kind, worker = extra.split(":", 2)
        SYSTEMS[name] = System(worker, (kind,), name)
    names = args.systems or list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {sorted(SYSTEMS)}")
    loads = [w for w in workloads(args.quick) if args.workloads is None or w["name"] in args.workloads]
    command = "python benchmarks/compare.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()

    ceiling_run = dict(ok=False, reason="--no-roofline")
    if not args.no_roofline:
        print("measuring the machine's ceilings ...", flush=True)
        ceiling_run = run_worker("roofline", System("roofline.py", ("roofline",), "roofline"),
                                 roofline_workload(args.quick), 0, 1, timeout)
    ceilings = ceiling_run["info"] if ceiling_run["ok"] else {}

    runs, unavailable = [], {}
    for workload, name in schedule(names, loads, args.rounds):
        if name in unavailable:  # a missing package stays missing: report it once, run nothing more
            continue
        print(f"[{len(runs) + 1}] {workload['name']}: {name} ...", end=" ", flush=True)
        result = run_worker(name, SYSTEMS[name], workload, args.warmup, args.repeats, timeout)
        runs.append(result)
        if result["ok"]:
            rates = [result["units_per_call"] / s for s in result["seconds"]]
            print(f"{np.median(rates):.1f} units/s (load {result['load_before']:.1f}->{result['load_after']:.1f})",
                  flush=True)
        else:
            print(f"not run: {result['reason']}", flush=True)
            if result.get("unavailable"):
                unavailable[name] = result["reason"]
    summaries = {(w["name"], n): summarize([r for r in runs if r["workload"] == w["name"] and r["system"] == n])
                 for w in loads for n in names if w["kind"] in SYSTEMS[n].kinds}
    elapsed = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    ours = [r for r in runs if r["system"] in OURS.values()]
    if ours and not any(r["ok"] for r in ours):  # e.g. mappa_jax not importable: keep the last real report
        sys.exit(f"no mappa_jax system ran ({'; '.join(sorted({r['reason'] for r in ours}))}); {out} left as it was")
    host = machine()
    this_run = dict(commit=host["commit"], started=started.isoformat(), command=command, ceilings=ceiling_run,
                    machine=f"{host['cpu']}, {host['cores']} cores")
    sections = {w["name"]: this_run for w in loads}
    kept = {}
    if args.merge:
        if not out.with_suffix(".json").exists():
            parser.error(f"--merge: no earlier report at {out.with_suffix('.json')}")
        previous = json.loads(out.with_suffix(".json").read_text())
        kept = {w: p for w, p in previous_sections(previous, out.read_text() if out.exists() else "").items()
                if w not in sections}
        known = {w["name"]: w for w in workloads(args.quick)}
        loads += [known[w] for w in kept if w in known]
        loads.sort(key=lambda w: list(known).index(w["name"]) if w["name"] in known else len(known))
        runs = runs + [r for r in previous["runs"] if r["workload"] in kept]
        summaries.update({tuple(k.split("/", 1)): s for k, s in previous["summaries"].items()
                          if k.split("/", 1)[0] in kept})
        sections.update(kept)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, command, host, loads, summaries, ceilings, ceiling_run, runs, started, elapsed, kept))
    raw = dict(command=command, started=started.isoformat(), elapsed_s=elapsed, ceilings=ceiling_run, runs=runs,
               summaries={f"{w}/{n}": s for (w, n), s in summaries.items()}, versions=versions(),
               sections=sections)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
