"""Runs on the host around every sandbox start: the run's own init, outside the sandbox.

    python -I -S -c <this source> [cgroup.procs file ...] -- command ...

Why: bubblewrap's outer process exits as soon as it learns the sandbox's exit status, before it
reaps its child (the sandbox's pid-1 process). That child is then re-parented to the nearest
child subreaper, normally the machine's PID 1, and in a container whose PID 1 does not reap it
stays a zombie for good (one per run). This process makes itself the child subreaper of the run,
so every descendant that loses its parent lands here and is reaped here: the trainer's own
process never waits for anything but this one child, so no other waiter's status is stolen.

What it does:
- joins the given cgroups (per-run aggregate limits) in the forked child, before `command` runs;
- on SIGTERM (the host's stop request: wall-clock limit, cancellation) or when the trainer dies
  (PR_SET_PDEATHSIG), SIGKILLs the command's process group and every remaining descendant;
- after the command exits, kills and reaps whatever of the run is left (a detached grandchild of
  the unsandboxed backend, a sandbox init that outlived bwrap), then mirrors the command's exit:
  the same exit code, or death by the same signal; SIGKILL when the host asked it to stop.
"""
import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
EXEC_FAILED = 127


def _children() -> list[int]:
    """Pids whose parent is this process (/proc/self/task/*/children, else a /proc scan)."""
    pids = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as handle:
                pids += [int(pid) for pid in handle.read().split()]
        return pids
    except OSError:
        pass
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            pids.append(int(name))
    return pids


def _kill_children():
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main():
    split = sys.argv.index("--")
    procs_files, command = sys.argv[1:split], sys.argv[split + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write(f"mappa sandbox reaper: prctl(PR_SET_CHILD_SUBREAPER) failed: "
                         f"{os.strerror(ctypes.get_errno())}\n")
        sys.exit(EXEC_FAILED)
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    state = {"child": None, "stopped": False}

    def stop(signum, frame):
        state["stopped"] = True
        if state["child"] is not None:
            try:
                os.killpg(state["child"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _kill_children()

    signal.signal(signal.SIGTERM, stop)
    if os.getppid() != parent:  # the trainer died before PR_SET_PDEATHSIG was armed
        sys.exit(EXEC_FAILED)
    child = os.fork()
    if child == 0:
        try:
            os.setpgid(0, 0)  # its own group: the stop request kills it without killing us
            for path in procs_files:
                with open(path, "w") as handle:
                    handle.write("0")  # "0": the writing process itself
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execv(command[0], command)
        except BaseException as error:  # noqa: BLE001 - report anything, never return into main
            os.write(2, f"mappa sandbox reaper: cannot start {command[0]}: {error}\n".encode())
        os._exit(EXEC_FAILED)
    state["child"] = child
    if state["stopped"]:  # the stop request arrived between fork and here
        stop(signal.SIGTERM, None)
    child_status = None
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            child_status = status
        if child_status is not None:
            _kill_children()  # the command is done: nothing it started may outlive it
    if state["stopped"] or child_status is None:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.WIFSIGNALED(child_status):
        number = os.WTERMSIG(child_status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        sys.exit(128 + number)  # a signal whose default action is not to terminate
    sys.exit(os.WEXITSTATUS(child_status))


if __name__ == "__main__":
    main()
