"""Where metrics go: JSONL (always), TensorBoard event files, and W&B when configured; plus a
progress line with step rate and ETA, and a few complete episodes per step in episodes.jsonl
(format_episode prints one). Metrics are numbers and episodes the agents' and coach's texts:
nothing here sees an API key."""
from __future__ import annotations

import json
import math
import pathlib
import sys
import textwrap
import time
from typing import Mapping


def _scalar(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl; mirrors scalars to TensorBoard / W&B.
    write_episodes appends episode records (workflows.records.episode_record) to episodes.jsonl."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, wandb_project: str = "",
                 run_name: str = "", config: Mapping | None = None, is_main: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.episodes_path = pathlib.Path(workdir) / "episodes.jsonl"
        self.is_main = is_main
        self._tb = self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        if wandb_project:
            import wandb
            self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=dict(config or {}),
                                     dir=str(workdir), resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows (and episodes) of steps after the checkpoint, so none is there twice."""
        for path in (self.path, self.episodes_path):
            if not self.is_main or not path.exists():
                continue
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(r + "\n" for r in rows))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.is_main:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def write_episodes(self, records: list[Mapping]) -> None:
        if not self.is_main or not records:
            return
        with self.episodes_path.open("a") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_episode(record: Mapping) -> str:
    """One episodes.jsonl record as text: the problem, then each action's reply, the output of its
    code (the code itself is in the reply) and the coach's score, reasoning and resulting reward."""
    failed = f" | failed: {record['failure_reason']}" if record["status"] == "failed" else ""
    lines = [f"=== {record['phase']} step {record['step']}, episode {record['episode_id']}: "
             f"outcome {record['outcome']:g}{failed}",
             f"problem: {record['problem']}", f"ground truth: {record['ground_truth']}"]
    for action in record["actions"]:
        truncated = " (truncated)" if action["truncated"] else ""
        lines.append(f"--- {action['agent']}, turn {action['turn']}{truncated}")
        lines.append(textwrap.indent(action["text"].rstrip() or "(empty)", "  "))
        tool = action["tool"]
        if tool is not None:
            ended = (f"stopped: {tool['killed_reason']}" if tool["killed_reason"]
                     else f"exit status {tool['exit_code']}")
            lines.append(f"  [code run, {ended}]")
            lines += [f"  {name}:\n" + textwrap.indent(tool[name].rstrip(), "    ")
                      for name in ("stdout", "stderr") if tool[name].strip()]
        coach, reward = action["coach"], action["reward"]
        reward = "masked" if reward is None else f"{reward:.2f}"
        if coach is None or coach["score"] is None:
            why = coach["fallback_reason"] if coach else "no verdict"
            lines.append(f"  [coach: no score ({why}); reward {reward}]")
        else:
            judged = {True: ", judged correct", False: ", judged wrong"}.get(coach["correct"], "")
            lines.append(f"  [coach: {coach['score']:g}/10{judged}; reward {reward}] {coach['reasoning']}")
    return "\n".join(lines)


class Progress:
    """A periodic one-line report: step k/N, seconds per step, ETA, and a few chosen metrics."""

    def __init__(self, total: int, start: int = 0, stream=sys.stdout, enabled: bool = True):
        self.total, self.start, self.stream, self.enabled = total, start, stream, enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, object] = (), keys=()) -> str:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / done if done > 0 else float("nan")
        eta = rate * (self.total - step) if done > 0 else float("nan")
        shown = " ".join(f"{k.split('/')[-1] if k.count('/') < 2 else k}={float(metrics[k]):.3g}"
                         for k in keys if k in metrics and _scalar(metrics[k]) is not None)
        line = (f"step {step}/{self.total} [{_fmt(elapsed)} elapsed, {rate:.1f} s/step, "
                f"ETA {_fmt(eta)}] {shown}")
        if self.enabled:
            print(line, file=self.stream, flush=True)
        return line


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ---- where a run's wall time went ----------------------------------------------------------------
_COMPILE_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
                   "/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}


class CompileLog:
    """Seconds jax spent making programs in this process (tracing, lowering, XLA compile or cache
    load), in total and per program name, from jax.monitoring's duration events. jax offers no way
    to unregister a listener, so `close` only stops the counting."""

    def __init__(self):
        import threading
        import jax
        self._lock = threading.Lock()
        self.total_s = 0.0
        self.per_program: dict[str, list] = {}  # name -> [XLA compiles, seconds of all three kinds]
        self._open = True
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        kind = _COMPILE_EVENTS.get(event)
        if kind is None or not self._open:
            return
        name = str(kwargs.get("fun_name", "?"))  # tracing names the function, lowering "jit(name)"
        name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
        with self._lock:
            self.total_s += duration_secs
            entry = self.per_program.setdefault(name, [0, 0.0])
            entry[0] += kind == "compile"
            entry[1] += duration_secs

    def close(self) -> None:
        self._open = False

    def top(self, n: int = 6, min_seconds: float = 0.5) -> str:
        """The n programs that cost most to make; those under min_seconds are not worth a line."""
        with self._lock:
            ranked = sorted(self.per_program.items(), key=lambda kv: -kv[1][1])
        return ", ".join(f"{name} {s:.1f} s ({count}x)" for name, (count, s) in ranked[:n]
                         if s >= min_seconds)


class TimeSplit:
    """A run's wall time split into compilation (jax tracing + XLA compiling, wherever it happened),
    sampling, sandbox (code runs while nothing was sampled), coach wait (verdicts still pending
    after a rollout), update and the rest (model load, rollout bookkeeping, checkpoints, export).
    Phases are measured around the loop's calls; compile seconds spent inside a phase are moved out
    of it, so the parts add up to the wall time."""

    PHASES = ("compilation", "sampling", "sandbox", "coach wait", "update", "other")

    def __init__(self):
        self.start = time.perf_counter()
        self.compiles = CompileLog()
        self.seconds = {phase: 0.0 for phase in self.PHASES[1:-1]}

    def compile_s(self) -> float:
        return self.compiles.total_s

    def add(self, phase: str, seconds: float, compile_s: float = 0.0) -> None:
        """seconds of wall time in `phase`, of which compile_s were compiling."""
        if phase not in self.seconds:
            raise KeyError(f"unknown phase {phase!r}; one of {self.PHASES[1:-1]}")
        self.seconds[phase] += max(0.0, seconds - compile_s)

    def split(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        parts = {"compilation": self.compile_s(), **self.seconds}
        parts["other"] = max(0.0, wall - sum(parts.values()))
        return {"wall": wall, **parts}

    def describe(self) -> str:
        parts = self.split()
        wall = parts.pop("wall")
        body = ", ".join(f"{phase} {_fmt(s)} ({100 * s / max(wall, 1e-9):.0f} %)" for phase, s in parts.items())
        programs = self.compiles.top()
        return f"{_fmt(wall)} wall: {body}" + (f"\ncompiled programs (most costly): {programs}" if programs else "")
