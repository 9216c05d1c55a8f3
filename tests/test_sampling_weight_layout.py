"""On an FSDP mesh the sampler decodes from its own layout of the weights (gathered once per generate
call), so the compiled decode loop holds no all-gather of a weight; the tokens equal the unsharded
sampler's; the memory check counts the gathered copy at exactly its per-device bytes.

The HLO check runs on 8 forced CPU devices in a subprocess (the device count is fixed when jax starts).
The "sharded" layout (the training layout) is the positive control: there XLA gathers each layer's
weights inside the loop, and the same count must find them."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cpu_devices import cpu_devices_env
from mappa_jax.models.config import ModelConfig
from mappa_jax.parallel import hlo
from mappa_jax.parallel import memory_check as mc

CHILD = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from mappa_jax.parallel import make_mesh, shard_state
    from mappa_jax.parallel.hlo import collectives
    from mappa_jax.sampling import Sampler, SamplerConfig
    sys.path.insert(0, "tests")
    from tiny_policy import tiny_policy

    assert jax.device_count() == 8, jax.devices()
    cfg, state, lora, prompts = tiny_policy()
    calls = {"greedy": dict(n=2, temperature=0.0), "sampled_lora": dict(n=2, temperature=1.0, seed=3, lora=lora)}
    buckets = dict(batch_buckets=(8,), prompt_buckets=(16,), generation_buckets=(16,))
    single = Sampler(cfg, SamplerConfig(**buckets))
    reference = {k: single.generate(state, prompts, max_new_tokens=12, stop_token_ids=[], **kw) for k, kw in calls.items()}
    smallest_weight = min(x.nbytes // x.shape[0] if x.ndim == 3 else x.nbytes
                          for x in jax.tree.leaves(state) if x.ndim >= 2)

    def recorded(sampler):
        """Runs generate, keeping the abstract arguments of its decode program for lowering."""
        decode = sampler._programs_for(None).decode
        seen = []
        def spy(*args):
            seen.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args))
            return decode(*args)
        sampler._programs[None] = sampler._programs[None]._replace(decode=spy)
        return seen, decode

    report = {"smallest_weight": int(smallest_weight)}
    for name, axes in (("fsdp8", dict(data=1, fsdp=8)), ("data2_fsdp4", dict(data=2, fsdp=4))):
        mesh = make_mesh(**axes)
        placed = shard_state(mesh, state)  # the trainer's FSDP layout
        for layout in ("gathered", "sharded"):
            # decode_weights="stacked", as on TPU ("auto" copies the layers out of the stack on CPU)
            sampler = Sampler(cfg, SamplerConfig(weight_layout=layout, decode_weights="stacked", **buckets), mesh)
            seen, decode = recorded(sampler)
            # sampling with LoRA once (fsdp=8, gathered); tests/test_sampling_sharded.py does the rest
            keys = list(calls) if (name, layout) == ("fsdp8", "gathered") else ["greedy"]
            for key in keys:
                kw = calls[key]
                out = sampler.generate(placed, prompts, max_new_tokens=12, stop_token_ids=[], **kw)
                np.testing.assert_array_equal(out.tokens, reference[key].tokens, err_msg=f"{name} {layout} {key}")
                np.testing.assert_allclose(out.logprobs, reference[key].logprobs, atol=1e-5)
            text = decode.lower(*seen[0]).compile().as_text()
            found = [c for c in collectives(text) if c.opcode.startswith("all-gather")]
            row = {"loop": [[c.shape, c.bytes] for c in found if c.in_loop],
                   "outside": [[c.shape, c.bytes] for c in found if not c.in_loop],
                   "copies": sampler.copies_weights, "relayout_programs": len(sampler._relayouts)}
            if layout == "gathered":
                copy = sampler.place_weights(placed)
                row["copy_bytes"] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(copy))
                row["copy_whole"] = all(x.sharding.shard_shape(x.shape) == x.shape for x in jax.tree.leaves(copy))
                again = sampler.place_weights(copy)  # already in the layout: the same arrays, no copy
                row["kept"] = all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(copy)))
            report[f"{name}/{layout}"] = row
    print("REPORT " + json.dumps(report))
''')


@pytest.fixture(scope="module")
def report():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=cpu_devices_env(8),
                            cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.mark.parametrize("mesh", ["fsdp8", "data2_fsdp4"])
def test_decode_loop_gathers_no_weights_and_tokens_match(report, mesh):
    gathered, sharded = report[f"{mesh}/gathered"], report[f"{mesh}/sharded"]
    weight_sized = lambda rows: [r for r in rows if r[1] >= report["smallest_weight"]]
    # Tokens equal the unsharded sampler's (asserted in the child, greedy and sampled with LoRA).
    assert weight_sized(gathered["loop"]) == [], gathered
    assert gathered["outside"] == []  # the gather happened before the program, once per call
    # one copy program per weight tree (params; LoRA adapters where sampled with them), reused by every call
    assert gathered["copies"] and gathered["relayout_programs"] == (2 if mesh == "fsdp8" else 1)
    # The control: from the training layout XLA communicates inside the loop, at every token. (With
    # the layers unrolled over per-layer caches it gathers activations there, not weight matrices.)
    assert len(sharded["loop"]) > len(gathered["loop"]), (sharded, gathered)
    assert not sharded["copies"] and sharded["relayout_programs"] == 0
    assert gathered["copy_whole"] and gathered["kept"]


def test_memory_check_counts_the_gathered_copy_exactly(report):
    cfg = ModelConfig.tiny("llama")
    for mesh in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}):
        est = mc.estimate(mc.Workload(cfg, rollout_rows=8), mesh)
        name = "fsdp8" if mesh["fsdp"] == 8 else "data2_fsdp4"
        assert est.terms["sampler_weights"] == report[f"{name}/gathered"]["copy_bytes"] == cfg.num_params() * 4
        assert est.rollout == est.terms["kv_cache"] + est.terms["prefill"] + est.terms["sampler_weights"]
        sharded = mc.estimate(mc.Workload(cfg, rollout_rows=8, sampler_weight_layout="sharded"), mesh)
        assert sharded.terms["sampler_weights"] == 0
    # No fsdp: the training layout already is the sampler's, no copy. Tensor splits stay split.
    assert mc.estimate(mc.Workload(cfg), {"data": 8, "fsdp": 1, "tensor": 1}).terms["sampler_weights"] == 0
    tp = mc.estimate(mc.Workload(cfg), {"data": 1, "fsdp": 4, "tensor": 2}).terms["sampler_weights"]
    assert cfg.num_params() * 4 // 2 <= tp < cfg.num_params() * 4
    with pytest.raises(ValueError, match="sampler_weight_layout"):
        mc.Workload(cfg, sampler_weight_layout="replicated")
    # sampler.decode_weights "unstacked": decode's own copy of what it reads, on top of any gather.
    whole = cfg.num_params() * 4
    unstacked = mc.Workload(cfg, rollout_rows=8, sampler_unstacked=True)
    assert mc.estimate(unstacked, {"data": 8, "fsdp": 1, "tensor": 1}).terms["sampler_weights"] == whole
    assert mc.estimate(unstacked, {"data": 1, "fsdp": 8, "tensor": 1}).terms["sampler_weights"] == 2 * whole


def test_memory_check_suggests_decoding_from_sharded_weights_when_only_that_fits():
    cfg = ModelConfig.tiny(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                           num_kv_heads=2, head_dim=64)
    # Short sequences: the rollout (with its gathered copy), not the update, sets the peak.
    work = mc.Workload(cfg, train_micro_batch=8, train_seq_len=64, rollout_rows=8, rollout_prompt_len=64,
                       rollout_new_tokens=64)
    fsdp8 = {"data": 1, "fsdp": 8, "tensor": 1}
    budget = mc.estimate(work.replace(sampler_weight_layout="sharded"), fsdp8).peak
    assert mc.estimate(work, fsdp8).peak > budget
    fits = mc.suggest(work, 8, budget)
    full = [e for e in fits if e.lora_rank == 0]
    assert any(e.mesh == fsdp8 and e.sampler_weight_layout == "sharded" for e in full)
    assert not any(e.mesh == fsdp8 and e.sampler_weight_layout == "gathered" for e in full)
    assert all(e.mesh["fsdp"] > 1 for e in fits if e.sampler_weight_layout == "sharded")  # else no change
    sharded = next(e for e in full if e.sampler_weight_layout == "sharded")
    assert mc.SAMPLER_SHARDED_FLAG in mc._overrides(sharded, work)
    # Same-layout mesh changes come before the layout change, which comes before LoRA.
    order = [(e.lora_rank != 0, e.sampler_weight_layout == "sharded") for e in fits]
    assert order == sorted(order)


def test_config_validates_the_layout():
    from mappa_jax.config import ConfigError, base_config, validate
    from mappa_jax.sampling import SamplerConfig
    config = base_config()
    config.sampler.weight_layout = "replicated"
    with pytest.raises(ConfigError, match="sampler.weight_layout"):
        validate(config)
    with pytest.raises(ValueError, match="sampler.weight_layout"):
        SamplerConfig(weight_layout="replicated")


HLO_FIXTURE = textwrap.dedent('''
    HloModule m

    %add (a: f32[], b: f32[]) -> f32[] {
      %a = f32[] parameter(0)
      %b = f32[] parameter(1)
      ROOT %s = f32[] add(%a, %b)
    }

    %fused_inner (p: f32[4,8]) -> f32[32,8] {
      %p = f32[4,8]{1,0} parameter(0)
      ROOT %ag = f32[32,8]{1,0} all-gather(%p), replica_groups={}, dimensions={0}, metadata={op_name="jit(f)/while/body/dot"}
    }

    %body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
      %t = (s32[], f32[4,8]{1,0}) parameter(0)
      %w = f32[4,8]{1,0} get-tuple-element(%t), index=1
      %c = f32[32,8]{1,0} call(%w), to_apply=%fused_inner
      %ags = (f32[4,8]{1,0}, bf16[32,8]{1,0}) all-gather-start(%w), dimensions={0}
      ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %w)
    }

    %cond (t: (s32[], f32[4,8])) -> pred[] {
      %t = (s32[], f32[4,8]{1,0}) parameter(0)
      %ar = f32[] all-reduce(%x), to_apply=%add
      ROOT %lt = pred[] compare(%i, %n), direction=LT
    }

    ENTRY %main (x: f32[4,8]) -> f32[4,8] {
      %x = f32[4,8]{1,0} parameter(0)
      %g = f32[32,8]{1,0} all-gather(%x), dimensions={0}
      %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
      ROOT %o = f32[4,8]{1,0} get-tuple-element(%loop), index=1
    }
''')


def test_hlo_collectives_found_inside_loops():
    found = {c.name: c for c in hlo.collectives(HLO_FIXTURE)}
    assert set(found) == {"ag", "ags", "ar", "g"}
    assert found["ag"].in_loop and found["ag"].bytes == 32 * 8 * 4 and found["ag"].op_name == "jit(f)/while/body/dot"
    assert found["ags"].in_loop and found["ags"].bytes == 32 * 8 * 2  # an async start counts its output
    assert found["ar"].in_loop  # the loop condition runs every iteration too
    assert not found["g"].in_loop and found["g"].computation == "main"
    assert [c.name for c in hlo.loop_collectives(HLO_FIXTURE, min_bytes=1000)] == ["ag"]
