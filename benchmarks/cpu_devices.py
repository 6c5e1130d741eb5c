"""How many emulated CPU devices make lossland's jobs fastest on this host.

    python -m benchmarks.cpu_devices [--counts 1 2] [--rounds 2] [--jobs shakespeare kfac sd cka]

On a CPU, XLA can present the host as several devices
(`--xla_force_host_platform_device_count`), each running its share of a
data-parallel batch on its own threads, or as one device whose operations use
all cores. This runs the main jobs' `launch.bench` configs in fresh processes,
each device count in turn, round after round, and prints each job's median
time per count and its ratio to the fastest. `launch/common.py`'s default
(`use_host_cores`) is set from what it measures.

Jobs: `main` (the main job's byte-level LM, `step_ms`), `shakespeare` (the reference LM's compiled 50-step training block,
`step_ms`), `kfac` (K-FAC factor accumulation step of a transformer LM,
`factor_step_ms`), `sd` (tiny Stable Diffusion sampling with A-STAR guidance, 10
steps, batch 4, `guided_seconds`), `cka` (the minibatch CKA matrix,
`lossland_seconds`). Needs only lossland; about 4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks import side_by_side

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'tinyshakespeare.txt')

JOBS = {
    'main': (['--config=configs/lm/pydoc_byte.py'], 'step_ms'),
    'shakespeare': (['--config=configs/lm/shakespeare_char.py',
                     f'--config.data.path={SHAKESPEARE}'], 'step_ms'),
    'kfac': (['--config=configs/curvature/bench_factors.py'], 'factor_step_ms'),
    'sd': (['--config=configs/guidance/bench_sd_sampling.py', '--config.sampling.num_steps=10',
            '--config.sampling.batch_size=4', '--config.sampling.repeats=2'], 'guided_seconds'),
    'cka': (['--config=configs/stitching/bench_cka.py', '--config.bench_args.n=4000',
             '--config.bench_args.numpy_pairs=1'], 'lossland_seconds'),
}


def run_bench(argv: list[str], devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = subprocess.run([sys.executable, '-m', 'launch.bench', *argv], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--counts', type=int, nargs='+', default=[1, side_by_side.threads()])
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--jobs', nargs='+', default=list(JOBS), choices=list(JOBS))
  args = p.parse_args()
  counts = sorted(set(args.counts))
  results = {}
  for job in args.jobs:
    argv, key = JOBS[job]
    times = {n: [] for n in counts}
    for _ in range(args.rounds):
      for n in counts:
        times[n].append(run_bench(argv, n)[key])
    medians = {n: statistics.median(t) for n, t in times.items()}
    best = min(medians, key=medians.get)
    results[job] = {'metric': key, 'median_by_devices': medians, 'fastest_devices': best,
                    'over_fastest': {n: round(m / medians[best], 3) for n, m in medians.items()}}
    print(f'{job:12s} {key}: ' + ', '.join(f'{n} device(s) {m:.4g}' for n, m in medians.items())
          + f'  -> fastest with {best}')
  print(json.dumps({'benchmark': 'cpu device count', 'jobs': results,
                    'machine': side_by_side.machine()}, sort_keys=True))


if __name__ == '__main__':
  main()
