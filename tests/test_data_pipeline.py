"""grain pipelines: deterministic order, exact resume, epochs, stratified batches."""
import collections
import json

import pytest

from mappa_jax.data import DataError, SyntheticMathTasks, Task, TaskPipeline, task_source


def _tasks(counts):
    return [Task(f"{kind}-{i}", "math", kind, f"problem {kind} {i}", "1")
            for kind, n in counts.items() for i in range(n)]


MAPPA_DS = {"regression": 34, "classification": 30}  # MAPPA's 64 training tasks


def _ids(batches):
    return [[t.task_id for t in batch] for batch in batches]


def test_same_seed_same_order_other_seed_other_order():
    tasks = _tasks(MAPPA_DS)
    first = _ids(TaskPipeline(tasks, 16, seed=1, num_epochs=2))
    assert first == _ids(TaskPipeline(tasks, 16, seed=1, num_epochs=2))
    assert first != _ids(TaskPipeline(tasks, 16, seed=2, num_epochs=2))
    assert first[:4] != first[4:]  # epochs are reshuffled


def test_resume_from_json_state_gives_exactly_the_next_batches():
    tasks = _tasks(MAPPA_DS)
    uninterrupted = _ids(TaskPipeline(tasks, 16, seed=3, num_epochs=5))
    pipeline = TaskPipeline(tasks, 16, seed=3, num_epochs=5)
    for _ in range(7):  # stop mid-epoch (epochs are 4 batches)
        next(pipeline)
    saved = json.dumps(pipeline.get_state())
    resumed = TaskPipeline(tasks, 16, seed=3, num_epochs=5)
    resumed.set_state(json.loads(saved))
    assert _ids(resumed) == uninterrupted[7:]
    assert json.loads(saved)["next_batch"] == 7


def test_resume_rejects_state_of_another_pipeline():
    tasks = _tasks(MAPPA_DS)
    state = TaskPipeline(tasks, 16, seed=3).get_state()
    with pytest.raises(DataError, match="seed is 3 in the state, 4 here"):
        TaskPipeline(tasks, 16, seed=4).set_state(state)
    with pytest.raises(DataError, match="tasks_fingerprint"):
        TaskPipeline(list(reversed(tasks)), 16, seed=3).set_state(state)


def test_every_epoch_visits_every_task_once():
    tasks = _tasks({"a": 10, "b": 7})
    pipeline = TaskPipeline(tasks, 5, seed=0, num_epochs=3, drop_remainder=False)
    batches = _ids(pipeline)
    assert pipeline.num_batches == len(batches) == 11
    flat = [task_id for batch in batches for task_id in batch]
    assert len(flat) == 51
    for epoch in range(3):
        assert sorted(flat[epoch * 17:(epoch + 1) * 17]) == sorted(t.task_id for t in tasks)
    dropped = _ids(TaskPipeline(tasks, 5, seed=0, num_epochs=3))
    assert len(dropped) == 10 and dropped == batches[:10]


def test_batches_hold_strata_in_proportion():
    tasks = _tasks(MAPPA_DS)
    pipeline = TaskPipeline(tasks, 16, seed=5, num_epochs=21)
    assert pipeline.num_batches == 84 and pipeline.strata == {"classification": 30,
                                                              "regression": 34}
    for batch in pipeline:
        counts = collections.Counter(t.task_type for t in batch)
        # 16 * 34/64 = 8.5 regression tasks per batch: each batch holds 8 or 9.
        assert counts["regression"] in (8, 9) and sum(counts.values()) == 16
    three = _tasks({"a": 30, "b": 20, "c": 10})
    for batch in TaskPipeline(three, 12, seed=0, num_epochs=4):
        counts = collections.Counter(t.task_type for t in batch)
        for kind, share in (("a", 6), ("b", 4), ("c", 2)):
            assert abs(counts[kind] - share) <= 1, counts
    # Unstratified: a plain shuffle, so some batch is far from proportional.
    skews = [collections.Counter(t.task_type for t in batch)["c"]
             for batch in TaskPipeline(three, 12, seed=0, num_epochs=4, stratify=False)]
    assert max(skews) - min(skews) >= 2


def test_pipeline_reads_array_record_source(tmp_path):
    source = task_source(SyntheticMathTasks(arithmetic_count=12, seed=1,
                                            reasoning_gym={"basic_arithmetic": 4},
                                            data_dir=tmp_path))
    batches = list(TaskPipeline(source, 4, seed=0, num_epochs=1))
    assert len(batches) == 4
    assert all(collections.Counter(t.task_type for t in b) == {"arithmetic": 3,
                                                              "basic_arithmetic": 1}
               for b in batches)
    assert sorted(t.task_id for b in batches for t in b) == sorted(t.task_id for t in source)


def test_host_shards_partition_the_global_batch():
    tasks = _tasks(MAPPA_DS)
    whole = _ids(TaskPipeline(tasks, 16, seed=9, num_epochs=2))
    shards = [_ids(TaskPipeline(tasks, 16, seed=9, num_epochs=2, shard_index=i, shard_count=4))
              for i in range(4)]
    for number, batch in enumerate(whole):
        assert sorted(sum((shard[number] for shard in shards), [])) == sorted(batch)
        assert all(len(shard[number]) == 4 for shard in shards)
    with pytest.raises(DataError, match="count dividing batch_size 16"):
        TaskPipeline(tasks, 16, seed=0, shard_index=0, shard_count=3)


def test_bad_pipeline_arguments():
    with pytest.raises(DataError, match="empty task source"):
        TaskPipeline([], 4, seed=0)
    with pytest.raises(DataError, match="batch_size must be positive"):
        TaskPipeline(_tasks({"a": 2}), 0, seed=0)
    with pytest.raises(DataError, match="do not fill one batch"):
        TaskPipeline(_tasks({"a": 2}), 4, seed=0, num_epochs=1)
