"""Experiment: forget memorized noisy labels with a K-FAC curvature edit.

Merullo et al. (2025), sec. 4.3 at toy scale; see configs/curvature/noisy_labels.py.
Flips a fraction of the training labels to a random wrong class, trains an MLP
(or reuses WORKDIR/train) and estimates K-FAC factors on the clean training
images. ρ is chosen from `curvature.rhos` on half of the flipped points (set
A: fewest noisy-label predictions while clean training accuracy stays within
`max_clean_drop` of before; test data is never used to choose). Reported:
flipped points of set B (and of all flipped points) that still get their
noisy label or get their true label back, and test accuracy; plus the ρ sweep
with K-FAC and EK-FAC masses. Writes results.json and PNG figures.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from lossland import data as data_lib
from lossland import train as train_lib
from lossland.curvature import edit, eigen, factors, plots


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int):
  """(noisy labels, flipped indices): `fraction` of labels moved to a random wrong class."""
  rng = np.random.default_rng([seed, 11])
  flipped = np.sort(rng.choice(len(labels), int(round(fraction * len(labels))), replace=False))
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
  return noisy, flipped


def run(config, workdir: str) -> dict:
  ds = data_lib.load_image_dataset(config.data.source, data_dir=config.data.data_dir or None)
  t, cv = config.train, config.curvature
  noisy, flipped = flip_labels(ds.train_labels, config.data.flip_fraction, ds.num_classes,
                               config.seed)
  clean = np.setdiff1d(np.arange(len(noisy)), flipped)
  model = common.build_model(config.model, num_classes=ds.num_classes)
  params = model.init(jax.random.key(config.seed), ds.train_images[:1])
  mesh = common.build_mesh(config.mesh, t.batch_size)

  def batch_fn(step):
    idx = data_lib.epoch_indices(step, batch_size=t.batch_size, num_examples=len(noisy),
                                 seed=config.seed)
    return {'inputs': ds.train_images[idx], 'labels': noisy[idx]}

  start = time.perf_counter()
  result = train_lib.fit(
      params=params, loss_fn=train_lib.classification_loss(model.apply),
      optimizer=common.build_optimizer(t), batch_fn=batch_fn, num_steps=t.num_steps, mesh=mesh,
      rng=jax.random.key(config.seed + 1), data_seed=config.seed,
      workdir=os.path.join(workdir, 'train'), checkpoint_every=config.checkpoint_every,
      steps_per_block=t.steps_per_block, show_progress=config.progress)
  params = jax.device_get(result.state.params)
  train_seconds = time.perf_counter() - start
  predict = jax.jit(lambda p, x: model.apply(p, x).argmax(-1))

  order = np.random.default_rng([config.seed, 12]).permutation(len(flipped))
  set_a, set_b = flipped[np.sort(order[:len(order) // 2])], flipped[np.sort(order[len(order) // 2:])]

  def scores(p):
    pred_train = np.asarray(predict(p, ds.train_images))
    pred_test = np.asarray(predict(p, ds.test_images))
    out = {'clean_train_acc': float(np.mean(pred_train[clean] == ds.train_labels[clean])),
           'test_acc': float(np.mean(pred_test == ds.test_labels))}
    for label, idx in (('', flipped), ('_a', set_a), ('_b', set_b)):
      out[f'flipped_noisy{label}'] = float(np.mean(pred_train[idx] == noisy[idx]))
      out[f'flipped_true{label}'] = float(np.mean(pred_train[idx] == ds.train_labels[idx]))
    return out

  before = scores(params)
  # K-FAC factors on the clean training images; the true Fisher samples labels from
  # the model, so `factor_samples` passes over the images average several draws.
  start = time.perf_counter()
  batches = [{'inputs': ds.train_images[clean], 'labels': ds.train_labels[clean]}
             for _ in range(cv.factor_samples)]
  f = factors.estimate_factors(model.apply, params, batches, select=cv.layers,
                               mesh=common.build_mesh(config.mesh, len(clean)),
                               rng=jax.random.key(5), fisher_type=cv.fisher_type)
  bases = eigen.eigenbasis(f)
  factor_seconds = time.perf_counter() - start
  masses = None
  if cv.ekfac:
    masses = eigen.estimate_eigencorrection(
        model.apply, params, bases, batches, mesh=common.build_mesh(config.mesh, len(clean)),
        rng=jax.random.key(6), fisher_type=cv.fisher_type)
  sweep = {'rhos': list(cv.rhos)}
  chosen = {}
  for label, m in (('kfac', None), ('ekfac', masses)):
    if label == 'ekfac' and masses is None:
      continue
    rows = [scores(edit.curvature_edit(params, bases, r, m)) for r in cv.rhos]
    for key in rows[0]:
      sweep[f'{label}_{key}'] = [row[key] for row in rows]
    ok = [i for i, row in enumerate(rows)
          if row['clean_train_acc'] >= before['clean_train_acc'] - cv.max_clean_drop] or [0]
    best = min(ok, key=lambda i: (rows[i]['flipped_noisy_a'], -cv.rhos[i]))
    chosen[label] = (cv.rhos[best], rows[best])
  rho, after = chosen['kfac']
  plots.plot_spectra(bases, os.path.join(workdir, 'spectra.png'))
  plots.plot_kept_mass(bases, os.path.join(workdir, 'kept_mass.png'), [rho])
  plots.plot_sweep(cv.rhos, {k: v for k, v in sweep.items()
                             if k != 'rhos' and 'clean' not in k and not k.endswith(('_a', '_b'))},
                   os.path.join(workdir, 'rho_sweep.png'), 'fraction')

  results = {
      'train_seconds': train_seconds, 'factor_seconds': factor_seconds,
      'num_flipped': int(len(flipped)), 'rho': rho, 'layers': list(bases),
      'flipped_noisy_before': before['flipped_noisy_b'],
      'flipped_true_before': before['flipped_true_b'],
      'test_acc_before': before['test_acc'], 'clean_train_acc_before': before['clean_train_acc'],
      'flipped_noisy_after': after['flipped_noisy_b'], 'flipped_true_after': after['flipped_true_b'],
      'flipped_noisy_after_all': after['flipped_noisy'],
      'flipped_true_after_all': after['flipped_true'],
      'test_acc_after': after['test_acc'], 'clean_train_acc_after': after['clean_train_acc'],
      'rho_sweep': sweep,
  }
  if masses is not None:
    ek_rho, ek = chosen['ekfac']
    results['ekfac_rho'] = ek_rho
    results.update({f'ekfac_{k}_after': v for k, v in ek.items()})
  results['acceptance'] = {
      'noisy_before_ge_0.8': results['flipped_noisy_before'] >= 0.8,
      'noisy_after_le_0.2': results['flipped_noisy_after'] <= 0.2,
      'true_after_ge_0.4': results['flipped_true_after'] >= 0.4,
      'test_acc_drop_le_1pt': results['test_acc_after'] >= results['test_acc_before'] - 0.01,
  }
  return results
