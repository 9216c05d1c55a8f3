"""Async sandboxed execution of an action's code cells in a per-episode workspace."""
import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path

from mappa_jax.tools import backends
from mappa_jax.tools.config import SandboxConfig
from mappa_jax.tools.workspace import Workspace

logger = logging.getLogger(__name__)
_RUNNER_SOURCE = (Path(__file__).parent / "cell_runner.py").read_text()
# After a kill, how long to wait for the pipes to close before giving up on the rest of the output.
_DRAIN_GRACE_S = 2.0


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What running one action's cells produced.

    exit_code: the runner's status (0 all cells ran, 1 a cell raised, 128+N killed by signal N,
        -9 when the host killed it at the wall-clock limit).
    killed_reason: None if the runner finished by itself, else "wall_timeout", "cpu_time"
        (RLIMIT_CPU) or "signal <NAME>". A memory bomb is not killed: its cell gets MemoryError.
    files_created / files_modified: relative paths (POSIX) changed by this run in the workspace.
    files_present: every file in the workspace after the run.
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    killed_reason: str | None
    files_created: tuple[str, ...]
    files_modified: tuple[str, ...]
    files_present: tuple[str, ...]
    wall_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class _BoundedOutput:
    """Keeps the first and last `limit // 2` bytes of a stream and counts what it dropped."""

    def __init__(self, limit: int):
        self.head_limit = limit - limit // 2
        self.tail_limit = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes):
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_limit:
            self.tail += data
            del self.tail[:-self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self, stream_name: str) -> str:
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        if not self.truncated:
            return head + tail
        omitted = self.total - len(self.head) - len(self.tail)
        return f"{head}\n[... {omitted} bytes of {stream_name} truncated ...]\n{tail}"


async def _drain(stream: asyncio.StreamReader, sink: _BoundedOutput):
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return
        sink.add(chunk)


def _killed_reason(exit_code: int, timed_out: bool) -> str | None:
    if timed_out:
        return "wall_timeout"
    signal_number = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    if signal_number <= 0 or signal_number >= signal.NSIG:
        return None
    if signal_number == signal.SIGXCPU:
        return "cpu_time"
    return f"signal {signal.Signals(signal_number).name}"


class Sandbox:
    """Runs model-written Python in isolation; the backend is chosen once, at construction.

    Safe to share between concurrent episodes: each `run_cells` call is its own sandbox.
    """

    def __init__(self, config: SandboxConfig = SandboxConfig()):
        self.config = config
        self.backend = backends.select_backend(config)
        if isinstance(self.backend, backends.UnsandboxedBackend):
            message = ("SANDBOX DISABLED: no isolation backend works and "
                       "SandboxConfig.allow_unsandboxed=True, so model-written code runs "
                       "directly on this machine. " + self.backend.describe())
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            logger.info("sandbox backend: %s", self.backend.describe())

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        return self.backend.describe()

    def close(self):
        self.backend.close()

    async def run_cells(self, cells: list[str], workspace: Workspace) -> ExecResult:
        """Runs `cells` in order in one interpreter inside `workspace`; never blocks the loop."""
        if not isinstance(workspace, Workspace):
            raise TypeError(f"workspace must be a Workspace, got {type(workspace).__name__}")
        if not all(isinstance(cell, str) for cell in cells):
            raise TypeError("cells must be a list of str")
        config = self.config
        loop = asyncio.get_running_loop()
        sandboxed = not isinstance(self.backend, backends.UnsandboxedBackend)
        if sandboxed and self.backend.host_is_root:
            await loop.run_in_executor(None, workspace.hand_over, config.sandbox_uid,
                                       config.sandbox_gid)
        before = await loop.run_in_executor(None, workspace.snapshot)
        request = json.dumps({"cells": list(cells), "limits": config.runner_limits(),
                              "site_dirs": backends.site_dirs()}).encode()
        argv = self.backend.command(backends.python_command(_RUNNER_SOURCE), workspace.path)

        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=str(workspace.path) if not sandboxed else "/",
            start_new_session=True)
        stdout, stderr = (_BoundedOutput(config.max_output_bytes),
                          _BoundedOutput(config.max_output_bytes))
        readers = [asyncio.ensure_future(_drain(process.stdout, stdout)),
                   asyncio.ensure_future(_drain(process.stderr, stderr))]

        async def feed_and_wait():
            try:
                process.stdin.write(request)
                await process.stdin.drain()
                process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sandbox died before reading; its exit status says why
            await process.wait()

        timed_out = False
        try:
            try:
                await asyncio.wait_for(feed_and_wait(), timeout=config.wall_timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
        finally:
            # Whatever happened (timeout, cancellation), nothing of this run may outlive it.
            _kill_group(process)
            await process.wait()
            done, pending = await asyncio.wait(readers, timeout=_DRAIN_GRACE_S)
            for reader in pending:
                reader.cancel()
        wall_s = time.monotonic() - started

        exit_code = process.returncode
        after = await loop.run_in_executor(None, workspace.snapshot)
        changes = Workspace.diff(before, after)
        return ExecResult(
            stdout=stdout.text("stdout"), stderr=stderr.text("stderr"), exit_code=exit_code,
            timed_out=timed_out, killed_reason=_killed_reason(exit_code, timed_out),
            files_created=changes.created, files_modified=changes.modified,
            files_present=tuple(sorted(after)), wall_s=wall_s,
            stdout_truncated=stdout.truncated, stderr_truncated=stderr.truncated)


def _kill_group(process: asyncio.subprocess.Process):
    """SIGKILLs the run's process group; the sandbox's pid namespace dies with its leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
