"""The whole Shakespeare training run: lossland's `launch.train` vs the PyTorch baseline.

    python -m benchmarks.shakespeare_vs_torch [--data ../shared/data/tinyshakespeare.txt] \\
        [--rounds 2] [--devices N]

Each round runs `python -m launch.train --config=configs/lm/shakespeare_char.py`
(into a fresh temporary workdir) and `benchmarks/torch_char_lm.py` (the
PyTorch baseline it is held to: the same model, 2000 iterations and
evaluations) one after the other, in fresh processes, and times each whole
command: imports, compilation, evaluation and checkpoints included, as a user
waits for them. Prints min/median, lossland's ratio (target: at most 0.8x the
baseline, issue 2) and both validation losses. Needs `torch`
(`pip install -r benchmarks/requirements.txt`); about 2.5 minutes a round on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import side_by_side

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, '..', '..', 'shared', 'data', 'tinyshakespeare.txt')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', default=DEFAULT_DATA, help='tinyshakespeare.txt')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--devices', type=int, default=None,
                 help='emulated CPU devices for launch.train (default: the launcher\'s own)')
  args = p.parse_args()
  if not os.path.isfile(args.data):
    raise SystemExit(f'error: no text at {args.data}; pass --data=/path/to/tinyshakespeare.txt')
  env = dict(os.environ)
  if args.devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  losses = {}

  def lossland_run():
    with tempfile.TemporaryDirectory() as workdir:
      subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/lm/shakespeare_char.py',
                      f'--config.data.path={args.data}', f'--workdir={workdir}'],
                     env=env, check=True, capture_output=True)
      with open(os.path.join(workdir, 'results.json')) as f:
        losses['lossland'] = json.load(f)['final_val_loss']

  def torch_run():
    out = subprocess.run([sys.executable, os.path.join(HERE, 'torch_char_lm.py'), args.data],
                         check=True, capture_output=True, text=True).stdout
    losses['pytorch'] = float(re.search(r'final val loss ([0-9.]+)', out).group(1))

  load_before = round(os.getloadavg()[0], 2)
  start = time.perf_counter()
  times = side_by_side.alternate({'lossland': lossland_run, 'pytorch': torch_run},
                                 rounds=args.rounds, warmup=0)
  side_by_side.report('Shakespeare char LM, whole 2000-step run (launch.train vs PyTorch)', times,
                      load_before=load_before, lossland_val_loss=losses['lossland'],
                      pytorch_val_loss=losses['pytorch'],
                      total_seconds=round(time.perf_counter() - start, 1))


if __name__ == '__main__':
  main()
