"""mappa_jax: MAPPA (multiagent process rewards) in JAX/Flax."""
__version__ = "0.1.0"
