"""Experiment: forget memorized noisy labels with a K-FAC curvature edit.

Merullo et al. (2025), sec. 4.3 at toy scale; see configs/curvature/noisy_labels.py.
Flips a fraction of the training labels to a random wrong class
(`data.flip_labels`), trains an MLP (or reuses WORKDIR/train) and estimates
K-FAC factors on the clean training images. ρ is chosen from `curvature.rhos`
on half of the flipped points (set A: fewest noisy-label predictions while
clean training accuracy stays within `max_clean_drop` of before; test data is
never used to choose; `curvature.selection.choose_rho`). Reported: flipped
points of set B (and of all flipped points) that still get their noisy label
or get their true label back, and test accuracy; plus the ρ sweep with K-FAC
and EK-FAC masses. Writes results.json and PNG figures.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from launch import common
from lossland import data as data_lib
from lossland import train as train_lib
from lossland.curvature import eigen, factors, plots, selection


def train_mlp(config, workdir, ds, noisy):
  """Trains (or restores from WORKDIR/train) the MLP on the noisy labels; (model, params, s)."""
  t = config.train
  model = common.build_model(config.model, num_classes=ds.num_classes)
  start = time.perf_counter()
  result = train_lib.fit_classifier(
      model, model.init(jax.random.key(config.seed), ds.train_images[:1]), ds.train_images,
      noisy, batch_size=t.batch_size, num_steps=t.num_steps,
      optimizer=common.build_optimizer(t), rng=jax.random.key(config.seed + 1),
      data_seed=config.seed, mesh=common.build_mesh(config.mesh, t.batch_size),
      steps_per_block=t.steps_per_block, show_progress=config.progress,
      workdir=os.path.join(workdir, 'train'), checkpoint_every=config.checkpoint_every)
  return model, jax.device_get(result.params), time.perf_counter() - start


def run(config, workdir: str) -> dict:
  ds = data_lib.load_image_dataset(config.data.source, data_dir=config.data.data_dir or None)
  cv = config.curvature
  noisy, flipped = data_lib.flip_labels(ds.train_labels, config.data.flip_fraction,
                                        ds.num_classes, config.seed)
  clean = np.setdiff1d(np.arange(len(noisy)), flipped)
  model, params, train_seconds = train_mlp(config, workdir, ds, noisy)
  predict = jax.jit(lambda p, x: model.apply(p, x).argmax(-1))
  order = np.random.default_rng([config.seed, 12]).permutation(len(flipped))
  subsets = {'': flipped, '_a': flipped[np.sort(order[:len(order) // 2])],
             '_b': flipped[np.sort(order[len(order) // 2:])]}

  def scores(p):
    pred_train, pred_test = np.asarray(predict(p, ds.train_images)), np.asarray(
        predict(p, ds.test_images))
    out = {'clean_train_acc': float(np.mean(pred_train[clean] == ds.train_labels[clean])),
           'test_acc': float(np.mean(pred_test == ds.test_labels))}
    for label, idx in subsets.items():
      out[f'flipped_noisy{label}'] = float(np.mean(pred_train[idx] == noisy[idx]))
      out[f'flipped_true{label}'] = float(np.mean(pred_train[idx] == ds.train_labels[idx]))
    return out

  before = scores(params)
  # The true Fisher samples labels from the model: `factor_samples` passes average several draws.
  start = time.perf_counter()
  batches = [{'inputs': ds.train_images[clean], 'labels': ds.train_labels[clean]}
             for _ in range(cv.factor_samples)]
  fmesh = common.build_mesh(config.mesh, len(clean))
  bases = eigen.eigenbasis(factors.estimate_factors(
      model.apply, params, batches, select=cv.layers, mesh=fmesh, rng=jax.random.key(5),
      fisher_type=cv.fisher_type))
  factor_seconds = time.perf_counter() - start
  masses = {'kfac': None}
  if cv.ekfac:
    masses['ekfac'] = eigen.estimate_eigencorrection(
        model.apply, params, bases, batches, mesh=fmesh, rng=jax.random.key(6),
        fisher_type=cv.fisher_type)
  sweep, chosen = {'rhos': list(cv.rhos)}, {}
  for label, m in masses.items():
    rows = selection.score_rhos(params, bases, cv.rhos, scores, m)
    sweep.update({f'{label}_{key}': [row[key] for row in rows] for key in rows[0]})
    best = selection.choose_rho(
        cv.rhos, rows, objective=lambda r: r['flipped_noisy_a'],
        feasible=lambda r: r['clean_train_acc'] >= before['clean_train_acc'] - cv.max_clean_drop)
    chosen[label] = (cv.rhos[best], rows[best])
  rho, after = chosen['kfac']
  plots.plot_spectra(bases, os.path.join(workdir, 'spectra.png'))
  plots.plot_kept_mass(bases, os.path.join(workdir, 'kept_mass.png'), [rho])
  plots.plot_sweep(cv.rhos, {k: v for k, v in sweep.items()
                             if k != 'rhos' and 'clean' not in k and not k.endswith(('_a', '_b'))},
                   os.path.join(workdir, 'rho_sweep.png'), 'fraction')
  results = {
      'train_seconds': train_seconds, 'factor_seconds': factor_seconds,
      'num_flipped': int(len(flipped)), 'rho': rho, 'layers': list(bases), 'rho_sweep': sweep,
      **{f'{k}_before': before[k + s] for k, s in (('flipped_noisy', '_b'),
                                                    ('flipped_true', '_b'), ('test_acc', ''),
                                                    ('clean_train_acc', ''))},
      **{f'{k}_after': after[k + s] for k, s in (('flipped_noisy', '_b'), ('flipped_true', '_b'),
                                                 ('test_acc', ''), ('clean_train_acc', ''))},
      'flipped_noisy_after_all': after['flipped_noisy'],
      'flipped_true_after_all': after['flipped_true']}
  if 'ekfac' in chosen:
    results['ekfac_rho'] = chosen['ekfac'][0]
    results.update({f'ekfac_{k}_after': v for k, v in chosen['ekfac'][1].items()})
  results['acceptance'] = {
      'noisy_before_ge_0.8': results['flipped_noisy_before'] >= 0.8,
      'noisy_after_le_0.2': results['flipped_noisy_after'] <= 0.2,
      'true_after_ge_0.4': results['flipped_true_after'] >= 0.4,
      'test_acc_drop_le_1pt': results['test_acc_after'] >= results['test_acc_before'] - 0.01,
  }
  return results
