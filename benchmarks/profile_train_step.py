"""Where a config's compiled train block spends its time, per XLA thunk kind.

    XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_enable_xprof_traceme=true" \\
      python benchmarks/profile_train_step.py --config=configs/lm/shakespeare_char.py \\
      --config.data.path=../shared/data/tinyshakespeare.txt --config.model.matmul_dtype=float32

Runs one 50-step block to compile, one to time, and one under `jax.profiler`
with a Perfetto trace, then sums the trace's per-thunk durations by kind
(`ynn_fusion`, `copy_bitcast_fusion`, `all-reduce`, ...) in ms per step,
summed over devices. Needs no TensorBoard: the trace is read as JSON.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

from launch import common, config_cli, tasks

import jax

from lossland import data as data_lib, parallel, train as train_lib
from lossland.parallel import rules as rules_lib
from lossland.train import steps as steps_lib


def main(argv) -> None:
  _, config = config_cli.parse(argv, __doc__)
  t = config.train
  task = tasks.build_task(config)
  mesh = common.build_mesh(config.mesh, t.batch_size)
  optimizer = common.build_optimizer(t)
  state = train_lib.init_train_state(task.params, optimizer)
  sharding = steps_lib.state_shardings(
      state, mesh, rules_lib.param_shardings(state.params, mesh, common.param_rules(config)))
  state = jax.device_put(state, sharding)
  block = steps_lib.make_train_block(task.loss_fn, optimizer, state_sharding=sharding, mesh=mesh)
  k = t.steps_per_block
  batches = parallel.shard_batch(
      data_lib.stack_batches([task.batch_fn(s) for s in range(k)]), mesh, leading_axes=1)
  rng = jax.random.key(0)
  state, metrics = block(state, batches, rng)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  state, metrics = block(state, batches, rng)
  jax.block_until_ready(metrics)
  print(f'step {(time.perf_counter() - start) / k * 1e3:.1f} ms wall')
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  state, metrics = block(state, batches, rng)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True))[-1]
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name.startswith(('ThunkExecutor', '$', 'Wait', 'Rendezvous',
                                              'end: ', 'PjitFunction')):
      continue
    kind = re.sub(r'[._]\d+$', '', name)
    total[kind] += e.get('dur', 0)
    count[kind] += 1
  whole = sum(total.values())
  print('ms/step  share  calls/step  thunk kind (summed over devices)')
  for kind, us in total.most_common(20):
    print(f'{us / 1e3 / k:7.2f}  {us / whole:5.1%}  {count[kind] / k:10.1f}  {kind}')


if __name__ == '__main__':
  main(sys.argv[1:])
