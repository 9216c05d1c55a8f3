"""One global device mesh and the sharding rule of every parameter."""
from mappa_jax.parallel.mesh import (AXES, BATCH_AXES, batch_sharding, decode_param_shardings, make_mesh,
                                     mesh_platform, param_shardings, param_spec, replicated, shard_state)

__all__ = ["AXES", "BATCH_AXES", "batch_sharding", "decode_param_shardings", "make_mesh", "mesh_platform", "param_shardings",
           "param_spec", "replicated", "shard_state"]
