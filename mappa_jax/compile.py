"""Compile a whole run ahead of time for a machine this one is not: will it fit, how fast can it be?

    mappa-compile --config configs/mathchat_qwen3_4b.py --target v5p-8
    mappa-compile --config configs/tiny.py --target cpu:8 --config.mesh.data=2 --config.mesh.fsdp=2

Every program of the run's plan (mappa_jax/plan.py: sampler prefill and decode per batch bucket,
trainer and reference logprobs, the update) is lowered from the training loop's own jitted
functions with abstract weights and optimizer state (ShapeDtypeStructs with NamedShardings, nothing
materialized) onto the target's devices: a TPU slice from libtpu's topology descriptions
(jax.experimental.topologies; needs the `tpu` extra, `pip install -e ".[tpu]"`) or N CPU devices.
Per program it prints XLA's memory analysis beside the pre-run estimate (parallel/memory_check.py),
the cost analysis with the roofline time on that chip, and the collectives inside loops (a weight
all-gather there runs at every decoded token). It exits non-zero naming every program that does not
fit, with --config.mesh.* / --config.policy.* settings that would (by the estimator).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

GiB = 1024 ** 3

# Slice name -> libtpu topology (chips per dimension). v4 / v5p slices are named by TensorCores
# (2 per chip), v5e / v6e by chips.
TPU_TARGETS = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures: peak bf16 dense FLOP/s, HBM bytes and HBM bandwidth (bytes/s)."""
    name: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float


# Sources: cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s),
# cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s),
# cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s),
# cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s). Keyed by device_kind.
CHIPS = {
    "TPU v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1200e9),
    "TPU v5 lite": ChipSpec("TPU v5e", 197e12, 16 * GiB, 819e9),
    "TPU v5": ChipSpec("TPU v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v6 lite": ChipSpec("TPU v6e", 918e12, 32 * GiB, 1640e9),
}


class TargetError(ValueError):
    """An unknown or unusable --target."""


def known_targets() -> list[str]:
    by_size = lambda name: (name.split("-")[0], int(name.split("-")[1]))
    return sorted(TPU_TARGETS, key=by_size) + ["cpu:N"]


def _cpu_count(target: str) -> int | None:
    match = re.fullmatch(r"cpu:(\d+)", target)
    return int(match.group(1)) if match else None


def prepare_target(target: str) -> None:
    """Environment for `target`, before JAX starts its backends: N host CPU devices for cpu:N; for a
    TPU slice the CPU backend only (the TPU devices are descriptions, not this machine's)."""
    if target not in TPU_TARGETS and _cpu_count(target) is None:
        raise TargetError(f"unknown target {target!r}; known targets: {', '.join(known_targets())}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    # libtpu only describes the slice here (no TPU is opened), so compiles may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    n = _cpu_count(target)
    if n is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        from mappa_jax.parallel.cpu_runtime import size_cpu_thread_pool
        size_cpu_thread_pool()


def target_devices(target: str) -> list:
    """The devices of `target`: TPU device descriptions of a slice, or N CPU devices of this host."""
    import jax
    n = _cpu_count(target)
    if n is not None:
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise TargetError(f"target {target}: this process has {len(devices)} CPU devices; start it with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (mappa-compile sets it)")
        return devices[:n]
    if target not in TPU_TARGETS:
        raise TargetError(f"unknown target {target!r}; known targets: {', '.join(known_targets())}")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=TPU_TARGETS[target]).devices)
    except Exception as err:  # noqa: BLE001 - libtpu missing or not loadable
        raise TargetError(f"target {target} needs libtpu's topology descriptions: pip install -e \".[tpu]\" "
                          f"(jax[tpu]); {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def chip_spec(device) -> ChipSpec | None:
    """The published figures of `device`'s chip, per device: a v4 / v5p chip has two TensorCores,
    which libtpu's descriptions may show as two devices (num_cores 1) sharing the chip's HBM."""
    spec = CHIPS.get(getattr(device, "device_kind", ""))
    if spec is None:
        return None
    cores = getattr(device, "num_cores", None)
    if spec.name in ("TPU v4", "TPU v5p") and cores == 1:
        return ChipSpec(f"{spec.name} (1 of 2 cores)", spec.peak_flops / 2, spec.hbm_bytes // 2, spec.hbm_bandwidth / 2)
    return spec


def run_device_memory(config, spec) -> int | None:
    """Bytes per device the programs must fit in: config.mesh.device_memory_gib when set, else the
    chip's HBM; None for a CPU target without that setting (not checked)."""
    if float(config.mesh.device_memory_gib) > 0:
        return int(float(config.mesh.device_memory_gib) * GiB)
    return spec.hbm_bytes if spec else None


# ---- compiling ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ProgramReport:
    name: str
    shapes: str
    compile_s: float
    estimate: int                     # the estimator's per-device bytes (resident + this program)
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliases: int = 0
    code: int = 0
    needed: int = 0                   # per device, with the run's other resident state
    flops: float = 0.0
    bytes_accessed: float = 0.0
    loop_collectives: list = dataclasses.field(default_factory=list)
    error: str = ""                   # XLA refused it (e.g. out of HBM): its message
    fits: bool | None = None

    def to_row(self) -> dict:
        return dataclasses.asdict(self)


def _xla_oom_bytes(message: str) -> int | None:
    """The bytes XLA said it needed, from its 'Ran out of memory in memory space hbm' message."""
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message) or \
        re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message)
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def compile_program(plan, program, device_memory: int | None) -> ProgramReport:
    from mappa_jax.parallel.hlo import loop_collectives
    report = ProgramReport(program.name, program.shapes, 0.0, program.estimate)
    start = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as err:  # noqa: BLE001 - XLA's own refusal (out of HBM) is a result
        report.compile_s = time.perf_counter() - start
        message = str(err)
        if "memory" not in message.lower():
            raise
        report.error = " ".join(message.split())[:400]
        temporaries = _xla_oom_bytes(message)
        if temporaries:  # at least its temporaries next to the run's resident state
            report.temporaries, report.needed = temporaries, temporaries + plan.resident_bytes
        report.fits = False
        return report
    report.compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.arguments = int(memory.argument_size_in_bytes)
    report.outputs = int(memory.output_size_in_bytes)
    report.temporaries = int(memory.temp_size_in_bytes)
    report.aliases = int(memory.alias_size_in_bytes)
    report.code = int(memory.generated_code_size_in_bytes)
    # What the device holds while it runs: its buffers, and the run's resident state it does not take.
    report.needed = (report.arguments + report.outputs - report.aliases + report.temporaries
                     + plan.resident_bytes - program.resident_arg_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    report.flops = float(cost.get("flops", 0.0))
    report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    report.loop_collectives = [(c.opcode, c.shape, c.bytes) for c in loop_collectives(compiled.as_text())]
    if device_memory:
        report.fits = report.needed <= device_memory
    return report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _roofline(report: ProgramReport, spec) -> str:
    if spec is None or not report.flops:
        return "roofline: no published chip figures" if spec is None else "roofline: -"
    compute, memory = report.flops / spec.peak_flops, report.bytes_accessed / spec.hbm_bandwidth
    bound = "compute" if compute >= memory else "memory"
    return (f"roofline {max(compute, memory) * 1e3:.2f} ms ({bound}-bound: FLOPs/peak {compute * 1e3:.2f} ms, "
            f"bytes/HBM {memory * 1e3:.2f} ms)")


def format_report(report: ProgramReport, spec) -> str:
    head = f"{report.name} [{report.shapes}] compiled in {report.compile_s:.1f} s"
    if report.error:
        needed = f"at least {_gib(report.needed)} GiB per device with the run's resident state; " if report.needed else ""
        return (f"{head}\n    XLA refused it: {report.error}\n    {needed}estimator: {_gib(report.estimate)} GiB")
    lines = [head,
             f"    XLA memory per device: arguments {_gib(report.arguments)} GiB, outputs {_gib(report.outputs)}, "
             f"temporaries {_gib(report.temporaries)}, aliased {_gib(report.aliases)}; with the run's other resident "
             f"state {_gib(report.needed)} GiB (estimator: {_gib(report.estimate)} GiB, "
             f"{(report.estimate - report.needed) / max(report.needed, 1):+.0%})",
             f"    cost: {report.flops / 1e12:.3f} TFLOP, {report.bytes_accessed / GiB:.2f} GiB accessed per device "
             f"(XLA counts a loop body once); {_roofline(report, spec)}"]
    if report.loop_collectives:
        by_op: dict[str, list] = {}
        for opcode, _, size in report.loop_collectives:
            by_op.setdefault(opcode, []).append(size)
        parts = ", ".join(f"{len(v)} x {op} ({sum(v) / 2 ** 20:.1f} MiB)" for op, v in sorted(by_op.items()))
        lines.append(f"    collectives inside loops (per iteration): {parts}")
    else:
        lines.append("    collectives inside loops: none")
    return "\n".join(lines)


def _compile_order(programs):
    """The update and the largest sampler bucket first (they decide whether a run fits), then the
    logprobs, then smaller buckets."""
    largest = max((p.rows for p in programs), default=0)

    def rank(p):
        if p.kind == "update":
            return 0
        if p.kind in ("prefill", "decode"):
            return 1 if p.rows == largest else 3
        return 2
    return sorted(programs, key=rank)


def compile_run(config, target: str, out=print, only: str = "", on_report=None) -> tuple[object, list[ProgramReport]]:
    """Plan `config` on `target`'s devices and compile every program; returns (plan, reports).
    on_report(plan, reports) runs after each program (e.g. to save what finished)."""
    from mappa_jax.plan import plan_run
    devices = target_devices(target)
    plan = plan_run(config, devices)
    spec = chip_spec(devices[0])
    device_memory = run_device_memory(config, spec)
    out(f"target {target}: {len(devices)} x {devices[0].device_kind}"
        + (f" ({spec.name}: {spec.peak_flops / 1e12:.0f} TFLOP/s bf16, {_gib(spec.hbm_bytes)} GiB HBM at "
           f"{spec.hbm_bandwidth / 1e9:.0f} GB/s per device)" if spec else ""))
    out(plan.describe())
    reports = []
    for program in _compile_order(plan.programs):
        if only and only not in program.name:
            continue
        report = compile_program(plan, program, device_memory)
        reports.append(report)
        out(format_report(report, spec))
        if on_report:
            on_report(plan, reports)
    return plan, reports


def not_fitting_message(plan, reports, device_memory: int) -> str:
    """Names every program over the device memory and the settings that fit (by the estimator)."""
    from mappa_jax.parallel import memory_check
    bad = [r for r in reports if r.fits is False]
    lines = [f"does not fit in {_gib(device_memory)} GiB per device: " + ", ".join(
        f"{r.name} ({_gib(r.needed)} GiB)" if r.needed else r.name for r in bad)]
    # The estimator ranks the settings; scaled by how far it fell short of XLA on this run, so that
    # a setting it suggests is not one XLA has just refused.
    shortfall = max([r.needed / r.estimate for r in bad if r.needed and r.estimate] + [1.0])
    fits = memory_check.suggest(plan.workload, plan.mesh.size, int(0.9 * device_memory / shortfall))
    if fits:
        lines.append("settings that fit (by the memory estimator, scaled by its shortfall against XLA here "
                     f"(x{shortfall:.2f}); compile again with them to confirm):")
        lines += [f"  {memory_check._overrides(e, plan.workload)}" for e in fits[:3]]
    else:
        lines.append("no mesh of these devices fits, with or without LoRA (by the memory estimator): lower "
                     "rl.micro_batch_size, the prompt / generation buckets or sampler.batch_buckets, or add devices")
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------------
def _define_flags():
    from absl import flags
    if "target" not in flags.FLAGS:
        flags.DEFINE_string("target", None, f"what to compile for: {', '.join(known_targets())}")
        flags.DEFINE_string("only", "", "compile only the programs whose name contains this")
        flags.DEFINE_string("json", "", "also write the reports to this JSON file")


def main(argv) -> None:
    del argv
    from absl import flags
    from mappa_jax.cli import CONFIG
    target = flags.FLAGS.target
    if not target:
        sys.exit(f"error: --target is required; known targets: {', '.join(known_targets())}")
    def save(plan, reports):
        if not flags.FLAGS.json:
            return
        import json
        import pathlib
        device_memory = run_device_memory(plan.config, chip_spec(plan.mesh.devices.flat[0]))
        summary = {"target": target, "mesh": dict(plan.mesh.shape), "devices": plan.mesh.size,
                   "device_kind": plan.mesh.devices.flat[0].device_kind, "device_memory": device_memory,
                   "resident": plan.resident_bytes, "estimated_resident": plan.estimate.resident,
                   "planned": [p.name for p in plan.programs], "programs": [r.to_row() for r in reports]}
        pathlib.Path(flags.FLAGS.json).write_text(json.dumps(summary, indent=1))

    try:
        plan, reports = compile_run(CONFIG.value, target, only=flags.FLAGS.only, on_report=save)
    except TargetError as err:
        sys.exit(f"error: {err}")
    device_memory = run_device_memory(plan.config, chip_spec(plan.mesh.devices.flat[0]))
    if any(r.fits is False for r in reports):
        sys.exit(not_fitting_message(plan, reports, device_memory))
    print(f"all {len(reports)} programs compiled" + (
        f" and fit in {_gib(device_memory)} GiB per device" if device_memory else
        "; no device memory figure for this target (set --config.mesh.device_memory_gib to check it)"))


def run() -> None:
    # The target decides JAX's platform and CPU device count, which must be set before JAX starts.
    target = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), None)
    if target is None and "--target" in sys.argv[:-1]:
        target = sys.argv[sys.argv.index("--target") + 1]
    if target:
        try:
            prepare_target(target)
        except TargetError as err:
            sys.exit(f"error: {err}")
    from absl import app
    from mappa_jax.cli import parse_flags
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
