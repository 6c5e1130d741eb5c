"""Orbax checkpoints of the train state plus the data iterator's position.

Each checkpoint is written to a temporary directory and renamed into place
when complete, so an interrupted save never replaces the previous good one;
restoring ignores unfinished directories. Restores go straight into the target
shardings (abstract arrays carrying a `.sharding`).

Saves are asynchronous: `save` returns once it has taken a private copy of the
state, and orbax writes it while training goes on; the next `save`,
`latest_step`, `restore`, `wait` and `close` wait for it first. The caller may
donate the saved state right away.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps into `WORKDIR/checkpoints`, keeping the latest `keep`."""

  def __init__(self, workdir: str, *, every: int, keep: int = 2):
    if every <= 0:
      raise ValueError(f'checkpoint every={every} must be positive')
    self.every = every
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
    """Starts writing `state` (copied first: the caller may donate it) and returns."""
    state = jax.tree.map(jnp.copy, state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)), force=True)

  def wait(self) -> None:
    """Blocks until the last `save` is on disk."""
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into `abstract_state` (e.g. `jax.eval_shape` output with shardings)."""
    self.manager.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
