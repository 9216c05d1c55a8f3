"""The sandbox, executed for real under every backend this machine has (no mocks).

Each isolation claim is paired with a control: the same probe run by the host (or by the
explicitly allowed unsandboxed backend) succeeds, so a passing test means the sandbox blocked it.
"""
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from mappa_jax.tools import (Sandbox, SandboxConfig, SandboxUnavailableError, Workspace,
                             extract_code_cells)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BASE = SandboxConfig(wall_timeout_s=30, cpu_time_s=20, memory_bytes=2 << 30,
                     file_size_bytes=64 << 20, max_processes=32, max_output_bytes=8192)


def _make_sandbox(config):
    try:
        return Sandbox(config)
    except SandboxUnavailableError as error:
        pytest.skip(f"backend {config.backend!r} does not work on this machine: {error}")


@pytest.fixture(scope="module", params=["bwrap", "unshare"])
def sandbox(request):
    sandbox = _make_sandbox(dataclasses.replace(BASE, backend=request.param))
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def unsandboxed():
    """The control: the same runner with rlimits only (explicitly allowed, warns loudly)."""
    with pytest.warns(RuntimeWarning, match="SANDBOX DISABLED"):
        sandbox = Sandbox(dataclasses.replace(BASE, backend="unsandboxed",
                                              allow_unsandboxed=True))
    yield sandbox
    sandbox.close()


@pytest.fixture
def workspace(tmp_path):
    return Workspace.create(tmp_path / "workspaces", "episode")


def run(sandbox, cells, workspace):
    return asyncio.run(sandbox.run_cells(cells, workspace))


def test_describe_names_the_backend(sandbox):
    assert sandbox.backend_name in ("bwrap", "unshare")
    assert sandbox.describe().startswith(sandbox.backend_name)


def test_state_carries_across_cells_and_a_failing_cell_stops_the_rest(sandbox, workspace):
    cells = ["import numpy as np\nvalues = np.arange(10)\nclass Box:\n    size = 3\n",
             "total = int(values.sum()) + Box.size\nprint('total', total)\n",
             "import pickle\npickle.dumps(Box())  # classes defined in cells are picklable\n"
             "total * 2",  # a last expression is displayed, like a notebook
             "undefined_name + 1\n",
             "open('never.txt', 'w').write('x')\n"]
    result = run(sandbox, cells, workspace)
    assert result.stdout.splitlines() == ["total 48", "96"]
    assert result.exit_code == 1 and not result.timed_out and result.killed_reason is None
    assert 'File "<cell 4>", line 1' in result.stderr
    assert "NameError: name 'undefined_name' is not defined" in result.stderr
    assert "[cell 4 failed; cell 5 was not run]" in result.stderr
    assert "never.txt" not in workspace.list_files()


def test_code_inside_think_is_not_run(sandbox, workspace):
    text = ("<think>Let me try\n```python\nopen('from_think.txt', 'w').write('bad')\n```\n"
            "</think>\nHere is my code:\n```python\nopen('from_answer.txt', 'w').write('ok')\n```")
    result = run(sandbox, extract_code_cells(text), workspace)
    assert result.exit_code == 0, result.stderr
    assert result.files_created == ("from_answer.txt",)
    assert workspace.list_files() == ["from_answer.txt"]


def test_files_flow_between_agents_of_one_episode(sandbox, workspace, tmp_path):
    answers = tmp_path / "answers.csv"
    answers.write_text("id,y\n0,1\n")
    source = tmp_path / "train.csv"
    source.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{2 * i + 1}\n" for i in range(40)))
    workspace.copy_in({"train.csv": source}, forbidden=[answers])
    engineer = run(sandbox, [
        "import csv\nrows = list(csv.DictReader(open('train.csv')))\n",  # stdlib: a quick agent
        "with open('X_train.csv', 'w') as x, open('y_train.csv', 'w') as y:\n"
        "    x.write('a,b\\n'); y.write('y\\n')\n"
        "    for row in rows:\n"
        "        x.write(f\"{row['a']},{row['b']}\\n\"); y.write(f\"{row['y']}\\n\")\n"
        "print(len(rows))\n"], workspace)
    assert engineer.exit_code == 0, engineer.stderr
    assert engineer.files_created == ("X_train.csv", "y_train.csv")
    modeler = run(sandbox, [
        "import pandas as pd, pickle\nfrom sklearn.linear_model import LinearRegression\n"
        "X = pd.read_csv('X_train.csv'); y = pd.read_csv('y_train.csv')['y']\n"
        "model = LinearRegression().fit(X, y)\n"
        "pickle.dump(model, open('model.pkl', 'wb'))\nprint(round(float(model.coef_[0]), 6))\n"
        "import numpy, sklearn, sys\n"
        "print(numpy.__version__, pd.__version__, sklearn.__version__, sys.version)\n",
        "with open('X_train.csv', 'w') as handle:\n    handle.write('a,b\\n')\n"],
        workspace)
    assert modeler.exit_code == 0, modeler.stderr
    import numpy
    import pandas
    import sklearn
    assert modeler.stdout.splitlines() == [  # y = 2a + 1, fitted with the host's own packages
        "2.0", f"{numpy.__version__} {pandas.__version__} {sklearn.__version__} {sys.version}"]
    assert modeler.files_created == ("model.pkl",)
    assert modeler.files_modified == ("X_train.csv",)
    assert modeler.files_present == ("X_train.csv", "model.pkl", "train.csv", "y_train.csv")
    assert "answers.csv" not in json.dumps(modeler.files_present)


def test_runs_unprivileged_in_its_own_namespaces(sandbox, workspace):
    result = run(sandbox, [
        "import os, socket\n"
        "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status') if ':\\t' in line)\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(os.getuid(), os.getgid(), status['CapEff'].strip(), len(pids) < 5,\n"
        "      [name for _, name in socket.if_nameindex()], os.getcwd())\n"], workspace)
    assert result.stdout.split() == ["65534", "65534", "0000000000000000", "True", "['lo']",
                                     "/workspace"]


def test_bwrap_sandbox_cannot_create_user_namespaces(sandbox, workspace):
    if sandbox.backend_name != "bwrap":
        pytest.skip("only bubblewrap can forbid nested user namespaces (--disable-userns)")
    result = run(sandbox, ["import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                           "print(libc.unshare(0x10000000), ctypes.get_errno() != 0)\n"],
                 workspace)  # 0x10000000 = CLONE_NEWUSER
    assert result.stdout.split() == ["-1", "True"]


# The probe every isolation test runs: one JSON line per attempt, {"target": "ok" | "ErrorName"}.
_ATTEMPTS = """
import json, socket
def attempt(target, action):
    try:
        action()
        outcome = 'ok'
    except Exception as error:
        outcome = type(error).__name__
    print(json.dumps({target: outcome}))
"""


def _outcomes(result):
    outcomes = {}
    for line in result.stdout.splitlines():
        outcomes.update(json.loads(line))
    return outcomes


class _Listener:
    """A real TCP server on 127.0.0.1 that records whether anyone connected."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.server.close()


def test_no_network_not_even_loopback(sandbox, unsandboxed, tmp_path):
    listener = _Listener()
    probe = _ATTEMPTS + (
        f"attempt('loopback', lambda: socket.create_connection(('127.0.0.1', {listener.port}), "
        "timeout=2))\n"
        "attempt('public', lambda: socket.create_connection(('1.1.1.1', 53), timeout=2))\n")
    try:
        control = run(unsandboxed, [probe], Workspace.create(tmp_path, "control"))
        assert _outcomes(control)["loopback"] == "ok" and listener.connections == 1
        result = run(sandbox, [probe], Workspace.create(tmp_path, "sandboxed"))
        outcomes = _outcomes(result)
        assert outcomes["loopback"] != "ok" and outcomes["public"] != "ok", outcomes
        assert listener.connections == 1  # nothing from inside the sandbox arrived
    finally:
        listener.close()


@pytest.fixture
def host_secrets(tmp_path):
    """Files the sandbox must not read: hidden answers next to the workspace, a file in $HOME."""
    hidden = tmp_path / "hidden_answers.csv"
    hidden.write_text("id,label\n0,cat\n")
    secrets = {"hidden": str(hidden), "checkout": str(PROJECT_ROOT / "setup.py"),
               "test_file": str(Path(__file__).resolve()), "shadow": "/etc/shadow",
               "passwd": "/etc/passwd"}
    home_file = None
    try:
        home_file = tempfile.NamedTemporaryFile("w", dir=Path.home(), prefix=".mappa-secret-",
                                                delete=False)
        home_file.write("token")
        home_file.close()
        secrets["home"] = home_file.name
    except OSError:
        pass  # a read-only home; the other targets still run
    yield secrets
    if home_file is not None:
        os.unlink(home_file.name)


def test_cannot_read_outside_the_workspace(sandbox, unsandboxed, tmp_path, host_secrets):
    probe = _ATTEMPTS + "".join(
        f"attempt({name!r}, lambda: open({path!r}).read())\n"
        for name, path in host_secrets.items()) + (
        f"attempt('checkout_dir', lambda: __import__('os').listdir({str(PROJECT_ROOT)!r}))\n"
        # An empty listing fails too: nothing of the host's home may show, not even a name.
        f"attempt('home_dir', lambda: __import__('os').listdir({str(Path.home())!r}) or 1/0)\n")
    control = _outcomes(run(unsandboxed, [probe], Workspace.create(tmp_path, "control")))
    readable_by_host = {name for name, outcome in control.items() if outcome == "ok"}
    assert {"hidden", "checkout", "test_file", "checkout_dir"} <= readable_by_host
    outcomes = _outcomes(run(sandbox, [probe], Workspace.create(tmp_path, "sandboxed")))
    assert set(outcomes) == set(control)
    assert all(outcome != "ok" for outcome in outcomes.values()), outcomes


def test_cannot_write_outside_the_workspace(sandbox, workspace, tmp_path):
    targets = {"next_to_workspace": tmp_path / "escaped.txt",
               "checkout": PROJECT_ROOT / "escaped_by_sandbox.txt",
               "usr": Path("/usr/escaped_by_sandbox.txt"),
               "root_dir": Path("/escaped_by_sandbox.txt")}
    probe = _ATTEMPTS + "".join(
        f"attempt({name!r}, lambda: open({str(path)!r}, 'w').write('x'))\n"
        for name, path in targets.items()) + (
        "attempt('workspace', lambda: open('inside.txt', 'w').write('x'))\n")
    outcomes = _outcomes(run(sandbox, [probe], workspace))
    assert outcomes.pop("workspace") == "ok"
    assert all(outcome != "ok" for outcome in outcomes.values()), outcomes
    assert not any(path.exists() for path in targets.values())
    assert workspace.list_files() == ["inside.txt"]


def test_output_is_truncated_with_a_marker(sandbox, workspace):
    result = run(sandbox, ["print('HEAD' + 'x' * 100_000 + 'TAIL')\n"
                           "import sys\nsys.stderr.write('e' * 50_000)\nsys.stderr.flush()\n"], workspace)
    assert result.exit_code == 0
    assert result.stdout_truncated and result.stderr_truncated
    assert result.stdout.startswith("HEADxxx") and result.stdout.rstrip().endswith("xxxTAIL")
    assert "bytes of stdout truncated" in result.stdout
    assert len(result.stdout) < BASE.max_output_bytes + 100
    assert len(result.stderr) < BASE.max_output_bytes + 100


async def _heartbeat(stop: asyncio.Event, period=0.02):
    """Largest gap between ticks of a task that wakes every `period` seconds."""
    last, worst = time.monotonic(), 0.0
    while not stop.is_set():
        await asyncio.sleep(period)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


def test_event_loop_stays_responsive_during_a_long_run(sandbox, workspace):
    async def scenario():
        stop = asyncio.Event()
        heartbeat = asyncio.ensure_future(_heartbeat(stop))
        result = await sandbox.run_cells(["import time\ntime.sleep(1.5)\nprint('done')\n"],
                                         workspace)
        stop.set()
        return result, await heartbeat

    result, worst_gap = asyncio.run(scenario())
    assert result.stdout == "done\n" and result.wall_s >= 1.5
    # A blocking call would stall the loop for the whole 1.5 s run; the margin absorbs a loaded host.
    assert worst_gap < 0.75, f"event loop blocked for {worst_gap:.3f} s"


def test_wall_timeout_kills_everything_the_run_started(sandbox, workspace):
    config = dataclasses.replace(sandbox.config, wall_timeout_s=1.5)
    strict = _make_sandbox(config)
    try:
        # A detached grandchild (new session, double fork) that keeps appending to a file.
        cell = ("import os, time, subprocess, sys\n"
                "subprocess.Popen([sys.executable, '-c', 'import time\\n"
                "while True:\\n open(\"beat.txt\", \"a\").write(\"x\"); time.sleep(0.05)'],\n"
                "                 start_new_session=True)\n"
                "time.sleep(60)\n")
        result = run(strict, [cell], workspace)
    finally:
        strict.close()
    assert result.timed_out and result.killed_reason == "wall_timeout"
    assert result.wall_s < config.wall_timeout_s + 2
    size = (workspace.path / "beat.txt").stat().st_size
    assert size > 0
    time.sleep(0.5)
    assert (workspace.path / "beat.txt").stat().st_size == size  # nothing survived the kill


_FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
_MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n"
_INFINITE_LOOP = "while True:\n    pass\n"
_GIANT_FILE = ("with open('huge.bin', 'wb') as handle:\n"
               "    for _ in range(1024):\n        handle.write(b'\\0' * (1 << 20))  # 1 GiB\n")
_WELL_BEHAVED = ("import numpy as np\nfrom sklearn.linear_model import LogisticRegression\n"
                 "rng = np.random.default_rng(0)\nX = rng.normal(size=(200, 3))\n"
                 "y = (X[:, 0] > 0).astype(int)\n"
                 "accuracy = LogisticRegression().fit(X, y).score(X, y)\n"
                 "open('submission.csv', 'w').write(f'accuracy,{accuracy}\\n')\n"
                 "print('accuracy', accuracy)\n")


def _count_host_processes():
    """Processes of the host uid sandboxes act as (the sandbox uid when the host is root)."""
    uid = BASE.sandbox_uid if os.geteuid() == 0 else os.geteuid()
    count = 0
    for name in os.listdir("/proc"):
        try:
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except FileNotFoundError:
            pass
    return count


def test_bombs_are_contained_while_other_episodes_carry_on(sandbox, tmp_path):
    limits = dataclasses.replace(sandbox.config, wall_timeout_s=30, cpu_time_s=10,
                                 memory_bytes=512 << 20, file_size_bytes=32 << 20,
                                 max_processes=16)
    # Memory, CPU and file bombs must be stopped by their rlimits, not the wall clock, however
    # much the fork bomb slows them down on a small machine; only the fork bomb needs the clock.
    limited = _make_sandbox(limits)
    cpu_limits = dataclasses.replace(limits, cpu_time_s=1)
    cpu_limited = _make_sandbox(cpu_limits)
    fork_limits = dataclasses.replace(limits, wall_timeout_s=4)
    fork_limited = _make_sandbox(fork_limits)
    baseline_processes = _count_host_processes()

    async def scenario():
        stop = asyncio.Event()
        heartbeat = asyncio.ensure_future(_heartbeat(stop))
        peak = 0

        async def watch_processes():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _count_host_processes())
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch_processes())
        programs = {"fork": (fork_limited, _FORK_BOMB), "memory": (limited, _MEMORY_BOMB),
                    "loop": (cpu_limited, _INFINITE_LOOP), "file": (limited, _GIANT_FILE)}
        workspaces = {name: Workspace.create(tmp_path, name) for name in [*programs, "good"]}
        runs = [runner.run_cells([code], workspaces[name])
                for name, (runner, code) in programs.items()]
        # The well-behaved episode gets its default limits; it must finish despite the others.
        runs.append(sandbox.run_cells([_WELL_BEHAVED], workspaces["good"]))
        results = await asyncio.gather(*runs)
        stop.set()
        await watcher
        return dict(zip([*programs, "good"], results)), await heartbeat, peak, workspaces

    try:
        results, worst_gap, peak, workspaces = asyncio.run(scenario())
    finally:
        for each in (limited, cpu_limited, fork_limited):
            each.close()

    good = results["good"]
    assert good.exit_code == 0, good.stderr
    assert good.stdout.startswith("accuracy 0.9") and good.files_created == ("submission.csv",)

    fork = results["fork"]
    assert fork.timed_out and fork.wall_s < fork_limits.wall_timeout_s + 2
    # The bomb holds at most max_processes; the other four sandboxes and the wrappers add a few.
    # Without the limit this count grows without bound until the wall-clock kill.
    assert peak - baseline_processes <= limits.max_processes + 20, (peak, baseline_processes)

    memory = results["memory"]
    assert memory.exit_code == 1 and "MemoryError" in memory.stderr, memory

    loop = results["loop"]
    assert loop.killed_reason == "cpu_time" and not loop.timed_out, loop

    giant = results["file"]
    assert giant.exit_code == 1 and "File too large" in giant.stderr, giant
    assert (workspaces["file"].path / "huge.bin").stat().st_size <= limits.file_size_bytes

    assert worst_gap < 1.0, f"event loop blocked for {worst_gap:.3f} s"
    assert _count_host_processes() <= baseline_processes + 2  # nothing left behind


def test_refuses_without_a_backend_unless_allowed(tmp_path):
    empty_path = tmp_path / "no-tools"
    empty_path.mkdir()
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        Sandbox(SandboxConfig(tool_path=str(empty_path)))
    with pytest.raises(SandboxUnavailableError, match=r"bwrap: bwrap.* not found on PATH"):
        Sandbox(SandboxConfig(backend="bwrap", tool_path=str(empty_path),
                              allow_unsandboxed=True))
    with pytest.raises(SandboxUnavailableError, match="unsandboxed"):
        Sandbox(SandboxConfig(backend="unsandboxed"))
    with pytest.warns(RuntimeWarning, match="SANDBOX DISABLED"):
        fallback = Sandbox(SandboxConfig(tool_path=str(empty_path), allow_unsandboxed=True))
    assert fallback.backend_name == "unsandboxed"
    assert "UNSANDBOXED" in fallback.describe()
    result = run(fallback, ["print(6 * 7)"], Workspace.create(tmp_path, "ep"))
    assert result.stdout == "42\n"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SandboxConfig.backend"):
        SandboxConfig(backend="docker")
    with pytest.raises(ValueError, match="SandboxConfig.wall_timeout_s"):
        SandboxConfig(wall_timeout_s=0)
    with pytest.raises(ValueError, match="SandboxConfig.sandbox_uid"):
        SandboxConfig(sandbox_uid=0)
