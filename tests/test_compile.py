"""mappa-compile: a whole run compiled ahead of time for a target this machine is not."""
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.cpu_devices import cpu_devices_env

TINY_ON_8 = ["--config=configs/tiny.py", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def _compile(args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "mappa_jax.compile", *args], capture_output=True, text=True,
                          env=env or cpu_devices_env(1), timeout=timeout)


def _check_tiny_reports(summary, devices):
    names = [p["name"] for p in summary["programs"]]
    assert sorted(names) == sorted(summary["planned"]) == sorted(
        ["logprobs (reference)", "update", "prefill b4", "decode b4"])  # tiny: the sampler's old logprobs
    assert names[0] == "update"  # what decides whether a run fits compiles first
    assert summary["devices"] == devices
    for p in summary["programs"]:
        assert not p["error"], p
        assert p["arguments"] > 0 and p["temporaries"] >= 0 and p["flops"] > 0 and p["bytes_accessed"] > 0
        # Per device: its buffers plus the resident state it does not take, never below the resident state.
        assert p["needed"] >= summary["resident"]
    update = summary["programs"][0]
    # The update donates its train state: XLA aliases those buffers to the new state.
    assert update["aliases"] > 0


def test_tiny_run_compiles_for_cpu_8_and_names_what_does_not_fit(tmp_path):
    """One compile of the whole tiny run on data=2 fsdp=2 tensor=2 (the suite's slowest compile, so it
    checks both paths): every program's report, and, with 30 MiB per device, an exit that names the
    sampler programs that do not fit and settings by --config keys."""
    out = tmp_path / "report.json"
    result = _compile(["--target=cpu:8", *TINY_ON_8, "--config.mesh.device_memory_gib=0.03", f"--json={out}"])
    assert out.exists(), result.stderr[-3000:] + result.stdout[-3000:]
    summary = json.loads(out.read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    _check_tiny_reports(summary, 8)
    # Tensor parallelism reduces partial sums over "tensor" in every layer, i.e. inside the decode loop.
    decode = next(p for p in summary["programs"] if p["name"] == "decode b4")
    assert any(op.startswith("all-reduce") for op, _, _ in decode["loop_collectives"])
    assert "collectives inside loops" in result.stdout and "XLA memory per device" in result.stdout
    assert result.returncode != 0
    message = result.stderr
    assert "does not fit in 0.03 GiB per device" in message, message + result.stdout[-2000:]
    assert "prefill b4" in message and "decode b4" in message
    assert "--config.mesh.data=" in message or "no mesh of these devices fits" in message


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: TPU targets need the tpu extra (pip install -e '.[tpu]')")
def test_tiny_run_compiles_for_a_tpu_slice(tmp_path):
    out = tmp_path / "report.json"
    result = _compile(["--target=v5e-4", "--config=configs/tiny.py", f"--json={out}"])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    summary = json.loads(out.read_text())
    assert summary["device_kind"] == "TPU v5 lite" and summary["device_memory"] == 16 * 1024 ** 3
    _check_tiny_reports(summary, 4)
    assert all(p["fits"] for p in summary["programs"])
    assert "all 4 programs compiled and fit in 16.00 GiB per device" in result.stdout
    assert "roofline" in result.stdout and "memory-bound" in result.stdout


def test_unknown_target_names_the_known_ones():
    result = _compile(["--target=v9-8", "--config=configs/tiny.py"])
    assert result.returncode != 0
    for name in ("v4-8", "v5e-8", "v5p-8", "v6e-8", "v5p-32", "cpu:N"):
        assert name in result.stderr, result.stderr
