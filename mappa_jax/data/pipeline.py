"""Deterministic, resumable, stratified batches of Tasks, read through grain.

The order is a pure function of (seed, position): epoch e visits every task exactly once, in
an order drawn from seed and e. With stratification on, each stratum (task_type) is shuffled
on its own and the strata are interleaved evenly (item k of a stratum of size n sits at
(k + 0.5) / n of the epoch), so every window of batch_size consecutive slots, hence every
batch, holds each stratum in proportion to its share of the data (within +-1 task; +-2 in
a batch that spans two epochs). MAPPA's 34 regression / 30 classification tasks in batches of
16 give 8-9 regression and 7-8 classification tasks per batch.

Batch b is slots [b * batch_size, (b + 1) * batch_size) of the concatenated epochs, so the
position to checkpoint is one integer; get_state() returns it with what it depends on, as a
JSON-serializable dict, and set_state() makes the next batch exactly the one that would have
come.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Any, Sequence

import grain
import numpy as np

from mappa_jax.data.task import DataError, Task

STATE_VERSION = 1


def index_fields(source: Sequence[Task]) -> tuple[list[str], list[str]]:
    """(task ids, task types) of a task source in order, without decoding whole tasks."""
    if hasattr(source, "index_fields"):
        return source.index_fields()
    tasks = [source[i] for i in range(len(source))]
    return [t.task_id for t in tasks], [t.task_type for t in tasks]


def tasks_fingerprint(task_ids: Sequence[str]) -> str:
    """Short digest of an ordered list of task ids (a pipeline state refuses another one)."""
    return hashlib.sha256("\n".join(task_ids).encode()).hexdigest()[:16]


class TaskPipeline:
    """Iterator over batches (lists of Tasks) of a random-access task source.

    source: a TaskDataSource (from builders.task_source) or any sequence of Tasks.
    num_epochs: None repeats forever. drop_remainder: drop a last, short batch.
    stratify: interleave task_type strata in proportion (see the module doc); when False the
    whole epoch is one shuffled stratum.
    shard_index, shard_count: on a multi-host run each host passes jax.process_index() and
    jax.process_count() and gets items shard_index::shard_count of every global batch; all
    hosts compute the same global order, and one saved state restores every host.
    """

    def __init__(self, source: Sequence[Task], batch_size: int, seed: int,
                 num_epochs: int | None = None, stratify: bool = True,
                 drop_remainder: bool = True, read_threads: int = 2,
                 shard_index: int = 0, shard_count: int = 1):
        if len(source) == 0:
            raise DataError(f"cannot build batches from an empty task source ({source!r})")
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if num_epochs is not None and num_epochs <= 0:
            raise DataError(f"num_epochs must be positive or None, got {num_epochs}")
        if not 0 <= shard_index < shard_count or batch_size % shard_count:
            raise DataError(f"shard_index {shard_index} / shard_count {shard_count} must satisfy "
                            f"0 <= index < count with count dividing batch_size {batch_size}")
        self._shard = slice(shard_index, None, shard_count)
        self.shard_count = shard_count
        self._source = source
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_epochs = num_epochs
        self.stratify = stratify
        task_ids, task_types = index_fields(source)
        self._fingerprint = tasks_fingerprint(task_ids)
        strata = sorted(set(task_types)) if stratify else ["all"]
        self._strata = {name: np.array([i for i, t in enumerate(task_types)
                                        if not stratify or t == name]) for name in strata}
        self.num_tasks = len(source)
        self._epoch_cache: dict[int, np.ndarray] = {}
        if num_epochs is None:
            self.num_batches = None
            length = sys.maxsize
        else:
            slots = self.num_tasks * num_epochs
            self.num_batches = slots // batch_size if drop_remainder else -(-slots // batch_size)
            if self.num_batches == 0:
                raise DataError(f"{self.num_tasks} tasks x {num_epochs} epochs do not fill one "
                                f"batch of {batch_size} (drop_remainder=True)")
            length = self.num_batches
        self._slots_total = None if num_epochs is None else self.num_tasks * num_epochs
        self._dataset = grain.MapDataset.range(length).map(self._batch)
        self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4)
        self._iterator = iter(self._dataset.to_iter_dataset(self._read_options))

    @property
    def strata(self) -> dict[str, int]:
        """Stratum name -> number of tasks in it."""
        return {name: len(indices) for name, indices in self._strata.items()}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source indices in the order epoch `epoch` visits them."""
        order = self._epoch_cache.get(epoch)
        if order is None:
            order = self._compute_epoch_order(epoch)
            if len(self._epoch_cache) >= 4:  # a batch touches at most two epochs
                self._epoch_cache.pop(next(iter(self._epoch_cache)), None)
            self._epoch_cache[epoch] = order
        return order

    def _compute_epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        indices, keys, ties = [], [], []
        tie_rank = rng.permutation(len(self._strata))
        for rank, members in zip(tie_rank, self._strata.values()):
            shuffled = rng.permutation(members)
            indices.append(shuffled)
            keys.append((np.arange(len(shuffled)) + 0.5) / len(shuffled))
            ties.append(np.full(len(shuffled), rank))
        order = np.lexsort((np.concatenate(ties), np.concatenate(keys)))
        return np.concatenate(indices)[order]

    def batch_indices(self, batch: int) -> list[int]:
        """Source indices of global batch number `batch` (pure function of seed and batch)."""
        start = batch * self.batch_size
        stop = start + self.batch_size
        if self._slots_total is not None:
            stop = min(stop, self._slots_total)
        return [int(self.epoch_order(slot // self.num_tasks)[slot % self.num_tasks])
                for slot in range(start, stop)]

    def _batch(self, batch: int) -> list[Task]:
        return [self._source[i] for i in self.batch_indices(batch)[self._shard]]

    def __iter__(self):
        return self

    def __next__(self) -> list[Task]:
        return next(self._iterator)

    def epoch_of_next_batch(self) -> int:
        return self.get_state()["next_batch"] * self.batch_size // self.num_tasks

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: restoring it resumes with the very next batch."""
        next_batch = int(self._iterator.get_state()["next_index"])
        return {"version": STATE_VERSION, "next_batch": next_batch,
                "seed": self.seed, "batch_size": self.batch_size, "stratify": self.stratify,
                "num_tasks": self.num_tasks, "shard_count": self.shard_count,
                "tasks_fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        expected = self.get_state()
        for key in ("version", "seed", "batch_size", "stratify", "num_tasks", "shard_count",
                    "tasks_fingerprint"):
            if state.get(key) != expected[key]:
                raise DataError(f"pipeline state does not match this pipeline: {key} is "
                                f"{state.get(key)!r} in the state, {expected[key]!r} here")
        next_batch = int(state["next_batch"])
        if next_batch < 0 or (self.num_batches is not None and next_batch > self.num_batches):
            raise DataError(f"pipeline state next_batch={next_batch} is outside "
                            f"[0, {self.num_batches}]")
        self._iterator = iter(self._dataset.to_iter_dataset(self._read_options))
        self._iterator.set_state({"next_index": next_batch})
