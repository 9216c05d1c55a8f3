"""What every benchmark worker shares: its command line, the workloads, the timing loop and the one
JSON line it prints for benchmarks/compare.py.

A worker is run as `python benchmarks/workers/<file>.py --spec '<json>'`. It builds its system
(untimed), runs `warmup` calls (timed apart: they include compilation), then `repeats` timed calls,
each one full unit of work (one generate call of `batch` rows x `new_tokens`, or one optimizer
step), and prints `BENCH_RESULT {...}` as its last stdout line. A peer that cannot run here (package
missing, build failed) raises Unavailable and the line says why, so the table can show it.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import pathlib
import sys
import time
import traceback
from typing import Callable

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
GREEDY_TOKENS = 16  # the correctness check: greedy continuation of prompt 0, compared across systems
# sampler.py and update.py hold the workload definitions (prompts, model presets, loss); reuse them.
sys.path.insert(0, str(BENCHMARKS))


@dataclasses.dataclass
class Prepared:
    """A built system: `call(seed)` runs one unit of work to completion (blocking); `units` is
    what one call produces (generated tokens, or trained tokens), unless `call` returns that call's
    count (workloads where rows stop at EOS); `check()` runs once after timing,
    untimed, and returns extra info (e.g. `greedy_tokens`: the first greedy tokens of prompt 0,
    which the parent compares across systems as a correctness check); `timing_starts()` runs
    once between the warm-up and the timed calls (e.g. to drop figures the warm-up recorded);
    `before_call(seed)` runs untimed before every call (e.g. the first turn of a two-turn workload)."""
    call: Callable[[int], None]
    units: int
    info: dict = dataclasses.field(default_factory=dict)
    check: Callable[[], dict] | None = None
    timing_starts: Callable[[], None] | None = None
    before_call: Callable[[int], None] | None = None


class Unavailable(Exception):
    """The system cannot run on this machine; the message says why (shown in the table)."""


def cores() -> int:
    """CPU cores this process may use: every system gets all of them."""
    return len(os.sched_getaffinity(0))


def require(module: str, install_hint: str):
    """Imports `module` or raises Unavailable naming the missing package."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken native library
        raise Unavailable(f"{module} not importable ({type(exc).__name__}: {exc}); {install_hint}") from exc


def smollm2_prompts(batch: int, prompt_tokens: int, mixed: bool = False) -> tuple[list[list[int]], object]:
    """The sampler workload's prompts (benchmarks/sampler.py's chat prompts of ~prompt_tokens, or
    with mixed=True its requests of varied answer lengths) and the GGUF path."""
    from mappa_jax.models import hub, weights
    from sampler import make_mixed_prompts, make_prompts
    path = hub.smollm2_gguf_path()
    tokenizer = weights.load_tokenizer(path)
    return (make_mixed_prompts(tokenizer, batch) if mixed else make_prompts(tokenizer, batch, prompt_tokens)), path


def prompt_info(prompts) -> dict:
    """What the parent's decode roofline needs to know about the prompts."""
    return {"prompt_tokens_mean": sum(map(len, prompts)) / len(prompts)}


def check_lengths(lengths, batch: int, new_tokens: int, system: str):
    """Every row must have produced exactly new_tokens tokens (EOS masked), or the figure is wrong."""
    lengths = list(lengths)
    if len(lengths) != batch or any(int(n) != new_tokens for n in lengths):
        raise RuntimeError(f"{system} produced {lengths} tokens per row, expected {batch} x {new_tokens}")


def greedy_count(workload: dict) -> int:
    return min(GREEDY_TOKENS, workload["new_tokens"])


def emit(result: dict):
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run(prepare: Callable[[dict, str], Prepared]):
    """Worker main: builds the system with `prepare(workload, system)` (one worker file may serve
    several variants of a system), warms up, times, prints one line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="JSON: system, workload, warmup, repeats")
    spec = json.loads(parser.parse_args().spec)
    system = spec["system"]
    if spec.get("dump_stack_after_s"):  # a hang (e.g. inside a native library) shows where, then exits
        faulthandler.dump_traceback_later(spec["dump_stack_after_s"], exit=True)
    result = {"system": system, "pid": os.getpid(), "workload": spec["workload"]["name"], "cores": cores()}
    try:
        start = time.perf_counter()
        built = prepare(spec["workload"], system)
        result["setup_s"] = time.perf_counter() - start
        warmup = []
        for i in range(spec["warmup"]):
            if built.before_call:
                built.before_call(1000 + i)
            start = time.perf_counter()
            built.call(1000 + i)
            warmup.append(time.perf_counter() - start)
        if built.timing_starts:
            built.timing_starts()
        seconds, units = [], []
        for r in range(spec["repeats"]):
            if built.before_call:
                built.before_call(r)
            start = time.perf_counter()
            produced = built.call(r)
            seconds.append(time.perf_counter() - start)
            units.append(built.units if produced is None else int(produced))
        info = dict(built.info, **(built.check() if built.check else {}))
        result.update(ok=True, warmup_s=warmup, seconds=seconds, units=units, units_per_call=max(units), info=info)
    except Unavailable as exc:
        result.update(ok=False, unavailable=True, reason=str(exc))
    except Exception as exc:
        traceback.print_exc()
        result.update(ok=False, reason=f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    emit(result)
