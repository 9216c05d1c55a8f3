"""XLA:CPU process set-up (mappa_jax/parallel/cpu_runtime.py): with several CPU devices in one
process the thread pool is sized so collectives cannot starve it; freed host memory stays mapped."""
import os
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


# ---- host memory: freed buffers stay mapped ------------------------------------------------------
@pytest.mark.parametrize("env, devices_present, cpu_only", [
    ({"JAX_PLATFORMS": "cpu"}, True, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False, False),
    ({"JAX_PLATFORMS": " tpu "}, False, False),
    ({}, False, True),
    ({}, True, False),
])
def test_cpu_only_process(monkeypatch, env, devices_present, cpu_only):
    monkeypatch.setattr(cpu_runtime.os.path, "exists", lambda path: devices_present)
    assert cpu_runtime.cpu_only_process(dict(env)) is cpu_only


def test_keep_freed_host_memory_setting():
    assert cpu_runtime.keep_freed_host_memory({cpu_runtime.ENV_KEEP_MEMORY: "0"}) is False
    assert cpu_runtime.keep_freed_host_memory({"JAX_PLATFORMS": "tpu"}) is False  # auto: not a CPU run
    with pytest.raises(ValueError, match=cpu_runtime.ENV_KEEP_MEMORY):
        cpu_runtime.keep_freed_host_memory({cpu_runtime.ENV_KEEP_MEMORY: "yes"})


# A program whose 64 MB temporary glibc would mmap afresh (and the kernel fault in page by page) at
# every execution; kept, the next execution reuses the same pages.
TEMPORARY = textwrap.dedent('''
    import resource
    from mappa_jax.parallel.cpu_runtime import keep_freed_host_memory
    applied = keep_freed_host_memory()
    import jax, jax.numpy as jnp
    x, w = jnp.ones((256, 64)), jnp.ones((64, 65536)) / 64
    f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
    f(x, w).block_until_ready(); f(x, w).block_until_ready()
    per_call = []
    for _ in range(3):  # the quietest of 3 windows: a one-off fault burst elsewhere does not count
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            f(x, w).block_until_ready()
        per_call.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
    print("FAULTS", applied, min(per_call))
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_host_memory_spares_the_page_faults_of_each_execution():
    faults = {}
    for setting in ("1", "0"):
        # A clean environment: what earlier tests set (a compilation cache directory, say) changes
        # how this process allocates.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")}
        env.update(JAX_PLATFORMS="cpu", **{cpu_runtime.ENV_KEEP_MEMORY: setting})
        done = subprocess.run([sys.executable, "-c", TEMPORARY], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _, applied, per_call = done.stdout.split()[-3:]
        assert applied == str(setting == "1")
        faults[setting] = float(per_call)
    assert faults["0"] > 8000, faults  # 64 MB in 4 KiB pages: 16,384 when every page is new
    assert faults["1"] < faults["0"] / 20, faults
