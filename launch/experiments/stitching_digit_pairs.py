"""Stitching experiment (Balogh & Jelasity, AAAI 2025) on digit pairs; see
configs/stitching/digit_pairs.py. `run(config, workdir) -> results dict`.

The methods are `lossland.stitching`'s: `DirectMatching`, `StitchEvaluator`,
`TaskLossMatching`, `similarity_matrices`. Here: the base models' training,
the wiring, the acceptance numbers (`summarize`) and the heatmaps.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from launch import common
from lossland import stitching as st
from lossland import train as train_lib
from lossland.models import MLP

SIMILARITY = {'cka': 'linear_cka', 'pwcca': 'pwcca', 'procrustes': 'procrustes'}


def _batches(x: np.ndarray, labels: np.ndarray, batch_size: int):
  n = len(x) // batch_size * batch_size
  if n == 0:
    raise ValueError(f'batch size {batch_size} exceeds the {len(x)} examples; lower it')
  return [{'inputs': x[i:i + batch_size], 'labels': labels[i:i + batch_size]}
          for i in range(0, n, batch_size)]


def train_model(config, data, seed: int, mesh):
  t = config.train
  model = MLP(features=tuple(config.model.features), num_classes=data.num_classes,
              residual=config.model.get('residual', False))
  params = model.init(jax.random.key(seed), data.train_images[:1])
  optimizer = train_lib.adamw(
      learning_rate=train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, t.num_steps,
                                            t.final_lr),
      weight_decay=t.weight_decay)
  result = train_lib.fit_classifier(
      model, params, data.train_images, data.train_labels, batch_size=t.batch_size,
      num_steps=t.num_steps, optimizer=optimizer, rng=jax.random.key(seed), data_seed=seed,
      mesh=mesh, steps_per_block=t.steps_per_block)
  return model, result.params


def stitch_scores(config, tools, data, params_a, params_b, seed) -> dict:
  """{method: {Pair: StitchScores}} for DM and TLM (each init), on test and training pairs."""
  dm_fit, evaluate, tlm, pairs = tools
  t0 = time.perf_counter()
  dm = dm_fit(params_a, params_b, _batches(data.train_images, data.train_labels,
                                           config.dm.batch_size))
  stitches = {'dm': dm.solve_all(pairs, ridge=config.dm.ridge)}
  gaussians = dm.gaussians()
  seconds = {'dm_fit': time.perf_counter() - t0}
  test = _batches(data.test_images, data.test_labels, config.eval.batch_size)
  n = config.eval.train_examples
  train = _batches(data.train_images[:n], data.train_labels[:n], config.eval.batch_size) \
      if n else []
  out = {'dm': evaluate(params_a, params_b, stitches['dm'], gaussians, test)}
  if train:
    out['dm_on_train'] = evaluate(params_a, params_b, stitches['dm'], gaussians, train)
  tc, t1 = config.tlm, time.perf_counter()

  batch_fn = train_lib.shuffled_batches(data.train_images, data.train_labels,
                                        batch_size=tc.batch_size, data_seed=7 + seed)
  for kind in tc.inits:
    start = dict(stitches['dm']) if kind == 'direct' else st.init_stitches(
        jax.random.key(1000 + seed), {p: s['w'].shape for p, s in stitches['dm'].items()},
        kind=kind)
    trained = tlm.fit(start, params_a, params_b, batch_fn, num_steps=tc.num_steps,
                      steps_per_block=tc.steps_per_block).stitches
    out[f'tlm_{kind}'] = evaluate(params_a, params_b, trained, gaussians, test)
    if train:
      out[f'tlm_{kind}_on_train'] = evaluate(params_a, params_b, trained, gaussians, train)
  seconds['tlm_train'] = time.perf_counter() - t1
  return out, seconds


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  data = st.load_digit_pairs(config.data.num_train, config.data.num_test,
                             data_dir=config.data.data_dir or None)
  mesh = common.build_mesh(config.mesh, config.train.batch_size)
  per_seed, tools, n_train = [], None, config.eval.train_examples
  test = _batches(data.test_images, data.test_labels, config.eval.batch_size)
  for seed in config.seeds:
    (model, params_a), (_, params_b) = (train_model(config, data, 2 * seed + i, mesh)
                                        for i in (0, 1))
    layers = model.hidden_layers
    if tools is None:  # built once: every seed and both matrices reuse the compiled passes
      pairs = st.all_pairs(layers, layers)
      tools = (st.DirectMatching(model, model, layers_a=layers, layers_b=layers, mesh=mesh),
               st.StitchEvaluator(model, model, pairs, mesh=mesh),
               st.TaskLossMatching(model, model, pairs, st.tlm_optimizer(
                   config.tlm.learning_rate, config.tlm.weight_decay), mesh=mesh), pairs)
    params = {'A': params_a, 'B': params_b}
    record = {'seed': seed, 'matrices': {},
              'base_accuracy': {k: train_lib.accuracy(model, p, test)
                                for k, p in params.items()}}
    if n_train:
      train = _batches(data.train_images[:n_train], data.train_labels[:n_train],
                       config.eval.batch_size)
      record['base_train_accuracy'] = {k: train_lib.accuracy(model, p, train)
                                       for k, p in params.items()}
    sim_x = {'inputs': data.test_images[:config.similarity_examples]}
    for name in ('AB', 'AA'):
      scores, record[f'seconds_{name}'] = stitch_scores(config, tools, data, params_a,
                                                        params[name[1]], seed)
      mats = {f'{method}_{metric}': st.scores_matrix(s, layers, layers, metric)
              for method, s in scores.items() for metric in st.pairs.METRICS}
      sims = st.layer_similarity(model, params_a, model, params[name[1]], sim_x, layers_a=layers,
                                 layers_b=layers, indices=list(SIMILARITY.values()))
      mats.update({k: sims[v].values for k, v in SIMILARITY.items()})
      record['matrices'][name] = {k: v.tolist() for k, v in mats.items()}
      if config.figures and workdir:
        st.plots.save_heatmaps(
            os.path.join(workdir, f'heatmaps_{name}_seed{seed}.png'),
            {k: v for k, v in mats.items() if 'on_train' not in k and (
                k.endswith(('accuracy', 'ood_ratio')) or k in ('dm_structural', *SIMILARITY))},
            rows=layers, cols=layers,
            title=f'A -> {name[1]} (seed {seed}); rows: source, cols: target')
    per_seed.append(record)
    print(json.dumps({'seed': seed, 'base_accuracy': record['base_accuracy']}), flush=True)
  results = summarize(config, per_seed, layers)
  results['seconds_total'] = time.perf_counter() - t_start
  return results


def summarize(config, per_seed: list, layers: list) -> dict:
  """The acceptance numbers (docs/results/stitching.md) from every seed's matrices."""
  L, n_train = len(layers), config.eval.train_examples
  offset = np.subtract.outer(np.arange(L), np.arange(L))  # i - j
  distant = np.abs(offset) >= config.distant
  # backward: a late layer of A feeds an early layer of B (i - j >= distant); forward: the reverse.
  directions = {'backward': offset >= config.distant, 'forward': offset <= -config.distant}

  def stack(name, key):
    return np.stack([np.asarray(r['matrices'][name][key]) for r in per_seed])  # [S, L, L]

  def diagonal(m):
    return np.diagonal(m, axis1=1, axis2=2)

  def median(m, mask=distant):
    return float(np.median(m[:, mask]))

  r: dict = {}
  aa_base = np.array([s['base_accuracy']['A'] for s in per_seed])
  dm_aa_res, dm_aa_acc, cka_aa = (stack('AA', k) for k in ('dm_structural', 'dm_accuracy', 'cka'))
  r['self_dm_diag_residual_max'] = float(np.max(diagonal(dm_aa_res)))
  r['self_dm_diag_acc_drop_max'] = float(100 * np.max(aa_base[:, None] - diagonal(dm_aa_acc)))
  r['cka_self_rows_diag_max'] = float(np.mean(cka_aa.argmax(axis=2) == np.arange(L)))
  r['dm_self_rows_diag_max'] = float(np.mean(dm_aa_res.argmin(axis=2) == np.arange(L)))
  dm_ood = stack('AB', 'dm_ood_ratio')
  r['dm_ood_ratio_distant_median'] = median(dm_ood)
  for kind in config.tlm.inits:
    ood, acc = stack('AB', f'tlm_{kind}_ood_ratio'), stack('AB', f'tlm_{kind}_accuracy')
    best = np.maximum(acc.max(axis=(1, 2)), stack('AB', 'dm_accuracy').max(axis=(1, 2)))
    gap = 100 * (best[:, None, None] - acc)
    gap_tlm = 100 * (acc.max(axis=(1, 2))[:, None, None] - acc)  # against the best TLM stitch
    p = 'tlm' if kind == 'random' else f'tlm_{kind}'
    r[f'{p}_ood_ratio_distant_median'] = median(ood)
    r[f'{p}_acc_gap_distant_median'] = median(gap)
    r[f'{p}_over_dm_ood_distant_median'] = float(np.median(ood[:, distant] / dm_ood[:, distant]))
    r[f'{p}_acc_gap_to_best_tlm_distant_median'] = median(gap_tlm)
    for direction, mask in directions.items():
      r[f'{p}_acc_gap_{direction}_median'] = median(gap, mask)
      r[f'{p}_acc_gap_to_best_tlm_{direction}_median'] = median(gap_tlm, mask)
      r[f'{p}_over_dm_ood_{direction}_median'] = float(np.median(ood[:, mask] / dm_ood[:, mask]))
    if n_train:
      r[f'{p}_train_acc_distant_median'] = 100 * median(
          stack('AB', f'tlm_{kind}_on_train_accuracy'))
      r[f'{p}_test_acc_distant_median'] = 100 * median(acc)
    aa = stack('AA', f'tlm_{kind}_accuracy')
    r[f'{p}_aa_diag_acc_min'] = float(100 * np.min(diagonal(aa)))
    counts = [st.more_similar_than_itself(100 * m, 0.5) for m in aa]
    r[f'{p}_more_similar_than_itself'] = float(np.mean(counts))
    r[f'{p}_more_similar_than_itself_per_seed'] = counts
  for name, m in (('dm', dm_aa_acc), ('cka', cka_aa)):
    counts = [st.more_similar_than_itself(100 * x, 0.5) for x in m]
    r[f'{name}_more_similar_than_itself'] = float(np.mean(counts))
    r[f'{name}_more_similar_than_itself_per_seed'] = counts
  r['dm_acc_distant_median'] = 100 * median(stack('AB', 'dm_accuracy'))
  r['tlm_acc_distant_median'] = 100 * median(stack('AB', f'tlm_{config.tlm.inits[0]}_accuracy'))
  if n_train:
    r['dm_train_acc_distant_median'] = 100 * median(stack('AB', 'dm_on_train_accuracy'))
    r['base_train_accuracy_mean'] = float(100 * np.mean(
        [[s['base_train_accuracy']['A'], s['base_train_accuracy']['B']] for s in per_seed]))
  r['base_accuracy_mean'] = float(100 * np.mean(
      [[s['base_accuracy']['A'], s['base_accuracy']['B']] for s in per_seed]))
  r.update(seeds=list(config.seeds), layers=layers, per_seed=per_seed)
  return r
