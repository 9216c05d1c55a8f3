"""TFDS builders that store serialized Tasks as ArrayRecord files (no TensorFlow needed).

Each builder gathers its Tasks eagerly, names its config after a hash of their content (so a
changed source file gives a fresh dataset instead of a stale cache), and writes one split,
"tasks", of records {task_id, task_type, task_json}. Read them back with `task_source()`,
a random-access source that grain can index.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Iterable, Mapping, Sequence

import tensorflow_datasets as tfds

from mappa_jax.data import dsbench, math_files, sklearn_tasks, synthetic
from mappa_jax.data.task import DataError, Task

SPLIT = "tasks"


class TaskDataSource:
    """Random-access view of a prepared task dataset: source[i] is a Task."""

    def __init__(self, records, name: str, path: str):
        self._records = records
        self.name = name
        self.path = path  # the prepared dataset's directory

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Task:
        return Task.from_json(self._records[index]["task_json"])

    def index_fields(self) -> tuple[list[str], list[str]]:
        """(task ids, task types) in source order, without decoding whole tasks."""
        ids, types = [], []
        for index in range(len(self._records)):
            record = self._records[index]
            ids.append(record["task_id"].decode())
            types.append(record["task_type"].decode())
        return ids, types

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"TaskDataSource({self.name!r}, {len(self)} tasks at {self.path})"


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: subclasses only say where their Tasks come from (`_gather`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Serialized mappa_jax.data.Task records."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks next to the builder's source for URL checksums; these builders download
        # nothing, and the lookup needs the importlib_resources backport, which we skip.
        return None

    def __init__(self, *, data_dir: str | pathlib.Path, label: str = "tasks"):
        tasks = list(self._gather())
        if not tasks:
            raise DataError(f"{type(self).__name__} ({self._describe()}) produced no tasks")
        duplicates = _duplicates(t.task_id for t in tasks)
        if duplicates:
            raise DataError(f"{type(self).__name__} ({self._describe()}): duplicate task ids "
                            f"{duplicates[:10]}")
        self._tasks = tasks
        digest = hashlib.sha256("\n".join(t.to_json() for t in tasks).encode()).hexdigest()
        config = tfds.core.BuilderConfig(name=f"{label}_{digest[:16]}",
                                         description=self._describe())
        super().__init__(data_dir=str(data_dir), config=config, file_format="array_record")

    def _gather(self) -> Iterable[Task]:
        raise NotImplementedError

    def _describe(self) -> str:
        return type(self).__name__

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "task_id": tfds.features.Text(),
            "task_type": tfds.features.Text(),
            "task_json": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, description=self._describe(),
                                     features=features)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        for task in self._tasks:
            yield task.task_id, {"task_id": task.task_id, "task_type": task.task_type,
                                 "task_json": task.to_json()}


def _duplicates(ids: Iterable[str]) -> list[str]:
    seen, repeated = set(), []
    for task_id in ids:
        if task_id in seen:
            repeated.append(task_id)
        seen.add(task_id)
    return repeated


class MathFilesTasks(TaskBuilder):
    """Competition-math problem files (JSONL / JSON / parquet; see math_files.py)."""

    def __init__(self, sources: Sequence[math_files.MathSource], **kwargs):
        if not sources:
            raise DataError("MathFilesTasks needs at least one MathSource")
        self._sources = tuple(sources)
        super().__init__(**kwargs)

    def _gather(self):
        return math_files.load_math_tasks(self._sources)

    def _describe(self):
        return "math files: " + ", ".join(f"{s.task_type}={pathlib.Path(s.path).name}"
                                          for s in self._sources)


class DSBenchTasks(TaskBuilder):
    """DSBench-style task directories (see dsbench.py for the accepted layout)."""

    def __init__(self, tasks_root: str | pathlib.Path, answers_root: str | pathlib.Path,
                 id_prefix: str = "dsbench/", **kwargs):
        self._roots = (pathlib.Path(tasks_root), pathlib.Path(answers_root))
        self._id_prefix = id_prefix
        super().__init__(**kwargs)

    def _gather(self):
        return dsbench.load_dsbench_tasks(*self._roots, id_prefix=self._id_prefix)

    def _describe(self):
        return f"DSBench tasks under {self._roots[0].name}"


class SklearnTasks(TaskBuilder):
    """scikit-learn's shipped datasets as data-science tasks, files written under files_dir."""

    def __init__(self, files_dir: str | pathlib.Path, seed: int = 0,
                 test_fraction: float = 0.25, names: Sequence[str] | None = None, **kwargs):
        self._files_dir = pathlib.Path(files_dir)
        self._split = (seed, test_fraction, None if names is None else tuple(names))
        super().__init__(**kwargs)

    def _gather(self):
        seed, test_fraction, names = self._split
        return sklearn_tasks.write_sklearn_tasks(self._files_dir, seed, test_fraction, names)

    def _describe(self):
        return f"sklearn tasks (seed {self._split[0]}, test fraction {self._split[1]})"


class SyntheticMathTasks(TaskBuilder):
    """Generated math: our arithmetic word problems plus reasoning-gym generators.

    reasoning_gym maps generator name -> count; reasoning-gym must be installed if non-empty.
    """

    def __init__(self, arithmetic_count: int = 0, difficulty: int = 2, seed: int = 0,
                 reasoning_gym: Mapping[str, int] | None = None, templates: tuple[str, ...] = (), **kwargs):
        self._spec = (arithmetic_count, difficulty, seed, dict(reasoning_gym or {}), tuple(templates))
        super().__init__(**kwargs)

    def _gather(self):
        count, difficulty, seed, generators, templates = self._spec
        tasks = synthetic.arithmetic_tasks(count, seed, difficulty, templates) if count else []
        for name, n in sorted(generators.items()):
            tasks.extend(synthetic.reasoning_gym_tasks(name, n, seed))
        return tasks

    def _describe(self):
        count, difficulty, seed, generators, templates = self._spec
        families = f", templates {list(templates)}" if templates else ""
        return (f"synthetic math: {count} arithmetic (difficulty {difficulty}{families}), reasoning-gym "
                f"{generators}, seed {seed}")


def task_source(builder: TaskBuilder) -> TaskDataSource:
    """Prepare the builder's ArrayRecord files (once; later calls reuse them) and open them."""
    builder.download_and_prepare()
    return TaskDataSource(builder.as_data_source()[SPLIT], builder.info.full_name,
                          str(builder.data_dir))


def open_prepared(dataset_dir: str | pathlib.Path) -> TaskDataSource:
    """Open a task dataset prepared earlier (e.g. on another host), without its builder class."""
    dataset_dir = pathlib.Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        raise DataError(f"not a prepared task dataset (no dataset_info.json): {dataset_dir}")
    builder = tfds.builder_from_directory(str(dataset_dir))
    return TaskDataSource(builder.as_data_source()[SPLIT], builder.info.full_name,
                          str(dataset_dir))


_SPEC_KEYS = {
    "math_files": {"files"},
    "dsbench": {"tasks_root", "answers_root", "id_prefix"},
    "sklearn": {"files_dir", "seed", "test_fraction", "names"},
    "synthetic": {"arithmetic_count", "difficulty", "seed", "reasoning_gym", "templates"},
}


def builder_from_spec(spec: Mapping, data_dir: str | pathlib.Path) -> TaskBuilder:
    """A builder from a config value, e.g. {"source": "synthetic", "arithmetic_count": 512}.

    source "math_files": files = [{"path", "task_type", "id_prefix"?, "select_count"?,
    "select_seed"?}, ...] (a seeded subset of a file: math_files.py);
    "dsbench": tasks_root, answers_root[, id_prefix]; "sklearn": files_dir[, seed,
    test_fraction, names]; "synthetic": arithmetic_count, difficulty, seed, reasoning_gym
    ({generator: count}), templates (arithmetic problem families, `synthetic.template_names()`). Unknown sources or keys are errors naming them.
    """
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    source = spec.pop("source", None)
    if source not in _SPEC_KEYS:
        raise DataError(f"data spec 'source' must be one of {sorted(_SPEC_KEYS)}, got {source!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS[source])
    if unknown:
        raise DataError(f"data spec for source {source!r}: unknown key(s) {unknown}; allowed "
                        f"{sorted(_SPEC_KEYS[source])}")
    try:
        if source == "math_files":
            files = [math_files.MathSource(**dict(entry)) for entry in spec.get("files", ())]
            return MathFilesTasks(files, data_dir=data_dir)
        if source == "dsbench":
            return DSBenchTasks(**spec, data_dir=data_dir)
        if source == "sklearn":
            return SklearnTasks(**spec, data_dir=data_dir)
        return SyntheticMathTasks(**spec, data_dir=data_dir)
    except TypeError as err:  # a missing required key
        raise DataError(f"data spec for source {source!r}: {err}") from err
