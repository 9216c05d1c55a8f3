"""A tiny random llama policy with a LoRA adapter and mixed-length prompts, shared by the sampler
tests that run in 8-device subprocesses (they import it with tests/ on sys.path)."""


def tiny_policy():
    """(cfg, state, lora, prompts): weights perturbed off init so that tokens depend on every one."""
    import jax
    from flax import nnx
    from mappa_jax.models.config import ModelConfig
    from mappa_jax.models.decoder import Decoder
    from mappa_jax.models.lora import LoraAdapters
    cfg = ModelConfig.tiny("llama")
    _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), state)
    lora = LoraAdapters(cfg, rank=2, alpha=4.0, targets=("q_proj", "up_proj"), rngs=nnx.Rngs(2))
    lora.up_proj_b[...] = 0.3 * jax.random.normal(jax.random.key(3), lora.up_proj_b.shape)
    prompts = [[1, 5, 9], [1, 7, 8, 9, 10, 11], [1, 100, 3, 4], [9]]
    return cfg, state, lora, prompts
