"""Shape buckets and numeric options of the sampler (a frozen dataclass, hashable, config-friendly)."""
from __future__ import annotations

import dataclasses

_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_LAYOUTS = ("gathered", "sharded")
DECODE_WEIGHTS = ("auto", "unstacked", "stacked")
REUSE_CONTEXT = ("auto", "on", "off")


def _check_buckets(name: str, buckets) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"sampler.{name} must be a non-empty increasing list of positive ints, got {buckets}")
    return buckets


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Every compiled program is specialised to one bucket of each kind; a call pads its actual
    sizes up to the smallest bucket that fits, so after warm-up nothing compiles again.

    batch_buckets: rows per program, for the distinct prompts (prefill) and for prompts x samples
        (decode). Each must be a multiple of the mesh's data-parallel size. Larger calls are split.
    prompt_buckets: prompt lengths (tokens, left-padded).
    generation_buckets: max_new_tokens budgets (the KV cache holds prompt + generation bucket).
    compute_dtype: overrides the model config's compute dtype (e.g. "bfloat16"); None keeps it.
    cache_dtype: KV-cache dtype; None = the compute dtype.
    pad_token_id: token written after a row stops and used to pad prompts.
    prefill_block_size: prompt buckets longer than this prefill with blockwise attention over
        blocks of this many queries and keys, so the prefill's attention memory grows with the
        prompt, not its square (a 24k-token prompt's dense scores need ~108 GiB per row for
        Qwen3-4B); 0 = always dense. Shorter prompts prefill dense (faster).
    weight_layout: how the programs hold the weights on a mesh with fsdp > 1. "gathered": each
        generate call first gathers them whole over "fsdp" (still split over "tensor"), a copy that
        lives for that call, so the decode loop reads local weights; "sharded": the training layout
        as passed, which costs no copy but makes XLA communicate inside the decode loop at every
        token (compiled for cpu:8 it gathers activations; the scanned, stacked decode gathered
        every layer's weights). Same tokens either way.
    compact_rows: when the rows still decoding fit a smaller batch bucket, drop the stopped ones
        and continue in that bucket (one more compiled decode program per bucket used), so rows
        that finish early stop costing decode work. Same tokens either way.
    decode_weights: "unstacked" = each generate call first copies every layer's weights out of
        the stacked arrays, transposed to [out, in] for weights-first matmuls (one more copy of the
        sampled weights while it decodes), so that its decode loops read them in place; "stacked" =
        the loop slices each layer out of the stacked arrays at every token, which XLA:CPU does by
        copying. SmolLM2-135M at batch 32 on CPU: stacked 297, unstacked as stored 222, unstacked
        transposed 177 ms per decode step (`python benchmarks/decode_profile.py`). "auto" =
        unstacked on CPU, stacked elsewhere (not measured on TPU or GPU, whose compilers can fuse
        the slice into the matmul). Same tokens either way (to float rounding of the logits).
    reuse_context: "on" = SamplerPolicy asks each generate call to keep its rows' KV cache (prompt
        and generated tokens) and hands it to the policy's next call, which then prefills only
        what its prompts add (`Sampler.generate(keep_context=..., context=...)`): the Code
        Executor's second turn runs the tool output through the model, not the whole conversation.
        The kept cache lives until that next call has prefilled (the memory check counts it as
        `kept_context`). "off" = every call prefills its whole prompts; "auto" = on on CPU, where
        prefill is compute-bound and memory ample, off elsewhere (not measured on TPU or GPU).
        Same tokens either way (to float rounding of the logits).
    """
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    generation_buckets: tuple[int, ...] = (16, 64, 256, 1024, 2048, 4096, 8192, 16384)
    compute_dtype: str | None = None
    cache_dtype: str | None = None
    pad_token_id: int = 0
    prefill_block_size: int = 1024
    weight_layout: str = "gathered"
    compact_rows: bool = True
    decode_weights: str = "auto"
    reuse_context: str = "auto"

    def __post_init__(self):
        for name in ("batch_buckets", "prompt_buckets", "generation_buckets"):
            object.__setattr__(self, name, _check_buckets(name, getattr(self, name)))
        for name in ("compute_dtype", "cache_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ValueError(f"sampler.{name}={value!r} is not one of {_DTYPES} or None")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"sampler.weight_layout={self.weight_layout!r} is not one of {WEIGHT_LAYOUTS}")
        if self.decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"sampler.decode_weights={self.decode_weights!r} is not one of {DECODE_WEIGHTS}")
        if self.reuse_context not in REUSE_CONTEXT:
            raise ValueError(f"sampler.reuse_context={self.reuse_context!r} is not one of {REUSE_CONTEXT}")
        if int(self.prefill_block_size) < 0:
            raise ValueError(f"sampler.prefill_block_size must be >= 0, got {self.prefill_block_size}")


def bucket_for(size: int, buckets: tuple[int, ...], key: str, what: str) -> int:
    """The smallest bucket >= size; a clear error naming the config key when none fits."""
    for b in buckets:
        if b >= size:
            return b
    raise ValueError(f"{what} {size} exceeds the largest entry {buckets[-1]} of sampler.{key}")
