"""Worker: Tunix's sampler (google-tunix, tunix.generate.sampler.Sampler) with its Llama3 model.

Two settings are needed for correct output on SmolLM2 (checked by the greedy tokens the report
compares with mappa_jax's):
- RoPE base: Tunix's llama3 Attention calls apply_rope without the config's rope_theta, so every
  model gets the default 1e6; SmolLM2 uses 1e5. The worker wraps `tunix.models.llama3.model.
  apply_rope` to pass the config's value.
- padding: Tunix marks every prompt token equal to the tokenizer's pad id as padding, and SmolLM2's
  pad id is its EOS (<|im_end|>, 2), which closes every chat turn inside the prompt. The worker
  hands Tunix a tokenizer whose pad id is <|endoftext|> (0), which the prompts never contain, and
  forbids sampling both 0 and EOS (Tunix also masks generated pad tokens from attention).
Prompts are the same token ids as the other systems (the tokenizer adapter passes them through).
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402

PAD_ID = 0  # <|endoftext|>: never inside the chat prompts


class TokenIdTokenizer:
    """Tunix's tokenizer interface over prompts given as token ids (space-separated in a string),
    so Tunix sees exactly the prompts the other systems see, with a pad id distinct from EOS."""

    def __init__(self, eos_id: int):
        self._eos = eos_id

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(map(str, ids))

    def bos_id(self):
        return None  # the chat prompts carry their own start tokens

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return PAD_ID


def load_model(path):
    import tempfile

    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file
    from mappa_jax.models import weights
    params_lib = common.require("tunix.models.llama3.params", "pip install google-tunix")
    model_lib = common.require("tunix.models.llama3.model", "pip install google-tunix")
    cfg, read = weights.gguf_reader(path)
    tunix_cfg = model_lib.ModelConfig(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.rms_norm_eps,
        weight_tying=cfg.tie_word_embeddings)
    original_rope = model_lib.apply_rope

    def apply_rope_with_config_theta(inputs, positions, head_dim, rope_theta=None):
        return original_rope(inputs, positions, head_dim=head_dim, rope_theta=cfg.rope_theta)
    model_lib.apply_rope = apply_rope_with_config_theta
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(cfg.num_layers) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    with tempfile.TemporaryDirectory() as tmp:  # Tunix loads HF-layout safetensors files
        save_file({n: np.ascontiguousarray(read(n, ())) for n in names}, os.path.join(tmp, "model.safetensors"))
        model = params_lib.create_model_from_safe_tensors(tmp, tunix_cfg, dtype=jnp.float32)
    return cfg, model


def prepare(workload: dict, system: str) -> common.Prepared:
    sampler_lib = common.require("tunix.generate.sampler", "pip install google-tunix")
    batch, new_tokens = workload["batch"], workload["new_tokens"]
    prompts, path = common.smollm2_prompts(batch, workload["prompt_tokens"])
    cfg, model = load_model(path)
    eos = cfg.eos_token_ids[0]
    width = max(map(len, prompts))
    cache_size = width + new_tokens  # Tunix keeps prompt (padded to max_prompt_length) + generation
    sampler = sampler_lib.Sampler(model, TokenIdTokenizer(eos), sampler_lib.CacheConfig(
        cache_size=cache_size, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    texts = [" ".join(map(str, p)) for p in prompts]
    forbidden = sorted({eos, PAD_ID})

    def call(seed: int):
        # top_p=1.0 selects Tunix's sampling path (categorical over the full vocabulary at temperature 1).
        out = sampler(texts, max_generation_steps=new_tokens, max_prompt_length=width, temperature=1.0,
                      top_p=1.0, top_k=None, eos_tokens=[eos], forbidden_tokens=forbidden, seed=seed)
        common.check_lengths([len(t) for t in out.tokens], batch, new_tokens, system)

    def check() -> dict:
        greedy = common.greedy_count(workload)
        out = sampler(texts[:1], max_generation_steps=greedy, max_prompt_length=width, temperature=0.0,
                      eos_tokens=[eos], forbidden_tokens=[PAD_ID])
        return {"greedy_tokens": [int(t) for t in out.tokens[0][:greedy]]}

    settings = ("float32; rope_theta passed to apply_rope (Tunix ignores the config's); pad id 0 "
                "(<|endoftext|>) instead of EOS; EOS and 0 forbidden")
    return common.Prepared(call, batch * new_tokens, dict(common.prompt_info(prompts), settings=settings), check)


if __name__ == "__main__":
    common.run(prepare)
