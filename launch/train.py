"""Train a model from a config and write `WORKDIR/results.json`.

    python -m launch.train --config=configs/lm/pydoc_byte.py --workdir=/tmp/lm
    python -m launch.train --config=configs/lm/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/shakespeare

Re-running the same command resumes from the latest checkpoint in the workdir
(one that restores and passes its checksums); a finished run is re-evaluated,
not retrained. SIGTERM or Ctrl-C saves a checkpoint at the current block and
exits (status 128 + signal number); the same command resumes. One run per
workdir at a time.

The resolved config is stored in `WORKDIR/config.json` (and a copy inside every
checkpoint, compared when config.json is gone); resuming with other values
stops with the list of changed keys, and a refused run leaves config.json as
it was. `--allow_config_change` resumes anyway with the new config: the
optimizer is rebuilt from it and continues at the checkpoint's step, so a
larger `train.num_steps` stretches the remaining cosine decay (the learning
rate jumps up to the new curve's value at that step) and the result differs
from a run started with the new config. Keys that only
affect speed, display or bookkeeping may change freely: `progress`, `mesh`,
`param_rules`, `train.steps_per_block`, `eval.every`, `checkpoint.*`,
`data.data_dir`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

from launch import common
from launch import config_cli
from launch import tasks

import jax

from lossland import parallel, train as train_lib

# Config keys (a key covers its subtree) that may differ on resume: they change
# how fast or how visibly the run goes, not what it computes.
RESUME_FREE_KEYS = ('progress', 'mesh', 'param_rules', 'train.steps_per_block', 'eval.every',
                    'checkpoint', 'data.data_dir')
# Results that describe the training itself; a re-evaluation keeps them from the first report.
TRAINING_KEYS = ('tokens_per_second', 'compile_seconds', 'wall_seconds')


def run_config(config) -> dict:
  """The config as a plain dict without `RESUME_FREE_KEYS`: what must match on resume."""
  return common.stored_config(config, RESUME_FREE_KEYS)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _last_train_loss(workdir: str) -> float:
  loss = math.nan
  with contextlib.suppress(OSError), open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      with contextlib.suppress(ValueError):
        loss = json.loads(line).get('train_loss', loss)
  return loss


def run(config, workdir: str | None, *, allow_config_change: bool = False) -> dict:
  """Trains per `config`; returns the results dict (also written to the workdir)."""
  with train_lib.WorkdirLock(workdir) if workdir else contextlib.nullcontext():
    return _run(config, workdir, allow_config_change)


def _run(config, workdir, allow_config_change) -> dict:
  start = time.perf_counter()
  t = config.train
  task = tasks.build_task(config)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  result = train_lib.fit(
      params=task.init_params, loss_fn=task.loss_fn, optimizer=common.build_optimizer(t),
      batch_fn=task.batch_fn, num_steps=t.num_steps, mesh=mesh,
      rng=jax.random.key(config.seed + 1), data_seed=config.seed,
      param_rules=common.param_rules(config), eval_sets=task.eval_sets,
      eval_every=config.eval.every, workdir=workdir, checkpoint_every=config.checkpoint.every,
      keep_checkpoints=config.checkpoint.keep, steps_per_block=t.steps_per_block,
      show_progress=config.get('progress', True), run_config=run_config(config),
      allow_config_change=allow_config_change)
  final = result.evals[-1] if result.evals else {}
  last_loss = float(result.train_losses[-1]) if len(result.train_losses) else math.nan
  results = {
      'steps': int(result.state.step),
      'final_train_loss': final.get('train_loss', last_loss),
      'final_val_loss': final.get('val_loss', final.get('test_loss', math.nan)),
      'tokens_per_second': train_lib.tokens_per_second(result, task.tokens_per_step),
      'compile_seconds': result.compile_seconds,
      'wall_seconds': time.perf_counter() - start,
      'devices': int(mesh.devices.size),
      'resumed_from': result.resumed_from if result.resumed_from is not None else -1,
  }
  results.update({f'final_{k}': v for k, v in final.items() if k != 'step'})
  if result.already_finished:
    previous = _read_json(os.path.join(workdir, 'results.json'))
    results.update({k: previous.get(k, math.nan) for k in TRAINING_KEYS})
    if 'train_loss' not in final:
      results['final_train_loss'] = previous.get('final_train_loss', _last_train_loss(workdir))
    if jax.process_index() == 0:
      print(f'the run in {workdir} had already finished at step {results["steps"]}: re-evaluated '
            'its final checkpoint (nothing was retrained). Raise train.num_steps and pass '
            '--allow_config_change to train further.', file=sys.stderr)
  common.write_results(workdir, results)
  return results


def main(argv=None) -> None:
  with config_cli.user_errors():
    args, config, allow_config_change = config_cli.parse_resumable(argv, __doc__)
    if args.multihost:
      parallel.initialize_multihost()
    try:
      results = run(config, args.workdir, allow_config_change=allow_config_change)
    except train_lib.Interrupted as e:
      print(f'\n{e}', file=sys.stderr)
      raise SystemExit(128 + e.signum) from None
  if jax.process_index() == 0:
    common.print_table(results)


if __name__ == '__main__':
  main()
