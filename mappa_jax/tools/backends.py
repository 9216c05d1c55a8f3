"""How a sandboxed interpreter is started: the command lines of each isolation backend.

Every backend gives model code the same view:
  /usr (and /bin, /lib... as on the host), a few /etc files the loader needs, the Python
  interpreter's prefix and site-packages (read-only, at their host paths, so the sandbox imports
  exactly our numpy/pandas/scikit-learn), /workspace (the episode's directory, the only writable
  host path), a private /tmp and /dev/shm (size-capped tmpfs), a fresh /proc and a minimal /dev.
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

SANDBOX_WORKSPACE = "/workspace"
# Directories that are symlinks into /usr on merged-/usr systems and real dirs elsewhere.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
              "/etc/alternatives", "/etc/mime.types", "/etc/fonts")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class SandboxUnavailableError(RuntimeError):
    """No isolation backend works here and unsandboxed execution was not allowed."""


def sandbox_environment(config: SandboxConfig) -> dict[str, str]:
    """The whole environment model code sees (nothing is inherited from the host)."""
    python_bin = str(Path(os.path.realpath(sys.executable)).parent)
    return {
        "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
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


def python_paths() -> list[str]:
    """Host directories the sandboxed interpreter needs: its prefixes and site-packages."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))]
    candidates += site.getsitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        candidates.append(site.getusersitepackages())
    resolved = sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})
    kept = []
    for path in resolved:  # sorted, so a parent comes before its children
        if path.startswith("/usr/") or path == "/usr":
            continue  # /usr is bound anyway
        if any(path == parent or path.startswith(parent + "/") for parent in kept):
            continue
        kept.append(path)
    return kept


def site_dirs() -> list[str]:
    """site-packages dirs to add inside the sandbox (the runner runs with -I, no user site)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [os.path.realpath(path) for path in dirs if os.path.isdir(path)]


def python_command(runner_source: str) -> list[str]:
    # -I: ignore PYTHON* variables, the user site and the current directory on sys.path.
    return [os.path.realpath(sys.executable), "-I", "-c", runner_source]


class Backend:
    """Builds the argv that runs `inner` (the sandboxed interpreter) under one isolation method."""

    name = "base"

    def __init__(self, config: SandboxConfig, tools: dict[str, str]):
        self.config = config
        self.tools = tools
        self.host_is_root = os.geteuid() == 0
        self._ro_paths = python_paths()
        self._staging = None

    def describe(self) -> str:
        raise NotImplementedError

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        raise NotImplementedError

    def staging_dir(self) -> Path:
        """A world-readable directory of empty mount points (bind targets in private namespaces)."""
        if self._staging is None:
            staging = Path(tempfile.mkdtemp(prefix="mappa-sandbox-"))
            staging.chmod(0o755)
            for index in range(len(self._ro_paths)):
                (staging / f"ro{index}").mkdir(mode=0o755)
            (staging / "workspace").mkdir(mode=0o755)
            (staging / "root").mkdir(mode=0o755)
            self._staging = staging
            # Removed when the backend is closed or collected, or at interpreter exit.
            self._cleanup = weakref.finalize(self, shutil.rmtree, staging, ignore_errors=True)
        return self._staging

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
                f"uid {self.config.sandbox_uid} in sandbox, {mode}, read-only system and Python "
                f"({', '.join(self._ro_paths)}), writable {SANDBOX_WORKSPACE} only, no network")

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        config = self.config
        if self.host_is_root:
            staging = self.staging_dir()
            sources = [str(staging / f"ro{index}") for index in range(len(self._ro_paths))]
            workspace_source = str(staging / "workspace")
        else:
            sources, workspace_source = list(self._ro_paths), str(workspace)
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
        for source, path in zip(sources, self._ro_paths):
            args += ["--ro-bind", source, path]
        args += ["--bind", workspace_source, SANDBOX_WORKSPACE,
                 "--proc", "/proc", "--dev", "/dev",
                 "--size", str(config.tmp_bytes), "--tmpfs", "/tmp",
                 "--size", str(config.tmp_bytes), "--tmpfs", "/dev/shm",
                 "--remount-ro", "/",
                 "--uid", str(config.sandbox_uid), "--gid", str(config.sandbox_gid),
                 "--chdir", SANDBOX_WORKSPACE, "--clearenv"]
        for key, value in sandbox_environment(config).items():
            args += ["--setenv", key, value]
        args += ["--", *inner]
        if not self.host_is_root:
            return args
        # As root: expose the paths on the staging mount points in a private mount namespace,
        # then drop to the sandbox uid and let bubblewrap run unprivileged from there.
        binds = [f"mount --bind {shlex.quote(path)} {shlex.quote(source)}"
                 for path, source in zip(self._ro_paths, sources)]
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
                f"{self.config.sandbox_uid}, no capabilities, read-only system and Python "
                f"({', '.join(self._ro_paths)}), writable {SANDBOX_WORKSPACE} only, no network")

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
        for path in self._ro_paths:
            bind(path, path)
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
        drop += [f"{key}={value}" for key, value in sandbox_environment(config).items()]
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

    def describe(self) -> str:
        return ("UNSANDBOXED: model code runs as host uid "
                f"{os.geteuid()} with rlimits only; it can read and write this machine's files "
                "and use the network")

    def command(self, inner: list[str], workspace: Path) -> list[str]:
        env = [f"{key}={value}" for key, value in sandbox_environment(self.config).items()]
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
        inner = python_command("import os; open('probe', 'w').write(str(os.getuid()))")
        try:
            done = subprocess.run(backend.command(inner, probe_dir), capture_output=True,
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
        backend = (BubblewrapBackend if name == "bwrap" else UnshareBackend)(config, tools)
        problem = _probe(backend)
        if problem is None:
            return backend
        backend.close()
        problems.append(problem)
    if config.backend in ("auto", "unsandboxed") and config.allow_unsandboxed:
        return UnsandboxedBackend(config, tools)
    raise SandboxUnavailableError(
        f"no sandbox backend works (SandboxConfig.backend={config.backend!r}): "
        + "; ".join(problems or ["unsandboxed backend requested"])
        + ". Install bubblewrap (apt-get install bubblewrap) or util-linux unshare, or set "
        "SandboxConfig.allow_unsandboxed=True to run model code without isolation.")
