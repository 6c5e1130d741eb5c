"""Train-step time and state bytes of low-rank arms relative to dense, in one process."""
from __future__ import annotations

import numpy as np

from launch import bench
from launch import common
from lossland import lowrank


def run(config) -> dict:
  arms = [a.strip() for a in config.bench_arms.split(',') if a.strip()]
  if 'dense' not in arms:
    raise ValueError('bench_arms must include dense: every ratio is relative to it')
  vocab = common.build_text_corpus(config.data).vocab.size
  models = {}
  for arm in arms:
    spec = lowrank.arm_spec(arm, **{k: config.lowrank[k] for k in lowrank.ARM_SETTINGS})
    if spec.galore:
      raise ValueError('the step bench times parameterizations; drop galore from bench_arms')
    models[arm] = common.build_model(
        config.model, vocab_size=vocab,
        dense=lowrank.dense_factory(spec.kind, seed=config.seed, **spec.kwargs))
  times = {arm: [] for arm in arms}
  out = {}
  for _ in range(config.rounds):  # interleaved rounds share the machine's noise
    for arm in arms:
      r = bench.time_train_step(config, repeats=config.repeats, model=models[arm])
      times[arm].append(r['step_ms'])
      out[f'{arm}_train_state_bytes'] = r['train_state_bytes']
      out[f'{arm}_compile_seconds'] = r['compile_seconds']
  for arm in arms:
    out[f'{arm}_step_ms'] = float(np.median(times[arm]))
    out[f'{arm}_step_ms_all'] = [float(t) for t in times[arm]]
    out[f'{arm}_step_ratio'] = (out[f'{arm}_step_ms'] / out['dense_step_ms'] if arm != 'dense'
                                else 1.0)
    out[f'{arm}_state_bytes_ratio'] = (out[f'{arm}_train_state_bytes'] /
                                       out['dense_train_state_bytes'])
  out['d_model'] = config.model.d_model
  out['devices'] = r['devices']
  return out
