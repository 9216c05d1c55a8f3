"""Runs inside the sandbox: executes an action's code cells in order in one interpreter.

The host passes this file's *source* to `python -c`, so the sandbox never needs to see the project
checkout. The request arrives as one JSON object on stdin: {"cells": [...], "limits": {...}}.

Behaviour the agents (and the coach) can rely on:
- All cells share one `__main__` namespace, like notebook cells: a variable, import or class from
  cell 1 is there in cell 2, and pickling classes defined in a cell works.
- If a cell's last statement is an expression, its repr is printed (as a notebook displays it).
- A cell that raises prints its traceback (with the cell's own line numbers and source) to stderr,
  and the remaining cells are NOT run: later cells almost always depend on the failed one, and
  running them only buries the real error under follow-up NameErrors. A note names the skipped
  cells.
- Exit status: 0 when every cell ran, 1 when a cell raised, the code of SystemExit if a cell exits.
Resource limits are applied here, before any model code runs, so they hold inside the sandbox's
own user namespace (RLIMIT_NPROC is then counted per sandbox, not per host uid).
"""
import ast
import json
import linecache
import os
import resource
import site
import sys
import traceback
import types

_LIMITS = {
    "cpu_time_s": resource.RLIMIT_CPU,
    "memory_bytes": resource.RLIMIT_AS,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "max_processes": resource.RLIMIT_NPROC,
}


def _apply_limits(limits):
    for key, which in _LIMITS.items():
        value = int(limits[key])
        # CPU: soft limit sends SIGXCPU (terminates); the hard limit one second later is SIGKILL.
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _split_last_expression(source, filename):
    """Compiles a cell; returns (body_code, last_expression_code or None)."""
    tree = ast.parse(source, filename, "exec")
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
        return compile(tree, filename, "exec"), compile(last, filename, "eval")
    return compile(tree, filename, "exec"), None


def _run_cell(source, filename, namespace):
    body, last = _split_last_expression(source, filename)
    exec(body, namespace)
    if last is not None:
        value = eval(last, namespace)
        if value is not None:
            print(repr(value))


def main():
    request = json.loads(sys.stdin.read())
    # Model code must not read the request (or block on input()).
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)
    for directory in request.get("site_dirs", []):
        site.addsitedir(directory)  # -I skips the user site; .pth files need addsitedir
    _apply_limits(request["limits"])

    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main_module
    namespace = main_module.__dict__

    cells = request["cells"]
    for index, source in enumerate(cells, start=1):
        filename = f"<cell {index}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            _run_cell(source, filename, namespace)
        except SystemExit:
            raise
        except BaseException as error:  # noqa: BLE001 - report any failure of model code
            sys.stdout.flush()
            tb = error.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != filename:
                tb = tb.tb_next  # hide the runner's own frames
            traceback.print_exception(type(error), error, tb, file=sys.stderr)
            if index < len(cells):
                skipped = (f"cell {index + 1} was" if index + 1 == len(cells)
                           else f"cells {index + 1}-{len(cells)} were")
                print(f"[cell {index} failed; {skipped} not run]", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    sys.exit(0)


if __name__ == "__main__":
    main()
