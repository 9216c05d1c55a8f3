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
from mappa_jax.tools.cgroups import WRAPPER_PROCESSES, CgroupManager
from mappa_jax.tools.config import SandboxConfig
from mappa_jax.tools.workspace import Workspace

logger = logging.getLogger(__name__)
_RUNNER_SOURCE = (Path(__file__).parent / "cell_runner.py").read_text()
# After a kill, how long to wait for the pipes to close before giving up on the rest of the output.
_DRAIN_GRACE_S = 2.0
# How long the reaper gets to kill and reap the run after the stop request, before SIGKILL.
_STOP_GRACE_S = 5.0
# How often the workspace's size is checked while a run writes to it.
_WORKSPACE_POLL_S = 0.25


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What running one action's cells produced.

    exit_code: the runner's status (0 all cells ran, 1 a cell raised, 128+N or -N killed by
        signal N, -9 when the host stopped it: wall-clock limit, workspace over its limit).
    killed_reason: None if the runner finished by itself, else "wall_timeout", "cpu_time"
        (RLIMIT_CPU), "memory" (the run's processes together went over total_memory_bytes and
        the kernel killed one), "workspace_full" or "signal <NAME>". One process over its own
        memory_bytes is not killed: its cell gets MemoryError.
    workspace_full: the workspace is over its size or entry limit after this run; the note at
        the end of stderr says so, and runs may not write files until enough is deleted.
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
    workspace_full: bool = False

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

    Safe to share between concurrent episodes: each `run_cells` call is its own sandbox, with its
    own cgroup where the machine offers one (see cgroups.py).
    """

    def __init__(self, config: SandboxConfig = SandboxConfig()):
        self.config = config
        self.backend = backends.select_backend(config)
        self.cgroups, self.cgroup_problem = None, "SandboxConfig.cgroup='off'"
        if config.cgroup != "off":
            self.cgroups, self.cgroup_problem = CgroupManager.detect(
                config.total_memory_bytes, config.max_processes + WRAPPER_PROCESSES)
            if self.cgroups is None and config.cgroup == "require":
                self.backend.close()
                raise backends.SandboxUnavailableError(
                    "SandboxConfig.cgroup='require' but per-run cgroups do not work here: "
                    + self.cgroup_problem)
        if not self.backend.isolated:
            message = ("SANDBOX DISABLED: no isolation backend works and "
                       "SandboxConfig.allow_unsandboxed=True, so model-written code runs "
                       "directly on this machine. " + self.backend.describe())
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            logger.info("sandbox: %s", self.describe())

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        config = self.config
        if self.cgroups is not None:
            aggregate = self.cgroups.describe()
        else:
            aggregate = (f"NO aggregate memory/process limit per run ({self.cgroup_problem}): "
                         f"only per-process rlimits, up to {config.max_processes} processes x "
                         f"{config.memory_bytes >> 20} MiB")
        return (f"{self.backend.describe()}; {aggregate}; per process {config.cpu_time_s} CPU-s "
                f"and {config.memory_bytes >> 20} MiB address space; {config.wall_timeout_s:g} s "
                f"wall clock per action; workspace at most {config.workspace_max_bytes >> 20} MiB "
                f"in {config.workspace_max_files} entries")

    def close(self):
        self.backend.close()

    def _over_limit(self, usage: tuple[int, int], start: tuple[int, int] = (0, 0)) -> bool:
        """Over the workspace limit (or, if it started over, grown beyond where it started)."""
        size, entries = usage
        return (size > max(self.config.workspace_max_bytes, start[0])
                or entries > max(self.config.workspace_max_files, start[1]))

    async def run_cells(self, cells: list[str], workspace: Workspace) -> ExecResult:
        """Runs `cells` in order in one interpreter inside `workspace`; never blocks the loop."""
        if not isinstance(workspace, Workspace):
            raise TypeError(f"workspace must be a Workspace, got {type(workspace).__name__}")
        if not all(isinstance(cell, str) for cell in cells):
            raise TypeError("cells must be a list of str")
        config = self.config
        loop = asyncio.get_running_loop()
        if self.backend.isolated and self.backend.host_is_root:
            await loop.run_in_executor(None, workspace.hand_over, config.sandbox_uid,
                                       config.sandbox_gid)
        before = await loop.run_in_executor(None, workspace.snapshot)
        size, entries = await loop.run_in_executor(None, workspace.usage)
        # No single file may take the workspace past its limit; a full one takes no writes at all.
        room = config.workspace_max_bytes - size if entries < config.workspace_max_files else 0
        request = json.dumps({
            "cells": list(cells),
            "limits": config.runner_limits(file_size_bytes=max(0, min(config.file_size_bytes, room))),
            "site_dirs": self.backend.site_dirs}).encode()
        cgroup = None
        if self.cgroups is not None:
            try:
                cgroup = await loop.run_in_executor(None, self.cgroups.create, workspace.path.name)
            except OSError as error:
                if config.cgroup == "require":
                    raise
                logger.warning("sandbox: no cgroup for this run (%s); per-process limits only",
                               error)
        inner = backends.python_command(self.backend.executable, _RUNNER_SOURCE)
        argv = self.backend.launch(inner, workspace.path,
                                   cgroup.procs_files if cgroup is not None else ())

        started = time.monotonic()
        stdout, stderr = (_BoundedOutput(config.max_output_bytes),
                          _BoundedOutput(config.max_output_bytes))
        timed_out = workspace_stopped = False
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(workspace.path) if not self.backend.isolated else "/",
                start_new_session=True)
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

            async def watch_workspace():
                # A full workspace may still run actions, to delete files; not to grow.
                while not self._over_limit(await loop.run_in_executor(None, workspace.usage),
                                           start=(size, entries)):
                    await asyncio.sleep(_WORKSPACE_POLL_S)

            finished = asyncio.ensure_future(feed_and_wait())
            watcher = asyncio.ensure_future(watch_workspace())
            try:
                done, _ = await asyncio.wait([finished, watcher], timeout=config.wall_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                timed_out = not done
                workspace_stopped = watcher in done and finished not in done
            finally:
                # Whatever happened (timeout, cancellation), nothing of this run may outlive it.
                for task in (finished, watcher):
                    task.cancel()
                await _stop(process)
                _, pending = await asyncio.wait(readers, timeout=_DRAIN_GRACE_S)
                for reader in pending:
                    reader.cancel()
        finally:
            oom_kills = 0
            if cgroup is not None:
                oom_kills = cgroup.oom_kills()
                await loop.run_in_executor(None, cgroup.kill_and_remove)
        wall_s = time.monotonic() - started

        exit_code = process.returncode
        after = await loop.run_in_executor(None, workspace.snapshot)
        usage = await loop.run_in_executor(None, workspace.usage)
        changes = Workspace.diff(before, after)
        killed_reason = _killed_reason(exit_code, timed_out)
        notes = []
        if oom_kills:
            if exit_code != 0 and not timed_out:
                killed_reason = "memory"
            notes.append(f"[sandbox: this action's processes together went over "
                         f"{config.total_memory_bytes >> 20} MiB of memory; the kernel killed "
                         f"{oom_kills} of them]")
        full = self._over_limit(usage) or workspace_stopped
        if workspace_stopped:
            killed_reason = "workspace_full"
        if full:
            notes.append(f"[sandbox: the workspace holds {usage[0]} bytes in {usage[1]} entries, "
                         f"over its limit of {config.workspace_max_bytes} bytes or "
                         f"{config.workspace_max_files} entries"
                         + ("; this action was stopped" if workspace_stopped else "")
                         + ". Until files are deleted, no action can write to any file.]")
        stderr_text = stderr.text("stderr")
        if notes:
            stderr_text += ("\n" if stderr_text and not stderr_text.endswith("\n") else "") + \
                "\n".join(notes) + "\n"
        return ExecResult(
            stdout=stdout.text("stdout"), stderr=stderr_text, exit_code=exit_code,
            timed_out=timed_out, killed_reason=killed_reason,
            files_created=changes.created, files_modified=changes.modified,
            files_present=tuple(sorted(after)), wall_s=wall_s,
            stdout_truncated=stdout.truncated, stderr_truncated=stderr.truncated,
            workspace_full=full)


async def _stop(process: asyncio.subprocess.Process):
    """Asks the run's reaper to kill and reap everything of the run; SIGKILL if it does not."""
    if process.returncode is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(process.wait(), timeout=_STOP_GRACE_S)
            return
        except asyncio.TimeoutError:
            logger.warning("sandbox: reaper %d ignored the stop request; killing its group",
                           process.pid)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    await process.wait()
