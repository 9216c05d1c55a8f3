"""benchmarks/compare.py, the machinery (not the figures): every (workload, system) run is its own
process, the processes alternate round-robin, the medians and spread come from the workers' raw
timings, a system that cannot run is reported once with its reason, and the report is written where
asked. Fake workers (cheap, deterministic timings) stand in for the peers; one test runs the real
mappa_jax update worker at smoke size."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FAKE_WORKER = """
import sys, time
sys.path.insert(0, {workers!r})
import common

def prepare(workload, system):
    if system == "fake_missing":
        raise common.Unavailable("fake_missing: package not installed")
    pause = 0.01 if system == "fake_a" else 0.02
    # calls take different times (seed = repeat index), so median, min and max differ
    return common.Prepared(lambda seed: time.sleep(pause * (1 + seed % 3)), 100, {{"settings": "fake"}})

common.run(prepare)
"""


def _compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, systems, extra, rounds, repeats="3", warmup="1", more=()):
    out = tmp_path / "report.md"
    workloads = () if "--workloads" in more else ("--workloads", "update_tiny")
    argv = [*more, "--quick", "--no-roofline", *workloads, "--rounds", str(rounds), "--repeats", repeats,
            "--warmup", warmup, "--out", str(out), "--systems", *systems]
    for e in extra:
        argv += ["--extra-system", e]
    _compare().main(argv)
    return out, json.loads(out.with_suffix(".json").read_text())


def test_processes_alternate_and_medians_come_from_the_raw_timings(tmp_path):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER.format(workers=str(REPO / "benchmarks" / "workers")))
    systems = ["fake_a", "fake_b", "fake_missing"]
    out, raw = _run(tmp_path, systems, [f"{s}:update:{worker}" for s in systems], rounds=3)

    order = [r["system"] for r in raw["runs"]]
    # the missing peer is tried once (round 1) and then skipped; the others rotate every round
    assert order == ["fake_a", "fake_b", "fake_missing", "fake_b", "fake_a", "fake_a", "fake_b"]
    pids = [r["pid"] for r in raw["runs"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids  # one fresh process per run
    for r in raw["runs"]:
        assert r["load_after"] >= 0 and r["load_before"] >= 0

    for name in ("fake_a", "fake_b"):
        ok = [r for r in raw["runs"] if r["system"] == name]
        rates = [r["units_per_call"] / s for r in ok for s in r["seconds"]]
        summary = raw["summaries"][f"update_tiny/{name}"]
        assert len(rates) == 9 and summary["repeats"] == 9 and summary["processes"] == 3
        assert summary["median"] == pytest.approx(float(np.median(rates)))
        assert (summary["min"], summary["max"]) == pytest.approx((min(rates), max(rates)))
        assert summary["pids"] == [r["pid"] for r in ok]
    a, b = raw["summaries"]["update_tiny/fake_a"], raw["summaries"]["update_tiny/fake_b"]
    assert a["median"] > 1.5 * b["median"]  # fake_b sleeps twice as long

    text = out.read_text()
    assert "Smoke run" in text and "python benchmarks/compare.py --quick" in text
    assert f"{a['median']:.0f} ({a['min']:.0f}-{a['max']:.0f})" in text
    assert "not run: fake_missing: package not installed" in text
    assert raw["summaries"]["update_tiny/fake_missing"] == {"ok": False,
                                                            "reason": "fake_missing: package not installed"}


def test_merge_re_measures_some_sections_and_keeps_the_rest_with_their_provenance(tmp_path):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER.format(workers=str(REPO / "benchmarks" / "workers")))
    extra = [f"fake_a:update:{worker}", f"fake_s:sample:{worker}"]
    _, first = _run(tmp_path, ["fake_a", "fake_s"], extra, rounds=1, more=("--workloads", "update_tiny", "sample_b2"))
    first["sections"]["sample_b2"].update(commit="abc1234", machine="Other CPU, 64 cores")  # as if measured elsewhere
    (tmp_path / "report.json").write_text(json.dumps(first))
    out, merged = _run(tmp_path, ["fake_a"], extra, rounds=1, more=("--merge",))

    assert merged["sections"]["sample_b2"] == first["sections"]["sample_b2"]
    assert merged["sections"]["update_tiny"]["started"] != first["sections"]["update_tiny"]["started"]
    assert merged["summaries"]["sample_b2/fake_s"] == first["summaries"]["sample_b2/fake_s"]
    new_pids = {r["pid"] for r in merged["runs"] if r["workload"] == "update_tiny"}
    assert new_pids.isdisjoint(r["pid"] for r in first["runs"])  # update_tiny was measured again
    text = out.read_text()
    sample = text[text.index("## Sampler"):text.index("## Update")]
    assert "Kept from `python benchmarks/compare.py" in sample and "at commit abc1234" in sample
    assert "machine Other CPU, 64 cores" in sample
    assert "Kept from" not in text[text.index("## Update"):text.index("## Order of runs")]
    assert "commit abc1234 on" in text.split("## Machine ceilings")[0]
    assert first["sections"]["update_tiny"]["machine"].endswith(" cores")
    assert "(kept: commit abc1234)" in text


def test_a_worker_that_crashes_is_reported_not_dropped(tmp_path):
    worker = tmp_path / "crash_worker.py"
    worker.write_text("import sys\nsys.exit('boom: no result line')\n")
    out, raw = _run(tmp_path, ["crasher"], [f"crasher:update:{worker}"], rounds=1)
    assert not raw["runs"][0]["ok"] and "boom: no result line" in raw["runs"][0]["reason"]
    assert "not run: worker exited 1 without a result: boom" in out.read_text()


def test_a_worker_that_hangs_says_where(tmp_path):
    worker = tmp_path / "hang_worker.py"
    worker.write_text(f"import sys, time\nsys.path.insert(0, {str(REPO / 'benchmarks' / 'workers')!r})\n"
                      "import common\n\ndef stuck_in_native_code(workload, system):\n    time.sleep(60)\n\n"
                      "common.run(stuck_in_native_code)\n")
    out, raw = _run(tmp_path, ["hanger"], [f"hanger:update:{worker}"], rounds=1, more=("--timeout", "4"))
    reason = raw["runs"][0]["reason"]
    assert reason.startswith("worker hung") and "stuck_in_native_code" in reason, reason
    assert raw["runs"][0]["wall_s"] < 4


def test_the_mappa_update_worker_at_smoke_size(tmp_path):
    """The real JAX worker against a fake peer: the ratio is ours' median over theirs."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER.format(workers=str(REPO / "benchmarks" / "workers")))
    out, raw = _run(tmp_path, ["mappa_update", "fake_a"], [f"fake_a:update:{worker}"], rounds=1, repeats="2")
    ours, peer = raw["summaries"]["update_tiny/mappa_update"], raw["summaries"]["update_tiny/fake_a"]
    assert ours["ok"], ours
    assert ours["units_per_call"] == 2 * 32 and ours["repeats"] == 2 and ours["pids"][0] != peer["pids"][0]
    assert f"{ours['median'] / peer['median']:.2f}x" in out.read_text()


def test_the_mappa_sampler_worker_at_smoke_size(tmp_path):
    """The real sampler worker (SmolLM2-135M from the GGUF) runs through the programs the Sampler
    builds and reports the decode's own rate and a greedy check; on the second-turn workload the
    next turn from the kept KV cache prefills only what the runner appended (the end of the first
    turn and the tool output); on the EOS workload the yes/no row stops early and the loop goes on
    in a smaller batch bucket (a second timed decode call after the first donated its cache). One
    compare run, one process per workload."""
    out, raw = _run(tmp_path, ["mappa_sampler"], [], rounds=1, repeats="1",
                    more=("--workloads", "sample_b2", "second_turn_b2", "sample_b3_eos"))
    ours, second, eos = (raw["summaries"][f"{w}/mappa_sampler"] for w in ("sample_b2", "second_turn_b2", "sample_b3_eos"))
    assert ours["ok"] and second["ok"] and eos["ok"], (ours, second, eos)
    info = {r["workload"]: r["info"] for r in raw["runs"]}
    assert ours["units_per_call"] == 2 * 8 and len(info["sample_b2"]["greedy_tokens"]) > 0
    assert info["sample_b2"]["decode_tokens_per_s"][0] > 0
    stopping = info["sample_b3_eos"]
    # rows were dropped: at 64 new tokens, in 16 of 16 seeds probed (at 32: 10 of 12)
    assert stopping["generated_tokens"] <= stopping["row_steps"] < 3 * 64
    turn = info["second_turn_b2"]
    appended = turn["prompt_tokens"] - turn["first_turn_prompt_tokens"] - 2 * 8
    assert turn["prefilled_tokens"] == appended > 0
    report = out.read_text()
    assert "mappa_jax Sampler" in report and "prompt tokens prefilled" in report


def test_decode_roofline_is_the_slower_of_bytes_and_flops():
    compare = _compare()
    ceilings = dict(bandwidth_gbs=20.0, bandwidth_1thread_gbs=15.0, numpy_matmul_gflops=150.0, jax_matmul_gflops=100.0,
                    param_bytes_f32=4e8, kv_bytes_per_token_f32=4e4, matmul_flops_per_token=2e8,
                    attention_flops_per_token_per_slot=1e5)
    summary = {"info": {"prompt_tokens_mean": 100.0}}
    for batch in (1, 64):
        workload = dict(batch=batch, new_tokens=200)
        context = 100.0 + 100.0
        memory_s = (4e8 + batch * context * 4e4) / 20e9
        compute_s = batch * (2e8 + context * 1e5) / 150e9
        rate, bound = compare.decode_roofline(workload, summary, ceilings)
        assert rate == pytest.approx(batch / max(memory_s, compute_s))
        assert bound == ("memory" if memory_s >= compute_s else "compute")
    assert compare.decode_roofline(dict(batch=1, new_tokens=2), summary, ceilings)[1] == "memory"
    assert compare.decode_roofline(dict(batch=64, new_tokens=2), summary, ceilings)[1] == "compute"
    assert compare.decode_roofline(dict(batch=1, new_tokens=2), {"info": {}}, ceilings) is None


def test_a_run_where_mappa_jax_fails_leaves_the_report(tmp_path):
    """A run in which none of our systems ran (e.g. mappa_jax not importable) must not replace the
    last real report with a table of failures."""
    worker = tmp_path / "crash_worker.py"
    worker.write_text("import sys\nsys.exit('ModuleNotFoundError: no mappa_jax')\n")
    out = tmp_path / "report.md"
    out.write_text("the last real report")
    with pytest.raises(SystemExit, match="no mappa_jax system ran.*left as it was"):
        _compare().main(["--quick", "--no-roofline", "--workloads", "update_tiny", "--rounds", "1", "--out", str(out),
                         "--systems", "mappa_update", "--extra-system", f"mappa_update:update:{worker}"])
    assert out.read_text() == "the last real report"
