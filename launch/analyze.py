"""Run an analysis experiment from a config; write `WORKDIR/results.json` and figures.

    python -m launch.analyze --config=configs/curvature/lm_canaries.py --workdir=/tmp/canaries

The config names its experiment (`config.experiment`), a module in
`launch/experiments/` with `run(config, workdir) -> dict`.

One run per workdir at a time (`WORKDIR/lock`, as `launch.train`). The
resolved config is stored in `WORKDIR/config.json`; re-running on the workdir
with other values stops with the list of changed keys, since the outputs there
(and any training an experiment resumes there) belong to the stored config.
`--allow_config_change` runs anyway and stores the new config. Keys that only
affect speed, display or bookkeeping may change freely (`FREE_KEYS`, plus an
experiment module's own `RERUN_FREE_KEYS`; '*' there: every key, for an
experiment whose outputs are named by their config).

The outputs an experiment writes through `launch.atomic.staged` (e.g.
hf_edit's `edited/` folder) and `results.json` are moved into place together
once the run returns (`atomic.Publication`): a run killed at any point leaves
the previous outputs or the new ones, whole, once the next run on the workdir
has recovered.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from launch import atomic
from launch import common
from launch import config_cli

import jax

from lossland import parallel, train as train_lib
from lossland.errors import UserError
from lossland.train import loop as loop_lib

# Config keys (a key covers its subtree) that may differ between runs on one workdir: they
# change how fast or how visibly an analysis runs, not what it computes.
FREE_KEYS = ('progress', 'mesh', 'param_rules', 'train.steps_per_block', 'eval.every',
             'checkpoint', 'data.data_dir')


def experiment_module(name: str):
  """launch/experiments/<name>.py; a UserError (config key experiment) listing the others."""
  from launch import experiments  # pylint: disable=g-import-not-at-top
  available = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                     if not m.name.startswith('_'))
  if name not in available:
    raise UserError(f'unknown experiment {name!r} (config key experiment); available: '
                    f'{", ".join(available)}')
  return importlib.import_module(f'launch.experiments.{name}')


def check_config(module, config, workdir: str, *, allow_change: bool = False) -> list[str]:
  """Compares `config` with `WORKDIR/config.json`, then stores it there.

  Returns:
    The changed keys ('key: old -> new'); with `allow_change` they are printed.

  Raises:
    UserError: keys changed and `allow_change` is False (config.json is left as it was).
  """
  free = FREE_KEYS + tuple(getattr(module, 'RERUN_FREE_KEYS', ()))
  current = common.stored_config(config, () if '*' in free else free)
  stored = loop_lib.read_run_config(workdir)
  changes = []
  if stored is not None and '*' not in free:
    changes = loop_lib.config_changes(stored, current)
    if changes and not allow_change:
      raise UserError(
          f'{workdir} holds the outputs of a run of another config; changed: '
          f'{"; ".join(changes)}. Re-run with the original values, use a fresh workdir, or pass '
          '--allow_config_change to replace its outputs with this config\'s.')
    if changes and jax.process_index() == 0:
      print(f'replacing the outputs in {workdir} with those of a changed config: '
            f'{"; ".join(changes)}', file=sys.stderr)
  if changes or stored is None or '*' in free:
    loop_lib.write_run_config(workdir, current)
  return changes


def run(module, config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs the experiment `module` under the workdir's lock; publishes its outputs and results."""
  with train_lib.WorkdirLock(workdir), atomic.Publication(
      workdir, write=jax.process_index() == 0) as outputs:
    check_config(module, config, workdir, allow_change=allow_config_change)
    results = module.run(config, workdir)
    outputs.publish(results)
  return results


def main(argv=None) -> None:
  with config_cli.user_errors():
    args, config, allow_config_change = config_cli.parse_resumable(argv, __doc__)
    if args.multihost:
      parallel.initialize_multihost()
    if 'experiment' not in config:
      raise UserError(f'{args.config} has no `experiment` key; analysis configs name a module '
                      'of launch/experiments/')
    if not args.workdir:
      raise UserError('--workdir is required: results.json and figures are written there')
    module = experiment_module(config.experiment)
    os.makedirs(args.workdir, exist_ok=True)
    try:
      results = run(module, config, args.workdir, allow_config_change=allow_config_change)
    except train_lib.Interrupted as e:  # SIGTERM/Ctrl-C during training: saved, resumable
      print(f'\n{e}', file=sys.stderr)
      raise SystemExit(128 + e.signum) from None
  if jax.process_index() == 0:
    common.print_table({k: v for k, v in results.items() if not isinstance(v, (dict, list))})


if __name__ == '__main__':
  main()
