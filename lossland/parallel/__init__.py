"""Meshes, batch and parameter shardings, multi-host start-up. No pmap."""
from lossland.parallel.distributed import initialize_multihost
from lossland.parallel.mesh import (DATA_AXIS, MODEL_AXIS, batch_sharding, make_mesh, replicated,
                                    shard_batch)
from lossland.parallel.rules import param_shardings, path_name

__all__ = ['DATA_AXIS', 'MODEL_AXIS', 'batch_sharding', 'initialize_multihost', 'make_mesh',
           'param_shardings', 'path_name', 'replicated', 'shard_batch']
