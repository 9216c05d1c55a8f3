"""The sampler on the real SmolLM2-135M-Instruct weights and tokenizer (short generations)."""
import numpy as np
import pytest
import torch
import transformers

from mappa_jax.models import weights
from mappa_jax.sampling import Sampler, SamplerConfig, compile_stop_patterns, token_bytes


@pytest.fixture(scope="module")
def pieces(smollm2):
    return token_bytes(smollm2[2])


def test_token_bytes_spell_the_text(smollm2, pieces):
    tokenizer = smollm2[2]
    text = "Déjà vu: ```python\nprint('héllo')\n```  \t 数学"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")


def test_stop_table_stops_at_the_closing_fence(smollm2, pieces):
    tokenizer, cfg = smollm2[2], smollm2[0]
    text = "Let me compute it.\n```python\nx = 2 ** 10\nprint(x)\n```\nThe output is"
    ids = tokenizer.encode(text, add_special_tokens=False)
    table, accept = compile_stop_patterns([("```python", "```"), "output"], pieces, cfg.vocab_size)
    stops = []
    for pattern in range(2):
        state = 0
        for i, token in enumerate(ids):
            state = table[pattern, state, token]
            if state == accept[pattern]:
                stops.append(tokenizer.decode(ids[:i + 1]))
                break
    assert stops[0].endswith("print(x)\n```") and stops[1].endswith("The output")


def test_greedy_matches_transformers_on_smollm2(smollm2):
    cfg, state, tokenizer = smollm2
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
               for text in ("What is 7 times 8?", "Name a prime number larger than ten, and say why it is prime.")]
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    sampler = Sampler(cfg, SamplerConfig(batch_buckets=(2,), prompt_buckets=(64,), generation_buckets=(8,)),
                      tokenizer=tokenizer)
    new = 6
    out = sampler.generate(state, prompts, max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict()), dtype=torch.float32).eval()
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.hf_tensors(cfg, state).items()},
                       strict=False)
    for prompt, ours in zip(prompts, out.sequences()):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert ours == theirs[0, len(prompt):].tolist(), (tokenizer.decode(ours), tokenizer.decode(theirs[0]))
    assert np.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
