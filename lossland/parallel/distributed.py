"""Multi-host start-up, called by launchers behind `--multihost`."""
from __future__ import annotations

import jax


def initialize_multihost() -> None:
  """`jax.distributed.initialize()` with cluster auto-detection (TPU pods, SLURM,
  Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  jax.distributed.initialize()
