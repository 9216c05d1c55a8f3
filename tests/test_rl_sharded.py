"""The update sharded over 8 forced CPU devices (data x fsdp x tensor = 2 x 2 x 2) equals the
unsharded one. Runs in a subprocess: the device count must be set before JAX starts."""
import json
import os
import subprocess
import sys
import textwrap

from cpu_devices import cpu_devices_env

SCRIPT = textwrap.dedent('''
    import json
    import numpy as np
    import jax, jax.numpy as jnp
    from flax import nnx
    from mappa_jax.models.config import ModelConfig
    from mappa_jax.models.decoder import Decoder
    from mappa_jax.models.lora import LoraAdapters
    from mappa_jax.parallel import make_mesh
    from mappa_jax.rl.config import RLConfig
    from mappa_jax.rl.experience import Sample, build_experience
    from mappa_jax.rl.pipeline import prepare_experiences
    from mappa_jax.rl.update import PolicyUpdater

    assert len(jax.devices()) == 8, jax.devices()
    cfg = ModelConfig.tiny(vocab_size=32, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2)
    rl = RLConfig(train_batch_size=8, micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.0,
                  total_optimizer_steps=10)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    lora_graphdef, adapters = nnx.split(LoraAdapters(cfg, 4, 8.0, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    samples = []
    for i in range(14):
        p, g = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        samples.append(Sample(rng.integers(3, 32, p).tolist(), rng.integers(3, 32, g).tolist(),
                              (-rng.exponential(2.0, g)).tolist(), float(rng.uniform()), i == 5, i % 2))
    exp = build_experience(samples, length_buckets=[10], batch_buckets=[16])

    def run(mesh):
        """Full and LoRA updates on one mesh. A fresh adapter is exactly the base, so the LoRA
        update reuses the experience prepared (logprobs, advantages) for the full model."""
        full = PolicyUpdater(graphdef, rl, mesh)
        policy = full.new_full_agent(state)
        prepared, prep_metrics = prepare_experiences(full, {"a": policy}, {"a": exp})
        lora = PolicyUpdater(graphdef, rl, mesh, lora_graphdef=lora_graphdef)
        results = {}
        for mode, up, pol in (("full", full, policy),
                              ("lora", lora, lora.new_lora_agent(lora.place_params(state), adapters))):
            old_leaf = jax.tree.leaves(pol.state.params)[0]
            new, metrics = up.update(pol, prepared["a"])
            metrics = {**{k: float(v) for k, v in metrics.items()}, **{k: float(v) for k, v in prep_metrics.items()}}
            specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(new.state.params)})
            results[mode] = (jax.device_get(new.state.params), metrics, specs, old_leaf.is_deleted())
        return results

    one, eight = run(make_mesh(devices=jax.devices()[:1])), run(make_mesh(data=2, fsdp=2, tensor=2))
    out = {}
    for mode in ("full", "lora"):
        p1, m1, _, _ = one[mode]
        p8, m8, specs, donated = eight[mode]
        start = jax.device_get(adapters if mode == "lora" else state)
        out[mode] = {
            "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))),
            "metric_diff": max(abs(m1[k] - m8[k]) / max(1.0, abs(m1[k])) for k in m1),
            "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(start))),
            "specs": specs, "donated": donated}
    # On fsdp=4 each device updates 1 of a micro-batch's 4 rows: its residual stream [1, T, H] and
    # MLP activations [1, T, F], not all 4 rows with the weights' FSDP split (XLA's choice unconstrained).
    import re
    mesh4 = make_mesh(data=1, fsdp=4, devices=jax.devices()[:4])
    up4 = PolicyUpdater(graphdef, rl, mesh4)
    pol4 = up4.new_full_agent(state)
    exp4 = prepare_experiences(up4, {"a": pol4}, {"a": exp})[0]["a"]
    hlo = up4._update_fn(pol4, exp4).lower(pol4.state, pol4.frozen, exp4).compile().as_text()
    out["mlp_rows_per_device"] = sorted({int(r) for r in re.findall(r"\[(\d+),10,64\]", hlo)})
    print("RESULT", json.dumps(out))
''')


def test_sharded_update_equals_unsharded():
    # Eight host devices must be requested before JAX starts; the lower backend optimization level
    # halves compile time and applies to both the sharded and the unsharded program.
    env = cpu_devices_env(8, "--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for mode in ("full", "lora"):
        r = result[mode]
        assert r["moved"] > 1e-4, (mode, r)
        assert r["param_diff"] <= 1e-5, (mode, r)
        assert r["metric_diff"] <= 1e-5, (mode, r)
        assert r["donated"], f"{mode}: the train state was not donated"
        assert any("fsdp" in s for s in r["specs"]) and any("tensor" in s for s in r["specs"]), (mode, r)
    assert result["mlp_rows_per_device"] == [1], result["mlp_rows_per_device"]
