"""Worker: transformers' PyTorch `generate` on the same float32 weights (dequantized from the GGUF).

hf_generate: eager, dynamic KV cache (what a user gets by default).
hf_generate_compiled: static KV cache + torch.compile of the forward (transformers' own auto-compile
path, switched on for CPU with CompileConfig._compile_all_devices; mode "default" because
"reduce-overhead" means CUDA graphs).
"""
from __future__ import annotations

import common


def load_model(path):
    import numpy as np
    import torch
    import transformers
    from mappa_jax.models import weights
    cfg, read = weights.gguf_reader(path)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict()), dtype=torch.float32).eval()
    state = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    model.load_state_dict({name: torch.from_numpy(np.array(read(name, ()))) for name in state if name not in tied},
                          strict=False)
    return cfg, model


def prepare(workload: dict, system: str) -> common.Prepared:
    torch = common.require("torch", "pip install torch==2.13.0 (the CPU wheel)")
    transformers = common.require("transformers", "pip install transformers")
    torch.set_num_threads(common.cores())
    batch, new_tokens = workload["batch"], workload["new_tokens"]
    prompts, path = common.smollm2_prompts(batch, workload["prompt_tokens"])
    cfg, model = load_model(path)
    pad = cfg.eos_token_ids[0]
    width = max(map(len, prompts))
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    extra = {}
    settings = "float32, eager, dynamic cache"
    if system == "hf_generate_compiled":
        compile_config = transformers.CompileConfig(mode="default")
        compile_config._compile_all_devices = True
        extra = dict(cache_implementation="static", compile_config=compile_config)
        settings = "float32, static cache, torch.compile (inductor, mode=default)"
    # min_new_tokens masks EOS's logit until new_tokens are out, so every row decodes new_tokens steps.
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad, **extra)

    def call(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        common.check_lengths([out.shape[1] - width] * batch, batch, new_tokens, system)

    def check() -> dict:
        greedy = common.greedy_count(workload)
        if extra:  # compiled: the timed shapes (a new shape recompiles for minutes); row 0 is unpadded
            with torch.no_grad():
                out = model.generate(ids, **dict(kwargs, do_sample=False))
            return {"greedy_tokens": out[0, width:width + greedy].tolist()}
        first = torch.tensor([prompts[0]])
        with torch.no_grad():
            out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=False,
                                 max_new_tokens=greedy, pad_token_id=pad)
        return {"greedy_tokens": out[0, first.shape[1]:].tolist()}

    return common.Prepared(call, batch * new_tokens, dict(common.prompt_info(prompts), settings=settings,
                                                                  threads=torch.get_num_threads()),
                           check)


if __name__ == "__main__":
    common.run(prepare)
