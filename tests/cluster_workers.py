"""Running a test file as the worker of a local JAX CPU cluster: each process prints one
`RESULT {json}` line, which the test compares across processes. Shared by the multi-host tests."""
import json
import pathlib
import sys

from mappa_jax.parallel.distributed import run_local_cluster

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_workers(script: pathlib.Path, *args: str, num_processes: int = 2, devices: int = 4,
                timeout_s: float = 90.0, env: dict | None = None) -> list[dict]:
    """Run `script` as a local cluster and return each process's parsed RESULT line, in order."""
    results = run_local_cluster([sys.executable, str(script), *args], num_processes, devices,
                                timeout_s=timeout_s, cwd=REPO, env=env)
    parsed = []
    for r in results:
        lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"process {r.process_id} printed no RESULT line:\n{r.stdout}\n{r.stderr[-3000:]}"
        parsed.append(json.loads(lines[0][len("RESULT "):]))
    return parsed
