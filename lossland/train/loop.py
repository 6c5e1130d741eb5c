"""The host training loop: blocks of compiled steps, evaluation, checkpoints, metrics.

`fit` is model- and task-agnostic: it takes initial params, a loss function
`loss_fn(params, batch, rng) -> (loss, metrics)`, an optax optimizer and a
`batch_fn(step) -> host batch` whose output depends only on the step (so the
iterator position is the step, saved with every checkpoint). With a workdir it
resumes automatically from the latest checkpoint and, given the same inputs,
ends with exactly the params of an uninterrupted run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from lossland.data import blocks
from lossland.parallel import mesh as mesh_lib
from lossland.parallel import rules as rules_lib
from lossland.train import checkpoint as checkpoint_lib
from lossland.train import progress as progress_lib
from lossland.train import steps as steps_lib


@dataclasses.dataclass
class FitResult:
  state: steps_lib.TrainState
  train_losses: np.ndarray  # [steps run in this process] per-step training loss
  evals: list[dict[str, float]]  # one record per evaluation: {'step', '<set>_<metric>', ...}
  resumed_from: int | None
  compile_seconds: float  # wall time of the first block (tracing + compilation + run)
  steady_seconds: float  # wall time of all later blocks
  steady_steps: int


class MetricsLog:
  """Appends JSON lines to `WORKDIR/metrics.jsonl`; on resume drops records past the restart."""

  def __init__(self, path: str | None, resume_step: int | None):
    self.path = path
    if path and os.path.exists(path):
      keep = []
      if resume_step is not None:
        with open(path) as f:
          keep = [line for line in f if json.loads(line).get('step', 0) <= resume_step]
      with open(path, 'w') as f:
        f.writelines(keep)

  def write(self, record: Mapping[str, Any]) -> None:
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def _next_boundary(step: int, num_steps: int, *intervals: int) -> int:
  candidates = [num_steps] + [(step // k + 1) * k for k in intervals if k]
  return min(candidates)


def fit(*, params, loss_fn: Callable, optimizer: optax.GradientTransformation,
        batch_fn: Callable[[int], Any], num_steps: int, mesh: Mesh, rng: jax.Array,
        data_seed: int, param_rules: Sequence[tuple[str, PartitionSpec]] = (),
        eval_sets: Mapping[str, Any] | None = None, eval_every: int = 0,
        workdir: str | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 2,
        steps_per_block: int = 1, show_progress: bool = True) -> FitResult:
  """Trains `params` for `num_steps` optimizer steps on `mesh`.

  Args:
    params: initial params (host or device arrays), or a zero-argument function that
      returns them (e.g. a jitted `model.init`): it is called only when there is no
      checkpoint to resume from, while the first training block compiles.
    loss_fn: `(params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
    optimizer: an optax transformation.
    batch_fn: `step -> pytree of numpy arrays`, this process's rows of the global batch.
    num_steps: total optimizer steps.
    mesh: device mesh with a `data` axis; batches are sharded on it.
    rng: base PRNG key; step s uses `fold_in(rng, s)`.
    data_seed: the seed behind `batch_fn`, stored with checkpoints and checked on resume.
    param_rules: regex -> PartitionSpec rules for params (default: replicated).
    eval_sets: name -> pytree of numpy arrays [num_batches, batch, ...]; evaluated every
      `eval_every` steps and at the end, metrics logged as '<name>_<metric>'.
    workdir: where `metrics.jsonl` and `checkpoints/` live; None keeps nothing.
    checkpoint_every: save every this many steps (and at the end); 0 disables.
    steps_per_block: optimizer steps per compiled call (a `lax.scan`).
    show_progress: draw the progress bar on stderr.
  """
  if num_steps <= 0:
    raise ValueError(f'num_steps={num_steps} must be positive')
  if checkpoint_every and not workdir:
    raise ValueError('checkpoint_every needs a workdir to write checkpoints into')
  eval_sets = dict(eval_sets or {})
  init_params = params if callable(params) else lambda: params

  abstract_state = jax.eval_shape(lambda: steps_lib.init_train_state(init_params(), optimizer))
  param_sharding = rules_lib.param_shardings(abstract_state.params, mesh, param_rules)
  state_sharding = steps_lib.state_shardings(abstract_state, mesh, param_sharding)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      state_sharding)

  checkpointer = None
  resumed_from = None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    if checkpoint_every:
      checkpointer = checkpoint_lib.Checkpointer(workdir, every=checkpoint_every,
                                                 keep=keep_checkpoints)
      resumed_from = checkpointer.latest_step()
  start_step = resumed_from or 0

  log = MetricsLog(os.path.join(workdir, 'metrics.jsonl') if workdir else None, resumed_from)
  train_block = steps_lib.make_train_block(loss_fn, optimizer, state_sharding=state_sharding,
                                           mesh=mesh)
  evaluate = steps_lib.make_evaluate(loss_fn, mesh=mesh)
  device_eval_sets = {name: mesh_lib.shard_batch(b, mesh, leading_axes=1)
                      for name, b in eval_sets.items()}
  rng = jax.device_put(rng, mesh_lib.replicated(mesh))

  def host_block(step: int, size: int):
    batches = [batch_fn(s) for s in range(step, step + size)]
    return blocks.stack_batches(batches)

  # XLA compiles a program mostly on one core, so the first training block and
  # the evaluation compile on two worker threads while this thread initializes
  # or restores the state. One executable per function and batch shape.
  compiler = concurrent.futures.ThreadPoolExecutor(2)
  executables: dict[Any, concurrent.futures.Future] = {}

  def executable(fn, first_arg, batches):
    key = (fn, tuple((x.shape, x.dtype) for x in jax.tree.leaves(batches)))
    if key not in executables:
      executables[key] = compiler.submit(lambda: fn.lower(first_arg, batches, rng).compile())
    return executables[key]

  step = start_step
  size = min(steps_per_block, _next_boundary(step, num_steps, eval_every, checkpoint_every) - step)
  pending = mesh_lib.shard_batch(host_block(step, size), mesh, leading_axes=1) \
      if step < num_steps else None
  try:
    if pending is not None:
      executable(train_block, abstract_state, pending)
    for batches in device_eval_sets.values():
      executable(evaluate, abstract_state.params, batches)
    if resumed_from is not None:
      state, position = checkpointer.restore(resumed_from, abstract_state)
      if position.get('seed') != data_seed:
        raise ValueError(f'the checkpoint in {workdir} was written with data seed '
                         f'{position.get("seed")} but this run uses {data_seed}; use a fresh '
                         'workdir or the original seed')
      if int(position['step']) != resumed_from:
        raise ValueError(f'checkpoint {resumed_from} in {workdir} holds iterator position '
                         f'{position["step"]}; the checkpoint directory is inconsistent')
    else:
      init = jax.jit(lambda p: steps_lib.init_train_state(p, optimizer),
                     out_shardings=state_sharding)
      state = init(init_params())
  except BaseException:
    compiler.shutdown(wait=False, cancel_futures=True)
    raise

  def run_evals(step: int) -> dict[str, float]:
    record: dict[str, float] = {'step': step}
    for name, batches in device_eval_sets.items():
      evaluate_exe = executable(evaluate, abstract_state.params, batches).result()
      metrics = jax.device_get(evaluate_exe(state.params, batches, rng))
      record.update({f'{name}_{k}': float(v) for k, v in metrics.items()})
    return record

  progress = progress_lib.Progress(num_steps, start_step) if show_progress else None
  losses: list[np.ndarray] = []
  evals: list[dict[str, float]] = []
  compile_seconds = steady_seconds = 0.0
  steady_steps = 0
  try:
    while step < num_steps:
      t0 = time.perf_counter()
      batches = pending
      state, metrics = executable(train_block, abstract_state, batches).result()(
          state, batches, rng)
      next_step = step + size
      if next_step < num_steps:  # prepare the next block on the host while this one runs
        next_size = min(steps_per_block,
                        _next_boundary(next_step, num_steps, eval_every, checkpoint_every)
                        - next_step)
        pending = mesh_lib.shard_batch(host_block(next_step, next_size), mesh, leading_axes=1)
      metrics = jax.device_get(metrics)  # the one host sync per block
      block_loss = np.asarray(metrics['loss'])
      if not np.all(np.isfinite(block_loss)):
        bad = step + int(np.argmin(np.isfinite(block_loss)))
        last = checkpointer.latest_step() if checkpointer else None  # waits for a pending save
        raise FloatingPointError(
            f'the training loss became {block_loss[bad - step]} at step {bad}; nothing was saved '
            f'after it (last good checkpoint: {last}). Lower the learning rate, tighten '
            'grad_clip, or check the data.')
      elapsed = time.perf_counter() - t0
      if step == start_step:
        compile_seconds = elapsed
      else:
        steady_seconds += elapsed
        steady_steps += size
      losses.append(block_loss)
      step = next_step
      size = next_size if step < num_steps else 0
      log.write({'step': step, 'train_loss': float(block_loss.mean()),
                 'grad_norm': float(np.mean(metrics['grad_norm']))})
      if device_eval_sets and ((eval_every and step % eval_every == 0) or step == num_steps):
        evals.append(run_evals(step))
        log.write(evals[-1])
      if checkpointer and (step % checkpoint_every == 0 or step == num_steps):
        checkpointer.save(step, state, {'step': step, 'seed': data_seed})
      if progress:
        shown = {'loss': float(block_loss[-1])}
        if evals and evals[-1]['step'] == step:
          shown.update({k: v for k, v in evals[-1].items() if k.endswith('_loss')})
        progress.update(step, **shown)
  finally:
    if progress:
      progress.close()
    if checkpointer:
      checkpointer.close()
    compiler.shutdown(wait=True)
  return FitResult(state=state,
                   train_losses=np.concatenate(losses) if losses else np.zeros((0,)),
                   evals=evals, resumed_from=resumed_from, compile_seconds=compile_seconds,
                   steady_seconds=steady_seconds, steady_steps=steady_steps)


def tokens_per_second(result: FitResult, tokens_per_step: int) -> float:
  if not result.steady_seconds:
    return math.nan
  return result.steady_steps * tokens_per_step / result.steady_seconds
