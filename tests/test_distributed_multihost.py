"""Two real JAX processes on this machine form one CPU cluster over loopback (gloo collectives,
4 CPU devices each): one global 8-device mesh, disjoint host shards, identical gathered lists, and
a jitted sharded computation that agrees with NumPy and bit-for-bit across hosts.

This file is also the worker: `run_local_cluster([python, this file])` runs `_worker()` in each
process, which prints one `RESULT {json}` line for the test to compare. To test another multi-host
program (e.g. training steps), write a worker that prints its RESULT line and use tests/cluster_workers.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import pytest

from cluster_workers import run_workers
from mappa_jax.parallel.distributed import LocalClusterError, run_local_cluster

ITEMS = [f"task-{i}" for i in range(11)]  # 11 over 2 hosts: uneven shards (6 + 5)


def _worker() -> None:
    start = time.monotonic()
    from mappa_jax.parallel import batch_sharding, distributed, make_mesh, replicated
    spec = distributed.initialize()  # auto: the MAPPA_* variables set by run_local_cluster
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    pid = jax.process_index()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # Host-side work: each host handles its shard; payload sizes differ per host (padding path).
    local = distributed.host_shard(ITEMS)
    done = [{"item": item, "host": pid, "note": "x" * (100 * (pid + 1))} for item in local]
    gathered = distributed.gather_from_hosts(done)
    seed = distributed.broadcast_from_host0(1234 + pid)
    decided, computed = _owner_decides(distributed, pid)
    unpicklable = _owner_raises_unpicklable(distributed, pid)

    # Device work: each host contributes its rows of the batch; weights come from one shared key.
    rng = np.random.default_rng(0)
    x_full = rng.standard_normal((16, 8), dtype=np.float32)
    rows = x_full[distributed.host_slice(len(x_full))]
    x = jax.make_array_from_process_local_data(batch_sharding(mesh, 2), rows, x_full.shape)
    w = jax.jit(lambda: jax.random.normal(jax.random.key(seed), (8, 6)),
                out_shardings=NamedSharding(mesh, P("fsdp", "tensor")))()
    step = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(axis=1), out_shardings=replicated(mesh))
    y = step(x, w)
    w_host = np.asarray(jax.jit(lambda w: w, out_shardings=replicated(mesh))(w))
    # A batch-sharded result spans both hosts: jax.device_get cannot fetch it, fetch_global can.
    rows_out = jax.jit(lambda x, w: x @ w, out_shardings=batch_sharding(mesh, 2))(x, w)
    fetched = distributed.fetch_global({"rows": rows_out})["rows"]
    print("RESULT " + json.dumps({
        "mode": spec.mode, "process_index": pid, "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "mesh_devices": sorted(d.id for d in mesh.devices.flat), "mesh_shape": dict(mesh.shape),
        "local": local, "gathered": gathered, "seed": seed,
        "y": np.asarray(y).tolist(), "y_bytes": np.asarray(y).tobytes().hex(),
        "reference": np.tanh(x_full @ w_host).sum(axis=1).tolist(),
        "fetched_ok": bool(np.allclose(fetched, x_full @ w_host, rtol=1e-5, atol=1e-5)),
        "fetched_shape": list(fetched.shape), "decided": decided, "computed": computed,
        "unpicklable": unpicklable,
        "seconds": time.monotonic() - start}), flush=True)


def _owner_decides(distributed, pid: int) -> tuple[list, list]:
    """Six results whose local values differ per host (random draws), owned alternately, asked
    for in opposite orders on the two hosts, one of them raising."""
    import asyncio
    import random
    computed = []

    async def draw(key):
        computed.append(key)
        await asyncio.sleep(0.01 * random.random())
        if key == "k3":
            raise ValueError(f"failed on host {pid}")
        return [pid, random.random()]

    async def settle(key, owner):
        try:
            return await decider.decide(owner, key, lambda: draw(key))
        except ValueError as err:
            return f"raised: {err}"

    async def main():
        keys = [f"k{i}" for i in range(6)]
        order = keys if pid == 0 else keys[::-1]
        results = dict(zip(order, await asyncio.gather(*(settle(k, int(k[1]) % 2) for k in order))))
        return [results[k] for k in keys]

    decider = distributed.OwnerDecides("test/owner_decides")
    decided = asyncio.run(main())
    distributed.sync_hosts("owner_decides_read")  # both have read before the records go
    decider.clear()
    decider.close()
    return decided, sorted(computed)


def _owner_raises_unpicklable(distributed, pid: int) -> str:
    """Host 0's computation raises an exception that pickle refuses (it holds a lambda)."""
    import asyncio

    class Unpicklable(Exception):
        def __init__(self):
            super().__init__("holds a lambda")
            self.callback = lambda: None

    async def fail():
        raise Unpicklable()

    decider = distributed.OwnerDecides("test/owner_decides_unpicklable", wait_s=60)
    try:
        asyncio.run(decider.decide(0, "k", fail))
        seen = "returned"
    except Exception as err:  # noqa: BLE001 - what each host raises is the result
        seen = f"{type(err).__name__}: {err}"
    distributed.sync_hosts("owner_decides_unpicklable_read")
    decider.clear()
    decider.close()
    return seen


@pytest.fixture(scope="module")
def two_hosts():
    return run_workers(pathlib.Path(__file__))


def test_one_global_mesh_of_eight_devices(two_hosts):
    for pid, r in enumerate(two_hosts):
        assert r["mode"] == "explicit" and r["process_index"] == pid and r["process_count"] == 2
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
        assert len(set(r["mesh_devices"])) == 8
    assert two_hosts[0]["mesh_devices"] == two_hosts[1]["mesh_devices"]


def test_host_shard_is_disjoint_and_complete(two_hosts):
    shards = [r["local"] for r in two_hosts]
    assert not set(shards[0]) & set(shards[1])
    assert shards[0] + shards[1] == ITEMS
    assert [len(s) for s in shards] == [6, 5]


def test_gather_from_hosts_gives_every_host_the_full_ordered_list(two_hosts):
    first, second = (r["gathered"] for r in two_hosts)
    assert first == second
    assert [g["item"] for g in first] == ITEMS
    # each item was processed exactly once, by the host that owned it
    assert [g["host"] for g in first] == [0] * 6 + [1] * 5
    assert {len(g["note"]) for g in first} == {100, 200}


def test_fetch_global_gathers_arrays_spanning_hosts(two_hosts):
    assert all(r["fetched_ok"] and r["fetched_shape"] == [16, 6] for r in two_hosts)


def test_broadcast_from_host0(two_hosts):
    assert [r["seed"] for r in two_hosts] == [1234, 1234]


def test_sharded_computation_matches_numpy_and_is_identical_on_both_hosts(two_hosts):
    assert two_hosts[0]["y_bytes"] == two_hosts[1]["y_bytes"]
    np.testing.assert_allclose(two_hosts[0]["y"], two_hosts[0]["reference"], rtol=1e-5, atol=1e-5)
    assert max(r["seconds"] for r in two_hosts) < 60


def test_owner_decides_shares_each_owners_result_computed_once(two_hosts):
    first, second = (r["decided"] for r in two_hosts)
    assert first == second  # the same values on both hosts, though each host's draws differ
    assert [first[i][0] for i in (0, 1, 2, 4, 5)] == [0, 1, 0, 0, 1]  # each key's owner computed it
    assert first[3] == "raised: failed on host 1"  # the owner's exception, raised on both hosts
    assert two_hosts[0]["computed"] == ["k0", "k2", "k4"] and two_hosts[1]["computed"] == ["k1", "k3", "k5"]


def test_an_unpicklable_exception_still_reaches_the_other_host(two_hosts):
    owner, other = (r["unpicklable"] for r in two_hosts)
    assert owner == "Unpicklable: holds a lambda"  # the owner raises its own exception
    assert other == "RuntimeError: Unpicklable: holds a lambda"  # the other host, at once, named


def test_a_failing_process_stops_the_cluster_quickly():
    # Process 1 fails at once; process 0 would wait (as in a collective) and must be killed.
    code = ("import os, sys, time\n"
            "if os.environ['MAPPA_PROCESS_ID'] == '1':\n"
            "    print('boom', file=sys.stderr); sys.exit(3)\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(LocalClusterError, match="a process failed") as err:
        run_local_cluster([sys.executable, "-c", code], 2, 1, timeout_s=30)
    assert time.monotonic() - start < 15
    assert "boom" in str(err.value) and "exit 3" in str(err.value)


def test_command_line_runs_a_local_cluster(capsys):
    from mappa_jax.parallel.distributed import main
    code = "import os; print('id', os.environ['MAPPA_PROCESS_ID'], os.environ['JAX_NUM_CPU_DEVICES'])"
    assert main(["--processes", "2", "--devices-per-process", "3", "--", sys.executable, "-c", code]) == 0
    out = capsys.readouterr().out
    assert "id 0 3" in out and "id 1 3" in out
    assert main(["--processes", "2", "--", sys.executable, "-c", "raise SystemExit(4)"]) == 1


def test_a_hanging_cluster_times_out():
    start = time.monotonic()
    with pytest.raises(LocalClusterError, match="timed out"):
        run_local_cluster([sys.executable, "-c", "import time; time.sleep(60)"], 2, 1, timeout_s=2)
    assert time.monotonic() - start < 10


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker()
