"""Weight import and export: HF safetensors (single file or sharded index), GGUF, and back to HF.

Our parameters are stacked over layers and stored as [in, out]; HF stores one [out, in] tensor per
layer. Import builds each stacked array with `jax.make_array_from_callback`, so every device reads
only its own shard straight from the memory-mapped file: no device holds, and the host never
assembles, a full copy of a sharded parameter.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import Decoder, compute_copy

# our name -> (HF name template, transpose?); "{i}" is the layer index.
_LAYER_NAMES = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", True),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", True),
}
_GLOBAL_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# llama.cpp tensor names for the same HF tensors.
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

TensorReader = Callable[[str, tuple], np.ndarray]  # (hf_name, index into the HF tensor) -> array


def abstract_model(cfg: ModelConfig, frozen: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a Decoder: nothing is allocated. frozen: the dtypes
    of weights that are never trained (compute dtype; see decoder.compute_copy), else param_dtype."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return graphdef, compute_copy(state, cfg.jnp_dtype) if frozen else state


def _hf_source(cfg: ModelConfig, name: str) -> tuple[str, bool, bool]:
    """(HF name template, transpose, stacked-over-layers) of one of our parameters."""
    if name in _LAYER_NAMES:
        return (*_LAYER_NAMES[name], True)
    return (*_GLOBAL_NAMES[name], False)


def _read_stacked(read: TensorReader, cfg: ModelConfig, name: str, index: tuple, dtype) -> np.ndarray:
    """The block `index` of our parameter `name`, read from HF tensors (and nothing more)."""
    template, transpose, stacked = _hf_source(cfg, name)

    def one(hf_name, idx):
        idx = tuple(reversed(idx)) if transpose else idx
        block = read(hf_name, idx)
        return (block.T if transpose else block).astype(dtype)

    if not stacked:
        return one(template, index)
    layers = range(cfg.num_layers)[index[0]]
    return np.stack([one(template.format(i=i), index[1:]) for i in layers])


def load_state(cfg: ModelConfig, read: TensorReader, shardings=None, frozen: bool = False) -> nnx.State:
    """A Decoder state filled from HF-named tensors; each leaf placed with its sharding.

    `shardings` is a pytree matching the state (e.g. `mappa_jax.parallel.param_shardings`), or None
    for the default device. frozen: weights that are never trained (LoRA's shared base) load in the
    compute dtype (norm scales in param_dtype), trained ones in param_dtype (the master copy).
    """
    _, abstract = abstract_model(cfg, frozen)
    pure = nnx.to_pure_dict(abstract)
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), pure)
    elif isinstance(shardings, nnx.State):
        shardings = nnx.to_pure_dict(shardings)
    loaded = {}
    for name, leaf in pure.items():
        loaded[name] = jax.make_array_from_callback(
            leaf.shape, shardings[name],
            lambda index, name=name, dtype=np.dtype(leaf.dtype): _read_stacked(read, cfg, name, index, dtype))
    nnx.replace_by_pure_dict(abstract, loaded)
    return abstract


def _full_index(shape) -> tuple:
    return tuple(slice(0, n) for n in shape)


# ---- Hugging Face safetensors -------------------------------------------------------------------
def safetensors_reader(model_dir: str | pathlib.Path) -> TensorReader:
    """Reads slices of tensors from model.safetensors or a sharded model.safetensors.index.json."""
    from safetensors import safe_open
    model_dir = pathlib.Path(model_dir)
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").exists():
        weight_map = None
    else:
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    handles: dict[str, object] = {}

    def read(hf_name: str, index: tuple) -> np.ndarray:
        file = "model.safetensors" if weight_map is None else weight_map.get(hf_name)
        if file is None:
            raise KeyError(f"tensor {hf_name!r} is missing from {index_file}")
        if file not in handles:
            handles[file] = safe_open(str(model_dir / file), framework="numpy")
        handle = handles[file]
        if weight_map is None and hf_name not in handle.keys():
            raise KeyError(f"tensor {hf_name!r} is missing from {model_dir / file}")
        return np.asarray(handle.get_slice(hf_name)[index])

    return read


def load_hf(model_dir: str | pathlib.Path, shardings_fn=None, frozen: bool = False,
            **config_overrides) -> tuple[ModelConfig, nnx.State]:
    """(config, state) from a local HF snapshot. `shardings_fn(abstract_state)` gives placements;
    frozen: see load_state."""
    cfg = ModelConfig.from_hf(pathlib.Path(model_dir) / "config.json", **config_overrides)
    shardings = None if shardings_fn is None else shardings_fn(abstract_model(cfg)[1])
    return cfg, load_state(cfg, safetensors_reader(model_dir), shardings, frozen)


def hf_tensors(cfg: ModelConfig, state: nnx.State, dtype=None) -> dict[str, np.ndarray]:
    """Our state as HF-named, HF-shaped host arrays (gathers sharded arrays), cast to `dtype` (a
    name in ModelConfig's dtypes; None keeps each array's own)."""
    out = {}
    for name, value in nnx.to_pure_dict(state).items():
        template, transpose, stacked = _hf_source(cfg, name)
        value = np.asarray(jax.device_get(value))
        value = value if dtype is None else value.astype(jax.numpy.dtype(dtype))
        if stacked:
            for i in range(cfg.num_layers):
                out[template.format(i=i)] = np.ascontiguousarray(value[i].T if transpose else value[i])
        else:
            out[template] = np.ascontiguousarray(value.T if transpose else value)
    return out


def save_hf(cfg: ModelConfig, state: nnx.State, out_dir: str | pathlib.Path, tokenizer=None,
            dtype: str | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads; tensors
    in `dtype` ("float32", "bfloat16", "float16"; None = cfg.param_dtype), which config.json names."""
    from safetensors.numpy import save_file
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(param_dtype=dtype or cfg.param_dtype)
    save_file(hf_tensors(cfg, state, cfg.param_dtype), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def state_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], shardings=None) -> nnx.State:
    """From an in-memory dict of HF tensors (e.g. a PyTorch state_dict converted to numpy)."""
    def read(hf_name, index):
        if hf_name not in tensors:
            raise KeyError(f"tensor {hf_name!r} is missing")
        return np.asarray(tensors[hf_name][index])
    return load_state(cfg, read, shardings)


# ---- GGUF (llama.cpp) ---------------------------------------------------------------------------
def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, **overrides) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    fields = dict(
        family="llama", vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")), num_layers=int(g("block_count")),
        num_heads=heads, num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 4096)),
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),))
    fields.update(overrides)
    return ModelConfig(**fields)


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows (its RoPE is pairwise)."""
    out_features = w.shape[0]
    return w.reshape(heads, out_features // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(path: str | pathlib.Path, cfg: ModelConfig | None = None):
    """(config, TensorReader) for a GGUF file; tensors are dequantized to float32 once, on demand."""
    import gguf
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    reader = gguf.GGUFReader(str(path))
    cfg = cfg or gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    cache: dict[str, np.ndarray] = {}

    def gguf_name(hf_name: str) -> str:
        if hf_name in _GGUF_NAMES:
            return _GGUF_NAMES[hf_name]
        _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.<rest>
        return f"blk.{layer}.{_GGUF_NAMES[rest]}"

    def read(hf_name: str, index: tuple) -> np.ndarray:
        if hf_name not in cache:
            name = gguf_name(hf_name)
            if name not in tensors:
                raise KeyError(f"tensor {name!r} ({hf_name}) is missing from {path}")
            t = tensors[name]
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            if hf_name.endswith("q_proj.weight"):
                w = _unpermute_rope(w, cfg.num_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _unpermute_rope(w, cfg.num_kv_heads)
            cache[hf_name] = w
        return cache[hf_name][index]

    return cfg, read


def load_gguf(path: str | pathlib.Path, shardings_fn=None, frozen: bool = False,
              **config_overrides) -> tuple[ModelConfig, nnx.State]:
    import gguf
    cfg = gguf_config(gguf.GGUFReader(str(path)), **config_overrides) if config_overrides else None
    cfg, read = gguf_reader(path, cfg)
    shardings = None if shardings_fn is None else shardings_fn(abstract_model(cfg)[1])
    return cfg, load_state(cfg, read, shardings, frozen)


def load_tokenizer(source: str | pathlib.Path):
    """A transformers tokenizer (with chat template) from a GGUF file or a local model directory.

    A GGUF's tokenizer is built from its metadata without torch (models/gguf_tokenizer.py). Parsing
    that metadata takes 5-10 s, so the built tokenizer is saved once in the model cache (keyed by
    the file's name and size) and loaded from there afterwards."""
    from transformers import AutoTokenizer
    from mappa_jax.models import gguf_tokenizer, hub
    source = pathlib.Path(source)
    if source.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(str(source))
    cached = hub.cache_dir() / "tokenizers" / f"{source.stem}-{source.stat().st_size}"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = gguf_tokenizer.load_gguf_tokenizer(source)
    partial = cached.with_name(cached.name + f".partial{os.getpid()}")
    tokenizer.save_pretrained(str(partial))
    try:
        partial.rename(cached)  # atomic; a concurrent process may have won the race
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


def merge(cfg: ModelConfig, state: nnx.State) -> Decoder:
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, state)
