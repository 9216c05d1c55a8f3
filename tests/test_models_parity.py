"""Our decoder vs transformers' PyTorch models on the same weights (the independent reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mappa_jax.models import weights
from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, KVCache, positions_from_mask
from mappa_jax.models.lora import LoraAdapters

FAMILIES = [
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 64), rope_theta=500000.0)),
    ("qwen2", dict()),
    ("qwen3", dict(tie_word_embeddings=True)),
    ("qwen3", dict(num_heads=6, num_kv_heads=2)),
]


def random_model(cfg, seed=0):
    """A Decoder with every parameter random (norm scales and biases too, so all paths are tested)."""
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def torch_model(cfg, state):
    hf_config = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    tensors = {k: torch.from_numpy(v.copy()) for k, v in weights.hf_tensors(cfg, state).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens)).long(),
                    attention_mask=torch.from_numpy(np.asarray(mask)).long())
    return out.logits.numpy()


@pytest.mark.parametrize("family,overrides", FAMILIES)
def test_logits_match_transformers(family, overrides):
    cfg = ModelConfig.tiny(family, **overrides)
    graphdef, state = random_model(cfg)
    model = nnx.merge(graphdef, state)
    reference = torch_model(cfg, state)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (3, 11)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, :4] = False  # left padding
    mask[2, :9] = False
    ours, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    theirs = torch_logits(reference, tokens, mask)
    np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=1e-4, rtol=0)
    # Padding must not change a row's logits: row 1 alone, unpadded, gives the same values.
    alone, _ = model(jnp.asarray(tokens[1:2, 4:]), positions_from_mask(jnp.ones((1, 7), bool)), jnp.ones((1, 7), bool))
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(ours)[1, 4:], atol=1e-5)


@pytest.mark.parametrize("family,overrides", [FAMILIES[0], FAMILIES[2]])
@pytest.mark.parametrize("layer_loop", [dict(), dict(unroll_layers=True), dict(unroll_layers=True, remat=True)],
                         ids=["scanned", "unrolled", "unrolled_remat"])
def test_gradients_match_transformers(family, overrides, layer_loop):
    """Every parameter's gradient of a weighted token-logprob loss equals torch autograd's (the
    decoder's matmuls have a hand-written backward pass; tied and untied heads, biases), with the
    layers scanned or unrolled (the update's layer loop on CPU), recomputed in the backward pass or not."""
    cfg = ModelConfig.tiny(family, **overrides, **layer_loop)
    graphdef, state = random_model(cfg)
    reference = torch_model(cfg, state)
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = False
    weight = (rng.randn(2, 9) * mask[:, :-1]).astype(np.float32)  # from real positions only: padded
    # queries see no keys, which the two models treat differently (and which no loss reads)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                                               jnp.asarray(mask))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0] * weight)

    ours = weights.hf_tensors(cfg, jax.grad(loss)(state))
    out = reference(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long())
    logp = torch.log_softmax(out.logits[:, :-1], dim=-1)
    target = torch.from_numpy(tokens[:, 1:]).long()[..., None]
    (torch.gather(logp, -1, target)[..., 0] * torch.from_numpy(weight)).sum().backward()
    theirs = dict(reference.named_parameters())
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for name, grad in ours.items():
        expected = theirs[name].grad.numpy()
        np.testing.assert_allclose(grad, expected, atol=2e-5 * max(1.0, np.abs(expected).max()), rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("family,overrides", [("qwen2", dict()), ("llama", dict(tie_word_embeddings=True))])
@pytest.mark.parametrize("weights_first", [False, True], ids=["as_stored", "weights_first"])
def test_cached_decode_matches_full_forward(family, overrides, weights_first):
    """Prefill then one token at a time over a KV cache = one full forward, with LoRA adapters, for
    the layers as decode reads them: sliced as stored, or transposed for weights-first matmuls (the
    LoRA factors and an untied head too; a tied head reads the embedding)."""
    cfg = ModelConfig.tiny(family, **overrides)
    graphdef, state = random_model(cfg)
    model = nnx.merge(graphdef, state)
    lora = LoraAdapters(cfg, rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), rngs=nnx.Rngs(2))
    for name in lora.targets:
        factor = getattr(lora, f"{name}_b")
        factor[...] = 0.3 * jax.random.normal(jax.random.key(len(name)), factor.shape)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), bool).at[0, :3].set(False)
    full, _ = model(tokens, positions_from_mask(mask), mask, lora=lora)
    layers = model.layer_slices(lora, weights_first=weights_first)
    assert (layers.head is None) == (not weights_first)
    slots = 16
    kv_mask = jnp.zeros((2, slots), bool).at[:, :9].set(mask)
    cache = KVCache.zeros(cfg, 2, slots)
    positions = positions_from_mask(mask)
    prefix, cache = model(tokens[:, :6], positions[:, :6], kv_mask, cache=cache, cache_index=0, lora=lora,
                          layers=layers)
    steps = [prefix]
    for t in range(6, 9):
        step, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], kv_mask, cache=cache, cache_index=t,
                            lora=lora, layers=layers)
        steps.append(step)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_roundtrip_and_transformers_load(family, tmp_path):
    cfg = ModelConfig.tiny(family, tie_word_embeddings=family == "qwen3")
    graphdef, state = random_model(cfg, seed=3)
    out = weights.save_hf(cfg, state, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    cfg2, state2 = weights.load_hf(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    ours, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(loaded, tokens, mask), atol=1e-4)


def test_sharded_index_import(tmp_path):
    """A checkpoint split across files with model.safetensors.index.json loads like a single file."""
    from safetensors.numpy import save_file
    cfg = ModelConfig.tiny("qwen2")
    _, state = random_model(cfg, seed=5)
    tensors = weights.hf_tensors(cfg, state)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    _, loaded = weights.load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        weights.safetensors_reader(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.tiny("llama", num_heads=4, num_kv_heads=3)
