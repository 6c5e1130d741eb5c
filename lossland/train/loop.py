"""The host training loop: blocks of compiled steps, evaluation, checkpoints, metrics.

`fit` is model- and task-agnostic: it takes initial params, a loss function
`loss_fn(params, batch, rng) -> (loss, metrics)`, an optax optimizer and a
`batch_fn(step) -> host batch` whose output depends only on the step (so the
iterator position is the step, saved with every checkpoint). With a workdir it
resumes automatically from the latest checkpoint that restores and, given the
same inputs, ends with exactly the params of an uninterrupted run.

A workdir holds one run at a time (`WORKDIR/lock`); the run's resolved config
(`WORKDIR/config.json`, when the caller passes one, also saved inside every
checkpoint) is compared on resume, and stored once the resume is accepted.
SIGTERM (how TPU pods and SLURM preempt) and Ctrl-C stop the run after the
current block with a checkpoint at that step: the same call resumes it.

`ema_decay` keeps an exponential moving average of the params, updated on
every step inside the compiled block and checkpointed with the state
(`steps.with_ema`); `time_budget_s` stops the run after the block during which
the budget ran out, with an evaluation and a checkpoint at that step.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
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
  ema_params: Any = None  # with `ema_decay`: the EMA of the params at the final step, else None
  stopped_by_time_budget: bool = False  # `time_budget_s` ran out before `num_steps`

  @property
  def step(self) -> int:
    """Optimizer steps the final state has taken (below `num_steps` after a budget stop)."""
    return int(self.state.step)

  @property
  def already_finished(self) -> bool:
    """The workdir's checkpoint was at `num_steps`: nothing was trained, only evaluated."""
    return self.resumed_from is not None and int(self.state.step) == self.resumed_from


class Interrupted(KeyboardInterrupt):
  """Raised by `fit` after SIGTERM or SIGINT (Ctrl-C), once the state at `step` is saved."""

  def __init__(self, signum: int, step: int, checkpoint: int | None, workdir: str | None):
    self.signum, self.step, self.checkpoint = signum, step, checkpoint
    name = signal.Signals(signum).name
    if checkpoint is None:
      saved = 'nothing was saved (no checkpoint yet, or none configured)'
    else:
      saved = (f'checkpoint {checkpoint} is in {workdir}; run the same command again to resume '
               'from it')
    super().__init__(f'stopped by {name} at step {step}: {saved}')


class _StopSignals:
  """Turns the first SIGTERM or SIGINT into a flag that `fit` checks between blocks.

  Only the main thread can install handlers; elsewhere the signals keep their
  handlers. A second signal of the same kind acts as usual (Ctrl-C twice aborts
  without saving).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      sys.stderr.write(f'\n{signal.Signals(signum).name} received: saving a checkpoint after the '
                       'current block, then stopping (send it again to stop without saving)\n')
      sys.stderr.flush()
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class MetricsLog:
  """Appends JSON lines to `WORKDIR/metrics.jsonl`; on resume drops records past the restart.

  Lines that do not parse (a run killed mid-write leaves a torn last line) are
  dropped with a warning instead of blocking the resume.
  """

  def __init__(self, path: str | None, resume_step: int | None):
    self.path = path
    if path and os.path.exists(path):
      keep, torn = [], []
      if resume_step is not None:
        with open(path, errors='replace') as f:
          for number, line in enumerate(f, 1):
            try:
              record = json.loads(line)
            except ValueError:
              torn.append(number)
              continue
            if record.get('step', 0) <= resume_step:
              keep.append(json.dumps(record) + '\n')
      if torn:
        warnings.warn(f'{path}: dropped unreadable line(s) {torn} (a run killed mid-write)',
                      stacklevel=3)
      with open(path, 'w') as f:
        f.writelines(keep)

  def write(self, record: Mapping[str, Any]) -> None:
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


CONFIG_FILE = 'config.json'


def _normalized(run_config: Mapping[str, Any]) -> dict:
  """`run_config` as it reads back from JSON (tuples become lists, other objects strings)."""
  return json.loads(json.dumps(run_config, sort_keys=True, default=str))


def read_run_config(workdir: str) -> dict | None:
  """The config stored in `WORKDIR/config.json`, or None when there is none.

  Raises:
    ValueError: the file is not a JSON object (the message names it).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore it from a backup, or delete it and '
                     'allow the config change (--allow_config_change) to store this run\'s '
                     'config') from None
  if not isinstance(stored, dict):
    raise ValueError(f'{path} holds a {type(stored).__name__}, not the JSON object of a run\'s '
                     'config; restore it, or delete it and allow the config change '
                     '(--allow_config_change)')
  return stored


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """The keys whose values differ, as sorted 'key: old -> new' lines (JSON values)."""
  old, new = _flatten(_normalized(stored)), _flatten(_normalized(current))
  show = lambda flat, k: json.dumps(flat[k]) if k in flat else '(absent)'  # noqa: E731
  return [f'{k}: {show(old, k)} -> {show(new, k)}' for k in sorted(old.keys() | new.keys())
          if k not in old or k not in new or old[k] != new[k]]


def write_run_config(workdir: str, run_config: Mapping[str, Any]) -> None:
  """Writes `WORKDIR/config.json` whole (a temporary file, then a rename); process 0 only."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(_normalized(run_config), f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def check_run_config(workdir: str, run_config: Mapping[str, Any], *, resuming: bool,
                     allow_change: bool = False,
                     checkpoint_config: Mapping[str, Any] | None = None,
                     store: bool = True) -> list[str]:
  """On resume compares `run_config` with the stored one; then stores it as `WORKDIR/config.json`.

  The stored config is `WORKDIR/config.json`, else the copy inside the checkpoint
  being resumed (`checkpoint_config`: `fit` saves the run config with every
  checkpoint), so deleting config.json does not let a changed run pass.

  Args:
    workdir: the run's directory.
    run_config: JSON-serializable nested mapping of the settings that define the run.
    resuming: whether a checkpoint will be resumed (else the stored config is replaced).
    allow_change: resume even if keys changed, or with no stored config to compare
      with (the new config is stored, with a warning).
    checkpoint_config: the config saved in the resumed checkpoint, if known.
    store: write `run_config` to `WORKDIR/config.json` once the checks pass. `fit`
      checks early with `store=False` and stores only after the checkpoint restored,
      so a refused run leaves config.json as it was.

  Returns:
    The changed keys, as 'key: old -> new' lines.

  Raises:
    ValueError: keys changed, or there is no stored config to compare with, and
      `allow_change` is False; the message lists the keys or says how to proceed.
  """
  changes = []
  if resuming:
    stored = read_run_config(workdir)
    if stored is None:
      stored = checkpoint_config
    if stored is None:
      if not allow_change:
        raise ValueError(
            f'{os.path.join(workdir, CONFIG_FILE)} is missing and the checkpoint holds no copy '
            'of the config that wrote it, so a changed config (e.g. another learning rate) '
            'could not be told apart. Put config.json back, use a fresh workdir, or allow the '
            'change (launch.train: --allow_config_change) to resume with this config and store '
            'it.')
      warnings.warn(f'resuming {workdir} without a stored config to compare with; this run\'s '
                    f'config is stored as {CONFIG_FILE}', stacklevel=2)
    else:
      changes = config_changes(stored, run_config)
    if changes and not allow_change:
      raise ValueError(
          f'the run in {workdir} was started with a different config; changed: '
          f'{"; ".join(changes)}. Resume with the original values, use a fresh workdir, or allow '
          'the change (launch.train: --allow_config_change) to continue from the checkpoint '
          'with the new config.')
    if changes and store:
      warnings.warn(f'resuming {workdir} with a changed config: {"; ".join(changes)}',
                    stacklevel=2)
  if store:
    write_run_config(workdir, run_config)
  return changes


def _next_boundary(step: int, num_steps: int, *intervals: int) -> int:
  candidates = [num_steps] + [(step // k + 1) * k for k in intervals if k]
  return min(candidates)


def _check_count(name: str, value: int, key: str, *, minimum: int = 1) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'{name}={value!r} must be an integer >= {minimum} (config key {key})')


def fit(*, params, loss_fn: Callable, optimizer: optax.GradientTransformation,
        batch_fn: Callable[[int], Any], num_steps: int, mesh: Mesh, rng: jax.Array,
        data_seed: int, param_rules: Sequence[tuple[str, PartitionSpec]] = (),
        eval_sets: Mapping[str, Any] | None = None, eval_every: int = 0,
        workdir: str | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 2,
        steps_per_block: int = 1, show_progress: bool = True,
        run_config: Mapping[str, Any] | None = None,
        allow_config_change: bool = False, ema_decay: float | None = None,
        time_budget_s: float | None = None) -> FitResult:
  """Trains `params` for `num_steps` optimizer steps on `mesh`.

  Resuming a workdir whose checkpoint is already at `num_steps` trains nothing:
  it evaluates the final state (`FitResult.already_finished`).

  Args:
    params: initial params (host or device arrays), or a zero-argument function that
      returns them (e.g. a jitted `model.init`): it is called only when there is no
      checkpoint to resume from, while the first training block compiles.
    loss_fn: `(params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
    optimizer: an optax transformation.
    batch_fn: `step -> pytree of numpy arrays`, this process's rows of the global batch.
    num_steps: total optimizer steps; at least the step of the checkpoint resumed.
    mesh: device mesh with a `data` axis; batches are sharded on it.
    rng: base PRNG key; step s uses `fold_in(rng, s)`.
    data_seed: the seed behind `batch_fn`, stored with checkpoints and checked on resume.
    param_rules: regex -> PartitionSpec rules for params (default: replicated).
    eval_sets: name -> pytree of numpy arrays [num_batches, batch, ...]; evaluated every
      `eval_every` steps and at the end, metrics logged as '<name>_<metric>'.
    eval_every: evaluate every this many steps (and at the end); 0: only at the end.
    workdir: where `metrics.jsonl`, `config.json`, `lock` and `checkpoints/` live; None
      keeps nothing.
    checkpoint_every: save every this many steps (and at the end, and on SIGTERM/SIGINT);
      0 disables.
    keep_checkpoints: how many of the latest checkpoints to keep (>= 1).
    steps_per_block: optimizer steps per compiled call (a `lax.scan`), >= 1.
    show_progress: draw the progress bar on stderr.
    run_config: the settings that define this run (JSON-serializable mapping), stored as
      `WORKDIR/config.json` and with every checkpoint, and compared on resume (see
      `check_run_config`).
    allow_config_change: resume although `run_config` changed. The optimizer given is
      used as is from the checkpoint's step on: a learning-rate schedule built for a new
      `num_steps` continues at its value for the resumed step.
    ema_decay: keep `ema <- d * ema + (1 - d) * params` after every optimizer step
      (starting from the initial params), returned as `FitResult.ema_params` and saved
      with every checkpoint, so a resumed run's EMA equals an uninterrupted one's. The
      EMA lives in `state.opt_state` (`steps.EmaState`); None keeps none.
    time_budget_s: stop after the block during which this many wall seconds of training
      (counted from the start of the first block, its compilation included) have passed:
      the final state is evaluated and, with a workdir, checkpointed (also when
      `checkpoint_every` is 0), and `FitResult.stopped_by_time_budget` is set. The same
      call resumes from that checkpoint with a fresh budget. None: no budget.

  Raises:
    Interrupted: after SIGTERM or SIGINT, once the current step is checkpointed.
    FloatingPointError: a non-finite loss or train state; nothing after it is saved.
    ValueError: bad arguments, or a workdir whose checkpoint, config or lock conflicts.
  """
  _check_count('num_steps', num_steps, 'train.num_steps')
  _check_count('steps_per_block', steps_per_block, 'train.steps_per_block')
  _check_count('keep_checkpoints', keep_checkpoints, 'checkpoint.keep')
  _check_count('checkpoint_every', checkpoint_every, 'checkpoint.every', minimum=0)
  _check_count('eval_every', eval_every, 'eval.every', minimum=0)
  if checkpoint_every and not workdir:
    raise ValueError('checkpoint_every needs a workdir to write checkpoints into')
  if time_budget_s is not None and (isinstance(time_budget_s, bool) or
                                    not isinstance(time_budget_s, (int, float)) or
                                    not time_budget_s >= 0):
    raise ValueError(f'time_budget_s={time_budget_s!r} must be a number of seconds >= 0, or None '
                     'for no budget')
  if ema_decay is not None:
    optimizer = steps_lib.with_ema(optimizer, ema_decay)
  eval_sets = dict(eval_sets or {})
  init_params = params if callable(params) else lambda: params

  abstract_state = jax.eval_shape(lambda: steps_lib.init_train_state(init_params(), optimizer))
  param_sharding = rules_lib.param_shardings(abstract_state.params, mesh, param_rules)
  state_sharding = steps_lib.state_shardings(abstract_state, mesh, param_sharding)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      state_sharding)

  with contextlib.ExitStack() as stack:
    if workdir:
      stack.enter_context(checkpoint_lib.WorkdirLock(workdir))
    stop = stack.enter_context(_StopSignals())
    checkpointer = None
    latest = None
    if workdir and (checkpoint_every or time_budget_s is not None):
      checkpointer = checkpoint_lib.Checkpointer(workdir, every=checkpoint_every or num_steps,
                                                 keep=keep_checkpoints)
      stack.callback(checkpointer.close)
      latest = checkpointer.latest_step()
    if latest is not None and latest > num_steps:
      raise ValueError(f'num_steps={num_steps} (config key train.num_steps) is below the step of '
                       f'the checkpoint in {workdir} ({latest}): a run cannot be shortened. Set '
                       f'it to at least {latest}, or use a fresh workdir.')
    if workdir and run_config is not None and read_run_config(workdir) is not None:
      # Before minutes of restoring and compiling; config.json is written only once the
      # checkpoint restored (below), so a refused run leaves it as it was.
      check_run_config(workdir, run_config, resuming=latest is not None,
                       allow_change=allow_config_change, store=False)
    start_step = latest or 0
    position_extra = {'run_config': _normalized(run_config)} if run_config is not None else {}

    log_path = os.path.join(workdir, 'metrics.jsonl') if workdir else None
    train_block = steps_lib.make_train_block(loss_fn, optimizer, state_sharding=state_sharding,
                                             mesh=mesh)
    evaluate = steps_lib.make_evaluate(loss_fn, mesh=mesh)
    device_eval_sets = {name: mesh_lib.shard_batch(b, mesh, leading_axes=1)
                        for name, b in eval_sets.items()}
    rng = mesh_lib.put_replicated(rng, mesh)  # typed keys too, on a mesh spanning processes

    def block_size(step: int) -> int:
      return min(steps_per_block,
                 _next_boundary(step, num_steps, eval_every, checkpoint_every) - step)

    def device_block(step: int):
      if step >= num_steps:
        return None
      batches = [batch_fn(s) for s in range(step, step + block_size(step))]
      return mesh_lib.shard_batch(blocks.stack_batches(batches), mesh, leading_axes=1)

    # XLA compiles a program mostly on one core, so the first training block and
    # the evaluation compile on two worker threads while this thread initializes
    # or restores the state. One executable per function and batch shape.
    compiler = concurrent.futures.ThreadPoolExecutor(2)
    stack.push(lambda failed, *_: compiler.shutdown(wait=failed is None,
                                                    cancel_futures=failed is not None))
    executables: dict[Any, concurrent.futures.Future] = {}

    def executable(fn, first_arg, batches):
      key = (fn, tuple((x.shape, x.dtype) for x in jax.tree.leaves(batches)))
      if key not in executables:
        executables[key] = compiler.submit(lambda: fn.lower(first_arg, batches, rng).compile())
      return executables[key]

    pending = device_block(start_step)
    if pending is not None:
      executable(train_block, abstract_state, pending)
    for batches in device_eval_sets.values():
      executable(evaluate, abstract_state.params, batches)
    restored = checkpointer.restore_latest(abstract_state) if latest is not None else None
    resumed_from = None
    if restored is not None:
      resumed_from, state, position = restored
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
    if workdir and run_config is not None:
      check_run_config(workdir, run_config, resuming=resumed_from is not None,
                       allow_change=allow_config_change,
                       checkpoint_config=position.get('run_config') if restored else None)
    if (resumed_from or 0) != start_step:  # fell back to an older checkpoint (or to scratch)
      start_step = resumed_from or 0
      pending = device_block(start_step)
    log = MetricsLog(log_path, resumed_from)

    def run_evals(step: int) -> dict[str, float]:
      record: dict[str, float] = {'step': step}
      for name, batches in device_eval_sets.items():
        evaluate_exe = executable(evaluate, abstract_state.params, batches).result()
        metrics = jax.device_get(evaluate_exe(state.params, batches, rng))
        record.update({f'{name}_{k}': float(v) for k, v in metrics.items()})
      return record

    def last_good() -> int | None:
      return checkpointer.latest_step() if checkpointer else None  # waits for a pending save

    step = start_step
    saved = resumed_from
    progress = None
    if show_progress and step < num_steps:
      progress = progress_lib.Progress(num_steps, start_step)
      stack.callback(progress.close)
    losses: list[np.ndarray] = []
    evals: list[dict[str, float]] = []
    compile_seconds = steady_seconds = 0.0
    steady_steps = 0
    out_of_time = False
    train_start = time.perf_counter()
    if step == num_steps and device_eval_sets:  # a finished run: report its final state
      evals.append(run_evals(step))
    while step < num_steps:
      if stop.signum is not None:
        if checkpointer and step > 0 and saved != step:
          checkpointer.save(step, state, {'step': step, 'seed': data_seed, **position_extra})
          saved = step
        if checkpointer:
          checkpointer.wait()
        raise Interrupted(stop.signum, step, saved, workdir)
      t0 = time.perf_counter()
      batches, size = pending, block_size(step)
      state, metrics = executable(train_block, abstract_state, batches).result()(
          state, batches, rng)
      next_step = step + size
      pending = device_block(next_step)  # the next block's host work, while this one runs
      metrics = jax.device_get(metrics)  # the one host sync per block
      block_loss = np.asarray(metrics['loss'])
      if not np.all(np.isfinite(block_loss)):
        bad = step + int(np.argmin(np.isfinite(block_loss)))
        raise FloatingPointError(
            f'the training loss became {block_loss[bad - step]} at step {bad}; nothing was saved '
            f'after it (last good checkpoint: {last_good()}). Lower the learning rate, tighten '
            'grad_clip, or check the data.')
      if not bool(metrics['state_finite']):
        raise FloatingPointError(
            f'the params or optimizer state after step {next_step} are not finite although every '
            f'training loss up to it was; nothing was saved after it (last good checkpoint: '
            f'{last_good()}). Lower the learning rate, tighten grad_clip, or look for infinite '
            'gradients (e.g. sqrt or log at 0) in the loss.')
      elapsed = time.perf_counter() - t0
      if step == start_step:
        compile_seconds = elapsed
      else:
        steady_seconds += elapsed
        steady_steps += size
      losses.append(block_loss)
      step = next_step
      out_of_time = (time_budget_s is not None and step < num_steps and
                     time.perf_counter() - train_start > time_budget_s)
      log.write({'step': step, 'train_loss': float(block_loss.mean()),
                 'grad_norm': float(np.mean(metrics['grad_norm']))})
      if device_eval_sets and ((eval_every and step % eval_every == 0) or step == num_steps or
                               out_of_time):
        evals.append(run_evals(step))
        log.write(evals[-1])
      if checkpointer and ((checkpoint_every and step % checkpoint_every == 0) or
                           step == num_steps or out_of_time):
        checkpointer.save(step, state, {'step': step, 'seed': data_seed, **position_extra})
        saved = step
      if progress:
        shown = {'loss': float(block_loss[-1])}
        if evals and evals[-1]['step'] == step:
          shown.update({k: v for k, v in evals[-1].items() if k.endswith('_loss')})
        progress.update(step, **shown)
      if out_of_time:
        if checkpointer:
          checkpointer.wait()
        break
  return FitResult(state=state,
                   train_losses=np.concatenate(losses) if losses else np.zeros((0,)),
                   evals=evals, resumed_from=resumed_from, compile_seconds=compile_seconds,
                   steady_seconds=steady_seconds, steady_steps=steady_steps,
                   ema_params=state.opt_state.ema if ema_decay is not None else None,
                   stopped_by_time_budget=out_of_time)


def tokens_per_second(result: FitResult, tokens_per_step: int) -> float:
  if not result.steady_seconds:
    return math.nan
  return result.steady_steps * tokens_per_step / result.steady_seconds
