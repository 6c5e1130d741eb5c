"""Run an analysis experiment from a config; write `WORKDIR/results.json` and figures.

    python -m launch.analyze --config=configs/curvature/lm_canaries.py --workdir=/tmp/canaries

The config names its experiment (`config.experiment`), a module in
`launch/experiments/` with `run(config, workdir) -> dict`.
"""
from __future__ import annotations

import importlib
import os
import sys

from launch import common
from launch import config_cli

import jax

from lossland import parallel, train as train_lib


def main(argv=None) -> None:
  args, config = config_cli.parse(sys.argv[1:] if argv is None else argv, __doc__)
  if args.multihost:
    parallel.initialize_multihost()
  if 'experiment' not in config:
    raise SystemExit(f'{args.config} has no `experiment` key; analysis configs name a module of '
                     'launch/experiments/')
  if not args.workdir:
    raise SystemExit('--workdir is required: results.json and figures are written there')
  os.makedirs(args.workdir, exist_ok=True)
  module = importlib.import_module(f'launch.experiments.{config.experiment}')
  try:
    with config_cli.user_errors():
      results = module.run(config, args.workdir)
  except train_lib.Interrupted as e:  # SIGTERM/Ctrl-C during training: saved, resumable
    print(f'\n{e}', file=sys.stderr)
    raise SystemExit(128 + e.signum) from None
  common.write_results(args.workdir, results)
  if jax.process_index() == 0:
    common.print_table({k: v for k, v in results.items() if not isinstance(v, (dict, list))})


if __name__ == '__main__':
  main()
