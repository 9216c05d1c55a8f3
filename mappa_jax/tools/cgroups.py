"""Aggregate limits for all processes of one sandbox run: a cgroup per run, where the machine has one.

Per-process rlimits leave the total open (64 processes x 4 GiB each); a cgroup caps the sum.
Preferred is cgroup v2 (memory.max, memory.swap.max, pids.max); a hybrid machine whose memory
and pids controllers are still on cgroup v1 hierarchies gets the v1 equivalents
(memory.limit_in_bytes, memory.memsw.limit_in_bytes, pids.max). The run's cgroups are children of
the trainer's own cgroup, so this needs write access there: root, or a delegated cgroup (systemd
`Delegate=yes`, a container's cgroup namespace). `CgroupManager.detect` says why when it cannot.

cgroup v2 forbids processes in a cgroup whose controllers are enabled for its children, so when
the trainer sits in a non-root v2 cgroup without memory+pids in its cgroup.subtree_control, v2 is
reported unavailable (moving the trainer itself elsewhere is left to the operator).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time
from pathlib import Path

_MOUNTINFO = "/proc/self/mountinfo"
_SELF_CGROUP = "/proc/self/cgroup"
# Processes the wrappers add to a run's cgroup besides model code: reaper, bwrap (2) or
# unshare + shell + setpriv, the runner itself.
WRAPPER_PROCESSES = 6


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    mounts = []
    with open(_MOUNTINFO) as handle:
        for line in handle:
            left, right = line.split(" - ", 1)
            mount_point = left.split()[4]
            fstype, _source, options = right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((mount_point, fstype, set(options.split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """{controller or "" for v2: path} from /proc/self/cgroup."""
    paths = {}
    with open(_SELF_CGROUP) as handle:
        for line in handle:
            _hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _write(path: Path, value: str):
    with open(path, "w") as handle:
        handle.write(value)


@dataclasses.dataclass
class RunCgroup:
    """The cgroup directories (one per v1 hierarchy, or one v2) of one sandbox run."""

    version: int
    dirs: tuple[Path, ...]

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for exceeding the memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for directory in self.dirs:
            try:
                text = (directory / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def _pids(self) -> set[int]:
        pids = set()
        for directory in self.dirs:
            try:
                pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return pids

    def kill_and_remove(self, timeout_s: float = 5.0):
        """SIGKILLs anything still in the run's cgroups and removes them."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self._pids()
            if self.version == 2 and pids and (self.dirs[0] / "cgroup.kill").exists():
                try:
                    _write(self.dirs[0] / "cgroup.kill", "1")
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            removed = True
            for directory in self.dirs:
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    removed = False  # busy until its last process is reaped
            if removed or time.monotonic() > deadline:
                return
            time.sleep(0.02)


class CgroupManager:
    """Creates one cgroup per run under the trainer's own cgroup(s), with the aggregate limits."""

    _counter = itertools.count()

    def __init__(self, version: int, parents: dict[str, Path], memory_bytes: int,
                 max_processes: int):
        self.version = version
        self.parents = parents  # v2: {"": dir}; v1: {"memory": dir, "pids": dir}
        self.memory_bytes = int(memory_bytes)
        self.max_processes = int(max_processes)

    def describe(self) -> str:
        where = ", ".join(str(p) for p in dict.fromkeys(self.parents.values()))
        return (f"cgroup v{self.version} per run under {where}: all processes of one action "
                f"together get {self.memory_bytes >> 20} MiB of memory (no swap) and "
                f"{self.max_processes} tasks")

    @classmethod
    def detect(cls, memory_bytes: int, max_processes: int) -> tuple["CgroupManager | None", str]:
        """(a manager, "") where per-run cgroups work here, else (None, why not)."""
        try:
            mounts, own = _mounts(), _own_cgroups()
        except (OSError, ValueError) as error:
            return None, f"cannot read the cgroup setup ({error})"
        reasons = []
        for fstype_mount, fstype, _options in mounts:
            if fstype != "cgroup2" or "" not in own:
                continue
            manager, why = cls._try_v2(Path(fstype_mount + own[""]), memory_bytes, max_processes)
            if manager is not None:
                return manager, ""
            reasons.append(why)
            break
        v1 = {}
        for controller in ("memory", "pids"):
            mount = next((m for m, t, opts in mounts if t == "cgroup" and controller in opts), None)
            if mount is None or controller not in own:
                reasons.append(f"cgroup v1: no {controller} hierarchy")
                break
            v1[controller] = Path(mount + own[controller])
        else:
            manager, why = cls(1, v1, memory_bytes, max_processes).check()
            if manager is not None:
                return manager, ""
            reasons.append(why)
        if not mounts:
            reasons.append(f"no cgroup filesystem mounted (looked at {_MOUNTINFO})")
        return None, "; ".join(reasons)

    @classmethod
    def _try_v2(cls, own_dir: Path, memory_bytes, max_processes):
        try:
            controllers = set((own_dir / "cgroup.controllers").read_text().split())
        except OSError as error:
            return None, f"cgroup v2 at {own_dir}: {error}"
        missing = {"memory", "pids"} - controllers
        if missing:
            return None, (f"cgroup v2 at {own_dir} has no {'/'.join(sorted(missing))} "
                          "controller (on this machine it may be bound to cgroup v1)")
        enabled = set((own_dir / "cgroup.subtree_control").read_text().split())
        if not {"memory", "pids"} <= enabled:
            try:
                _write(own_dir / "cgroup.subtree_control", "+memory +pids")
            except OSError as error:
                return None, (f"cgroup v2 at {own_dir}: cannot enable memory+pids for child "
                              f"cgroups ({error.strerror}; the trainer's cgroup must be "
                              "delegated and hold no processes itself, or be the root)")
        manager = cls(2, {"": own_dir}, memory_bytes, max_processes)
        return manager.check()

    def check(self):
        """Creates and removes one cgroup: (self, "") if that works, else (None, why)."""
        try:
            self.create("probe").kill_and_remove()
        except OSError as error:
            where = ", ".join(str(p) for p in self.parents.values())
            return None, (f"cgroup v{self.version} at {where}: cannot create a child cgroup "
                          f"({error.strerror or error})")
        return self, ""

    def create(self, label: str) -> RunCgroup:
        name = f"mappa-sandbox-{os.getpid()}-{next(self._counter)}-{label}"[:200]
        dirs = []
        try:
            if self.version == 2:
                directory = self.parents[""] / name
                directory.mkdir()
                dirs.append(directory)
                _write(directory / "memory.max", str(self.memory_bytes))
                if (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
                _write(directory / "pids.max", str(self.max_processes))
            else:
                memory = self.parents["memory"] / name
                memory.mkdir()
                dirs.append(memory)
                _write(memory / "memory.limit_in_bytes", str(self.memory_bytes))
                if (memory / "memory.memsw.limit_in_bytes").exists():
                    _write(memory / "memory.memsw.limit_in_bytes", str(self.memory_bytes))
                pids = self.parents["pids"] / name
                pids.mkdir()
                dirs.append(pids)
                _write(pids / "pids.max", str(self.max_processes))
        except OSError:
            RunCgroup(self.version, tuple(dirs)).kill_and_remove(timeout_s=0.5)
            raise
        return RunCgroup(self.version, tuple(dirs))
