"""SmolLM2-135M-Instruct from its GGUF: our loader vs transformers' own load of the same file."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mappa_jax.models import weights
from mappa_jax.models.decoder import positions_from_mask


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    _, _, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is 17 + 25? Answer briefly."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_config_from_gguf(smollm2):
    cfg, _, tokenizer = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    assert tokenizer.eos_token_id == 2 and "<|im_start|>" in tokenizer.chat_template


def test_logits_match_transformers_gguf_load(smollm2, reference, chat_prompt):
    cfg, state, _ = smollm2
    tokens = np.asarray([chat_prompt], np.int32)
    mask = np.ones_like(tokens, bool)
    ours, _ = weights.merge(cfg, state)(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    with torch.no_grad():
        theirs = reference(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-3, rtol=0)


def test_greedy_generation_matches_transformers(smollm2, reference, chat_prompt):
    cfg, state, _ = smollm2
    with torch.no_grad():
        expected = reference.generate(torch.tensor([chat_prompt]), max_new_tokens=20, do_sample=False,
                                      eos_token_id=None, pad_token_id=2)[0, len(chat_prompt):].tolist()
    # Plain greedy decode by full forward passes over a fixed right-padded buffer (one compile):
    # causal attention makes the padding invisible. The sampler has its own tests. The weights are
    # an argument, not captured: as constants they would be hashed into the compilation cache's key
    # (enabled in-process by the trainer tests before this one), which took 2 minutes in the suite.
    forward = jax.jit(lambda state, x: weights.merge(cfg, state)(x, jnp.arange(x.shape[1])[None],
                                                                 jnp.ones_like(x, bool))[0])
    buffer = np.zeros((1, len(chat_prompt) + 20), np.int32)
    buffer[0, :len(chat_prompt)] = chat_prompt
    for n in range(len(chat_prompt), buffer.shape[1]):
        buffer[0, n] = int(jnp.argmax(forward(state, jnp.asarray(buffer))[0, n - 1]))
    assert buffer[0, len(chat_prompt):].tolist() == expected


def test_cached_tokenizer_equals_the_gguf_conversion(smollm2_gguf):
    """load_tokenizer caches the GGUF's converted tokenizer; the cached copy must encode the same."""
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    cached = weights.load_tokenizer(smollm2_gguf)
    text = "Ada buys 7 pencils at 3 dollars each.\n```python\nprint(7 * 3)\n```  \\boxed{21} <think>x</think>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert cached.encode(text) == fresh.encode(text)
    assert (cached.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            == fresh.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert cached.convert_ids_to_tokens(list(range(49152))) == fresh.convert_ids_to_tokens(list(range(49152)))
