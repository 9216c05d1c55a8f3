"""Several CPU devices in one process: the thread pool is sized so collectives cannot starve it
(mappa_jax/parallel/cpu_runtime.py)."""
import subprocess
import sys
import textwrap

import pytest
from cpu_devices import cpu_devices_env

from mappa_jax.parallel import cpu_runtime


@pytest.mark.parametrize("env, devices", [
    ({}, 1),
    ({"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}, 8),
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
    ({"JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, 4),
])
def test_requested_cpu_devices(env, devices):
    assert cpu_runtime.requested_cpu_devices(dict(env)) == devices


def test_pool_is_sized_only_when_needed(monkeypatch):
    monkeypatch.setattr(cpu_runtime.os, "cpu_count", lambda: 2)
    env = {"JAX_NUM_CPU_DEVICES": "8"}
    assert cpu_runtime.size_cpu_thread_pool(env) == 32 and env[cpu_runtime.ENV_POOL] == "32"
    chosen = {"JAX_NUM_CPU_DEVICES": "8", cpu_runtime.ENV_POOL: "12"}  # the user's choice stands
    assert cpu_runtime.size_cpu_thread_pool(chosen) is None and chosen[cpu_runtime.ENV_POOL] == "12"
    single = {}
    assert cpu_runtime.size_cpu_thread_pool(single) is None and cpu_runtime.ENV_POOL not in single
    monkeypatch.setattr(cpu_runtime.os, "cpu_count", lambda: 64)  # enough cores: XLA's default is fine
    assert cpu_runtime.size_cpu_thread_pool({"JAX_NUM_CPU_DEVICES": "8"}) is None


def test_small_pool_warning_names_the_fix(monkeypatch):
    monkeypatch.setattr(cpu_runtime.os, "cpu_count", lambda: 2)
    message = cpu_runtime.cpu_pool_warning(8, {})
    assert "PJRT_NPROC=32" in message and "rendezvous" not in message
    assert cpu_runtime.cpu_pool_warning(8, {cpu_runtime.ENV_POOL: "32"}) is None
    assert cpu_runtime.cpu_pool_warning(1, {}) is None


# Three threads each dispatch 80 independent 8-device reductions without waiting: with XLA's default
# pool (8 threads on this 2-core machine) such a process aborted in 2 of 4 training runs and in
# every run of this script; with the sized pool it finishes.
STRESS = textwrap.dedent('''
    import threading
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mappa_jax.parallel import make_mesh
    mesh = make_mesh(data=8)
    xs = [jax.device_put(jnp.arange(64.0 * (i + 1)).reshape(8, -1), NamedSharding(mesh, P("data")))
          for i in range(20)]
    def work():
        for _ in range(2):
            jax.block_until_ready([jnp.mean(x) for x in xs] + [jnp.max(2 * x) for x in xs])
    threads = [threading.Thread(target=work) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("STRESS_OK")
''')


def test_independent_collective_programs_on_8_cpu_devices_finish():
    env = cpu_devices_env(8)
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", STRESS], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "STRESS_OK" in done.stdout, done.stderr[-3000:]
