"""Where metrics go: JSONL (always), TensorBoard event files, and W&B when configured; plus a
progress line with step rate and ETA. Only numbers are written: nothing here sees an API key."""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Mapping


def _scalar(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl; mirrors scalars to TensorBoard / W&B."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True, wandb_project: str = "",
                 run_name: str = "", config: Mapping | None = None, is_main: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
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
        """On resume: drop rows of steps after the checkpoint, so curves never hold a step twice."""
        if not self.is_main or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

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
