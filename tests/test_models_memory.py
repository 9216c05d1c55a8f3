"""Memory options of the decoder: blockwise (flash-style) attention and per-layer remat.

Both must leave the numbers unchanged (the dense, non-remat decoder is the reference; it is checked
against transformers in test_models_parity) and must shrink what XLA allocates for backprop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mappa_jax.models.config import ModelConfig
from mappa_jax.models.decoder import (KEYS_FROM_CACHE, KEYS_FROM_INPUT, Decoder, KVCache, blockwise_attention, projection_shapes,
                                      positions_from_mask)

BATCH, LENGTH = 3, 37


@pytest.fixture(scope="module")
def padded_batch():
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, 128)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, :5] = False   # left padding: fully masked query rows
    mask[2, 30:] = False  # right padding
    mask = jnp.asarray(mask)
    return tokens, positions_from_mask(mask), mask


def _split(cfg):
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))


def _loss_and_grads(cfg, batch):
    graphdef, state = _split(cfg)
    tokens, positions, mask = batch

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, mask)
        # A loss that touches every logit, padded positions included.
        return jnp.sum(jnp.sin(logits)), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return value, logits, grads


def _max_relative_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_blockwise_matches_dense_on_padded_batch(padded_batch):
    dense = ModelConfig.tiny("qwen3")  # attention is family-independent; qwen3 adds q/k norms
    ref_value, ref_logits, ref_grads = _loss_and_grads(dense, padded_batch)
    # 8 does not divide 37: the last block carries filler slots that must not count.
    for block in (8,):
        value, logits, grads = _loss_and_grads(dense.replace(attention_impl="blockwise", attention_block_size=block),
                                               padded_batch)
        assert float(jnp.max(jnp.abs(logits - ref_logits))) <= 1e-5
        assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value))
        assert _max_relative_diff(ref_grads, grads) <= 1e-5


def test_blockwise_matches_dense_with_kv_cache():
    dense = ModelConfig.tiny("qwen3")
    blockwise = dense.replace(attention_impl="blockwise", attention_block_size=10)  # 48 slots: 5 blocks, 2 filler
    prompt = jax.random.randint(jax.random.key(2), (2, 12), 0, 128)
    prompt_mask = jnp.asarray(np.arange(12)[None, :] >= np.array([[0], [4]]))  # row 1 left-padded
    steps = jax.random.randint(jax.random.key(3), (2, 3), 0, 128)

    def run(cfg):
        graphdef, state = _split(cfg)
        model = nnx.merge(graphdef, state)
        slots = 48
        kv_mask = jnp.zeros((2, slots), bool).at[:, :12].set(prompt_mask)
        positions = positions_from_mask(prompt_mask)
        logits, cache = model(prompt, positions, kv_mask, cache=KVCache.zeros(cfg, 2, slots), cache_index=0)
        outs = [logits]
        for i in range(3):
            index = 12 + i
            kv_mask = kv_mask.at[:, index].set(True)
            positions = positions[:, -1:] + 1
            logits, cache = model(steps[:, i:i + 1], positions, kv_mask, cache=cache, cache_index=index)
            outs.append(logits)
        return jnp.concatenate(outs, axis=1)

    real = jnp.concatenate([prompt_mask, jnp.ones((2, 3), bool)], axis=1)
    ref = run(dense)
    # Query blocks of 5 (the sampler's long-prompt prefill): 12 prompt positions = 3 blocks, 3 filler.
    for cfg in (blockwise, blockwise.replace(attention_query_block=5)):
        got = run(cfg)
        assert float(jnp.max(jnp.abs(got - ref))) <= 1e-5
        assert bool(jnp.all(jnp.isfinite(got[real])))


def test_blockwise_attention_on_cache_layout_keys_matches_input_layout():
    # A cache layer's keys are [B,Hkv,S,D], the input's [B,S,Hkv,D]: same numbers, gradients included
    # (the custom backward pass blocks and unblocks along the layout's slot axis).
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in
               enumerate([(2, 6, 4, 8), (2, 11, 2, 8), (2, 11, 2, 8)]))
    q_slots = jnp.arange(6) + 5
    kv_mask = jnp.ones((2, 11), bool).at[1, :3].set(False)

    def loss(q, k, v, kv_layout, query_block):
        if kv_layout == KEYS_FROM_CACHE:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        out = blockwise_attention(q, k, v, q_slots, kv_mask, jnp.float32, block_size=4, query_block=query_block,
                                  kv_layout=kv_layout)
        return jnp.sum(jnp.sin(out))

    for query_block in (0, 4):
        grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
        ref_value, ref_grads = grad(q, k, v, KEYS_FROM_INPUT, query_block)
        value, grads = grad(q, k, v, KEYS_FROM_CACHE, query_block)
        assert abs(float(value - ref_value)) <= 1e-5
        assert _max_relative_diff(ref_grads, grads) <= 1e-6


def _numpy_attention(q, k, v, q_slot, kv_mask):
    """One query per row, q [B,Hq,D] over keys [B,Hkv,S,D]: softmax over the unmasked slots <= q_slot."""
    b, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for row in range(b):
        for head in range(hq):
            keys, values = k[row, head // group].astype(np.float64), v[row, head // group].astype(np.float64)
            scores = keys @ q[row, head].astype(np.float64) / np.sqrt(d)
            keep = kv_mask[row] & (np.arange(keys.shape[0]) <= q_slot)
            weights = np.exp(scores[keep] - scores[keep].max())
            out[row, head] = weights @ values[keep] / weights.sum()
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_attention_over_a_cache_layer_matches_numpy(dtype):
    """The decode step's own attention path (one query per row, cache layout): grouped heads, left
    padding, slots past the query's masked."""
    from mappa_jax.models.decoder import attention
    b, hkv, group, slots, d, q_slot = 3, 2, 3, 11, 8, 7
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, 1, hkv * group, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, hkv, slots, d)).astype(np.float32) for _ in range(2))
    kv_mask = np.ones((b, slots), bool)
    kv_mask[1, :3] = False  # left padding
    kv_mask[2, :6] = False
    cast = lambda x: jnp.asarray(x, dtype)
    out = attention(cast(q), cast(k), cast(v), jnp.array([q_slot]), jnp.asarray(kv_mask), dtype, KEYS_FROM_CACHE)
    assert out.shape == (b, 1, hkv * group * d) and out.dtype == dtype
    rounded = lambda x: np.asarray(cast(x), np.float32)  # the inputs as the kernel saw them
    expected = _numpy_attention(rounded(q)[:, 0], rounded(k), rounded(v), q_slot, kv_mask)
    tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32).reshape(b, hkv * group, d), expected,
                               atol=tolerance, rtol=tolerance)


def test_remat_gives_same_loss_and_gradients(padded_batch):
    base = ModelConfig.tiny("qwen2")
    ref_value, _, ref_grads = _loss_and_grads(base, padded_batch)
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        value, _, grads = _loss_and_grads(base.replace(remat=True, remat_policy=policy), padded_batch)
        assert abs(float(value - ref_value)) <= 1e-6 * abs(float(ref_value))
        assert _max_relative_diff(ref_grads, grads) <= 1e-6


def compiled_train_temp_bytes(cfg, batch: int, length: int) -> int:
    """XLA temp bytes of one compiled loss-and-gradient step (what backprop needs beyond params)."""
    graphdef, state = _split(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, length), bool)

    def loss(state, tokens, mask):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    compiled = jax.jit(jax.grad(loss)).lower(state, tokens, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_drops_at_1024_tokens():
    cfg = ModelConfig.tiny("llama", num_layers=4, max_position_embeddings=2048)
    sizes = {name: compiled_train_temp_bytes(c, 2, 1024) for name, c in {
        "dense": cfg,
        "blockwise": cfg.replace(attention_impl="blockwise", attention_block_size=128),
        "blockwise+remat": cfg.replace(attention_impl="blockwise", attention_block_size=128, remat=True),
    }.items()}
    print("compiled temp MB (tiny llama, 4 layers, batch 2 x 1024 tokens): "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items()))
    assert sizes["blockwise+remat"] * 8 <= sizes["dense"]
    assert sizes["blockwise"] * 4 <= sizes["dense"]


def _arrays_in(jaxpr):
    """Every array value an equation of `jaxpr` or of its sub-jaxprs (scan bodies, custom rules) makes."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _arrays_in(inner)


def test_backprop_keeps_no_mask_per_key_block():
    """The blockwise masks depend only on the slots and the key mask, the same in every layer; JAX
    must not hoist them out of the differentiated layer scan as [blocks, B, Hkv, G, T, block]
    (the heads' broadcast of every block's mask; 49 GiB per device on a 28k-token Qwen3-4B update)."""
    cfg = ModelConfig.tiny("qwen3", attention_impl="blockwise", attention_block_size=64, remat=True,
                           max_position_embeddings=1024)
    graphdef, state = _split(cfg)
    tokens, mask = jnp.ones((2, 512), jnp.int32), jnp.ones((2, 512), bool)

    def loss(state):
        hidden, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask, return_hidden=True)
        return jnp.sum(hidden)

    scores_size = 2 * cfg.num_heads * 512 * 512  # B x heads x T x S
    masks = [a for a in _arrays_in(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
             if getattr(a, "dtype", None) == jnp.bool_ and a.size >= scores_size]
    assert not masks, masks


def test_dots_saveable_remat_keeps_every_projection_output():
    """The decoder's matmuls are custom_vjp calls, opaque to jax.checkpoint's policies; remat_policy
    still saves their outputs under "dots_with_no_batch_dims_saveable": the compiled step keeps more
    than half of every layer's seven projection outputs beyond "nothing_saveable" (XLA fuses some
    away; autodiffed dots gave the same 3.50 MB here, and a policy blind to the matmuls ~0 more)."""
    base = ModelConfig.tiny("llama", remat=True, num_layers=4)
    batch, length = 4, 64
    saved = compiled_train_temp_bytes(base.replace(remat_policy="dots_with_no_batch_dims_saveable"), batch, length)
    recomputed = compiled_train_temp_bytes(base.replace(remat_policy="nothing_saveable"), batch, length)
    widths = [o for _, o in projection_shapes(base).values()]
    projection_bytes = base.num_layers * batch * length * sum(widths) * 4
    assert saved - recomputed >= 0.5 * projection_bytes, (saved, recomputed, projection_bytes)
