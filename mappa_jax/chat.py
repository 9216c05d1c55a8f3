"""mappa-chat: talk to a model through our own decoder and sampler (SmolLM2 offline by default)."""
from __future__ import annotations

import sys
import time

from absl import app, flags

from mappa_jax import compile_cache
from mappa_jax.models import hub, weights
from mappa_jax.sampling import Sampler, SamplerConfig

_MODEL = flags.DEFINE_string("model", None, "GGUF file or HF model directory; default SmolLM2-135M-Instruct")
_PROMPT = flags.DEFINE_string("prompt", None, "one message to answer, then exit (else interactive)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens per reply")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", 'persistent XLA compilation cache: "auto" (the user cache), "" (off) or a directory')


def load(source: str | None):
    source = source or str(hub.smollm2_gguf_path())
    if source.endswith(".gguf"):
        cfg, state = weights.load_gguf(source)
    else:
        source = str(hub.resolve_model_dir(source))
        cfg, state = weights.load_hf(source)
    return cfg, state, weights.load_tokenizer(source)


def main(argv):
    del argv
    compile_cache.enable(_COMPILATION_CACHE.value)  # the second chat session starts without compiling
    cfg, state, tokenizer = load(_MODEL.value)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_ids[0]
    sampler = Sampler(cfg, SamplerConfig(pad_token_id=pad), tokenizer=tokenizer)
    messages = []
    prompts = [_PROMPT.value] if _PROMPT.value else None
    while True:
        text = prompts.pop(0) if prompts else (None if prompts is not None else input("you> "))
        if not text:
            return
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        start = time.perf_counter()
        out = sampler.generate(state, [ids], max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                               seed=_SEED.value)
        seconds = time.perf_counter() - start
        reply = tokenizer.decode(out.sequences()[0], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}\n[{int(out.lengths[0])} tokens in {seconds:.1f} s, compile included on the first turn]",
              file=sys.stdout, flush=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
