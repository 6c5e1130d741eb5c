"""Experiment: remove canary memorization from a small LM by K-FAC curvature edits.

Merullo et al. (2025), sec. 4.1 at toy scale; see configs/curvature/lm_canaries.py.
Trains the LM (or reuses the checkpoint in WORKDIR/train), estimates K-FAC
factors of the MLP gate/up projections on clean text, chooses the layers and
ρ on canary set A (lowest strict recitation with perplexity ratio within
`max_ppl_ratio`), reports set B, and compares random / inverted / SVD controls
at matched perplexity. Writes results.json and PNG figures.
"""
from __future__ import annotations

import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch import common
from launch.experiments import curvature_canary_data as canary_data
from lossland import data as data_lib
from lossland import parallel, taps
from lossland import train as train_lib
from lossland.curvature import analysis, capture, edit, eigen, factors, layer_views, metrics, plots


def train_lm(config, workdir: str):
  """Trains (or restores from WORKDIR/train) the canary LM; returns (model, params, extras)."""
  corpus = data_lib.load_tfds_text(config.data.source, vocab=config.data.vocab,
                                   data_dir=config.data.data_dir or None)
  cc, t = config.canary, config.train
  canaries = canary_data.make_canaries(cc.num, cc.prefix_len, cc.suffix_len, config.seed)
  num_steps = canary_data.steps_for_repeats(cc.num, cc.repeats, cc.rows)
  batch_fn = canary_data.make_batch_fn(
      corpus.train, canaries, batch_size=t.batch_size, seq_len=t.seq_len, canary_rows=cc.rows,
      repeats=cc.repeats, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  model = common.build_model(config.model, vocab_size=corpus.vocab.size)
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, t.seq_len), jnp.int32))
  mesh = common.build_mesh(config.mesh, t.batch_size)
  schedule = train_lib.warmup_cosine(t.learning_rate, t.warmup_steps, num_steps, t.final_lr)
  optimizer = train_lib.adamw(learning_rate=schedule, b1=t.b1, b2=t.b2,
                              weight_decay=t.weight_decay, grad_clip=t.grad_clip)
  start = time.perf_counter()
  result = train_lib.fit(
      params=params, loss_fn=train_lib.next_token_loss(model.apply), optimizer=optimizer,
      batch_fn=batch_fn, num_steps=num_steps, mesh=mesh, rng=jax.random.key(config.seed + 1),
      data_seed=config.seed, workdir=os.path.join(workdir, 'train'),
      checkpoint_every=config.checkpoint_every, steps_per_block=t.steps_per_block,
      show_progress=config.progress)
  extras = {'corpus': corpus, 'canaries': canaries, 'mesh': mesh, 'num_steps': num_steps,
            'train_seconds': time.perf_counter() - start,
            'resumed_from': result.resumed_from}
  return model, jax.device_get(result.state.params), extras


class Evaluator:
  """Held-out perplexity and canary recitation of edited params (jitted once)."""

  def __init__(self, model, corpus, canaries, config, mesh):
    e, t = config.eval, config.train
    self.canaries = canaries
    self.mesh = mesh
    batches = [data_lib.lm_batch(corpus.validation, i, batch_size=e.ppl_batch_size,
                                 seq_len=t.seq_len, seed=40_000 + config.seed)
               for i in range(e.ppl_batches)]
    self.ppl_batches = [parallel.shard_batch(b, mesh) for b in batches]
    self._nll = jax.jit(lambda p, b: metrics.nll_sum(model.apply, p, b))
    self._decode = jax.jit(
        lambda p, x: metrics.greedy_decode(model.apply, p, x, config.canary.suffix_len))

  def perplexity(self, params) -> float:
    # One batch at a time on multi-device CPU: each call all-reduces over the sharded batch.
    totals = [parallel.settle(self._nll(params, b)) for b in self.ppl_batches]
    nll, count = jax.device_get((sum(t[0] for t in totals), sum(t[1] for t in totals)))
    return metrics.perplexity(float(nll), float(count))

  def recitation(self, params, which: np.ndarray) -> dict[str, float]:
    gen = np.asarray(self._decode(params, self.canaries.prefixes[which]))
    return metrics.recitation_scores(gen, self.canaries.suffixes[which])


def _bisect(evaluate, target_ppl: float, steps: int, lo: float = 0.0, hi: float = 1.0):
  """Finds the knob in [lo, hi] (higher = milder edit) whose perplexity is closest to target."""
  best = None
  for _ in range(steps):
    mid = (lo + hi) / 2
    ppl, params = evaluate(mid)
    if best is None or abs(np.log(ppl / target_ppl)) < abs(np.log(best[1] / target_ppl)):
      best = (mid, ppl, params)
    if ppl > target_ppl:
      lo = mid
    else:
      hi = mid
  return best


def run(config, workdir: str) -> dict:
  model, params, ex = train_lm(config, workdir)
  corpus, canaries, mesh = ex['corpus'], ex['canaries'], ex['mesh']
  cv, t = config.curvature, config.train
  ev = Evaluator(model, corpus, canaries, config, mesh)
  results = {'train_steps': ex['num_steps'], 'train_seconds': ex['train_seconds'],
             'canary_repeats': config.canary.repeats}
  ppl_before = ev.perplexity(params)
  before_a, before_b = ev.recitation(params, canaries.set_a), ev.recitation(params, canaries.set_b)
  results.update(perplexity_before=ppl_before, recitation_strict_before=before_b['strict'],
                 recitation_loose_before=before_b['loose'],
                 recitation_strict_before_set_a=before_a['strict'])

  # K-FAC factors of the candidate MLP projections on clean training text.
  start = time.perf_counter()
  layer_ids = '|'.join(str(i) for i in cv.candidate_layers)
  pattern = rf'block_({layer_ids})/mlp/({cv.projections})'
  factor_batches = [data_lib.lm_batch(corpus.train, i, batch_size=cv.factor_batch_size,
                                      seq_len=t.seq_len, seed=30_000 + config.seed)
                    for i in range(cv.factor_batches)]
  f = factors.estimate_factors(model.apply, params, factor_batches, select=pattern, mesh=mesh,
                               rng=jax.random.key(77), fisher_type=cv.fisher_type)
  bases = eigen.eigenbasis(f)
  results['factor_seconds'] = time.perf_counter() - start
  results['factor_tokens'] = float(next(iter(f.values())).count)
  plots.plot_spectra(bases, os.path.join(workdir, 'spectra.png'))
  plots.plot_kept_mass(bases, os.path.join(workdir, 'kept_mass.png'), cv.rhos)

  def layer_names(blocks):
    return [n for n in bases if int(n.split('/')[0].split('_')[1]) in blocks]

  # Choose layers and rho on set A.
  cands = [c for k in range(1, cv.max_layers + 1) for c in itertools.combinations(
      cv.candidate_layers, k) if list(c) == list(range(c[0], c[0] + k))]
  sweep_a = []
  for blocks in cands:
    sub = {n: bases[n] for n in layer_names(blocks)}
    for rho in cv.rhos:
      if rho >= 1.0:
        continue
      edited = edit.curvature_edit(params, sub, rho)
      ppl = ev.perplexity(edited)
      strict = ev.recitation(edited, canaries.set_a)['strict']
      sweep_a.append({'blocks': list(blocks), 'rho': rho, 'ppl_ratio': ppl / ppl_before,
                      'strict_a': strict})
      print(f'selection: blocks {list(blocks)} rho {rho}: perplexity ratio '
            f'{ppl / ppl_before:.4f}, strict recitation (set A) {strict:.4f}', flush=True)
  ok = [s for s in sweep_a if s['ppl_ratio'] <= cv.max_ppl_ratio] or sweep_a
  choice = min(ok, key=lambda s: (s['strict_a'], s['ppl_ratio']))
  chosen = {n: bases[n] for n in layer_names(choice['blocks'])}
  rho = choice['rho']
  results.update(rho=rho, layers=list(chosen), selection_sweep=sweep_a)

  edited = edit.curvature_edit(params, chosen, rho)
  after_b = ev.recitation(edited, canaries.set_b)
  ppl_after = ev.perplexity(edited)
  results.update(recitation_strict_after=after_b['strict'], recitation_loose_after=after_b['loose'],
                 recitation_levenshtein_after=after_b['levenshtein'],
                 recitation_levenshtein_before=before_b['levenshtein'],
                 perplexity_after=ppl_after, perplexity_ratio=ppl_after / ppl_before)

  # rho sweep on set B for the chosen layers (K-FAC and EK-FAC).
  sweep = {'kfac_strict': [], 'kfac_ppl': []}
  masses = None
  if cv.ekfac:
    masses = eigen.estimate_eigencorrection(model.apply, params, chosen, factor_batches,
                                            mesh=mesh, rng=jax.random.key(78),
                                            fisher_type=cv.fisher_type)
    sweep.update(ekfac_strict=[], ekfac_ppl=[])
  for r in cv.rhos:
    p = edit.curvature_edit(params, chosen, r)
    sweep['kfac_strict'].append(ev.recitation(p, canaries.set_b)['strict'])
    sweep['kfac_ppl'].append(ev.perplexity(p))
    if masses is not None:
      p = edit.curvature_edit(params, chosen, r, masses)
      sweep['ekfac_strict'].append(ev.recitation(p, canaries.set_b)['strict'])
      sweep['ekfac_ppl'].append(ev.perplexity(p))
  results['rho_sweep'] = {'rhos': list(cv.rhos), **sweep}
  plots.plot_sweep(cv.rhos, {k: v for k, v in sweep.items() if k.endswith('strict')},
                   os.path.join(workdir, 'rho_sweep_strict.png'), 'strict recitation, set B')
  plots.plot_sweep(cv.rhos, {k: v for k, v in sweep.items() if k.endswith('ppl')},
                   os.path.join(workdir, 'rho_sweep_ppl.png'), 'held-out perplexity')
  if masses is not None:
    kmasks = edit.curvature_masks(chosen, rho)
    emasks = edit.curvature_masks(chosen, rho, masses)
    ek = edit.curvature_edit(params, chosen, rho, masses)
    results.update(
        ekfac_strict_after=ev.recitation(ek, canaries.set_b)['strict'],
        ekfac_perplexity_after=ev.perplexity(ek),
        ekfac_rank_spearman={n: analysis.spearman(eigen.pair_mass(b), masses[n])
                             for n, b in chosen.items()},
        ekfac_kept_jaccard={n: analysis.jaccard(kmasks[n], emasks[n]) for n in chosen})

  # Controls at matched perplexity (and at the curvature edit's kept count).
  kept = {n: int(m.sum()) for n, m in edit.curvature_masks(chosen, rho).items()}
  total = {n: b.shape[0] * b.shape[1] for n, b in chosen.items()}
  results['kept_fraction'] = {n: kept[n] / total[n] for n in chosen}
  rng = jax.random.key(99)
  for kind in ('random', 'inverted'):
    p = edit.masked_edit(params, chosen, edit.control_masks(kind, chosen, kept, rng=rng))
    results[f'control_{kind}_strict_same_count'] = ev.recitation(p, canaries.set_b)['strict']
    results[f'control_{kind}_perplexity_same_count'] = ev.perplexity(p)

  def control(kind, frac):
    if kind == 'svd':
      ranks = {n: max(1, int(round(frac * min(b.shape)))) for n, b in chosen.items()}
      p = edit.svd_edit(params, {n: b.view for n, b in chosen.items()}, ranks)
    elif kind == 'inverted':
      # Dropping even a few top-mass pairs costs a lot, so search the number of dropped
      # pairs on a log scale: knob 1 drops 1 pair per layer, knob 0 drops all of them.
      counts = {n: total[n] - max(1, int(round(total[n] ** (1.0 - frac)))) for n in chosen}
      p = edit.masked_edit(params, chosen, edit.control_masks(kind, chosen, counts, rng=rng))
    else:
      counts = {n: max(1, int(round(frac * total[n]))) for n in chosen}
      p = edit.masked_edit(params, chosen, edit.control_masks(kind, chosen, counts, rng=rng))
    return ev.perplexity(p), p

  for kind in ('random', 'inverted', 'svd'):
    frac, ppl, p = _bisect(lambda x, kind=kind: control(kind, x), ppl_after,
                           config.eval.bisect_steps)
    rec = ev.recitation(p, canaries.set_b)
    results.update({f'control_{kind}_strict': rec['strict'], f'control_{kind}_loose': rec['loose'],
                    f'control_{kind}_perplexity': ppl, f'control_{kind}_knob': frac})
    print(f'control {kind}: perplexity {ppl:.4f} (target {ppl_after:.4f}), strict '
          f'{rec["strict"]:.4f}', flush=True)

  # Activation ratio per band: canary suffix positions vs clean text positions.
  mem_inputs = canaries.tokens[canaries.set_b][:, :-1]
  clean_inputs = factor_batches[0]['inputs'][:, :mem_inputs.shape[1]]
  _, mem_acts = taps.capture(model.apply, params, jnp.asarray(mem_inputs), select=list(chosen))
  _, clean_acts = taps.capture(model.apply, params, jnp.asarray(clean_inputs),
                               select=list(chosen))
  plen = config.canary.prefix_len
  ratios = {}
  for n, b in chosen.items():
    mem = layer_views.input_rows(b.view, taps.join_calls(mem_acts.inputs[n])[:, plen - 1:])
    clean = layer_views.input_rows(b.view, taps.join_calls(clean_acts.inputs[n]))
    ratios[n] = [float(r) for r in analysis.activation_ratio(
        capture.layer_matrix(params, b.view), b, mem, clean)]
  results['band_activation_ratio'] = {'bands': list(analysis.BAND_NAMES), **ratios}
  plots.plot_bands(ratios, analysis.BAND_NAMES, os.path.join(workdir, 'band_ratio.png'))

  strict_ctrl = min(results['control_random_strict'], results['control_inverted_strict'])
  results['acceptance'] = {
      'strict_before_ge_0.9': results['recitation_strict_before'] >= 0.9,
      'strict_after_le_0.2': results['recitation_strict_after'] <= 0.2,
      'loose_after_le_0.3': results['recitation_loose_after'] <= 0.3,
      'ppl_ratio_le_1.25': results['perplexity_ratio'] <= 1.25,
      'half_of_random_and_inverted': results['recitation_strict_after'] <= 0.5 * strict_ctrl,
  }
  return results
