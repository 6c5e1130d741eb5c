"""Experiment: the K-FAC curvature edit on a Hugging Face checkpoint folder.

Merullo et al. (2025), sec. 3-4 applied to a pretrained model; see
configs/curvature/hf_edit.py. Writes results.json (perplexity and recitation
before and after) and WORKDIR/edited/ (the edited model, same format).
The factor and held-out windows use the same seeds as `lm_canaries`, so a
model trained there and exported (`export_hf`) gives that experiment's numbers.
"""
from __future__ import annotations

import os
import time

import jax

from launch import atomic, common
from lossland import data as data_lib
from lossland.curvature import controls, edit, eigen, evaluate, factors, plots
from lossland.interop import hf, text as text_lib


def load_data(config, tokenizer):
  """(train tokens, held-out tokens, token pairs or None) from the configured files."""
  d = config.data
  if not d.path:
    raise ValueError('config.data.path is empty; pass --config.data.path=TEXT (a UTF-8 file)')
  tokens = text_lib.encode_text(text_lib.read_text(d.path), tokenizer)
  if d.heldout_path:
    train, heldout = tokens, text_lib.encode_text(text_lib.read_text(d.heldout_path), tokenizer)
  else:
    train, heldout = text_lib.split_tokens(tokens, d.heldout_fraction)
  pairs = None
  if d.recitation_path:
    pairs = text_lib.encode_pairs(data_lib.read_recitation_pairs(d.recitation_path), tokenizer)
  return train, heldout, pairs


def dtype_of(name: str, key: str):
  if name not in common.DTYPES:
    raise ValueError(f'config.model.{key}={name!r} is not one of {sorted(common.DTYPES)}')
  return common.DTYPES[name]


def save_dtype(config, hf_config):
  """config.model.save_dtype, else the checkpoint's own dtype (float32 when it names none)."""
  if config.model.save_dtype:
    return dtype_of(config.model.save_dtype, 'save_dtype')
  name = hf_config.get('torch_dtype') or hf_config.get('dtype')
  return common.DTYPES.get(name, common.DTYPES['float32'])


def run(config, workdir: str) -> dict:
  if not config.model.path:
    raise ValueError('config.model.path is empty; pass --config.model.path=DIR (a Hugging Face '
                     'folder with config.json, safetensors and tokenizer.json)')
  hf.read_config(config.model.path)  # a clear error for a missing folder or config.json
  if not os.path.isfile(os.path.join(config.model.path, hf.TOKENIZER_FILE)):
    raise FileNotFoundError(f'{config.model.path} has no {hf.TOKENIZER_FILE}; hf_edit tokenizes '
                            'the text and the recitation pairs with the folder\'s tokenizer')
  cv, seq = config.curvature, config.data.seq_len
  eigen.check_eigh_method(cv.eigh)  # before loading the model and estimating the factors
  mesh = common.build_mesh(config.mesh, cv.factor_batch_size)
  ckpt = hf.load(config.model.path, dtype=dtype_of(config.model.dtype, 'dtype'), tokenizer=True,
                 mesh=mesh, param_rules=common.param_rules(config))
  train, heldout, pairs = load_data(config, ckpt.tokenizer)
  ev = evaluate.LMEvaluator(ckpt.model.apply, evaluate.heldout_batches(
      heldout, config.eval.ppl_batches, config.eval.ppl_batch_size, seq, config.seed), mesh=mesh)
  start = time.perf_counter()
  batches = evaluate.factor_batches(train, cv.factor_batches, cv.factor_batch_size, seq,
                                    config.seed)
  f = factors.estimate_factors(ckpt.model.apply, ckpt.params, batches, select=cv.layers,
                               mesh=mesh, rng=jax.random.key(77 + config.seed),
                               fisher_type=cv.fisher_type)
  bases = eigen.eigenbasis(f, cv.eigh)
  masses = None
  if cv.ekfac:
    masses = eigen.estimate_eigencorrection(ckpt.model.apply, ckpt.params, bases, batches,
                                            mesh=mesh, rng=jax.random.key(78 + config.seed),
                                            fisher_type=cv.fisher_type)
  edited = edit.curvature_edit(ckpt.params, bases, cv.rho, masses)
  kept = controls.kept_counts(bases, cv.rho, masses)
  results = {'layers': list(bases), 'rho': cv.rho, 'method': 'ekfac' if cv.ekfac else 'kfac',
             'factor_seconds': time.perf_counter() - start, 'factor_tokens': float(
                 next(iter(f.values())).count), 'train_tokens': len(train),
             'heldout_tokens': len(heldout),
             'kept_fraction': {n: kept[n] / v for n, v in controls.pair_counts(bases).items()}}
  for when, p in (('before', ckpt.params), ('after', edited)):
    results[f'perplexity_{when}'] = ev.perplexity(p)
    if pairs is not None:
      rec = ev.recitation_of_pairs(p, pairs)
      results.update({f'recitation_{k}_{when}': getattr(rec, k)
                      for k in ('strict', 'loose', 'levenshtein')}, recitation_pairs=rec.count)
  results['perplexity_ratio'] = results['perplexity_after'] / results['perplexity_before']
  out = jax.tree.map(lambda x: x.astype(save_dtype(config, ckpt.hf_config)),
                     jax.device_get(edited))
  # Each output is written under a temporary name and, under launch.analyze, moved into place
  # with results.json once the run returns: a killed re-run leaves the old outputs or the new.
  edited_dir = os.path.join(workdir, 'edited')
  with atomic.staged(edited_dir) as tmp:
    hf.save(tmp, out, ckpt.config, base_config=ckpt.hf_config, tokenizer_from=config.model.path)
  results['edited_dir'] = edited_dir
  with atomic.staged(os.path.join(workdir, 'spectra.png')) as tmp:
    plots.plot_spectra(bases, tmp)
  with atomic.staged(os.path.join(workdir, 'kept_mass.png')) as tmp:
    plots.plot_kept_mass(bases, tmp, [cv.rho])
  return results
