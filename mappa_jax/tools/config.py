"""SandboxConfig: every knob of sandboxed code execution in one frozen value."""
import dataclasses

BACKENDS = ("auto", "bwrap", "unshare", "unsandboxed")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation settings for running model-written Python.

    backend: "auto" picks bubblewrap, else unshare, else (only if allow_unsandboxed) none.
        Naming a backend forces it (and fails loudly if it does not work on this machine).
    allow_unsandboxed: permit running model code with rlimits only, no isolation. Off by default.
    wall_timeout_s: wall-clock limit for one action's cells; the whole sandbox is killed after it.
    cpu_time_s: CPU seconds (RLIMIT_CPU) per process of the sandbox.
    memory_bytes: address space per process (RLIMIT_AS); allocations beyond it raise MemoryError.
    file_size_bytes: largest file a sandboxed process may write (RLIMIT_FSIZE).
    max_processes: processes/threads the sandbox may hold at once (RLIMIT_NPROC, counted inside
        the sandbox's own user namespace, so one episode's fork bomb does not starve another).
    max_output_bytes: stdout and stderr are each cut to this many bytes (head and tail kept,
        a marker in between says how much was dropped).
    tmp_bytes: size of the sandbox's private /tmp (a tmpfs).
    sandbox_uid / sandbox_gid: the unprivileged ids model code runs as. When the host process is
        root, this is also the host uid the sandbox acts as, and workspaces are handed to it.
    tool_path: PATH used to find bwrap/unshare/setpriv/mount; None means the host's PATH.
    """

    backend: str = "auto"
    allow_unsandboxed: bool = False
    wall_timeout_s: float = 60.0
    cpu_time_s: int = 30
    memory_bytes: int = 4 << 30
    file_size_bytes: int = 256 << 20
    max_processes: int = 64
    max_output_bytes: int = 16 << 10
    tmp_bytes: int = 256 << 20
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    tool_path: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"SandboxConfig.backend={self.backend!r}; expected one of {BACKENDS}")
        for name in ("wall_timeout_s", "cpu_time_s", "memory_bytes", "file_size_bytes",
                     "max_processes", "max_output_bytes", "tmp_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        for name in ("sandbox_uid", "sandbox_gid"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive (non-root) id, "
                                 f"got {value!r}")

    def runner_limits(self) -> dict:
        """The rlimits the in-sandbox runner applies before any model code runs."""
        return {
            "cpu_time_s": int(self.cpu_time_s),
            "memory_bytes": int(self.memory_bytes),
            "file_size_bytes": int(self.file_size_bytes),
            "max_processes": int(self.max_processes),
        }
