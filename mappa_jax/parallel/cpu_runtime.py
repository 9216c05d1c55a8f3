"""Several XLA:CPU devices in one process: size the runtime's thread pool so collectives can't starve it.

XLA:CPU runs each device's share of a multi-device program on one thread pool of
max(cores, devices) threads, and a share blocked in a collective keeps its thread until every
device's share arrives. With two or more such programs in flight (async dispatch, or the sampler's
worker thread beside the main thread), their shares can fill the pool with no program complete: the
process aborts after 40 s with "Expected 8 threads to join the rendezvous, but only 7 of them
arrived". On a 2-core machine with 8 CPU devices this killed about half of the 2-step training runs.
XLA reads the pool size from PJRT_NPROC when the CPU client is created, so `size_cpu_thread_pool`
must run before the first JAX computation. Accelerators (their own streams) and one-device CPU
runs are unaffected.
"""
from __future__ import annotations

import os
import re
from typing import MutableMapping

ENV_POOL = "PJRT_NPROC"
PROGRAMS_IN_FLIGHT = 4  # multi-device programs whose shares may wait on the pool at once
_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def requested_cpu_devices(env: MutableMapping[str, str] | None = None) -> int:
    """CPU devices this process will create: JAX_NUM_CPU_DEVICES / jax_num_cpu_devices, else
    --xla_force_host_platform_device_count in XLA_FLAGS, else 1."""
    env = os.environ if env is None else env
    counts = [int(m) for m in _FORCED_DEVICES.findall(env.get("XLA_FLAGS", ""))]
    if env.get("JAX_NUM_CPU_DEVICES", "").strip():
        counts.append(int(env["JAX_NUM_CPU_DEVICES"]))
    if env is os.environ:  # set in code with jax.config.update, which the environment does not show
        import jax
        counts.append(int(jax.config.jax_num_cpu_devices))
    return max([1, *counts])


def size_cpu_thread_pool(env: MutableMapping[str, str] | None = None) -> int | None:
    """Set PJRT_NPROC to PROGRAMS_IN_FLIGHT x the CPU device count when several CPU devices are
    requested and the pool would be smaller. Returns the pool size set, or None when nothing changed
    (one device, enough cores, or PJRT_NPROC already chosen by the user)."""
    env = os.environ if env is None else env
    devices = requested_cpu_devices(env)
    wanted = PROGRAMS_IN_FLIGHT * devices
    if devices <= 1 or env.get(ENV_POOL) or (os.cpu_count() or 1) >= wanted:
        return None
    env[ENV_POOL] = str(wanted)
    return wanted


def cpu_pool_warning(num_cpu_devices: int, env: MutableMapping[str, str] | None = None) -> str | None:
    """Why a mesh of `num_cpu_devices` CPU devices may abort in a collective, or None when the
    pool is large enough (or there is one device)."""
    env = os.environ if env is None else env
    pool = int(env.get(ENV_POOL) or 0) or (os.cpu_count() or 1)
    if num_cpu_devices <= 1 or pool >= 2 * num_cpu_devices:
        return None
    return (f"{num_cpu_devices} CPU devices share a thread pool of {max(pool, num_cpu_devices)} threads: "
            "two multi-device programs in flight can starve each other's collectives (XLA aborts after "
            f"40 s). Set {ENV_POOL}={PROGRAMS_IN_FLIGHT * num_cpu_devices} before JAX starts "
            "(mappa_jax.parallel.cpu_runtime.size_cpu_thread_pool does it).")
