"""The environment of a child process with several forced CPU devices (the device count is fixed
when JAX starts, so multi-device checks run in subprocesses). Shared by the sharding tests."""
import os

from mappa_jax.parallel.cpu_runtime import ENV_POOL, size_cpu_thread_pool


def cpu_devices_env(count: int = 8, extra_xla_flags: str = "") -> dict[str, str]:
    """os.environ with `count` CPU devices, the CPU platform and a thread pool large enough for
    the devices' collectives (see mappa_jax/parallel/cpu_runtime.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", ENV_POOL)}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}", extra_xla_flags]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    size_cpu_thread_pool(env)
    return env
