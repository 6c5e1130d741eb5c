"""Stitching experiment (Balogh & Jelasity, AAAI 2025) on digit pairs; see
configs/stitching/digit_pairs.py. `run(config, workdir) -> results dict`."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from launch import common
from lossland import parallel
from lossland import stitching as st
from lossland import train as train_lib
from lossland.data import epoch_indices
from lossland.models import MLP


def _batches(x: np.ndarray, batch_size: int, labels: np.ndarray | None = None):
  n = len(x) // batch_size * batch_size
  if n == 0:
    raise SystemExit(f'batch size {batch_size} exceeds the {len(x)} examples')
  for i in range(0, n, batch_size):
    if labels is None:
      yield x[i:i + batch_size]
    else:
      yield x[i:i + batch_size], labels[i:i + batch_size]


def build_model(config, num_classes: int) -> MLP:
  return MLP(features=tuple(config.model.features), num_classes=num_classes,
             residual=config.model.get('residual', False))


def train_model(config, data, seed: int, mesh):
  t = config.train
  model = build_model(config, data.num_classes)
  params = model.init(jax.random.key(seed), data.train_images[:1])

  def batch_fn(step):
    idx = epoch_indices(step, batch_size=t.batch_size, num_examples=len(data.train_labels),
                        seed=seed)
    return {'inputs': data.train_images[idx], 'labels': data.train_labels[idx]}

  optimizer = train_lib.adamw(
      learning_rate=train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, t.num_steps,
                                            t.final_lr),
      weight_decay=t.weight_decay)
  result = train_lib.fit(params=params, loss_fn=train_lib.classification_loss(model.apply),
                         optimizer=optimizer, batch_fn=batch_fn, num_steps=t.num_steps,
                         mesh=mesh, rng=jax.random.key(seed), data_seed=seed,
                         steps_per_block=t.steps_per_block, show_progress=False)
  return model, result.state.params


def accuracy(model, params, x, y, batch_size):
  fn = jax.jit(model.apply)
  correct = sum(int((np.asarray(fn(params, bx)).argmax(-1) == by).sum())
                for bx, by in _batches(x, batch_size, y))
  return correct / (len(x) // batch_size * batch_size)


class Tools:
  """The jitted passes, built once and reused for A->B, A->A and every seed (same architecture)."""

  def __init__(self, config, model, layers, mesh):
    self.pairs = [(a, b) for a in layers for b in layers]
    self.dm_statistics = st.make_dm_statistics(model, model, layers_a=layers, layers_b=layers,
                                               mesh=mesh)
    self.evaluate = st.make_evaluator(model, model, self.pairs, mesh=mesh)
    tc = config.tlm
    self.tlm_init, self.tlm_block = st.make_tlm_trainer(
        model, model, self.pairs, st.tlm_optimizer(tc.learning_rate, tc.weight_decay), mesh=mesh)


def stitch_matrices(config, data, tools: Tools, params_a, params_b, layers, seed: int) -> dict:
  """All L x L stitches A -> B: DM and TLM (per init), each with accuracy / structural / OOD."""
  pairs = tools.pairs
  t0 = time.perf_counter()
  stats, layout = tools.dm_statistics(params_a, params_b,
                                      _batches(data.train_images, config.dm.batch_size))
  dm = st.solve_all(stats, layout, pairs, ridge=config.dm.ridge)
  gaussians = {b: st.gaussian(*st.target_moments(stats, layout, b)) for b in layers}
  dm_seconds = time.perf_counter() - t0

  n_train = config.eval.train_examples

  def evaluate_all(stitches, images=data.test_images, labels=data.test_labels):
    totals = None
    for bx, by in _batches(images, config.eval.batch_size, labels):
      totals = parallel.settle(
          tools.evaluate(totals, params_a, params_b, stitches, gaussians, bx, by))
    return tools.evaluate.summarize(totals)

  def evaluate_on_train(stitches):  # the same stitches on training pairs: the generalization gap
    return evaluate_all(stitches, data.train_images[:n_train], data.train_labels[:n_train])

  out = {'dm': evaluate_all(dm)}
  if n_train:
    out['dm_on_train'] = evaluate_on_train(dm)
  tc = config.tlm
  t1 = time.perf_counter()
  for kind in tc.inits:
    if kind == 'direct':
      stitches = jax.tree.map(lambda v: v, dm)
    else:
      rng = jax.random.key(1000 + seed)
      stitches = {}
      for i, (a, b) in enumerate(pairs):
        d_in, d_out = dm[st.pair_key(a, b)]['w'].shape
        stitches[st.pair_key(a, b)] = st.init_stitch(jax.random.fold_in(rng, i), d_in, d_out,
                                                     kind)
    opt_state = tools.tlm_init(stitches)
    n = len(data.train_labels)
    for start in range(0, tc.num_steps, tc.steps_per_block):
      steps = range(start, min(start + tc.steps_per_block, tc.num_steps))
      idx = np.stack([epoch_indices(s, batch_size=tc.batch_size, num_examples=n, seed=7 + seed)
                      for s in steps])
      stitches, opt_state, _ = tools.tlm_block(stitches, opt_state, params_a, params_b,
                                               data.train_images[idx], data.train_labels[idx])
    out[f'tlm_{kind}'] = evaluate_all(stitches)
    if n_train:
      out[f'tlm_{kind}_on_train'] = evaluate_on_train(stitches)
  out['seconds'] = {'dm_fit': dm_seconds, 'tlm_train': time.perf_counter() - t1}
  return out


def to_matrix(per_pair: dict, layers, metric: str) -> np.ndarray:
  return np.array([[per_pair[st.pair_key(a, b)][metric] for b in layers] for a in layers])


def similarity(acts_a: dict, acts_b: dict, layers) -> dict:
  f = lambda acts: {k: np.asarray(v).reshape(len(v), -1) for k, v in acts.items()}
  acts_a, acts_b = f(acts_a), f(acts_b)
  # Called on concrete arrays (not under jit), so non-finite activations raise a named error.
  return {name: np.array([[float(index(acts_a[a], acts_b[b])) for b in layers] for a in layers])
          for name, index in (('cka', st.linear_cka), ('pwcca', st.pwcca),
                              ('procrustes', st.procrustes))}


def more_similar_than_itself(m: np.ndarray, margin: float) -> int:
  """Off-diagonal entries M[i, j] > M[j, j] + margin (source i beats target j's own layer)."""
  diag = np.diag(m)
  off = ~np.eye(len(m), dtype=bool)
  return int(((m > diag[None, :] + margin) & off).sum())


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  data = st.load_digit_pairs(config.data.num_train, config.data.num_test,
                             data_dir=config.data.data_dir or None)
  mesh = common.build_mesh(config.mesh, config.train.batch_size)
  layers = build_model(config, data.num_classes).hidden_layers
  n_train = config.eval.train_examples  # also score on this many training pairs (0: skip)
  L = len(layers)
  dist = np.abs(np.subtract.outer(np.arange(L), np.arange(L)))
  distant = dist >= config.distant
  # backward: a late layer of A feeds an early layer of B (i - j >= distant); forward: the reverse.
  backward = np.subtract.outer(np.arange(L), np.arange(L)) >= config.distant
  forward = np.subtract.outer(np.arange(L), np.arange(L)) <= -config.distant
  per_seed = []
  tools = None
  for seed in config.seeds:
    model_a, params_a = train_model(config, data, 2 * seed, mesh)
    model_b, params_b = train_model(config, data, 2 * seed + 1, mesh)
    base = {'A': accuracy(model_a, params_a, data.test_images, data.test_labels,
                          config.eval.batch_size),
            'B': accuracy(model_b, params_b, data.test_images, data.test_labels,
                          config.eval.batch_size)}
    if tools is None:
      tools = Tools(config, model_a, layers, mesh)
    record = {'seed': seed, 'base_accuracy': base, 'matrices': {}}
    if n_train:
      record['base_train_accuracy'] = {
          name: accuracy(m, p, data.train_images[:n_train], data.train_labels[:n_train],
                         config.eval.batch_size)
          for name, (m, p) in {'A': (model_a, params_a), 'B': (model_b, params_b)}.items()}
    sim_x = data.test_images[:config.similarity_examples]
    _, acts_a = jax.jit(lambda p, x: st.capture(model_a, p, x, layers))(params_a, sim_x)
    _, acts_b = jax.jit(lambda p, x: st.capture(model_b, p, x, layers))(params_b, sim_x)
    for name, (mb, pb, acts_t) in {'AB': (model_b, params_b, acts_b),
                                   'AA': (model_a, params_a, acts_a)}.items():
      res = stitch_matrices(config, data, tools, params_a, pb, layers, seed)
      mats = {}
      for method in [k for k in res if k != 'seconds']:
        for metric in ('accuracy', 'structural', 'ood_ratio'):
          mats[f'{method}_{metric}'] = to_matrix(res[method], layers, metric)
      mats.update(similarity(acts_a, acts_t, layers))
      record['matrices'][name] = {k: v.tolist() for k, v in mats.items()}
      record[f'seconds_{name}'] = res['seconds']
      if config.figures and workdir:
        st.plots.save_heatmaps(
            os.path.join(workdir, f'heatmaps_{name}_seed{seed}.png'),
            {k: v for k, v in mats.items() if 'on_train' not in k and (
                k.endswith(('accuracy', 'ood_ratio')) or
                k in ('dm_structural', 'cka', 'pwcca', 'procrustes'))},
            rows=layers, cols=layers, title=f'A -> {name[1]} (seed {seed}); rows: source, '
            'cols: target')
    per_seed.append(record)
    print(json.dumps({'seed': seed, 'base_accuracy': base}), flush=True)

  # ---- summary metrics
  def stack(name, key):
    return np.stack([np.asarray(r['matrices'][name][key]) for r in per_seed])  # [S, L, L]

  results: dict = {}
  aa_base = np.array([r['base_accuracy']['A'] for r in per_seed])
  dm_aa_res = stack('AA', 'dm_structural')
  dm_aa_acc = stack('AA', 'dm_accuracy')
  results['self_dm_diag_residual_max'] = float(np.max(np.diagonal(dm_aa_res, axis1=1, axis2=2)))
  results['self_dm_diag_acc_drop_max'] = float(100 * np.max(
      aa_base[:, None] - np.diagonal(dm_aa_acc, axis1=1, axis2=2)))
  cka_aa = stack('AA', 'cka')
  results['cka_self_rows_diag_max'] = float(np.mean(cka_aa.argmax(axis=2) == np.arange(L)))
  results['dm_self_rows_diag_max'] = float(np.mean(dm_aa_res.argmin(axis=2) == np.arange(L)))
  dm_ood = stack('AB', 'dm_ood_ratio')
  results['dm_ood_ratio_distant_median'] = float(np.median(dm_ood[:, distant]))
  for kind in config.tlm.inits:
    ood = stack('AB', f'tlm_{kind}_ood_ratio')
    acc = stack('AB', f'tlm_{kind}_accuracy')
    best = np.maximum(acc.max(axis=(1, 2)), stack('AB', 'dm_accuracy').max(axis=(1, 2)))
    gap = 100 * (best[:, None, None] - acc)
    prefix = 'tlm' if kind == 'random' else f'tlm_{kind}'
    results[f'{prefix}_ood_ratio_distant_median'] = float(np.median(ood[:, distant]))
    results[f'{prefix}_acc_gap_distant_median'] = float(np.median(gap[:, distant]))
    results[f'{prefix}_over_dm_ood_distant_median'] = float(
        np.median(ood[:, distant] / dm_ood[:, distant]))
    # The same gap measured against the best stitch of this TLM matrix only.
    gap_tlm = 100 * (acc.max(axis=(1, 2))[:, None, None] - acc)
    results[f'{prefix}_acc_gap_to_best_tlm_distant_median'] = float(np.median(gap_tlm[:, distant]))
    for direction, mask in (('backward', backward), ('forward', forward)):
      results[f'{prefix}_acc_gap_{direction}_median'] = float(np.median(gap[:, mask]))
      results[f'{prefix}_acc_gap_to_best_tlm_{direction}_median'] = float(
          np.median(gap_tlm[:, mask]))
      results[f'{prefix}_over_dm_ood_{direction}_median'] = float(
          np.median(ood[:, mask] / dm_ood[:, mask]))
    if n_train:
      on_train = stack('AB', f'tlm_{kind}_on_train_accuracy')
      results[f'{prefix}_train_acc_distant_median'] = float(100 * np.median(on_train[:, distant]))
      results[f'{prefix}_test_acc_distant_median'] = float(100 * np.median(acc[:, distant]))
    results[f'{prefix}_aa_diag_acc_min'] = float(100 * np.min(np.diagonal(
        stack('AA', f'tlm_{kind}_accuracy'), axis1=1, axis2=2)))
    counts = [more_similar_than_itself(100 * m, 0.5) for m in stack('AA', f'tlm_{kind}_accuracy')]
    results[f'{prefix}_more_similar_than_itself'] = float(np.mean(counts))
    results[f'{prefix}_more_similar_than_itself_per_seed'] = counts
  counts = [more_similar_than_itself(100 * m, 0.5) for m in dm_aa_acc]
  results['dm_more_similar_than_itself'] = float(np.mean(counts))
  results['dm_more_similar_than_itself_per_seed'] = counts
  counts = [more_similar_than_itself(100 * m, 0.5) for m in cka_aa]
  results['cka_more_similar_than_itself'] = float(np.mean(counts))
  results['cka_more_similar_than_itself_per_seed'] = counts
  results['dm_acc_distant_median'] = float(100 * np.median(stack('AB', 'dm_accuracy')[:, distant]))
  results['tlm_acc_distant_median'] = float(
      100 * np.median(stack('AB', f'tlm_{config.tlm.inits[0]}_accuracy')[:, distant]))
  if n_train:
    results['dm_train_acc_distant_median'] = float(
        100 * np.median(stack('AB', 'dm_on_train_accuracy')[:, distant]))
    results['base_train_accuracy_mean'] = float(100 * np.mean(
        [[r['base_train_accuracy']['A'], r['base_train_accuracy']['B']] for r in per_seed]))
  results['base_accuracy_mean'] = float(100 * np.mean(
      [[r['base_accuracy']['A'], r['base_accuracy']['B']] for r in per_seed]))
  results['seeds'] = list(config.seeds)
  results['layers'] = layers
  results['per_seed'] = per_seed
  results['seconds_total'] = time.perf_counter() - t_start
  return results
