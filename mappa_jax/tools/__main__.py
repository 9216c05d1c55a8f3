"""`python -m mappa_jax.tools`: which sandbox backend this machine gets, and what a run costs.

Prints the backend description, then the wall time of a trivial action, of an action importing
pandas + scikit-learn, and of N concurrent trivial actions (the episode runner's usual load).
"""
import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time

from mappa_jax.tools import Sandbox, SandboxConfig, Workspace


async def _timed_runs(sandbox, root, cells, count, concurrent):
    workspaces = [Workspace.create(root, f"run-{time.monotonic_ns()}-{i}") for i in range(count)]
    started = time.monotonic()
    if concurrent:
        results = await asyncio.gather(*(sandbox.run_cells(cells, ws) for ws in workspaces))
    else:
        results = [await sandbox.run_cells(cells, ws) for ws in workspaces]
    elapsed = time.monotonic() - started
    failed = [result for result in results if not result.ok]
    if failed:
        raise RuntimeError(f"a measurement run failed: {failed[0].stderr[-500:]}")
    return [result.wall_s for result in results], elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="auto, bwrap, unshare or unsandboxed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    config = dataclasses.replace(SandboxConfig(), backend=args.backend)
    started = time.monotonic()
    sandbox = Sandbox(config)
    print(f"backend: {sandbox.describe()}")
    print(f"backend selection incl. probe: {time.monotonic() - started:.2f} s")
    with tempfile.TemporaryDirectory() as root:
        trivial, _ = asyncio.run(_timed_runs(sandbox, root, ["print(1)"], args.repeats, False))
        print(f"trivial action: median {statistics.median(trivial):.3f} s over {args.repeats}")
        imports = ["import numpy, pandas, sklearn.linear_model"]
        heavy, _ = asyncio.run(_timed_runs(sandbox, root, imports, args.repeats, False))
        print(f"numpy+pandas+sklearn import action: median {statistics.median(heavy):.3f} s")
        _, elapsed = asyncio.run(_timed_runs(sandbox, root, ["print(1)"], args.concurrent, True))
        print(f"{args.concurrent} concurrent trivial actions: {elapsed:.3f} s total")
    sandbox.close()


if __name__ == "__main__":
    main()
