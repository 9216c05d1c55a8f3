"""The sandbox started by a non-root host (the usual case off CI), exercised from a root test run.

The host side runs as uid 65534 under the system's /usr/bin/python3 (our interpreter may live in
root's home, which that uid cannot enter), with a copy of mappa_jax.tools on its path.
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import mappa_jax.tools

SYSTEM_PYTHON = Path("/usr/bin/python3")
PACKAGE = Path(mappa_jax.tools.__file__).resolve().parent

_HOST_SCRIPT = r"""
import asyncio, json, os, shutil, sys, tempfile
from mappa_jax.tools import Sandbox, SandboxConfig, SandboxUnavailableError, Workspace
backend, secret = sys.argv[1], sys.argv[2]
try:
    sandbox = Sandbox(SandboxConfig(backend=backend, wall_timeout_s=20, max_processes=16))
except SandboxUnavailableError as error:
    print(json.dumps({"unavailable": str(error)})); sys.exit(0)
root = tempfile.mkdtemp()
workspace = Workspace.create(root, "episode")
first = asyncio.run(sandbox.run_cells(["open('shared.txt', 'w').write('from agent 1')\n"], workspace))
probe = (
    "import json, os, socket\n"
    "def attempt(action):\n"
    "    try:\n        action(); return 'ok'\n"
    "    except Exception as error:\n        return type(error).__name__\n"
    "status = dict(l.split(':\t', 1) for l in open('/proc/self/status') if ':\t' in l)\n"
    "print(json.dumps({'uid': os.getuid(), 'cap_eff': status['CapEff'].strip(),\n"
    "    'shared': open('shared.txt').read(), 'interfaces': [n for _, n in socket.if_nameindex()],\n"
    f"    'secret': attempt(lambda: open({secret!r}).read()),\n"
    "    'outside_write': attempt(lambda: open('/tmp/../escape', 'w'))}))\n")
second = asyncio.run(sandbox.run_cells([probe], workspace))
print(json.dumps({"describe": sandbox.describe(), "first": first.exit_code,
                  "second": second.exit_code, "stderr": second.stderr,
                  "report": json.loads(second.stdout or "null")}))
sandbox.close()
shutil.rmtree(root)
"""


@pytest.fixture(scope="module")
def nonroot_host():
    if os.geteuid() != 0:
        pytest.skip("the test process is already non-root: the main sandbox tests cover this")
    if not SYSTEM_PYTHON.exists() or not shutil.which("setpriv"):
        pytest.skip(f"needs {SYSTEM_PYTHON} and setpriv to start a non-root host process")
    # Not under pytest's tmp dir: that one is private to root.
    home = Path(tempfile.mkdtemp(prefix="mappa-nonroot-host-"))
    shutil.copytree(PACKAGE, home / "mappa_jax" / "tools",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (home / "mappa_jax" / "__init__.py").write_text("")
    (home / "host.py").write_text(_HOST_SCRIPT)
    secret = home / "secret.txt"  # readable by the host uid, outside every workspace
    secret.write_text("secret")
    for path in [home, *home.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield home, secret
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("backend", ["bwrap", "unshare"])
def test_non_root_host_gets_the_same_isolation(nonroot_host, backend):
    home, secret = nonroot_host
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", f"PYTHONPATH={home}",
         str(SYSTEM_PYTHON), str(home / "host.py"), backend, str(secret)],
        capture_output=True, text=True, timeout=60, cwd=home)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if "unavailable" in outcome:
        pytest.skip(f"{backend} does not work for a non-root host here: {outcome['unavailable']}")
    assert outcome["describe"].startswith(backend) and "host uid 65534" in outcome["describe"]
    assert outcome["first"] == 0 and outcome["second"] == 0, outcome["stderr"]
    assert outcome["report"] == {"uid": 65534, "cap_eff": "0000000000000000",
                                 "shared": "from agent 1", "interfaces": ["lo"],
                                 "secret": "FileNotFoundError",
                                 "outside_write": outcome["report"]["outside_write"]}
    assert outcome["report"]["outside_write"] != "ok"
