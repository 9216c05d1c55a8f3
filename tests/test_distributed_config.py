"""How `resolve` turns config + environment into a cluster spec, and how host_slice splits work."""
from __future__ import annotations

import ml_collections
import pytest

from mappa_jax.parallel import distributed as dist

# What srun gives task 3 of a 4-node step (one task per node).
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
         "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456"}
# What the batch script itself sees: it is "process 0" of the job, but not part of any step.
SLURM_BATCH_STEP = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[007-010]",
                    "SLURM_JOB_ID": "123456"}


def test_no_signals_means_a_single_process():
    assert dist.resolve(None, env={}).is_single
    assert dist.resolve({"mode": "none"}, env=SLURM).is_single


def test_explicit_settings_from_config_or_environment():
    cfg = ml_collections.ConfigDict({"distributed": dist.default_config()})
    cfg.distributed.update(mode="explicit", coordinator_address="10.0.0.1:1234", num_processes=8,
                           process_id=0, local_device_ids="0,1")
    spec = dist.resolve(cfg, env={})
    assert spec == dist.ClusterSpec("explicit", "10.0.0.1:1234", 8, 0, (0, 1))
    env = {dist.ENV_COORDINATOR: "h:9", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "1"}
    assert dist.resolve(None, env=env) == dist.ClusterSpec("explicit", "h:9", 2, 1)  # auto picks it up


def test_explicit_errors_name_what_is_missing():
    with pytest.raises(ValueError, match=r"num_processes \(or \$MAPPA_NUM_PROCESSES\).*process_id"):
        dist.resolve({"mode": "explicit", "coordinator_address": "h:1"}, env={})
    with pytest.raises(ValueError, match="must be host:port"):
        dist.resolve({"mode": "explicit"}, env={dist.ENV_COORDINATOR: "h", dist.ENV_NUM_PROCESSES: "2",
                                                dist.ENV_PROCESS_ID: "0"})
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        dist.resolve({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, env={})
    with pytest.raises(ValueError, match="MAPPA_PROCESS_ID='x'"):
        dist.resolve(None, env={dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2",
                                dist.ENV_PROCESS_ID: "x"})


def test_bad_config_keys_and_modes_are_named():
    with pytest.raises(ValueError, match=r"unknown keys \['num_proceses'\]"):
        dist.resolve({"distributed": {"num_proceses": 2}}, env={})
    with pytest.raises(ValueError, match="distributed.mode='mpi'"):
        dist.resolve({"mode": "mpi"}, env={})


def test_slurm_from_environment():
    spec = dist.resolve(None, env=SLURM)
    assert spec == dist.ClusterSpec("slurm", f"gpu007:{dist.slurm_port('123456')}", 4, 3)
    assert 61440 <= dist.slurm_port("123456") <= 65535
    explicit_port = dist.resolve({"mode": "slurm", "coordinator_port": 5555}, env=SLURM)
    assert explicit_port.coordinator_address == "gpu007:5555"
    # one task per GPU: each process drives the device of its local rank
    per_gpu = dist.resolve(None, env={**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_LOCALID": "5"})
    assert per_gpu.local_device_ids == (5,)


def test_slurm_auto_detection_ignores_the_batch_script_and_prefers_step_variables():
    assert dist.resolve(None, env=SLURM_BATCH_STEP).is_single
    # explicit slurm mode still works from job-level variables
    assert dist.resolve({"mode": "slurm"}, env=SLURM_BATCH_STEP).num_processes == 4
    # a 2-task step on part of the job: the step's count and first node
    step = dist.resolve(None, env={**SLURM, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
                                   "SLURM_STEP_NODELIST": "gpu[009-010]"})
    assert (step.num_processes, step.process_id, step.coordinator_address.split(":")[0]) == (2, 1, "gpu009")


def test_slurm_errors_name_missing_variables():
    with pytest.raises(ValueError, match="SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, "
                                         "SLURM_STEP_NODELIST or SLURM_JOB_NODELIST.*srun"):
        dist.resolve({"mode": "slurm"}, env={})
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        dist.resolve({"mode": "slurm"}, env=env)


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[003-005,9]", "gpu003"), ("a[10,2],b3", "a10"), ("x-1,y-2", "x-1"),
    ("tpu-vm[0-3]-w", "tpu-vm0-w"), ("rack[1-2]-n[07-08],z", "rack1-n07")])

def test_first_slurm_host(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", ",a", "gpu[1-2"])
def test_bad_slurm_node_lists_are_errors(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        dist.first_slurm_host(nodelist)


def test_tpu_mode_and_tpu_detection():
    assert dist.resolve({"mode": "tpu"}, env={}) == dist.ClusterSpec("tpu")
    assert dist.resolve(None, env={"TPU_WORKER_HOSTNAMES": "w0,w1"}).mode == "tpu"


def test_initialize_is_a_noop_for_one_process():
    import jax
    assert dist.initialize({"mode": "none"}).is_single
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("n, count", [(0, 3), (1, 3), (7, 2), (11, 4), (16, 4), (5, 8)])
def test_host_slices_are_disjoint_complete_and_balanced(n, count):
    items = list(range(n))
    shards = [dist.host_shard(items, i, count) for i in range(count)]
    assert sum(shards, []) == items  # in process order: concatenation restores the order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_helpers_are_identity():
    assert dist.host_shard([1, 2, 3]) == [1, 2, 3]
    assert dist.gather_from_hosts([{"a": 1}]) == [{"a": 1}]
    assert dist.broadcast_from_host0("x") == "x"
    import jax.numpy as jnp
    fetched = dist.fetch_global({"a": jnp.arange(3)})
    assert type(fetched["a"]).__name__ == "ndarray" and fetched["a"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="process index 2"):
        dist.host_slice(4, 2, 2)
