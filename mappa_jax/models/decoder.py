"""One NNX decoder for the Llama, Qwen2 and Qwen3 families.

The three families differ only in details the config carries: Qwen2 adds biases to the q/k/v
projections, Qwen3 RMS-normalizes q and k per head, Llama 3 rescales RoPE frequencies, and small
models tie the output head to the embedding. Layers are stored stacked (leading axis = layer) and
run under `jax.lax.scan`, so a 30-layer model compiles as fast as a 1-layer one and every
parameter has one sharding rule (see `mappa_jax.parallel`).

Attention takes an explicit key mask. Without a cache the keys are the input tokens; with a cache
the keys are the cache slots, the new keys are written at `cache_index`, and query i sits at slot
`cache_index + i`. Positions are an input, so left-padded rows get the same RoPE phases (and logits)
as the unpadded sequence. The cache holds one [B, Hkv, S, D] array per layer, slots next to
head_dim, so that a decode step reads each (row, head)'s keys and values as one contiguous block.
Calls with a cache (decoding) run the layers as an unrolled Python loop over those arrays: XLA:CPU
copies any slice of a stacked array that a loop body reads, so a scan over a stacked cache (or
stacked weights) inside the decode loop copies every layer's cache and weights at every token.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mappa_jax.models.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every per-layer linear map."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values, one array per layer: [batch, kv_heads, slots, head_dim] each."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        dtype = dtype or cfg.jnp_dtype
        layers = range(cfg.num_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def map(self, fn) -> "KVCache":
        """`fn` applied to every layer's keys and values."""
        return KVCache(tuple(map(fn, self.k)), tuple(map(fn, self.v)))


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse RoPE frequencies [head_dim/2], with the checkpoint's scaling applied."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv
    if cfg.rope_scaling[0] == "linear":
        return inv / cfg.rope_scaling[1]
    _, factor, low_ff, high_ff, original_max = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original_max / low_ff, original_max / high_ff
    # Long wavelengths are slowed by `factor`, short ones kept; the band between is interpolated.
    smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
    interpolated = (1 - smooth) * inv / factor + smooth * inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, interpolated, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF layout). x: [B, T, H, D]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


# Key/value layouts, as einsum subscripts: the input's keys are [B,S,Hkv,D]; a cache layer's are
# [B,Hkv,S,D] (see KVCache).
KEYS_FROM_INPUT, KEYS_FROM_CACHE = "bskd", "bksd"


def attention(q, k, v, q_slots, kv_mask, dtype, kv_layout: str = KEYS_FROM_INPUT):
    """Grouped-query attention. q: [B,T,Hq,D]; k, v: [B,S,Hkv,D] (or [B,Hkv,S,D] with
    kv_layout=KEYS_FROM_CACHE); q_slots: [T]; kv_mask: [B,S]."""
    b, t, hq, d = q.shape
    hkv, s = k.shape[kv_layout.index("k")], k.shape[kv_layout.index("s")]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    if kv_layout == KEYS_FROM_CACHE and t == 1:
        return _decode_attention(q[:, 0], k, v, q_slots[0], kv_mask, dtype).reshape(b, t, hq * d)
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    mask = causal[None, None, None] & kv_mask[:, None, None, None, :]
    # A finite floor: fully masked rows (left padding) give a uniform softmax instead of NaN.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if kv_layout == KEYS_FROM_CACHE:
        # Heads-major output, then a transpose: with "->btkgd" XLA:CPU turns this dot into a
        # transposed-values matmul off its fast path (~2x slower; one query row: _decode_attention).
        out = jnp.transpose(jnp.einsum("bkgts,bksd->bkgtd", probs, v), (0, 3, 1, 2, 4))
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq * d)


def _decode_attention(q, k, v, q_slot, kv_mask, dtype):
    """`attention` for one query per row over a cache layer: q [B,Hkv,G,D]; k, v [B,Hkv,S,D].
    Scores are kept slots-major, [B,Hkv,S,G], the layout XLA:CPU's dot of the cache against the G
    query heads produces, so neither dot nor the softmax needs a transposed copy."""
    d = q.shape[-1]
    scores = jnp.einsum("bksd,bkgd->bksg", k, q, preferred_element_type=jnp.float32) / math.sqrt(d)
    mask = kv_mask[:, None, :, None] & (jnp.arange(k.shape[2]) <= q_slot)[None, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=2).astype(dtype)
    return jnp.einsum("bksg,bksd->bkgd", probs, v)  # [B,Hkv,G,D]: the heads in q's order


# ---- blockwise (flash-style) attention ---------------------------------------------------------
# The keys are cut into blocks; a scan keeps a running max m, normalizer l and weighted sum per
# query (online softmax), so only [queries, block] scores exist at a time. A custom VJP keeps just
# (m, l, output) and recomputes each block's probabilities in the backward pass; differentiating
# the forward scan instead would store every block's scores, i.e. the full [T, S] again.
# Masking matches `attention` exactly: masked keys score finfo.min (a fully masked query row gets
# a uniform average, as in the dense softmax); slots added to fill the last block score -inf.

def _split_slots(x, axis, n, block):
    """Pads `axis` (the slots) to n * block and splits it into n blocks on a new leading axis."""
    x = jnp.pad(x, [(0, n * block - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:]), axis, 0)


def _key_blocks(k, v, kv_mask, block, kv_layout):
    """k, v [B,S,Hkv,D] -> [n,B,block,Hkv,D] (or the same with Hkv before the slots);
    kv_mask -> [n,B,block]; slot ids [n,block]."""
    axis = kv_layout.index("s")
    n = -(-k.shape[axis] // block)
    split = lambda x, x_axis: _split_slots(x, x_axis, n, block)
    return split(k, axis), split(v, axis), split(kv_mask, 1), jnp.arange(n * block).reshape(n, block)


def _block_scores(q, k_block, mask_block, slot_block, q_slots, num_slots, kv_layout):
    """Masked float32 scores [B,Hkv,G,T,block] and the allowed-key mask of one key block."""
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k_block, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    allowed = (slot_block[None, :] <= q_slots[:, None])[None, None, None] & mask_block[:, None, None, None, :]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(slot_block < num_slots, scores, -jnp.inf), allowed


def _layer_local(k, *arrays):
    """`arrays` (query slots, key masks and slot ids) tied to this layer's keys `k`. The masks are
    built from these alone, the same in every layer, so when JAX differentiates the layer scan it
    hoists them out of the loop and keeps every key block's mask broadcast to the scores' shape,
    [n, B, Hkv, G, T, block] (2 x 24.5 GiB per device in a 28k-token Qwen3-4B update); tied to k,
    they are built block by block inside the loop. The barrier moves no data."""
    return jax.lax.optimization_barrier((k, *arrays))[1:]


def _flash_forward(q, k, v, q_slots, kv_mask, block, kv_layout):
    b, t, hkv, g, d = q.shape
    k_blocks, v_blocks, mask_blocks, slot_blocks = _key_blocks(k, v, kv_mask, block, kv_layout)
    q_slots, mask_blocks, slot_blocks = _layer_local(k, q_slots, mask_blocks, slot_blocks)

    def step(carry, xs):
        m, l, acc = carry
        k_j, v_j, mask_j, slot_j = xs
        scores, _ = _block_scores(q, k_j, mask_j, slot_j, q_slots, k.shape[kv_layout.index("s")], kv_layout)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(f"bkgts,{kv_layout}->bkgtd", p.astype(v.dtype), v_j,
                                                       preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    init = (jnp.full((b, hkv, g, t), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((b, hkv, g, t), jnp.float32), jnp.zeros((b, hkv, g, t, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, mask_blocks, slot_blocks))
    return (acc / l[..., None]).astype(q.dtype), m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_attention(q, k, v, q_slots, kv_mask, block, kv_layout):
    return _flash_forward(q, k, v, q_slots, kv_mask, block, kv_layout)[0]


def _flash_attention_fwd(q, k, v, q_slots, kv_mask, block, kv_layout):
    out, m, l = _flash_forward(q, k, v, q_slots, kv_mask, block, kv_layout)
    return out, (q, k, v, q_slots, kv_mask, out, m, l)


def _flash_attention_bwd(block, kv_layout, residuals, d_out):
    q, k, v, q_slots, kv_mask, out, m, l = residuals
    seq_axis = kv_layout.index("s")
    s = k.shape[seq_axis]
    k_blocks, v_blocks, mask_blocks, slot_blocks = _key_blocks(k, v, kv_mask, block, kv_layout)
    q_slots, mask_blocks, slot_blocks = _layer_local(k, q_slots, mask_blocks, slot_blocks)
    d_out = d_out.astype(jnp.float32)
    # d softmax: ds = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = <d_out, out> per query.
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def step(dq, xs):
        k_j, v_j, mask_j, slot_j = xs
        scores, allowed = _block_scores(q, k_j, mask_j, slot_j, q_slots, s, kv_layout)
        p = jnp.exp(scores - m[..., None]) / l[..., None]
        dv_j = jnp.einsum(f"bkgts,bkgtd->{kv_layout}", p, d_out)
        dp = jnp.einsum(f"bkgtd,{kv_layout}->bkgts", d_out, v_j.astype(jnp.float32))
        ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0) * scale  # masked scores are constants
        dq = dq + jnp.einsum(f"bkgts,{kv_layout}->btkgd", ds, k_j.astype(jnp.float32))
        dk_j = jnp.einsum(f"bkgts,btkgd->{kv_layout}", ds, q.astype(jnp.float32))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (k_blocks, v_blocks, mask_blocks, slot_blocks))

    def unblock(x):  # [n, ..., block, ...] -> [..., S, ...] with the slots back at seq_axis
        x = jnp.moveaxis(x, 0, seq_axis)
        x = x.reshape(*x.shape[:seq_axis], -1, *x.shape[seq_axis + 2:])
        return jax.lax.slice_in_dim(x, 0, s, axis=seq_axis)
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def blockwise_attention(q, k, v, q_slots, kv_mask, dtype, block_size: int = 512, query_block: int = 0,
                        kv_layout: str = KEYS_FROM_INPUT):
    """`attention` computed over key blocks of `block_size` slots (same inputs, same result); with
    `query_block`, also over query blocks of that many positions, one after the other (for
    inference: see ModelConfig.attention_query_block)."""
    b, t, hq, d = q.shape
    hkv = k.shape[kv_layout.index("k")]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    key_block = int(min(block_size, k.shape[kv_layout.index("s")]))
    if not query_block or t <= query_block:
        out = _flash_attention(q, k, v, q_slots, kv_mask, key_block, kv_layout)  # [B,Hkv,G,T,D]
    else:
        n = -(-t // query_block)
        pad = n * query_block - t  # padded queries take the last slot; their rows are dropped below
        q_blocks = jnp.moveaxis(jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)])
                                .reshape(b, n, query_block, *q.shape[2:]), 1, 0)
        slot_blocks = jnp.pad(q_slots, (0, pad), mode="edge").reshape(n, query_block)
        out = jax.lax.map(lambda xs: _flash_attention(xs[0], k, v, xs[1], kv_mask, key_block, kv_layout),
                          (q_blocks, slot_blocks))  # [n,B,Hkv,G,query_block,D]
        out = jnp.moveaxis(out, 0, 3).reshape(b, hkv, hq // hkv, n * query_block, d)[:, :, :, :t]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, hq * d).astype(dtype)


# ---- matmul with a direct weight gradient ------------------------------------------------------
# Autodiff transposes `x @ w` into dw = (dy^T x)^T; XLA:CPU folds that transpose into the dot by
# swapping its operands, then copies dy (fused with whatever elementwise backward produced it, e.g.
# SiLU's) into a transposed layout and runs the dot off its fast path (`python
# benchmarks/update.py`: 3.4 s per step before, 2.5 s after). Contracting x and dy directly
# keeps both dots on the fast path. Same values; only the backward program differs. Remat policies
# see a custom_vjp as opaque, so the output is named: `remat_policy` saves it where the config's
# policy would save the dot inside.
MATMUL_OUTPUT = "decoder_matmul"


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] (in `out_dtype` when given, e.g. float32 logits from bf16 inputs)."""
    return checkpoint_name(_matmul(x, w, out_dtype), MATMUL_OUTPUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, out_dtype):
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return _matmul(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, residuals, dy):
    x, w = residuals
    dx = jnp.einsum("...o,io->...i", dy, w)
    dw = jnp.einsum("...i,...o->io", x, dy)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# With few rows (a decode step's batch), XLA:CPU runs x [M, I] @ w [I, O] slower than the same
# product with the weights as the left operand, w^T [O, I] @ x^T: a SmolLM2-135M decode step at
# batch 32 takes 222 ms as stored, 177 ms weights first; at batch 128, 816 vs 840 ms (`python
# benchmarks/decode_profile.py [--batch 128]`), hence the sampler's cut at 64 rows. The barrier
# keeps XLA from folding the transposes back into the slow form; transposing M rows costs little.
WEIGHTS_FIRST_MAX_ROWS = 64


def matmul_weights_first(x: jax.Array, w_t: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., I] @ w_t [O, I]^T, computed as w_t @ x^T (no gradient: decoding only)."""
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.optimization_barrier(jnp.dot(w_t, rows.T, preferred_element_type=out_dtype))
    return y.T.reshape(*x.shape[:-1], w_t.shape[0])


def remat_policy(name: str):
    """The jax.checkpoint policy of ModelConfig.remat_policy, counting `matmul` outputs as the
    batch-dim-free dots they are."""
    policy = getattr(jax.checkpoint_policies, name)
    if name == "dots_with_no_batch_dims_saveable":
        policy = jax.checkpoint_policies.save_from_both_policies(
            policy, jax.checkpoint_policies.save_only_these_names(MATMUL_OUTPUT))
    return policy


# ---- precision ---------------------------------------------------------------------------------
# Parameters live in ModelConfig.param_dtype (the master copy that the optimizer updates: float32
# under bf16 compute) and are cast to the compute dtype `ModelConfig.dtype` where they are used,
# except the RMSNorm scales, which `rms_norm` reads in float32 whatever the compute dtype.
FLOAT32_PARAMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")


def _param_name(path) -> str:
    return next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def compute_copy(state, dtype):
    """`state` (a decoder's or LoRA adapters' parameters, arrays or ShapeDtypeStructs) as a forward
    pass in compute `dtype` reads it: matmul weights, embeddings and biases cast to `dtype` once,
    norm scales as they are. A model run on the copy computes exactly what it computes on `state`
    (it casts at use), so frozen weights (the reference, LoRA's shared base) and the sampler's copy
    are held this way, at half the bytes of float32 and with no per-token cast in decoding. Leaves
    already in their dtype are returned as they are (not copied); shardings are kept."""
    dtype = jnp.dtype(dtype)

    def cast(path, leaf):
        if _param_name(path) in FLOAT32_PARAMS or leaf.dtype == dtype:
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
        return leaf.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, state)


class Decoder(nnx.Module):
    """Token ids -> next-token logits, with an optional KV cache and optional LoRA adapters."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        pdt = cfg.jnp_param_dtype
        n = cfg.num_layers

        def stacked(*shape, ones=False, zeros=False):
            if ones:
                return nnx.Param(jnp.ones((n, *shape), pdt))
            if zeros:
                return nnx.Param(jnp.zeros((n, *shape), pdt))
            return nnx.Param(init(rngs.params(), (n, *shape), pdt))

        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt))
        self.attn_norm = stacked(cfg.hidden_size, ones=True)
        self.mlp_norm = stacked(cfg.hidden_size, ones=True)
        for name, shape in projection_shapes(cfg).items():
            setattr(self, name, stacked(*shape))
        if cfg.qkv_bias:
            self.q_bias = stacked(cfg.num_heads * cfg.head_dim, zeros=True)
            self.k_bias = stacked(cfg.num_kv_heads * cfg.head_dim, zeros=True)
            self.v_bias = stacked(cfg.num_kv_heads * cfg.head_dim, zeros=True)
        if cfg.qk_norm:
            self.q_norm = stacked(cfg.head_dim, ones=True)
            self.k_norm = stacked(cfg.head_dim, ones=True)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), pdt))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt))

    def layer_params(self) -> dict[str, jax.Array]:
        """The stacked per-layer arrays, keyed by name (the xs of the layer scan)."""
        names = ["attn_norm", "mlp_norm", *PROJECTIONS]
        names += ["q_bias", "k_bias", "v_bias"] if self.cfg.qkv_bias else []
        names += ["q_norm", "k_norm"] if self.cfg.qk_norm else []
        return {name: getattr(self, name)[...] for name in names}

    def layer_slices(self, lora=None, weights_first: bool = False) -> "LayerSlices":
        """Every layer's (weights, LoRA adapters) as arrays of their own, for a call with a cache.
        A jitted program that returns them copies them out of the stacked arrays once, so a loop
        that reads them (the decode loop) reads them in place; sliced inside the loop, XLA:CPU
        copies every layer's weights at every iteration. weights_first: matmul weights, LoRA
        factors and the output head transposed to [out, in], for `matmul_weights_first`; the tied
        head is the embedding, already [vocab, hidden]."""
        dt = self.cfg.jnp_dtype
        transposed = lambda w: jnp.swapaxes(w, -1, -2).astype(dt)
        stacked = self.layer_params()
        adapters = None if lora is None else lora.layer_params()
        head = None
        if weights_first:
            stacked = {k: transposed(w) if k in PROJECTIONS else w for k, w in stacked.items()}
            adapters = None if adapters is None else jax.tree.map(transposed, adapters)
            head = self.embed[...].astype(dt) if self.cfg.tie_word_embeddings else transposed(self.lm_head[...])
        layers = [(jax.tree.map(lambda w, i=i: w[i], stacked),
                   None if adapters is None else jax.tree.map(lambda w, i=i: w[i], adapters))
                  for i in range(self.cfg.num_layers)]
        return LayerSlices(layers, head, weights_first)

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0,
                 lora=None, return_hidden: bool = False,
                 activation_sharding: jax.sharding.Sharding | None = None,
                 build_cache=None, layers=None) -> tuple[jax.Array, KVCache | None]:
        """tokens, positions: [B, T] int; kv_mask: [B, S] bool over keys (S = T without a cache,
        else the cache's slots). Returns float32 logits [B, T, V] and the updated cache; with
        return_hidden, the final-norm hidden states [B, T, H] instead of logits, so a caller that
        needs few positions' logits (the trainer: generated tokens only) applies `head` to those.
        activation_sharding: the residual stream's [B, T, H] sharding at every layer boundary (the
        trainer's rows over the mesh's data axes); without it XLA may follow the FSDP-sharded
        weights instead and give every device all the rows (4x the compute and activations).
        build_cache: a dtype; without a cache, also return a new T-slot cache of these tokens'
        keys and values in it (a prefill: the layers still run as one scan; attention reads the
        keys as the cache stores them, so later steps see the same numbers).
        layers: `layer_slices(lora)` for a call with a cache (default: sliced here)."""
        slices = layers if layers is not None else (self.layer_slices(lora) if cache is not None else None)
        weights_first = slices is not None and slices.weights_first
        project = matmul_weights_first if weights_first else matmul
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        constrain = ((lambda x: x) if activation_sharding is None else
                     (lambda x: jax.lax.with_sharding_constraint(x, activation_sharding)))
        b, t = tokens.shape
        inv_freq = rope_inv_freq(cfg)
        q_slots = cache_index + jnp.arange(t)
        lora_scale = 0.0 if lora is None else lora.scale
        cache_dtype = None if build_cache is None else jnp.dtype(build_cache)

        def linear(x, w, name, lp_lora):
            y = project(x, w.astype(dt))
            if lp_lora is not None and name in lp_lora:
                a, bb = lp_lora[name]
                y = y + project(project(x, a.astype(dt)), bb.astype(dt)) * lora_scale
            return y

        def layer(x, lp, lp_lora, cache_layer):
            """One layer. cache_layer: this layer's (k, v) cache arrays, or None. Returns the new x
            and the layer's updated cache arrays, or with build_cache its new keys and values in
            the cache layout [B, Hkv, T, D] (else None)."""
            x = constrain(x)
            h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
            q = linear(h, lp["q_proj"], "q_proj", lp_lora)
            k = linear(h, lp["k_proj"], "k_proj", lp_lora)
            v = linear(h, lp["v_proj"], "v_proj", lp_lora)
            if cfg.qkv_bias:
                q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
            q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
            k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
            kv_layout, kept = KEYS_FROM_INPUT, None
            if cache_layer is not None:
                # Only the new slots are written (in place under donation).
                new_slots = lambda x, c: jnp.swapaxes(x, 1, 2).astype(c.dtype)  # [B,Hkv,T,D]
                kept = tuple(jax.lax.dynamic_update_slice(c, new_slots(x, c), (0, 0, cache_index, 0))
                             for x, c in zip((k, v), cache_layer))
                k, v, kv_layout = kept[0].astype(dt), kept[1].astype(dt), KEYS_FROM_CACHE
            elif cache_dtype is not None:
                kept = tuple(jnp.swapaxes(x, 1, 2).astype(cache_dtype) for x in (k, v))
                k, v = (x.astype(cache_dtype).astype(dt) for x in (k, v))
            if cfg.attention_impl == "blockwise":
                attn = blockwise_attention(q, k, v, q_slots, kv_mask, dt, cfg.attention_block_size,
                                           cfg.attention_query_block, kv_layout)
            else:
                attn = attention(q, k, v, q_slots, kv_mask, dt, kv_layout)
            x = x + linear(attn, lp["o_proj"], "o_proj", lp_lora)
            h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
            gated = jax.nn.silu(linear(h, lp["gate_proj"], "gate_proj", lp_lora)) * linear(h, lp["up_proj"], "up_proj", lp_lora)
            x = x + linear(gated, lp["down_proj"], "down_proj", lp_lora)
            return constrain(x), kept

        x = self.embed[...].astype(dt)[tokens]
        if cache is not None:
            ks, vs = list(cache.k), list(cache.v)
            for i, (lp, lp_lora) in enumerate(slices.layers):
                x, (ks[i], vs[i]) = layer(x, lp, lp_lora, (ks[i], vs[i]))
            new_cache = KVCache(tuple(ks), tuple(vs))
        else:
            def scanned(x, xs):
                return layer(x, *xs, None)
            if cfg.remat:
                # Backprop keeps each layer's input only and recomputes the layer (see REMAT_POLICIES).
                scanned = jax.checkpoint(scanned, policy=remat_policy(cfg.remat_policy),
                                         prevent_cse=False)
            adapters = None if lora is None else lora.layer_params()
            x, kv = jax.lax.scan(scanned, x, (self.layer_params(), adapters), unroll=bool(cfg.unroll_layers))
            new_cache = None if kv is None else KVCache(*(tuple(a[i] for i in range(cfg.num_layers)) for a in kv))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if return_hidden:
            return x, new_cache
        return (matmul_weights_first(x, slices.head, jnp.float32) if weights_first else self.head(x)), new_cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden states [..., H] -> float32 logits [..., V]."""
        weight = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return matmul(hidden, weight.astype(self.cfg.jnp_dtype), jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerSlices:
    """`Decoder.layer_slices`: per layer, (weights, LoRA adapters or None); with weights_first, the
    matmul weights as [out, in] and the output head [vocab, hidden] too (else head is None)."""
    layers: list
    head: jax.Array | None
    weights_first: bool = dataclasses.field(metadata=dict(static=True))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions for a padded batch: each row counts from 0 at its first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under float32 logits of the same leading shape (no temperature)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
