"""Multi-host start-up and host-side work splitting for multi-controller JAX.

In multi-controller JAX every process (host) runs the same Python program and every compiled
program, each feeding its own devices. Host-side work that must happen once (a coach call, a
sandboxed tool run) is split with `host_shard`, and the results are exchanged with
`gather_from_hosts`, so every host then holds the same full list and computes the same update.

`initialize(config)` picks how the processes find each other (`distributed.mode`):
- "auto" (default): explicit settings (config or MAPPA_* environment) if given, else SLURM if
  this is one task of a multi-task srun step (SLURM_STEP_NUM_TASKS > 1), else a TPU VM (JAX reads the pod layout from the TPU
  metadata), else a single process (no-op).
- "tpu": `jax.distributed.initialize()` with no arguments (Cloud TPU pods).
- "slurm": process id / count from SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), the
  coordinator is the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) at `coordinator_port` (0: derived from SLURM_JOB_ID, as JAX itself does).
- "explicit": coordinator_address, num_processes, process_id (config keys, or the environment
  variables MAPPA_COORDINATOR_ADDRESS, MAPPA_NUM_PROCESSES, MAPPA_PROCESS_ID).
- "none": never initialize (one process).

`run_local_cluster` starts N processes of one command on this machine as one CPU cluster over
loopback (gloo collectives): tests use it, and `python -m mappa_jax.parallel.distributed
--processes 2 -- mappa-train ...` reproduces multi-host behaviour on a laptop.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

from mappa_jax.parallel.cpu_runtime import size_cpu_thread_pool

MODES = ("auto", "none", "tpu", "slurm", "explicit")
ENV_COORDINATOR = "MAPPA_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MAPPA_NUM_PROCESSES"
ENV_PROCESS_ID = "MAPPA_PROCESS_ID"
_TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")


def default_config():
    """The `distributed` section of a run config (ml_collections), every field documented."""
    import ml_collections
    c = ml_collections.ConfigDict()
    c.mode = "auto"               # auto | none | tpu | slurm | explicit (see module docstring)
    c.coordinator_address = ""    # explicit: "host:port" of process 0
    c.num_processes = 0           # explicit: total process count (0 = not set)
    c.process_id = -1             # explicit: this process's id (-1 = not set)
    c.coordinator_port = 0        # slurm: port on the first node (0 = derived from SLURM_JOB_ID)
    c.local_device_ids = ""       # comma-separated device ids this process drives ("" = all visible)
    c.cpu_collectives = "gloo"    # CPU cross-process collectives (tests, CPU clusters)
    c.initialization_timeout_s = 300
    return c


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the cluster; `initialize` turns it into a jax.distributed call."""
    mode: str                      # "single", "tpu", "slurm" or "explicit"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_single(self) -> bool:
        return self.mode == "single"


# ---- resolving the spec (pure: config + environment in, spec out) -------------------------------
def _section(config) -> Mapping[str, Any]:
    """The `distributed` settings as a plain mapping, from a full run config, the section itself,
    or None (all defaults)."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"distributed config must be a mapping or ConfigDict, got {type(config).__name__}")
    known = set(default_config().keys())
    if "distributed" in config:
        section = config["distributed"] or {}
    elif set(config) & known:
        section = config  # the section itself
    else:
        return {}  # a run config without a distributed section: defaults
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"distributed config has unknown keys {unknown}; known: {sorted(known)}")
    return section


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003",
    "rack[1-2]-n[07-08]" -> "rack1-n07"."""
    nodelist = nodelist.strip()
    entry = re.match(r"(?:[^,\[\]]|\[[^\[\]]*\])+", nodelist)  # up to the first top-level comma
    if entry is None or nodelist[entry.end():][:1] not in ("", ","):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    # each bracket group becomes its first value; zero padding is kept ("003-005" -> "003")
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry.group(0))


def slurm_port(job_id: str) -> int:
    """A port in [61440, 65535] derived from the job id, so concurrent jobs sharing a node differ."""
    return 61440 + int(job_id) % 4096


def _int_setting(name: str, value, env: Mapping[str, str], env_name: str, unset) -> int | None:
    if value is not None and value != unset:
        return int(value)
    raw = env.get(env_name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {env_name}={raw!r} (for distributed.{name}) is not an integer")


def _device_ids(raw) -> tuple[int, ...] | None:
    if raw in (None, "", ()):
        return None
    if isinstance(raw, str):
        raw = [x for x in raw.split(",") if x.strip()]
    return tuple(int(x) for x in raw)


def _explicit(section, env) -> ClusterSpec:
    address = section.get("coordinator_address") or env.get(ENV_COORDINATOR) or None
    count = _int_setting("num_processes", section.get("num_processes"), env, ENV_NUM_PROCESSES, 0)
    pid = _int_setting("process_id", section.get("process_id"), env, ENV_PROCESS_ID, -1)
    missing = [f"distributed.{key} (or ${var})" for key, var, value in (
        ("coordinator_address", ENV_COORDINATOR, address), ("num_processes", ENV_NUM_PROCESSES, count),
        ("process_id", ENV_PROCESS_ID, pid)) if value is None]
    if missing:
        raise ValueError("distributed.mode=explicit needs " + ", ".join(missing))
    if ":" not in address:
        raise ValueError(f"distributed.coordinator_address={address!r} must be host:port")
    if count < 1 or not 0 <= pid < count:
        raise ValueError(f"distributed: process_id={pid} must be in [0, num_processes={count})")
    return ClusterSpec("explicit", address, count, pid, _device_ids(section.get("local_device_ids")))


def _first(env, *names) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def _slurm(section, env) -> ClusterSpec:
    # Step-level variables (set by srun) win over job-level ones: a step may use part of the job.
    count = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    port = int(section.get("coordinator_port") or 0)
    missing = [name for name, value in (("SLURM_PROCID", env.get("SLURM_PROCID")),
                                        ("SLURM_STEP_NUM_TASKS or SLURM_NTASKS", count),
                                        ("SLURM_STEP_NODELIST or SLURM_JOB_NODELIST", nodelist)) if not value]
    if not port and not env.get("SLURM_JOB_ID"):
        missing.append("SLURM_JOB_ID (or set distributed.coordinator_port)")
    if missing:
        raise ValueError("distributed.mode=slurm: missing environment variables " + ", ".join(missing)
                         + "; run under srun (one task per node), not directly in the batch script")
    host = first_slurm_host(nodelist)
    port = port or slurm_port(env["SLURM_JOB_ID"])
    devices = _device_ids(section.get("local_device_ids"))
    per_node = (_first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE") or "1").split("(")[0]
    if devices is None and per_node.isdigit() and int(per_node) > 1 and env.get("SLURM_LOCALID"):
        devices = (int(env["SLURM_LOCALID"]),)  # one task per GPU: each drives its own device
    return ClusterSpec("slurm", f"{host}:{port}", int(count), int(env["SLURM_PROCID"]), devices)


def _on_tpu_vm(env) -> bool:
    if any(env.get(k) for k in _TPU_ENV_HINTS):
        return True
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    return has_libtpu and (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def resolve(config=None, env: Mapping[str, str] | None = None) -> ClusterSpec:
    """The cluster this process belongs to, from config and environment; no side effects."""
    env = os.environ if env is None else env
    section = _section(config)
    mode = section.get("mode", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"distributed.mode={mode!r} is not one of {MODES}")
    if mode == "none":
        return ClusterSpec("single")
    if mode == "explicit":
        return _explicit(section, env)
    if mode == "slurm":
        return _slurm(section, env)
    if mode == "tpu":
        return ClusterSpec("tpu", local_device_ids=_device_ids(section.get("local_device_ids")))
    # auto
    if section.get("coordinator_address") or env.get(ENV_COORDINATOR):
        return _explicit(section, env)
    # Only inside an srun step: the batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS,
    # and treating it as one of N processes would wait for N - 1 that never come.
    if env.get("SLURM_PROCID") and int(env.get("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return _slurm(section, env)
    if _on_tpu_vm(env):
        return ClusterSpec("tpu")
    return ClusterSpec("single")


# ---- initialization -----------------------------------------------------------------------------
def initialize(config=None, env: Mapping[str, str] | None = None) -> ClusterSpec:
    """Join the cluster described by `config` (a run config with a `distributed` section, the
    section, or None) before any JAX computation; a no-op for a single process or when already
    initialized. Returns the resolved spec."""
    import jax
    size_cpu_thread_pool()  # before the CPU client exists; see cpu_runtime
    spec = resolve(config, env)
    if spec.is_single or jax.distributed.is_initialized():
        return spec
    section = _section(config)
    collectives = section.get("cpu_collectives", "gloo")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    kwargs: dict[str, Any] = {"initialization_timeout": int(section.get("initialization_timeout_s", 300))}
    if spec.local_device_ids is not None:
        kwargs["local_device_ids"] = list(spec.local_device_ids)
    if spec.mode != "tpu":
        kwargs.update(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                      process_id=spec.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        raise RuntimeError(f"jax.distributed.initialize failed for {spec}: {err}. It must run before any "
                           "JAX computation, and every process must reach the coordinator.") from err
    return spec


def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


# ---- splitting host-side work -------------------------------------------------------------------
def host_slice(num_items: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's contiguous block of `num_items`: the first (num_items % count) processes get
    one extra item. Blocks are disjoint, cover everything and are in process order."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    base, extra = divmod(num_items, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def host_shard(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's share of `items` (same order on every host: pass the same sequence)."""
    return list(items[host_slice(len(items), index, count)])


def gather_from_hosts(local_results: Sequence) -> list:
    """Every process's `local_results`, concatenated in process order, on every process.

    With `host_shard`'s contiguous blocks this restores the original item order. How: each host
    pickles its list (all hosts run the same trusted program), the byte lengths are all-gathered,
    each payload is zero-padded to the longest one, and the fixed-size uint8 arrays are
    all-gathered with `multihost_utils.process_allgather`. It is a collective: every process must
    call it, in the same order relative to other collectives.
    """
    local_results = list(local_results)
    if process_count() == 1:
        return local_results
    import numpy as np
    from jax.experimental import multihost_utils
    payload = np.frombuffer(pickle.dumps(local_results, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    merged: list = []
    for row, size in zip(gathered, sizes):
        merged.extend(pickle.loads(row[:int(size)].tobytes()))
    return merged


def fetch_global(tree: Any) -> Any:
    """NumPy copies of a pytree of jax.Arrays, each whole on every process, even where it spans
    other hosts' devices (where `jax.device_get` fails). A collective when any leaf does."""
    import jax
    import numpy as np
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def broadcast_from_host0(obj: Any) -> Any:
    """Process 0's `obj` on every process (e.g. a run id or a seed picked once). A collective."""
    if process_count() == 1:
        return obj
    import numpy as np
    from jax.experimental import multihost_utils
    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array(payload.size, np.int32))))
    buffer = np.zeros(size, np.uint8)
    if process_index() == 0:
        buffer[:] = payload
    data = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return pickle.loads(data.tobytes())


class OwnerDecides:
    """Host-side work whose result every host must share, done once by the owning host.

    `await decide(owner, key, compute)`: the host whose index is `owner` awaits `compute()` and
    publishes what it returned or raised in the coordination service's key-value store; the other
    hosts wait for that record (in a thread, so their event loops go on) and return or raise the
    same. No collective: hosts may ask in any order, at any time. Used for sandboxed tool runs and
    wall-clock timeouts of episodes, whose local results could differ between hosts (random numbers
    or timings printed by model-written code, a timeout under load) and so make hosts' prompts, and
    then their sampler inputs, diverge. `clear()` deletes this host's records once every host has
    read them (after a collective). On one process `decide` just awaits `compute()`.
    """

    def __init__(self, namespace: str, wait_s: float = 3600.0, max_waiting: int = 64):
        self.namespace = namespace.strip("/")
        self.wait_s = wait_s
        self.client = _coordination_client() if process_count() > 1 else None
        self.index = process_index()
        self._published: list[str] = []
        self._waiters = None
        if self.client is not None:
            import concurrent.futures
            self._waiters = concurrent.futures.ThreadPoolExecutor(max_waiting, thread_name_prefix="owner-decides")

    async def decide(self, owner: int, key: str, compute):
        if self.client is None:
            return await compute()
        full_key = f"{self.namespace}/{key}"
        if owner == self.index:
            try:
                value = await compute()
            except Exception as err:  # noqa: BLE001 - the other hosts must raise the same
                self._publish(full_key, ("raise", _picklable(err)))
                raise
            self._publish(full_key, ("return", value))
            return value
        import asyncio
        try:
            payload = await asyncio.get_running_loop().run_in_executor(
                self._waiters, self.client.blocking_key_value_get_bytes, full_key, int(self.wait_s * 1000))
        except Exception as err:  # the owner died or is stuck: nothing consistent is possible
            raise RuntimeError(f"host {self.index} waited {self.wait_s:.0f} s for host {owner}'s result "
                               f"{full_key!r}: {err}") from err
        kind, value = pickle.loads(payload)
        if kind == "raise":
            raise value
        return value

    def _publish(self, full_key: str, record) -> None:
        self.client.key_value_set_bytes(full_key, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
        self._published.append(full_key)

    def clear(self) -> None:
        """Delete this host's records; call when every host has read them (e.g. after a collective)."""
        for key in self._published:
            self.client.key_value_delete(key)
        self._published.clear()

    def close(self) -> None:
        if self._waiters is not None:
            self._waiters.shutdown(wait=False, cancel_futures=True)


def _picklable(err: Exception) -> Exception:
    """`err`, or a RuntimeError naming it when it cannot be pickled (the other hosts would
    otherwise wait for a record the owner never wrote)."""
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__}: {err}")


def _coordination_client():
    """The jax.distributed coordination service client (orbax reaches it the same way)."""
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("several processes but no jax.distributed client: call initialize() first")
    return client


def sync_hosts(name: str) -> None:
    """Block until every process reaches the barrier `name` (e.g. before deleting a checkpoint)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---- a local CPU cluster (tests, debugging multi-host code on one machine) ----------------------
@dataclasses.dataclass
class LocalProcessResult:
    process_id: int
    returncode: int | None  # None: killed after the timeout or after another process failed
    stdout: str
    stderr: str


class LocalClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_cluster_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                      base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one process of a local CPU cluster; `initialize` in auto mode reads it."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if "_proxy" in key.lower():  # loopback only; proxies can hang the coordinator's gRPC
            del env[key]
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(process_id), "JAX_PLATFORMS": "cpu",
                "JAX_NUM_CPU_DEVICES": str(devices_per_process),
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
    return env


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class LocalCluster:
    """`num_processes` running copies of one command forming a JAX CPU cluster over loopback, each in
    its own process group with its output in a file; `kill()` ends them all (a preemption)."""

    def __init__(self, command: Sequence[str], num_processes: int = 2, devices_per_process: int = 4, *,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None):
        if num_processes < 1 or devices_per_process < 1:
            raise ValueError(f"need num_processes >= 1 and devices_per_process >= 1, got "
                             f"{num_processes}, {devices_per_process}")
        self.command = list(command)
        port = free_port()
        self._logs = pathlib.Path(tempfile.mkdtemp(prefix="mappa_local_cluster_"))
        self.procs: list[subprocess.Popen] = []
        self._files = []
        try:
            for pid in range(num_processes):
                out, err = open(self._logs / f"{pid}.out", "w+"), open(self._logs / f"{pid}.err", "w+")
                self._files.append((out, err))
                self.procs.append(subprocess.Popen(
                    self.command, stdout=out, stderr=err, cwd=cwd, start_new_session=True,
                    env=local_cluster_env(pid, num_processes, devices_per_process, port, env)))
        except BaseException:
            self.close()
            raise

    def wait(self, timeout_s: float) -> tuple[bool, bool]:
        """Wait until all exit, one fails (the others would wait forever in a collective: they get
        a second to print their view, then are killed) or `timeout_s` passes. (failed, timed_out)."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0) for p in self.procs):
                time.sleep(1.0)
                return True, False
            if time.monotonic() > deadline:
                return False, True
            time.sleep(0.05)
        return any(p.returncode != 0 for p in self.procs), False

    def kill(self) -> None:
        for p in self.procs:
            _kill(p)

    def results(self) -> list[LocalProcessResult]:
        """Every process's exit status (None while running) and output so far."""
        results = []
        for pid, (proc, (out, err)) in enumerate(zip(self.procs, self._files)):
            out.seek(0), err.seek(0)
            results.append(LocalProcessResult(pid, proc.poll(), out.read(), err.read()))
        return results

    def close(self) -> None:
        """Kill what still runs and delete the output files."""
        self.kill()
        for out, err in self._files:
            out.close(), err.close()
        for path in self._logs.iterdir():
            path.unlink()
        self._logs.rmdir()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local_cluster(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 4, *,
                      timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
                      cwd: str | os.PathLike | None = None, check: bool = True) -> list[LocalProcessResult]:
    """Run `command` as `num_processes` processes forming one JAX CPU cluster over loopback.

    Each process gets the MAPPA_* coordinator variables, its own `devices_per_process` CPU devices
    and gloo collectives. If one process fails, the others (which would wait forever in a
    collective) are killed; everything is killed at `timeout_s`. With `check`, any failure raises
    LocalClusterError carrying every process's output tail.
    """
    with LocalCluster(command, num_processes, devices_per_process, env=env, cwd=cwd) as cluster:
        failed, timed_out = cluster.wait(timeout_s)
        results = cluster.results()  # before the kill: a killed process reads as None
        cluster.kill()
    if check and (failed or timed_out or any(r.returncode != 0 for r in results)):
        why = f"timed out after {timeout_s:.0f} s" if timed_out else "a process failed"
        tails = "\n".join(f"--- process {r.process_id} (exit {r.returncode}) ---\n{r.stdout[-2000:]}\n"
                          f"{r.stderr[-4000:]}" for r in results)
        raise LocalClusterError(f"local cluster of {num_processes} running {list(command)}: {why}\n{tails}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command as N local processes forming one JAX CPU cluster over loopback.",
        usage="python -m mappa_jax.parallel.distributed [--processes N] [--devices-per-process D] -- COMMAND...")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    results = run_local_cluster(command, args.processes, args.devices_per_process,
                                timeout_s=args.timeout, check=False)
    for r in results:
        print(f"===== process {r.process_id} exit {r.returncode} =====\n{r.stdout}{r.stderr}", end="")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
