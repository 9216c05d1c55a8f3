"""End-of-sequence ids of a local HF snapshot: config.json's joined with generation_config.json's (as
Qwen3 publishes them: <|im_end|> in config.json, <|im_end|> and <|endoftext|> in generation_config),
checked against transformers' own reading of the same files and by where the sampler stops."""
import json

import numpy as np
import pytest
import transformers

from mappa_jax.models import weights
from mappa_jax.models.config import ModelConfig
from mappa_jax.sampling import Sampler, SamplerConfig

from test_sampling_core import random_state

CFG = ModelConfig.tiny("qwen3", vocab_size=64, eos_token_ids=(7,))
PROMPT = [1, 5, 9, 13]
BUCKETS = SamplerConfig(batch_buckets=(1,), prompt_buckets=(8,), generation_buckets=(16,))


@pytest.fixture(scope="module")
def greedy_ids():
    """A random model's greedy continuation of PROMPT with no stop token at all."""
    state = random_state(CFG, seed=2, scale=0.3)
    out = Sampler(CFG, BUCKETS).generate(state, [PROMPT], max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    return state, out.tokens[0].tolist()


def _snapshot(path, state, generation_eos):
    """A snapshot dir as the hub lays one out: config.json + weights, and generation_config.json."""
    weights.save_hf(CFG, state, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": generation_eos, "do_sample": True, "temperature": 0.6}))
    return path


def test_snapshot_eos_ids_join_config_and_generation_config(tmp_path, greedy_ids):
    state, ids = greedy_ids
    stop = next(t for t in ids[3:] if t not in ids[:3] and t != 7)  # first appears after 3+ tokens
    path = _snapshot(tmp_path, state, [7, stop])
    cfg = ModelConfig.from_hf(path)
    assert cfg.eos_token_ids == (7, stop)
    # The independent reading: transformers' configs of the same files, config.json's id first.
    assert json.loads((path / "config.json").read_text())["eos_token_id"] == 7
    from_transformers = transformers.GenerationConfig.from_pretrained(path).eos_token_id
    assert set(cfg.eos_token_ids) == {transformers.AutoConfig.from_pretrained(path).eos_token_id, *from_transformers}
    # Loading the snapshot gives the sampler both: it stops at generation_config's id by default.
    loaded_cfg, loaded = weights.load_hf(path)
    assert loaded_cfg.eos_token_ids == (7, stop)
    out = Sampler(loaded_cfg, BUCKETS).generate(loaded, [PROMPT], max_new_tokens=12, temperature=0.0)
    assert out.tokens[0, :out.lengths[0]].tolist() == ids[:ids.index(stop) + 1]
    assert not out.truncated[0]


def test_generation_config_ids_are_optional_and_validated(tmp_path, greedy_ids):
    state, _ = greedy_ids
    weights.save_hf(CFG, state, tmp_path)
    assert ModelConfig.from_hf(tmp_path / "config.json").eos_token_ids == (7,)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (7,)  # the same id once
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<|im_end|>"]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id"):
        ModelConfig.from_hf(tmp_path)
