"""A model's architecture without its weights, for planning and ahead-of-time compilation.

`architecture(config.model)` gives the ModelConfig a run would load, reading only metadata: a
random test decoder's sizes, a GGUF file's header, a local snapshot's config.json, or, for the
paper's hub models (no hub is needed), their published config.json values below. A hub id not in
the table is asked for its config.json alone.
"""
from __future__ import annotations

import pathlib

from mappa_jax.models.config import ModelConfig

# The architecture fields of each model's config.json as published on the Hugging Face hub
# (huggingface.co/<id>/blob/main/config.json); ModelConfig.from_hf reads them like the file.
# eos_token_id lists config.json's id and then generation_config.json's, as from_hf merges them
# from a snapshot (Qwen3 stops at <|im_end|> 151645 or <|endoftext|> 151643).
_QWEN3_4B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": [151645, 151643],
}
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen3-4B": _QWEN3_4B,
    # The 2507 releases: the same network, a longer RoPE period and 256k positions.
    "Qwen/Qwen3-4B-Thinking-2507": _QWEN3_4B | {"rope_theta": 5000000, "max_position_embeddings": 262144},
    "Qwen/Qwen3-4B-Instruct-2507": _QWEN3_4B | {"rope_theta": 5000000, "max_position_embeddings": 262144},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "use_sliding_window": False, "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}


def random_architecture(model_section, vocab_size: int) -> ModelConfig:
    """The tiny random decoder of model.source "random:<family>" (sized by model.random_*)."""
    hidden = int(model_section.random_hidden)
    return ModelConfig.tiny(model_section.source.split(":", 1)[1], vocab_size=vocab_size,
                            num_layers=int(model_section.random_layers), hidden_size=hidden,
                            head_dim=hidden // 4, param_dtype=model_section.param_dtype, dtype=model_section.dtype)


def _gguf_architecture(path: str, **dtypes) -> ModelConfig:
    import gguf
    from mappa_jax.models import weights
    return weights.gguf_config(gguf.GGUFReader(path), **dtypes)


def _gguf_path(source: str) -> str:
    from mappa_jax.models import hub
    if source == "smollm2":
        return str(hub.smollm2_gguf_path())
    if not pathlib.Path(source).exists():
        raise FileNotFoundError(f"config key 'model.source': GGUF file {source} does not exist")
    return source


def architecture(model_section) -> ModelConfig:
    """The ModelConfig of `config.model` (mappa_jax/config.py), from metadata only."""
    source = model_section.source
    dtypes = dict(param_dtype=model_section.param_dtype, dtype=model_section.dtype)
    if source.startswith("random:"):
        tokenizer = model_section.tokenizer or "smollm2"
        if tokenizer == "smollm2" or tokenizer.endswith(".gguf"):
            vocab = _gguf_architecture(_gguf_path(tokenizer)).vocab_size  # the GGUF holds the vocabulary
        else:
            from mappa_jax.models import hub, weights
            vocab = len(weights.load_tokenizer(str(hub.resolve_model_dir(tokenizer))))
        cfg = random_architecture(model_section, vocab)
        eos = _gguf_architecture(_gguf_path(tokenizer)).eos_token_ids if tokenizer == "smollm2" else cfg.eos_token_ids
        return cfg.replace(eos_token_ids=eos)
    if source == "smollm2" or source.endswith(".gguf"):
        return _gguf_architecture(_gguf_path(source), **dtypes)
    local = pathlib.Path(source).expanduser()
    if local.is_dir():
        return ModelConfig.from_hf(local / "config.json", **dtypes)
    if source in KNOWN_ARCHITECTURES:
        return ModelConfig.from_hf(KNOWN_ARCHITECTURES[source], **dtypes)
    try:
        from huggingface_hub import hf_hub_download
        return ModelConfig.from_hf(hf_hub_download(source, "config.json"), **dtypes)
    except Exception as err:  # offline, unknown id, gated repo
        raise FileNotFoundError(
            f"config key 'model.source' {source!r}: no local directory, no known architecture "
            f"(known: {sorted(KNOWN_ARCHITECTURES)}) and no config.json from the hub "
            f"({type(err).__name__}: {err})") from err
