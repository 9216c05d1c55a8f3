"""SandboxConfig: every knob of sandboxed code execution in one frozen value."""
import dataclasses
from typing import Mapping

BACKENDS = ("auto", "bwrap", "unshare", "unsandboxed")
CGROUP_MODES = ("auto", "require", "off")

# Package data that would hand model code the labelled rows behind the offline data-science
# tasks (scikit-learn's bundled datasets, and the copies other packages ship as test data).
# Relative to each site-packages directory; each is replaced by an empty directory in the sandbox.
HIDDEN_PACKAGE_DIRS = (
    "sklearn/datasets/data",
    "sklearn/datasets/descr",
    "sklearn/datasets/tests/data",   # OpenML fixtures, among them iris (id 61)
    "scipy/spatial/tests/data",      # iris.txt
    "scipy/io/arff/tests/data",      # iris.arff
    "mappa_jax",                     # an installed copy: the task writer and the graders
)
# Besides those, any package file whose name holds one of these and looks like data is hidden.
HIDDEN_DATA_NAMES = ("iris", "wine", "breast_cancer", "breast-cancer", "diabetes", "digits",
                     "linnerud")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation settings for running model-written Python.

    One run = one action's cells, executed in one fresh sandbox; an episode's runs share its
    workspace and happen one after another.

    backend: "auto" picks bubblewrap, else unshare, else (only if allow_unsandboxed) none.
        Naming a backend forces it (and fails loudly if it does not work on this machine).
    allow_unsandboxed: permit running model code with rlimits only, no isolation. Off by default.
    wall_timeout_s: wall-clock limit for one run; the whole sandbox is killed after it.
    cpu_time_s: CPU seconds (RLIMIT_CPU) per process of a run; a process over it is killed
        (killed_reason "cpu_time"). Threads of one process share it, so a single-threaded fit
        needs it close to wall_timeout_s.
    memory_bytes: address space per process (RLIMIT_AS); allocations beyond it raise MemoryError.
    total_memory_bytes: memory of all processes of one run together (a cgroup's memory.max, no
        swap); over it the kernel kills the largest (killed_reason "memory"). Needs cgroups.
    file_size_bytes: largest file a sandboxed process may write (RLIMIT_FSIZE).
    max_processes: processes/threads a run may hold at once: RLIMIT_NPROC, counted inside the
        sandbox's own user namespace (so one episode's fork bomb does not starve another), and the
        run cgroup's pids.max (plus the few wrapper processes) where cgroups work.
    cgroup: "auto" uses a per-run cgroup where this machine allows one and says so in describe()
        when not; "require" refuses to start without one; "off" never uses one.
    workspace_max_bytes / workspace_max_files: size and entry count of an episode's workspace.
        A run that takes it over the limit is stopped, its result says so, and later runs of the
        episode may not write files until enough is deleted.
    max_output_bytes: stdout and stderr are each cut to this many bytes (head and tail kept,
        a marker in between says how much was dropped).
    tmp_bytes: size of the sandbox's private /tmp (a tmpfs).
    hidden_package_dirs / hidden_data_names: package data made invisible to model code (see
        HIDDEN_PACKAGE_DIRS).
    sandbox_uid / sandbox_gid: the unprivileged ids model code runs as. When the host process is
        root, this is also the host uid the sandbox acts as, and workspaces are handed to it.
    tool_path: PATH used to find bwrap/unshare/setpriv/mount; None means the host's PATH.
    """

    backend: str = "auto"
    allow_unsandboxed: bool = False
    wall_timeout_s: float = 60.0
    cpu_time_s: int = 60
    memory_bytes: int = 4 << 30
    total_memory_bytes: int = 8 << 30
    file_size_bytes: int = 256 << 20
    max_processes: int = 64
    cgroup: str = "auto"
    workspace_max_bytes: int = 1 << 30
    workspace_max_files: int = 10_000
    max_output_bytes: int = 16 << 10
    tmp_bytes: int = 256 << 20
    hidden_package_dirs: tuple[str, ...] = HIDDEN_PACKAGE_DIRS
    hidden_data_names: tuple[str, ...] = HIDDEN_DATA_NAMES
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    tool_path: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"SandboxConfig.backend={self.backend!r}; expected one of {BACKENDS}")
        if self.cgroup not in CGROUP_MODES:
            raise ValueError(f"SandboxConfig.cgroup={self.cgroup!r}; expected one of "
                             f"{CGROUP_MODES}")
        for name in ("wall_timeout_s", "cpu_time_s", "memory_bytes", "total_memory_bytes",
                     "file_size_bytes", "max_processes", "workspace_max_bytes",
                     "workspace_max_files", "max_output_bytes", "tmp_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        for name in ("sandbox_uid", "sandbox_gid"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive (non-root) id, "
                                 f"got {value!r}")
        for name in ("hidden_package_dirs", "hidden_data_names"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"SandboxConfig.{name} must be a tuple of non-empty strings, "
                                 f"got {value!r}")
        for path in self.hidden_package_dirs:
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"SandboxConfig.hidden_package_dirs: {path!r} must be relative "
                                 "to site-packages")

    def runner_limits(self, file_size_bytes: int | None = None) -> dict:
        """The rlimits the in-sandbox runner applies before any model code runs."""
        return {
            "cpu_time_s": int(self.cpu_time_s),
            "memory_bytes": int(self.memory_bytes),
            "file_size_bytes": int(self.file_size_bytes if file_size_bytes is None
                                   else file_size_bytes),
            "max_processes": int(self.max_processes),
        }


def _megabytes(value) -> int:
    return int(value * (1 << 20))


# The trainer's config keys (train.sandbox_*; see mappa_jax/config.py) and, for each, the
# SandboxConfig field it sets and how its value converts (None: taken as it is).
TRAIN_KEYS = {
    "sandbox_wall_timeout_s": ("wall_timeout_s", float),
    "sandbox_cpu_time_s": ("cpu_time_s", int),
    "sandbox_memory_mb": ("memory_bytes", _megabytes),
    "sandbox_total_memory_mb": ("total_memory_bytes", _megabytes),
    "sandbox_max_processes": ("max_processes", int),
    "sandbox_workspace_mb": ("workspace_max_bytes", _megabytes),
    "sandbox_cgroup": ("cgroup", None),
    "allow_unsandboxed": ("allow_unsandboxed", None),
}


def sandbox_config_from(train: Mapping) -> SandboxConfig:
    """The SandboxConfig of a trainer config's `train` section (keys in TRAIN_KEYS)."""
    fields = {}
    for key, (field, convert) in TRAIN_KEYS.items():
        if key not in train:
            continue
        value = train[key]
        if convert is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"config key train.{key} must be a positive number, "
                                 f"got {value!r}")
            value = convert(value)
        fields[field] = value
    try:
        return SandboxConfig(**fields)
    except ValueError as error:
        message = str(error)
        for key, (field, _) in TRAIN_KEYS.items():
            message = message.replace(f"SandboxConfig.{field}=", f"train.{key}=").replace(
                f"SandboxConfig.{field} ", f"train.{key} ")
        raise ValueError(f"config: {message}") from error
