"""Meshes, batch and parameter shardings, multi-host start-up, safe dispatch on CPU. No pmap."""
from lossland.parallel.dispatch import needs_settling, settle, settled
from lossland.parallel.distributed import (LocalProcessError, ProcessResult, free_port,
                                           initialize_multihost, python_argv,
                                           run_local_processes)
from lossland.parallel.mesh import (DATA_AXIS, MODEL_AXIS, batch_sharding, data_mesh, make_mesh,
                                    put_replicated, replicated, shard_batch)
from lossland.parallel.rules import fsdp_rules, param_shardings, path_name, transformer_rules

__all__ = ['DATA_AXIS', 'LocalProcessError', 'MODEL_AXIS', 'ProcessResult', 'batch_sharding',
           'data_mesh', 'free_port', 'fsdp_rules', 'initialize_multihost', 'make_mesh',
           'needs_settling', 'param_shardings', 'path_name', 'put_replicated', 'python_argv',
           'replicated', 'run_local_processes', 'settle', 'settled', 'shard_batch',
           'transformer_rules']
