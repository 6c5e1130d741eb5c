"""Pre-training comparison of low-rank (+ sparse) parameterizations at equal budgets.

Run by `python -m launch.analyze --config=configs/lowrank/pretrain_compare.py`.
Each arm gets its own best learning rate (seed 0 sweep, extended past the grid's
end while the best rate sits on it), then every seed at that rate; results per
arm and the LOST acceptance gaps go into results.json.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable

import ml_collections
import numpy as np

from launch import common
from launch import tasks
from lossland import lowrank
from lossland import train as train_lib


def _arm(config: ml_collections.ConfigDict, name: str) -> lowrank.Arm:
  return lowrank.arm_spec(name, **{k: config.lowrank[k] for k in lowrank.ARM_SETTINGS})


# Part of every run key: runs finished under an earlier layer initialization (W0 from a
# `seed` field and a path hash, before it came from the params rng) are not reused.
INIT_SCHEME = 'params_rng'
# launch.analyze's stored-config check: any key may change between calls on one workdir, since
# every run's folder is named by a hash of its config (`run_key`) and is never reused otherwise;
# one arm per call and a last `summarize_only` call are the intended use.
RERUN_FREE_KEYS = ('*',)


def run_key(config: ml_collections.ConfigDict) -> str:
  """A short hash of everything that shapes one run, so a changed config never reuses a result.

  The arm list, the rate/seed lists, `extend_grid` and `summarize_only` are
  left out: adding an arm or a seed reuses the runs already finished.
  """
  d = config.to_dict()
  d['lowrank'] = {k: v for k, v in d['lowrank'].items()
                  if k not in ('arms', 'learning_rates', 'seeds', 'extend_grid', 'summarize_only')}
  d.pop('progress', None)
  d['init'] = INIT_SCHEME
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_one(config: ml_collections.ConfigDict, arm: str, lr: float, seed: int,
            eval_set: Callable[[], dict], workdir: str) -> lowrank.ArmRun | None:
  """Trains one (arm, rate, seed) unless WORKDIR/runs/<run>/result.json holds it."""
  run_dir = os.path.join(workdir, 'runs', f'{arm}_lr{lr:g}_s{seed}_{run_key(config)}')

  def train() -> lowrank.ArmRun:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = seed  # params from key(seed): each seed its own init
    t, lc, spec = cfg.train, cfg.lowrank, _arm(config, arm)
    model = common.build_model(cfg.model, vocab_size=common.build_text_corpus(cfg.data).vocab.size,
                               dense=lowrank.dense_factory(spec.kind, **spec.kwargs))
    task = tasks.lm_task(cfg, model=model)
    recipe = lowrank.OptimizerRecipe(
        num_steps=t.num_steps, warmup_fraction=lc.warmup_fraction,
        final_lr_ratio=lc.final_lr_ratio, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
        grad_clip=t.grad_clip, galore_rank=lc.galore_rank, galore_gap=lc.galore_gap,
        galore_scale=lc.galore_scale)
    result = lowrank.train_arm(
        spec, lr, seed, model=model, params=task.params, loss_fn=task.loss_fn,
        batch_fn=task.batch_fn, eval_set=eval_set(), recipe=recipe,
        mesh=common.build_mesh(cfg.mesh, t.batch_size),
        example_inputs=(np.zeros((1, t.seq_len), np.int32),), workdir=run_dir,
        steps_per_block=t.steps_per_block, show_progress=config.get('progress', False), log=print)
    print(json.dumps(result.to_dict()))
    return result
  return lowrank.cached_arm_run(run_dir, None if config.lowrank.summarize_only else train)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  lc = config.lowrank
  arms = [a.strip() for a in lc.arms.split(',') if a.strip()]
  for arm in arms:
    _arm(config, arm)  # fail fast on a typo
  seeds = list(lc.seeds)
  # Fixed validation windows for every run (seed 0's), so seeds differ only in init and data
  # order; built on first use, so summarizing finished runs builds nothing.
  eval_set = functools.lru_cache(maxsize=1)(lambda: tasks.lm_task(config, model=common.build_model(
      config.model, vocab_size=common.build_text_corpus(config.data).vocab.size)).eval_sets['val'])
  runs, per_arm = [], {}
  for arm in arms:
    sweep = train_lib.sweep_rates(lambda lr: run_one(config, arm, lr, seeds[0], eval_set, workdir),
                                  lc.learning_rates, extend=lc.extend_grid,
                                  score=lambda r: r.val_loss)
    if not sweep.runs:
      continue
    rest = [run_one(config, arm, sweep.best_rate, s, eval_set, workdir) for s in seeds[1:]]
    rest = [r for r in rest if r is not None]
    runs += [r.to_dict() for r in sweep.runs + tuple(rest)]
    per_arm[arm] = lowrank.summarize_arm(sweep, rest)
  if 'dense' in per_arm:
    per_arm = lowrank.relative_to(per_arm, 'dense')
  results = {'arms': {a: s.to_dict() for a, s in per_arm.items()}, 'runs': runs,
             'runs_finished': len(runs), 'run_key': run_key(config)}
  for arm, r in per_arm.items():
    for key in ('seeds', 'val_loss_mean', 'val_loss_std', 'best_lr', 'step_ms') + (
        ('param_fraction',) if r.param_fraction is not None else ()):
      results[f'{arm}/{key}'] = float(getattr(r, key))
  if 'dense' not in per_arm:  # e.g. one arm per process; summarize later with all arms
    return results
  dense = per_arm['dense']
  for name in ('lost', 'lost_silu'):  # the acceptance, for LOST with and without SiLU
    if name not in per_arm:
      continue
    lost = per_arm[name]
    results[f'{name}_minus_dense'] = lost.val_loss_mean - dense.val_loss_mean
    results[f'accept_{name}_within_dense_0.05'] = bool(results[f'{name}_minus_dense'] <= 0.05)
    if 'lowrank_svd' in per_arm:
      low = per_arm['lowrank_svd']
      gap = low.val_loss_mean - lost.val_loss_mean
      results[f'lowrank_svd_minus_{name}'] = gap
      results[f'accept_{name}_beats_lowrank_svd_0.02_and_2std'] = bool(
          gap >= 0.02 and gap > 2 * max(lost.val_loss_std, low.val_loss_std))
  return results
