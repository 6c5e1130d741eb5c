"""Meshes, batch and parameter shardings, multi-host start-up, safe dispatch on CPU. No pmap."""
from lossland.parallel.dispatch import needs_settling, settle, settled
from lossland.parallel.distributed import initialize_multihost
from lossland.parallel.mesh import (DATA_AXIS, MODEL_AXIS, batch_sharding, make_mesh, replicated,
                                    shard_batch)
from lossland.parallel.rules import param_shardings, path_name

__all__ = ['DATA_AXIS', 'MODEL_AXIS', 'batch_sharding', 'initialize_multihost', 'make_mesh',
           'needs_settling', 'param_shardings', 'path_name', 'replicated', 'settle', 'settled',
           'shard_batch']
