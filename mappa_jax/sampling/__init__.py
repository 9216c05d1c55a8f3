"""Batched generation under jax.jit: prefill + decode loop, stop handling, logprobs, shape buckets."""
from mappa_jax.sampling.config import SamplerConfig
from mappa_jax.sampling.sampler import SampleOutput, Sampler
from mappa_jax.sampling.stops import OutsideReasoning, compile_stop_patterns, token_bytes

__all__ = ["OutsideReasoning", "SampleOutput", "Sampler", "SamplerConfig", "compile_stop_patterns",
           "token_bytes"]
