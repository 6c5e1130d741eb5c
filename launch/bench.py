"""Benchmark from a config; prints one JSON line.

    python -m launch.bench --config=configs/lm/shakespeare_char.py

Without `config.bench`, times the config's jitted training block (median over
repeats, compile excluded) and prints `step_ms`, `tokens_per_second`,
`compile_seconds`, `peak_rss_mb`, plus `step_cpu_ms` (process CPU time per step,
all threads: steadier than wall time on a shared machine) and `load_average`.
With `config.bench = '<name>'`, runs `launch/benches/<name>.py`'s
`run(config) -> dict` instead. Speed targets are ratios measured within one
such process, never wall-clock asserts in tests.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time

from launch import common
from launch import config_cli
from launch import tasks

import jax
import numpy as np

from lossland import data as data_lib, parallel, train as train_lib
from lossland.errors import UserError
from lossland.parallel import rules as rules_lib
from lossland.train import steps as steps_lib


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_train_step(config, *, repeats: int = 5, model=None) -> dict:
  """Times `config`'s compiled training block on its mesh; returns per-step numbers."""
  t = config.train
  task = tasks.build_task(config, model=model)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  optimizer = common.build_optimizer(t)
  state = train_lib.init_train_state(task.params, optimizer)
  param_sharding = rules_lib.param_shardings(state.params, mesh, common.param_rules(config))
  sharding = steps_lib.state_shardings(state, mesh, param_sharding)
  state = jax.device_put(state, sharding)
  block = steps_lib.make_train_block(task.loss_fn, optimizer, state_sharding=sharding, mesh=mesh)
  k = t.steps_per_block
  host = data_lib.stack_batches([task.batch_fn(s) for s in range(k)])
  batches = parallel.shard_batch(host, mesh, leading_axes=1)
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  state, metrics = block(state, batches, rng)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - t0
  times, cpu_times = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = block(state, batches, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  step_s = float(np.median(times)) / k
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  return {'step_ms': step_s * 1e3, 'tokens_per_second': task.tokens_per_step / step_s,
          'step_cpu_ms': float(np.median(cpu_times)) / k * 1e3,
          'compile_seconds': compile_seconds, 'devices': int(mesh.devices.size),
          'train_state_bytes': int(state_bytes)}


def bench_module(name: str):
  """launch/benches/<name>.py; a UserError listing the benches when there is none by that name."""
  benches = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), 'benches'))
                   if f.endswith('.py') and not f.startswith('_'))
  if name not in benches:
    raise UserError(f'unknown bench {name!r} (config key bench); available: {", ".join(benches)}')
  return importlib.import_module(f'launch.benches.{name}')


def main(argv=None) -> None:
  with config_cli.user_errors():
    args, config = config_cli.parse(sys.argv[1:] if argv is None else argv, __doc__)
    if args.multihost:
      parallel.initialize_multihost()
    results = bench_module(config.bench).run(config) if 'bench' in config else time_train_step(
        config)
  results['peak_rss_mb'] = peak_rss_mb()
  results['load_average'] = os.getloadavg()[0]  # other work on the machine inflates step_ms
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
