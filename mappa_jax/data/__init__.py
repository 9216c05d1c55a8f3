"""Tasks (math problems, data-science tasks), their TFDS builders and grain pipelines."""
from mappa_jax.data.builders import (DSBenchTasks, MathFilesTasks, SklearnTasks,
                                     SyntheticMathTasks, TaskBuilder, TaskDataSource,
                                     builder_from_spec, open_prepared, task_source)
from mappa_jax.data.latex import last_boxed
from mappa_jax.data.math_files import MathSource, load_math_tasks
from mappa_jax.data.dsbench import load_dsbench_tasks
from mappa_jax.data.overlap import DataOverlapError, check_no_overlap
from mappa_jax.data.pipeline import TaskPipeline
from mappa_jax.data.selection import SELECTION_FILE, write_data_selection
from mappa_jax.data.sklearn_tasks import write_sklearn_tasks
from mappa_jax.data.synthetic import arithmetic_tasks, reasoning_gym_tasks
from mappa_jax.data.task import DataError, DataScienceFiles, Task

__all__ = [
    "DSBenchTasks", "DataError", "DataOverlapError", "DataScienceFiles", "MathFilesTasks",
    "MathSource", "SELECTION_FILE", "SklearnTasks", "SyntheticMathTasks", "Task", "TaskBuilder", "TaskDataSource",
    "TaskPipeline", "arithmetic_tasks", "builder_from_spec", "check_no_overlap", "last_boxed",
    "load_dsbench_tasks", "load_math_tasks", "open_prepared", "reasoning_gym_tasks",
    "task_source", "write_data_selection", "write_sklearn_tasks",
]
