"""Orbax checkpoints of the train state plus the data iterator's position.

Each checkpoint is written to a temporary directory and renamed into place
when complete, so an interrupted save never replaces the previous good one;
restoring ignores unfinished directories. Restores go straight into the target
shardings (abstract arrays carrying a `.sharding`).

Saves are asynchronous: `save` returns once it has dispatched a private copy
of the state; a worker thread hands that copy to orbax, which writes it while
training goes on. The next `save`, `latest_step`, `restore`, `wait` and
`close` wait for it first. The caller may donate the saved state right away.
"""
from __future__ import annotations

import concurrent.futures
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
    self._saver = concurrent.futures.ThreadPoolExecutor(1)
    self._pending: concurrent.futures.Future | None = None
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  def latest_step(self) -> int | None:
    self.wait()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
    """Starts writing `state` (copied first: the caller may donate it) and returns."""
    self.wait()
    state = self._copy(state)
    self._pending = self._saver.submit(
        self.manager.save, step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
        force=True)

  def wait(self) -> None:
    """Blocks until the last `save` is on disk; re-raises its error, if any."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into `abstract_state` (e.g. `jax.eval_shape` output with shardings)."""
    self.wait()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._saver.shutdown(wait=True)
      self.manager.close()
