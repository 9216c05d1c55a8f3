"""How a sandboxed interpreter is started: the command lines of each isolation backend.

Every backend gives model code the same view:
  /usr (and /bin, /lib... as on the host), a few /etc files the loader needs, the Python
  interpreter's prefix and site-packages (read-only, so the sandbox imports exactly our
  numpy/pandas/scikit-learn; outside /usr they appear under /opt/python/<n>, whatever their host
  path: a venv under /tmp or $HOME works and reveals nothing of the host's layout), with bundled
  datasets (scikit-learn's and other packages' copies) covered by empty directories,
  /workspace (the episode's directory, the only writable host path), a private /tmp and /dev/shm
  (size-capped tmpfs), a fresh /proc and a minimal /dev.
No network (a new network namespace has only a downed loopback), no other processes (new pid
namespace), no view of $HOME or the project checkout, running as an unprivileged uid with no
capabilities in a user namespace of its own.

When the host process is root, the sandbox must not act as host root (file ownership would let it
read root-only files, and the kernel never enforces RLIMIT_NPROC for host root, so a fork bomb
would be unbounded). The sandbox then acts as host uid `sandbox_uid`. Because that uid cannot
traverse root-only directories such as /root (where pyenv puts Python), the paths to expose are
first bind-mounted, as root, onto a world-readable staging directory inside a private mount
namespace, and bubblewrap binds them from there.
"""
import functools
import os
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

from mappa_jax.tools.config import SandboxConfig

_REAPER_SOURCE = (Path(__file__).parent / "reaper.py").read_text()

SANDBOX_WORKSPACE = "/workspace"
# Directories that are symlinks into /usr on merged-/usr systems and real dirs elsewhere.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
              "/etc/alternatives", "/etc/mime.types", "/etc/fonts")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class SandboxUnavailableError(RuntimeError):
    """No isolation backend works here and unsandboxed execution was not allowed."""


def sandbox_environment(config: SandboxConfig) -> dict[str, str]:
    """The environment model code sees besides PATH (nothing is inherited from the host)."""
    return {
        # Caches and dotfiles go to the private /tmp, so the workspace holds only what the agents
        # wrote on purpose (its file list is shown to the next agent and to the coach).
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "XDG_CONFIG_HOME": "/tmp/.config",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "USER": "sandbox",  # getpass.getuser() reads these; the sandbox has no /etc/passwd
        "LOGNAME": "sandbox",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        # One BLAS/OpenMP thread: threads count against max_processes and the host has few cores.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# Where the interpreter's host directories appear inside the sandbox: neutral names, so neither
# a venv under /tmp (hidden by the private /tmp) nor one under $HOME (whose path would show the
# host's home) matters. /usr stays at /usr.
SANDBOX_PYTHON_ROOT = "/opt/python"
_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".data", ".dat", ".arff", ".json", ".npy", ".npz",
                  ".mat", ".pkl", ".pickle", ".parquet", ".xls", ".xlsx", ".rst", ".gz", ".bz2",
                  ".xz", ".zip")


def _site_packages() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(os.path.realpath(path) for path in dirs if os.path.isdir(path)))


def _unused_site_packages() -> list[str]:
    """The base interpreter's site-packages that a venv does not import from. They are visible
    with the base prefix (or /usr), so they are hidden whole: their packages' data too."""
    used = set(_site_packages())
    base = site.getsitepackages(list(dict.fromkeys([sys.base_prefix, sys.base_exec_prefix])))
    return [path for path in dict.fromkeys(os.path.realpath(p) for p in base if os.path.isdir(p))
            if path not in used]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


class PythonLayout:
    """The host interpreter's directories and how they appear inside the sandbox.

    mounts: (host directory, sandbox directory) pairs to bind read-only; directories under /usr
    need none (/usr is bound whole). Everything else about the interpreter (its executable, its
    site-packages, the libpython the executable's RUNPATH points to) is translated through them.
    hidden_dirs / hidden_files: sandbox paths of package data to cover with an empty directory or
    file (see SandboxConfig.hidden_package_dirs).
    """

    def __init__(self, config: SandboxConfig):
        candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                      os.path.dirname(os.path.realpath(sys.executable)), *_site_packages()]
        resolved = sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})
        roots = []
        for path in resolved:  # sorted, so a parent comes before its children
            if _under(path, "/usr") or any(_under(path, parent) for parent in roots):
                continue
            roots.append(path)
        self.mounts = [(path, f"{SANDBOX_PYTHON_ROOT}/{index}") for index, path in enumerate(roots)]
        self.host_executable = os.path.realpath(sys.executable)
        self.executable = self.to_sandbox(self.host_executable)
        self.site_dirs = [self.to_sandbox(path) for path in _site_packages()]
        self.library_dirs = []
        for prefix in dict.fromkeys([sys.base_prefix, sys.base_exec_prefix]):
            lib = os.path.join(os.path.realpath(prefix), "lib")
            if not _under(lib, "/usr") and os.path.isdir(lib) and any(
                    name.startswith("libpython") for name in os.listdir(lib)):
                self.library_dirs.append(self.to_sandbox(lib))
        self.hidden_dirs, self.hidden_files = self._hidden(config)

    def to_sandbox(self, host_path: str) -> str:
        host_path = os.path.realpath(host_path)
        for host, inside in self.mounts:
            if _under(host_path, host):
                return inside + host_path[len(host):]
        return host_path

    def _hidden(self, config: SandboxConfig) -> tuple[list[str], list[str]]:
        dirs = []
        for site_dir in _site_packages():
            for relative in config.hidden_package_dirs:
                if os.path.isdir(os.path.join(site_dir, relative)):
                    dirs.append(os.path.join(site_dir, relative))
        dirs += _unused_site_packages()
        names = tuple(name.lower() for name in config.hidden_data_names)
        files = []
        for site_dir in _site_packages():
            for directory, subdirs, filenames in os.walk(site_dir):
                if any(_under(directory, hidden) for hidden in dirs):
                    subdirs[:] = []
                    continue
                for filename in filenames:
                    lower = filename.lower()
                    if lower.endswith(_DATA_SUFFIXES) and any(name in lower for name in names):
                        files.append(os.path.join(directory, filename))
        return ([self.to_sandbox(path) for path in dirs],
                [self.to_sandbox(path) for path in files])

    def environment(self) -> dict[str, str]:
        python_bin = os.path.dirname(self.executable)
        env = {"PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin"}
        if self.library_dirs:  # the executable's RUNPATH names the host path of libpython
            env["LD_LIBRARY_PATH"] = ":".join(self.library_dirs)
        return env


@functools.lru_cache(maxsize=8)
def _cached_layout(executable: str, hidden_dirs: tuple, hidden_names: tuple) -> PythonLayout:
    return PythonLayout(SandboxConfig(hidden_package_dirs=hidden_dirs,
                                      hidden_data_names=hidden_names))


def python_layout(config: SandboxConfig) -> PythonLayout:
    """The layout for this interpreter; the site-packages walk (about a second) is done once."""
    return _cached_layout(sys.executable, config.hidden_package_dirs, config.hidden_data_names)


def python_command(executable: str, source: str) -> list[str]:
    # -I: ignore PYTHON* variables, the user site and the current directory on sys.path.
    return [executable, "-I", "-c", source]


class Backend:
    """Builds the argv that runs `inner` (the sandboxed interpreter) under one isolation method."""

    name = "base"
    isolated = True

    def __init__(self, config: SandboxConfig, tools: dict[str, str],
                 layout: "PythonLayout | None" = None):
        self.config = config
        self.tools = tools
        self.host_is_root = os.geteuid() == 0
        self.layout = layout if layout is not None else python_layout(config)
        self._staging = None

    def describe(self) -> str:
        raise NotImplementedError

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        raise NotImplementedError

    @property
    def executable(self) -> str:
        """The interpreter's path as the sandboxed process sees it."""
        return self.layout.executable

    @property
    def site_dirs(self) -> list[str]:
        """site-packages dirs to add inside the sandbox (the runner runs with -I, no user site)."""
        return self.layout.site_dirs

    def environment(self) -> dict[str, str]:
        return {**sandbox_environment(self.config), **self.layout.environment()}

    def launch(self, inner: list[str], workspace: Path, procs_files=()) -> list[str]:
        """`command` under the reaper (see reaper.py), which also joins the run's cgroups."""
        return [self.layout.host_executable, "-I", "-S", "-c", _REAPER_SOURCE, *procs_files,
                "--", *self.command(inner, workspace)]

    def _describe_python(self) -> str:
        hidden = len(self.layout.hidden_dirs) + len(self.layout.hidden_files)
        mounts = ", ".join(inside for _, inside in self.layout.mounts) or "under /usr"
        return (f"read-only system and Python ({mounts}; {hidden} bundled dataset paths "
                "hidden)")

    def staging_dir(self) -> Path:
        """A world-readable directory of empty mount points (bind targets in private namespaces)."""
        if self._staging is None:
            staging = Path(tempfile.mkdtemp(prefix="mappa-sandbox-"))
            staging.chmod(0o755)
            for index in range(len(self.layout.mounts)):
                (staging / f"ro{index}").mkdir(mode=0o755)
            for name in ("workspace", "root", "empty"):
                (staging / name).mkdir(mode=0o755)
            (staging / "empty_file").touch(mode=0o444)
            self._staging = staging
            # Removed when the backend is closed or collected, or at interpreter exit.
            self._cleanup = weakref.finalize(self, shutil.rmtree, staging, ignore_errors=True)
        return self._staging

    def hides(self) -> list[tuple[str, str]]:
        """(host empty directory or file, sandbox path) binds that cover bundled datasets."""
        staging = self.staging_dir()
        return ([(str(staging / "empty"), path) for path in self.layout.hidden_dirs]
                + [(str(staging / "empty_file"), path) for path in self.layout.hidden_files])

    def close(self):
        if self._staging is not None:
            self._cleanup()
            self._staging = None


def _shell(lines: list[str]) -> str:
    # mount, pivot_root and umount live in sbin, which a non-root PATH often lacks.
    return ("set -eu\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            + "\n".join(lines) + "\n")


class BubblewrapBackend(Backend):
    name = "bwrap"

    def describe(self) -> str:
        mode = (f"host root, sandbox acts as host uid {self.config.sandbox_uid}"
                if self.host_is_root else f"host uid {os.geteuid()}")
        return (f"bwrap ({self.tools['bwrap']}): user/pid/net/ipc/uts/cgroup namespaces, "
                f"uid {self.config.sandbox_uid} in sandbox, {mode}, {self._describe_python()}, "
                f"writable {SANDBOX_WORKSPACE} only, no network")

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        config = self.config
        if self.host_is_root:
            staging = self.staging_dir()
            sources = [str(staging / f"ro{index}") for index in range(len(self.layout.mounts))]
            workspace_source = str(staging / "workspace")
        else:
            sources = [host for host, _ in self.layout.mounts]
            workspace_source = str(workspace)
        # --disable-userns: model code cannot make further user namespaces (kernel attack surface).
        args = [self.tools["bwrap"], "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            args += ["--ro-bind-try", path, path]
        for source, (_, inside) in zip(sources, self.layout.mounts):
            args += ["--ro-bind", source, inside]
        for empty, path in self.hides():
            args += ["--ro-bind", empty, path]
        args += ["--bind", workspace_source, SANDBOX_WORKSPACE,
                 "--proc", "/proc", "--dev", "/dev",
                 "--size", str(config.tmp_bytes), "--tmpfs", "/tmp",
                 "--size", str(config.tmp_bytes), "--tmpfs", "/dev/shm",
                 "--remount-ro", "/",
                 "--uid", str(config.sandbox_uid), "--gid", str(config.sandbox_gid),
                 "--chdir", SANDBOX_WORKSPACE, "--clearenv"]
        for key, value in self.environment().items():
            args += ["--setenv", key, value]
        args += ["--", *inner]
        if not self.host_is_root:
            return args
        # As root: expose the paths on the staging mount points in a private mount namespace,
        # then drop to the sandbox uid and let bubblewrap run unprivileged from there.
        binds = [f"mount --bind {shlex.quote(path)} {shlex.quote(source)}"
                 for (path, _), source in zip(self.layout.mounts, sources)]
        binds.append(f"mount --bind {shlex.quote(str(workspace))} {shlex.quote(workspace_source)}")
        binds.append(f"exec {shlex.quote(self.tools['setpriv'])} --reuid={config.sandbox_uid} "
                     f"--regid={config.sandbox_gid} --clear-groups -- \"$@\"")
        return [self.tools["unshare"], "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", _shell(binds), "mappa-sandbox", *args]


class UnshareBackend(Backend):
    """Namespaces via util-linux `unshare`, the new root built by a small shell script."""

    name = "unshare"

    def describe(self) -> str:
        mode = ("host root: no outer user namespace, drops to host uid "
                f"{self.config.sandbox_uid}" if self.host_is_root
                else f"host uid {os.geteuid()} mapped to root of an outer user namespace")
        return (f"unshare ({self.tools['unshare']}): mount/pid/net/ipc/uts namespaces, pivot_root "
                f"into a tmpfs root, {mode}, inner user namespace with uid "
                f"{self.config.sandbox_uid}, no capabilities, {self._describe_python()}, "
                f"writable {SANDBOX_WORKSPACE} only, no network")

    def _setup_script(self, workspace: Path) -> str:
        config = self.config
        root = shlex.quote(str(self.staging_dir() / "root"))
        quote = shlex.quote
        lines = [f"R={root}", "mount -t tmpfs -o size=16m,mode=0755 mappa-root \"$R\""]

        def bind(path, target, read_only=True, is_dir=True):
            make = (f"mkdir -p \"$R\"{quote(target)}" if is_dir else
                    f"mkdir -p \"$R\"{quote(os.path.dirname(target))} && "
                    f"touch \"$R\"{quote(target)}")
            flag = "-o ro " if read_only else ""
            lines.extend([make, f"mount --bind {flag}{quote(path)} \"$R\"{quote(target)}"])

        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                lines.append(f"ln -s {quote(os.readlink(path))} \"$R\"{quote(path)}")
            elif os.path.isdir(path):
                bind(path, path)
        for path in _ETC_FILES:
            if os.path.exists(path):
                bind(path, path, is_dir=os.path.isdir(path))
        for path, inside in self.layout.mounts:
            bind(path, inside)
        for empty, path in self.hides():
            lines.append(f"mount --bind -o ro {quote(empty)} \"$R\"{quote(path)}")
        bind(str(workspace), SANDBOX_WORKSPACE, read_only=False)
        lines += [
            "mkdir -p \"$R/tmp\" \"$R/proc\" \"$R/dev/shm\"",
            f"mount -t tmpfs -o size={config.tmp_bytes},mode=1777 mappa-tmp \"$R/tmp\"",
            "mount -t proc proc \"$R/proc\"",
            "mount -t tmpfs -o size=64k,mode=0755 mappa-dev \"$R/dev\"",
            "mkdir -p \"$R/dev/shm\"",
            f"mount -t tmpfs -o size={config.tmp_bytes},mode=1777 mappa-shm \"$R/dev/shm\"",
        ]
        for device in _DEVICES:
            bind(f"/dev/{device}", f"/dev/{device}", read_only=False, is_dir=False)
        lines += [
            "ln -s /proc/self/fd \"$R/dev/fd\"",
            "cd \"$R\" && mkdir .oldroot && pivot_root . .oldroot",
            "umount -l /.oldroot && rmdir /.oldroot",
            "mount -o remount,bind,ro /",
            f"cd {SANDBOX_WORKSPACE}",
        ]
        drop = [self.tools["setpriv"]]
        if self.host_is_root:
            drop += [f"--reuid={config.sandbox_uid}", f"--regid={config.sandbox_gid}",
                     "--clear-groups"]
        # No new privileges (setuid/file-capability binaries do nothing). The interpreter runs as
        # a non-root uid of a fresh user namespace, so exec leaves it with no capabilities. (The
        # bounding set is not cleared: without it an unprivileged nested uid_map write fails.)
        drop += ["--nnp", "--inh-caps=-all", "--",
                 self.tools["unshare"], "--user", f"--map-user={config.sandbox_uid}",
                 f"--map-group={config.sandbox_gid}", "--", "/usr/bin/env", "-i"]
        drop += [f"{key}={value}" for key, value in self.environment().items()]
        # Not `exec`: this shell stays pid 1 of the namespace, so the interpreter is an ordinary
        # process (kernel signals such as SIGXCPU reach it) and killing the shell ends them all.
        lines.append(" ".join(quote(part) for part in drop) + " \"$@\"")
        lines.append("exit $?")
        return _shell(lines)

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        args = [self.tools["unshare"]]
        if not self.host_is_root:
            args += ["--user", "--map-root-user"]
        args += ["--mount", "--propagation", "private", "--net", "--pid", "--ipc", "--uts",
                 "--fork", "--kill-child", "--", "/bin/sh", "-c", self._setup_script(workspace),
                 "mappa-sandbox", *inner]
        return args


class UnsandboxedBackend(Backend):
    """Rlimits only. Model code sees the whole machine; used only when explicitly allowed."""

    name = "unsandboxed"
    isolated = False

    @property
    def executable(self) -> str:
        return self.layout.host_executable

    @property
    def site_dirs(self) -> list[str]:
        return _site_packages()

    def environment(self) -> dict[str, str]:
        python_bin = os.path.dirname(self.layout.host_executable)
        return {**sandbox_environment(self.config),
                "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin"}

    def describe(self) -> str:
        return ("UNSANDBOXED: model code runs as host uid "
                f"{os.geteuid()} with rlimits only; it can read and write this machine's files "
                "and use the network")

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        env = [f"{key}={value}" for key, value in self.environment().items()]
        return ["/usr/bin/env", "-i", *env, *inner]


def find_tools(config: SandboxConfig) -> dict[str, str]:
    search = config.tool_path if config.tool_path is not None else os.environ.get("PATH", "")
    found = {}
    for name in ("bwrap", "unshare", "setpriv"):
        path = shutil.which(name, path=search)
        if path:
            found[name] = path
    return found


def _probe(backend: Backend) -> str | None:
    """Runs a trivial interpreter through the backend; returns None if it works, else why not."""
    probe_dir = Path(tempfile.mkdtemp(prefix="mappa-sandbox-probe-"))
    try:
        if backend.host_is_root and backend.name != "unsandboxed":
            os.chown(probe_dir, backend.config.sandbox_uid, backend.config.sandbox_gid)
        inner = python_command(backend.executable,
                               "import os; open('probe', 'w').write(str(os.getuid()))")
        try:
            done = subprocess.run(backend.launch(inner, probe_dir), capture_output=True,
                                  timeout=30, cwd="/", start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{backend.name}: {error}"
        if done.returncode != 0 or not (probe_dir / "probe").exists():
            stderr = done.stderr.decode(errors="replace").strip()[-500:]
            return f"{backend.name}: exit {done.returncode}: {stderr}"
        return None
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


_REQUIRED_TOOLS = {
    "bwrap": ("bwrap",),
    "unshare": ("unshare", "setpriv"),
}


def select_backend(config: SandboxConfig) -> Backend:
    """The first working backend the config allows, probed once; raises if none is allowed."""
    tools = find_tools(config)
    layout = python_layout(config)
    order = ["bwrap", "unshare"] if config.backend == "auto" else [config.backend]
    problems = []
    for name in order:
        if name == "unsandboxed":
            break
        required = _REQUIRED_TOOLS[name] + (("unshare", "setpriv") if os.geteuid() == 0 else ())
        missing = [tool for tool in dict.fromkeys(required) if tool not in tools]
        if missing:
            problems.append(f"{name}: {', '.join(missing)} not found on PATH")
            continue
        backend = (BubblewrapBackend if name == "bwrap" else UnshareBackend)(config, tools, layout)
        problem = _probe(backend)
        if problem is None:
            return backend
        backend.close()
        problems.append(problem)
    if config.backend in ("auto", "unsandboxed") and config.allow_unsandboxed:
        return UnsandboxedBackend(config, tools, layout)
    raise SandboxUnavailableError(
        f"no sandbox backend works (SandboxConfig.backend={config.backend!r}): "
        + "; ".join(problems or ["unsandboxed backend requested"])
        + ". Install bubblewrap (apt-get install bubblewrap) or util-linux unshare, or set "
        "SandboxConfig.allow_unsandboxed=True to run model code without isolation.")
