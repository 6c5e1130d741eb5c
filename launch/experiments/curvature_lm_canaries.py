"""Experiment: remove canary memorization from a small LM by K-FAC curvature edits.

Merullo et al. (2025), sec. 4.1 at toy scale; see configs/curvature/lm_canaries.py.
Trains the LM (or reuses the checkpoint in WORKDIR/train), estimates K-FAC
factors of the MLP gate/up projections on clean text, chooses the layers and
ρ on canary set A (`curvature.selection`), reports set B, and compares random /
inverted / SVD controls at matched perplexity (`curvature.controls`). Writes
results.json and PNG figures; with `export_hf`, also the trained LM as a
Hugging Face folder and its data as files for `configs/curvature/hf_edit.py`.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from launch import atomic, common
from lossland import data as data_lib
from lossland import train as train_lib
from lossland.curvature import (analysis, controls, edit, eigen, evaluate, factors, plots,
                                selection)


def train_lm(config, workdir: str):
  """Trains (or restores from WORKDIR/train) the canary LM; returns (model, params, extras)."""
  corpus = data_lib.load_tfds_text(config.data.source, vocab=config.data.vocab,
                                   data_dir=config.data.data_dir or None)
  cc, t = config.canary, config.train
  canaries = data_lib.make_canaries(cc.num, cc.prefix_len, cc.suffix_len, config.seed)
  num_steps = data_lib.steps_for_repeats(cc.num, cc.repeats, cc.rows)
  batch_fn = data_lib.canaries.make_batch_fn(
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
            'train_seconds': time.perf_counter() - start}
  return model, jax.device_get(result.state.params), extras


def export_hf(workdir: str, model, params, corpus, canaries) -> dict:
  """The trained LM as a Llama folder with a byte tokenizer, and its data as files."""
  from lossland import models  # pylint: disable=import-outside-toplevel
  from lossland.interop import hf, tiny  # pylint: disable=import-outside-toplevel
  out = {'hf_model': os.path.join(workdir, 'hf_model'), 'hf_data': os.path.join(workdir, 'hf_data')}
  # Each folder is written whole (launch.atomic): under launch.analyze both move into place
  # with results.json, so a killed re-run leaves the old folders or the new ones.
  with atomic.staged(out['hf_model']) as folder:
    hf.save(folder, params, models.config_from_transformer_lm(model))
    tiny.byte_tokenizer().save(os.path.join(folder, hf.TOKENIZER_FILE))
  with atomic.staged(out['hf_data']) as folder:
    os.makedirs(folder)
    for name, tokens in (('train.txt', corpus.train), ('heldout.txt', corpus.validation)):
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(bytes(tokens.astype('uint8').tolist()))
    text = lambda ids: bytes(ids.astype('uint8').tolist()).decode('ascii')
    data_lib.write_recitation_pairs(
        os.path.join(folder, 'canaries_b.jsonl'),
        [(text(p), text(s)) for p, s in zip(canaries.prefixes[canaries.set_b],
                                            canaries.suffixes[canaries.set_b])])
  return out


def write_figures(workdir: str, bases, rhos, sweep: dict, ratios: dict) -> None:
  plots.plot_spectra(bases, os.path.join(workdir, 'spectra.png'))
  plots.plot_kept_mass(bases, os.path.join(workdir, 'kept_mass.png'), rhos)
  for kind, label in (('strict', 'strict recitation, set B'), ('ppl', 'held-out perplexity')):
    plots.plot_sweep(rhos, {k: v for k, v in sweep.items() if k.endswith(kind)},
                     os.path.join(workdir, f'rho_sweep_{kind}.png'), label)
  plots.plot_bands(ratios, analysis.BAND_NAMES, os.path.join(workdir, 'band_ratio.png'))


def run(config, workdir: str) -> dict:
  model, params, ex = train_lm(config, workdir)
  corpus, can, mesh = ex['corpus'], ex['canaries'], ex['mesh']
  cv, t, e = config.curvature, config.train, config.eval
  set_a, set_b = (can.prefixes[can.set_a], can.suffixes[can.set_a]), (can.prefixes[can.set_b],
                                                                       can.suffixes[can.set_b])
  ev = evaluate.LMEvaluator(model.apply, evaluate.heldout_batches(
      corpus.validation, e.ppl_batches, e.ppl_batch_size, t.seq_len, config.seed), mesh=mesh)
  ppl_before, before_a, before_b = ev.perplexity(params), ev.recitation(params, *set_a), \
      ev.recitation(params, *set_b)
  start = time.perf_counter()
  batches = evaluate.factor_batches(corpus.train, cv.factor_batches, cv.factor_batch_size,
                                    t.seq_len, config.seed)
  layer_ids = '|'.join(str(i) for i in cv.candidate_layers)
  f = factors.estimate_factors(
      model.apply, params, batches, select=rf'block_({layer_ids})/mlp/({cv.projections})',
      mesh=mesh, rng=jax.random.key(77), fisher_type=cv.fisher_type)
  bases = eigen.eigenbasis(f)
  results = {'train_steps': ex['num_steps'], 'train_seconds': ex['train_seconds'],
             'canary_repeats': config.canary.repeats, 'perplexity_before': ppl_before,
             'recitation_strict_before': before_b.strict, 'recitation_loose_before': before_b.loose,
             'recitation_levenshtein_before': before_b.levenshtein,
             'recitation_strict_before_set_a': before_a.strict,
             'factor_seconds': time.perf_counter() - start,
             'factor_tokens': float(next(iter(f.values())).count)}
  choice = selection.select_layers_and_rho(
      params, bases, ev, *set_a, candidate_blocks=cv.candidate_layers, max_blocks=cv.max_layers,
      rhos=cv.rhos, max_ppl_ratio=cv.max_ppl_ratio, ppl_before=ppl_before,
      log=lambda s: print(s, flush=True))
  chosen, rho = {n: bases[n] for n in choice.layers}, choice.rho
  edited = edit.curvature_edit(params, chosen, rho)
  after_b, ppl_after = ev.recitation(edited, *set_b), ev.perplexity(edited)
  kept = controls.kept_counts(chosen, rho)
  results.update(rho=rho, layers=list(choice.layers),
                 selection_sweep=[s.as_dict() for s in choice.sweep],
                 recitation_strict_after=after_b.strict, recitation_loose_after=after_b.loose,
                 recitation_levenshtein_after=after_b.levenshtein, perplexity_after=ppl_after,
                 perplexity_ratio=ppl_after / ppl_before,
                 kept_fraction={n: kept[n] / v for n, v in controls.pair_counts(chosen).items()})

  sweeps = {'kfac': selection.rho_sweep(params, chosen, ev, *set_b, cv.rhos)}
  if cv.ekfac:
    masses = eigen.estimate_eigencorrection(model.apply, params, chosen, batches, mesh=mesh,
                                            rng=jax.random.key(78), fisher_type=cv.fisher_type)
    sweeps['ekfac'] = selection.rho_sweep(params, chosen, ev, *set_b, cv.rhos, masses)
    ek = edit.curvature_edit(params, chosen, rho, masses)
    spearman, jaccard = analysis.ranking_agreement(chosen, masses, rho)
    results.update(ekfac_strict_after=ev.recitation(ek, *set_b).strict,
                   ekfac_perplexity_after=ev.perplexity(ek), ekfac_rank_spearman=spearman,
                   ekfac_kept_jaccard=jaccard)
  results['rho_sweep'] = {'rhos': list(cv.rhos), **{f'{k}_strict': list(s.strict) for k, s in
                                                    sweeps.items()},
                          **{f'{k}_ppl': list(s.perplexity) for k, s in sweeps.items()}}

  rng = jax.random.key(99)
  for kind, p in controls.same_count_controls(params, chosen, kept, rng=rng).items():
    results[f'control_{kind}_strict_same_count'] = ev.recitation(p, *set_b).strict
    results[f'control_{kind}_perplexity_same_count'] = ev.perplexity(p)
  for kind, c in controls.matched_controls(params, chosen, ev, ppl_after, *set_b,
                                           steps=e.bisect_steps, rng=rng,
                                           log=lambda s: print(s, flush=True)).items():
    results.update({f'control_{kind}_strict': c.recitation.strict, f'control_{kind}_knob': c.knob,
                    f'control_{kind}_loose': c.recitation.loose,
                    f'control_{kind}_perplexity': c.perplexity})
  ratios = analysis.band_activation_ratios(
      model.apply, params, chosen, can.tokens[can.set_b][:, :-1],
      batches[0]['inputs'][:, :can.tokens.shape[1] - 1], memorized_from=can.prefix_len - 1)
  results['band_activation_ratio'] = {'bands': list(analysis.BAND_NAMES), **ratios}

  write_figures(workdir, bases, cv.rhos, results['rho_sweep'], ratios)
  if config.get('export_hf', False):
    results.update(export_hf(workdir, model, params, corpus, can))
  strict_ctrl = min(results['control_random_strict'], results['control_inverted_strict'])
  results['acceptance'] = {
      'strict_before_ge_0.9': results['recitation_strict_before'] >= 0.9,
      'strict_after_le_0.2': results['recitation_strict_after'] <= 0.2,
      'loose_after_le_0.3': results['recitation_loose_after'] <= 0.3,
      'ppl_ratio_le_1.25': results['perplexity_ratio'] <= 1.25,
      'half_of_random_and_inverted': results['recitation_strict_after'] <= 0.5 * strict_ctrl,
  }
  return results
