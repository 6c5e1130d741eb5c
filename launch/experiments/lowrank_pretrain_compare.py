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
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from launch import common
from launch import tasks
from lossland import lowrank
from lossland import train as train_lib


def arm_spec(name: str, lc: ml_collections.ConfigDict) -> tuple[str, dict, bool]:
  """(layer kind, layer kwargs, uses GaLore) of an arm."""
  f = lc.param_fraction
  lost = dict(param_fraction=f, sparsity=lc.sparsity, gamma=lc.gamma)
  specs = {
      'dense': ('dense', {}, False),
      'lost': ('lost', lost, False),
      'lost_silu': ('lost', dict(lost, activation='silu'), False),
      'lost_gather': ('lost', dict(lost, impl='gather'), False),  # same maths, other kernel
      # Same budget as LOST: the largest rank within param_fraction of each layer.
      'lowrank_svd': ('lowrank', dict(param_fraction=f, factor_init='svd'), False),
      'lowrank_xavier': ('lowrank', dict(param_fraction=f, factor_init='xavier'), False),
      'cola': ('cola', dict(param_fraction=f), False),
      'sltrain': ('sltrain', dict(param_fraction=f, density=lc.density, alpha=lc.sltrain_alpha),
                  False),
      'galore': ('dense', {}, True),
  }
  if name not in specs:
    raise SystemExit(f'unknown arm {name!r} in lowrank.arms; available: {sorted(specs)}')
  return specs[name]


def _galore_mask(params):
  def leaf(path, x):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return x.ndim == 2 and ('/attn/' in name or '/mlp/' in name)
  return jax.tree_util.tree_map_with_path(leaf, params)


# Part of every run key: runs finished under an earlier layer initialization (W0 from a
# `seed` field and a path hash, before it came from the params rng) are not reused.
INIT_SCHEME = 'params_rng'


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
            eval_set: Callable[[], dict] | None, workdir: str) -> dict | None:
  """Trains one (arm, rate, seed); returns its record (cached in WORKDIR/runs/<run>/)."""
  run_dir = os.path.join(workdir, 'runs', f'{arm}_lr{lr:g}_s{seed}_{run_key(config)}')
  cached = os.path.join(run_dir, 'result.json')
  if os.path.exists(cached):
    with open(cached) as fh:
      return json.load(fh)
  if config.lowrank.summarize_only:
    return None
  lc = config.lowrank
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.seed = seed
  t = cfg.train
  t.learning_rate, t.final_lr = lr, lr * lc.final_lr_ratio
  t.warmup_steps = max(1, int(lc.warmup_fraction * t.num_steps))
  kind, kwargs, galore = arm_spec(arm, lc)
  vocab = common.build_text_corpus(cfg.data).vocab.size
  model = common.build_model(cfg.model, vocab_size=vocab,
                             dense=lowrank.dense_factory(kind, **kwargs))
  task = tasks.lm_task(cfg, model=model)  # params from key(cfg.seed): each seed its own init
  if eval_set is not None:  # every run scores the same validation windows
    task.eval_sets = {'val': eval_set()}
  if galore:
    schedule = train_lib.warmup_cosine(lr, t.warmup_steps, t.num_steps, t.final_lr)
    optimizer = lowrank.galore_adamw(schedule, rank=lc.galore_rank,
                                     update_proj_gap=lc.galore_gap, scale=lc.galore_scale,
                                     b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                                     grad_clip=t.grad_clip, mask=_galore_mask)
  else:
    optimizer = common.build_optimizer(t)
  mesh = common.build_mesh(cfg.mesh, t.batch_size)
  tokens = np.zeros((1, t.seq_len), np.int32)
  paths = [l.path for l in lowrank.linear_layers(model, tokens)]
  start = time.perf_counter()
  try:
    result = train_lib.fit(
        params=task.params, loss_fn=task.loss_fn, optimizer=optimizer, batch_fn=task.batch_fn,
        num_steps=t.num_steps, mesh=mesh, rng=jax.random.key(seed + 1), data_seed=seed,
        eval_sets=task.eval_sets, eval_every=t.num_steps, workdir=run_dir,
        steps_per_block=t.steps_per_block, show_progress=config.get('progress', False))
    val_loss = result.evals[-1]['val_loss']
    state = result.state
    step_ms = (1e3 * result.steady_seconds / result.steady_steps if result.steady_steps
               else float('nan'))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  except FloatingPointError as e:  # a diverged rate loses the sweep, it does not stop it
    print(f'{arm} lr={lr:g} seed={seed} diverged: {e}')
    val_loss, step_ms, state_bytes = float('inf'), float('nan'), 0
  record = {'arm': arm, 'lr': lr, 'seed': seed, 'val_loss': float(val_loss),
            'step_ms': float(step_ms), 'train_state_bytes': int(state_bytes),
            'linear_params': lowrank.linear_param_count(task.params, paths),
            'wall_seconds': time.perf_counter() - start}
  os.makedirs(run_dir, exist_ok=True)
  with open(cached, 'w') as fh:
    json.dump(record, fh)
  print(json.dumps(record))
  return record


def sweep_rates(run_at: Callable[[float], dict | None], rates: list[float],
                extend: int) -> list[dict]:
  """Seed-0 runs at every rate, plus up to `extend` rates past either end of the grid.

  A best rate on the grid's edge means the arm's optimum may lie outside it
  (a half-parameter arm often wants a larger rate), which would compare that
  arm below its best. The grid then grows geometrically, with the ratio of its
  two outermost rates, until the best rate is inside or `extend` rates were added.
  `run_at(lr)` returns None for a run not finished (summaries only).
  """
  rates = sorted(rates)
  done = {lr: run_at(lr) for lr in rates}
  for _ in range(extend if len(rates) > 1 else 0):
    finished = {lr: r for lr, r in done.items() if r is not None}
    if not finished:
      break
    best = min(finished, key=lambda lr: finished[lr]['val_loss'])
    if best == rates[-1]:
      rates.append(rates[-1] * rates[-1] / rates[-2])
      new = rates[-1]
    elif best == rates[0]:
      rates.insert(0, rates[0] * rates[0] / rates[1])
      new = rates[0]
    else:
      break
    done[new] = run_at(new)
    if done[new] is None:
      break
  return [done[lr] for lr in rates if done[lr] is not None]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  lc = config.lowrank
  arms = [a.strip() for a in lc.arms.split(',') if a.strip()]
  for arm in arms:
    arm_spec(arm, lc)  # fail fast on a typo
  seeds, rates = list(lc.seeds), list(lc.learning_rates)
  # Fixed validation windows for every run (seed 0's), so seeds differ only in init and data
  # order; built on first use, so summarizing finished runs builds nothing.
  eval_set = functools.lru_cache(maxsize=1)(lambda: tasks.lm_task(config, model=common.build_model(
      config.model, vocab_size=common.build_text_corpus(config.data).vocab.size)).eval_sets['val'])
  runs, per_arm = [], {}
  for arm in arms:
    sweep = sweep_rates(lambda lr: run_one(config, arm, lr, seeds[0], eval_set, workdir),
                        rates, lc.extend_grid)
    if not sweep:
      continue
    best = min(sweep, key=lambda r: r['val_loss'])
    rest = [run_one(config, arm, best['lr'], s, eval_set, workdir) for s in seeds[1:]]
    rest = [r for r in rest if r is not None]
    runs += sweep + rest
    losses = np.array([best['val_loss']] + [r['val_loss'] for r in rest])
    per_arm[arm] = {
        'seeds': len(losses), 'val_loss_mean': float(losses.mean()),
        'val_loss_std': float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
        'best_lr': best['lr'], 'linear_params': best['linear_params'],
        'step_ms': float(np.nanmedian([best['step_ms']] + [r['step_ms'] for r in rest])),
        'train_state_bytes': best['train_state_bytes'],
        'sweep_val_loss': {f'{r["lr"]:g}': r['val_loss'] for r in sweep}}
  results = {'arms': per_arm, 'runs': runs, 'runs_finished': len(runs), 'run_key': run_key(config)}
  for arm, r in per_arm.items():
    for key in ('seeds', 'val_loss_mean', 'val_loss_std', 'best_lr', 'step_ms'):
      results[f'{arm}/{key}'] = float(r[key])
  if 'dense' not in per_arm:  # e.g. one arm per process; summarize later with all arms
    return results
  dense = per_arm['dense']
  for arm, r in per_arm.items():
    r['param_fraction'] = r['linear_params'] / dense['linear_params']
    r['step_ratio'] = r['step_ms'] / dense['step_ms']
    r['state_bytes_ratio'] = r['train_state_bytes'] / dense['train_state_bytes']
    results[f'{arm}/param_fraction'] = r['param_fraction']
  for name in ('lost', 'lost_silu'):  # the acceptance, for LOST with and without SiLU
    if name not in per_arm:
      continue
    lost = per_arm[name]
    results[f'{name}_minus_dense'] = lost['val_loss_mean'] - dense['val_loss_mean']
    results[f'accept_{name}_within_dense_0.05'] = bool(results[f'{name}_minus_dense'] <= 0.05)
    if 'lowrank_svd' in per_arm:
      low = per_arm['lowrank_svd']
      gap = low['val_loss_mean'] - lost['val_loss_mean']
      results[f'lowrank_svd_minus_{name}'] = gap
      results[f'accept_{name}_beats_lowrank_svd_0.02_and_2std'] = bool(
          gap >= 0.02 and gap > 2 * max(lost['val_loss_std'], low['val_loss_std']))
  return results
