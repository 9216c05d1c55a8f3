"""The memory estimator's arithmetic on a small config, and the table's shape."""
import pytest

from mappa_jax.models.config import ModelConfig
from mappa_jax.rl.memory import estimate_memory, lora_num_params, memory_table, qwen3_4b_config


def test_persistent_bytes_follow_the_stated_layout():
    cfg = ModelConfig.tiny(dtype="bfloat16")
    n = cfg.num_params()
    full = estimate_memory(cfg, num_agents=3, mesh_shape=(2, 2, 2), mode="full")
    # fp32 params + two fp32 Adam moments + a bf16 reference per agent, over fsdp x tensor = 4.
    assert full.persistent == pytest.approx(3 * n * (4 + 8 + 2) / 4)
    assert full.gradients == pytest.approx(n * 4 / 4)
    lora = estimate_memory(cfg, num_agents=3, mesh_shape=(2, 2, 2), mode="lora", lora_rank=4)
    assert lora.persistent == pytest.approx((n * 2 + 3 * 12 * lora_num_params(cfg, 4)) / 4)
    assert lora.peak < full.peak
    # Doubling the fsdp axis halves the per-device parameter state.
    half = estimate_memory(cfg, num_agents=3, mesh_shape=(1, 4, 2), mode="full")
    assert half.persistent == pytest.approx(full.persistent / 2)
    with pytest.raises(ValueError, match="mode='half'"):
        estimate_memory(cfg, num_agents=1, mesh_shape=(1, 1, 1), mode="half")


def test_qwen3_4b_table():
    cfg = qwen3_4b_config()
    assert 4.0e9 < cfg.num_params() < 4.1e9
    table = memory_table(cfg)
    assert table.count("\n") == 1 + 12 and "TPU v5e-8 | lora" in table
