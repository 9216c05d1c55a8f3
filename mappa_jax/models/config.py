"""Model hyper-parameters for the Llama / Qwen2 / Qwen3 decoder family, built from HF config.json
(and the end-of-sequence ids of generation_config.json beside it)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "qwen2", "qwen3")
ATTENTION_IMPLS = ("dense", "blockwise")
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _token_ids(value, where: str) -> tuple[int, ...]:
    """An HF token-id field (null, an id, or a list of ids) as a tuple."""
    values = () if value is None else value if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where} must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Hashable rope scaling: ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
    # or ("linear", factor); None for plain RoPE.
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; logits are always float32
    # Training memory. remat: recompute each layer's activations in the backward pass (only the
    # layer inputs are kept); remat_policy: what the recomputation may keep instead (a name in
    # REMAT_POLICIES). attention_impl "blockwise": flash-style attention over key blocks of
    # attention_block_size slots, never holding [queries, keys] scores (for training at long T).
    # attention_query_block > 0 also takes the queries that many at a time (the sampler's prefill
    # of long prompts): scores are then [query block, key block]. Inference only: under jax.grad
    # each query block's residuals would hold the keys and values again.
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention_impl: str = "dense"
    attention_block_size: int = 512
    attention_query_block: int = 0
    # Calls without a cache run the stacked layers as a scan; unroll_layers unrolls it, so XLA:CPU
    # reads each layer's weights in place instead of copying their slices at every iteration (and
    # writing the gradient slices back). The update's graph sets it on CPU (config key
    # model.train_unroll_layers); the sampler's prefill gains nothing from it. Same numbers.
    unroll_layers: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if int(self.attention_block_size) <= 0:
            raise ValueError(f"model.attention_block_size must be positive, got {self.attention_block_size}")
        if int(self.attention_query_block) < 0:
            raise ValueError(f"model.attention_query_block must be >= 0, got {self.attention_query_block}")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {sorted(_DTYPES)}")

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        per_layer += (q + 2 * kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + l * per_layer + d + head

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> "ModelConfig":
        """From a transformers PretrainedConfig, a config.json dict, or a path to config.json / its dir.

        eos_token_ids: config.json's eos_token_id, then (from a path) the ids generation_config.json
        beside it adds: chat models stop generating at either (Qwen3 lists <|im_end|> and
        <|endoftext|> there, config.json only one of them), as transformers' generate does."""
        generation_eos: tuple[int, ...] = ()
        if isinstance(hf, (str, pathlib.Path)):
            path = pathlib.Path(hf)
            path = path / "config.json" if path.is_dir() else path
            hf = json.loads(path.read_text())
            generation = path.parent / "generation_config.json"
            if generation.exists():
                generation_eos = _token_ids(json.loads(generation.read_text()).get("eos_token_id"),
                                            f"{generation}: eos_token_id")
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get("model_type")
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(model_type)
        if family is None:
            raise ValueError(f"model_type {model_type!r} is not supported (llama, qwen2, qwen3)")
        if family == "llama" and (get("attention_bias") or get("mlp_bias")):
            raise ValueError("llama configs with attention_bias or mlp_bias are not supported")
        if get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)) or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("default", None):
            scaling = None
        elif rope_type == "llama3":
            scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        elif rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        else:
            raise ValueError(f"rope_type {rope_type!r} is not supported (default, llama3, linear)")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        eos = tuple(dict.fromkeys(_token_ids(get("eos_token_id"), "config.json: eos_token_id") + generation_eos))
        fields = dict(
                family=family, vocab_size=int(get("vocab_size")), hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")), num_layers=int(get("num_hidden_layers")),
                num_heads=heads, num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads), rope_theta=theta, rope_scaling=scaling,
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                max_position_embeddings=int(get("max_position_embeddings", 4096)),
                bos_token_id=get("bos_token_id"), eos_token_ids=eos)
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict:
        """config.json contents that transformers loads into the matching architecture."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope: dict = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling and self.rope_scaling[0] == "llama3":
            _, factor, low, high, orig = self.rope_scaling
            rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                                    original_max_position_embeddings=orig)
        elif self.rope_scaling:
            rope.update(rope_type="linear", factor=self.rope_scaling[1])
        eos = list(self.eos_token_ids)
        return {
                "architectures": [arch[self.family]], "model_type": self.family,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": rope, "rope_theta": self.rope_theta,
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings,
                "bos_token_id": self.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                "attention_bias": False, "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
        }

    @classmethod
    def tiny(cls, family: str = "llama", **overrides) -> "ModelConfig":
        """A few-thousand-parameter config for tests: GQA (4 query heads over 2 KV heads)."""
        fields = dict(family=family, vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                                    qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                                    max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,))
        fields.update(overrides)
        return cls(**fields)
