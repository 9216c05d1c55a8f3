"""Mesh construction and a sharded forward pass on 8 forced CPU devices (in a subprocess, because
the device count is fixed when jax initializes)."""
import subprocess
import sys
import textwrap

import jax
import pytest
from cpu_devices import cpu_devices_env
from jax.sharding import PartitionSpec as P

from mappa_jax import parallel
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.weights import abstract_model

SHARDED_FORWARD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from mappa_jax import parallel
    from mappa_jax.models.config import ModelConfig
    from mappa_jax.models.decoder import Decoder, positions_from_mask
    assert jax.device_count() == 8
    cfg = ModelConfig.tiny("qwen2", num_heads=4, num_kv_heads=2)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 12)), jnp.int32)
    mask = jnp.ones_like(tokens, bool).at[::2, :5].set(False)
    def forward(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)[0]
    reference = jax.jit(forward)(state, tokens, mask)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = parallel.param_shardings(mesh, state)
    sharded_state = jax.device_put(state, shardings)
    assert sharded_state["q_proj"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    batch = parallel.batch_sharding(mesh)
    out = jax.jit(forward, in_shardings=(shardings, batch, batch), out_shardings=parallel.batch_sharding(mesh, 3))(
        sharded_state, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    diff = float(jnp.max(jnp.abs(out - reference)))
    assert diff <= 1e-5, diff
    # Import straight onto the mesh: every device gets only its shard of each parameter.
    import sys, tempfile
    from mappa_jax.models import weights
    with tempfile.TemporaryDirectory() as tmp:
        weights.save_hf(cfg, state, tmp)
        _, loaded = weights.load_hf(tmp, lambda s: parallel.param_shardings(mesh, s))
    q = loaded["q_proj"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)  # [L, H/fsdp, (heads*dim)/tensor]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    print("max abs diff", diff)
""")


def run_on_cpu_devices(code: str, count: int = 8) -> str:
    env = cpu_devices_env(count)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sharded_forward_equals_unsharded():
    assert "max abs diff" in run_on_cpu_devices(SHARDED_FORWARD)


def test_mesh_sizes_and_errors():
    mesh = parallel.make_mesh(data=-1)
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not divide"):
        parallel.make_mesh(data=3, fsdp=1, tensor=1, devices=jax.devices() * 2)


def test_parameter_rules_by_name():
    from flax import nnx
    from mappa_jax.models.lora import LoraAdapters
    cfg = ModelConfig.tiny("qwen2")
    mesh = parallel.make_mesh()
    specs = {k: v.spec for k, v in nnx.to_pure_dict(parallel.param_shardings(mesh, abstract_model(cfg)[1])).items()}
    column, row = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
    assert specs == {
        "embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P(),
        "attn_norm": P(), "mlp_norm": P(), "q_proj": column, "k_proj": column, "v_proj": column,
        "gate_proj": column, "up_proj": column, "o_proj": row, "down_proj": row,
        "q_bias": P(None, "tensor"), "k_bias": P(None, "tensor"), "v_bias": P(None, "tensor")}
    lora = nnx.eval_shape(lambda: LoraAdapters(cfg, 4, 8.0, ("q_proj", "o_proj"), rngs=nnx.Rngs(0)))
    lora_specs = {k: v.spec for k, v in nnx.to_pure_dict(parallel.param_shardings(mesh, nnx.state(lora))).items()}
    assert lora_specs == {"q_proj_a": P(None, "fsdp", None), "q_proj_b": P(None, None, "tensor"),
                          "o_proj_a": P(None, "tensor", None), "o_proj_b": P(None, None, "fsdp")}


def test_indivisible_dimension_is_replicated():
    mesh = parallel.make_mesh(data=1, fsdp=1, tensor=1)
    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 2, "tensor": 4}})()
    assert parallel.param_spec(("k_proj",), (2, 64, 6), fake) == P(None, "fsdp", None)
    assert parallel.param_spec(("k_proj",), (2, 64, 8), mesh) == P(None, "fsdp", "tensor")
