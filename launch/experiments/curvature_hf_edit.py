"""Experiment: the K-FAC curvature edit on a pretrained LM (Hugging Face folder, GGUF file or name).

Merullo et al. (2025), sec. 3-4 applied to a pretrained model; see
configs/curvature/hf_edit.py and configs/curvature/real_lm_memorization.py.

1. The model: `config.model.path` is a Hugging Face folder, a .gguf file or a
   packaged model name (`lossland.interop.packaged`).
2. The memorized set: JSONL (prefix, suffix) pairs (`data.recitation_path`),
   or, with `memorized.scan`, the passages the model recites in a folder of
   texts (`curvature.memorization.scan`; default: the committed texts of
   `lossland.data.recitable`), cached in WORKDIR/cache.
3. K-FAC factors of the candidate layers on windows of `data.path` and their
   eigenbases, cached in WORKDIR/cache and reused by later runs with the same
   model, data and factor settings.
4. The edit: with `selection.enabled`, layers and ρ chosen on half A of the
   memorized set and every number reported on half B (`curvature.selection`);
   otherwise `curvature.layers` at `curvature.rho`. `curvature.rho_overrides`
   fixes ρ per layer pattern.
5. Reported: recitation per passage (passages.jsonl) and by kind with
   bootstrap intervals; held-out perplexity on every held-out text; a ρ sweep
   (`report.rhos`); random, inverted and SVD controls at the edit's perplexity
   (`report.controls`). The edited model goes to WORKDIR/edited/ (safetensors,
   the tokenizer and its chat template).

The factor and held-out windows use the same seeds as `lm_canaries`, so a
model trained there and exported (`export_hf`) gives that experiment's numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np

from launch import atomic, common
from lossland import data as data_lib
from lossland.data import recitable as recitable_lib
from lossland.curvature import (capture, controls, edit, eigen, evaluate, factors, memorization,
                                plots, recitation, selection, storage)
from lossland.interop import gguf, hf, packaged, text as text_lib


def log(message: str) -> None:
  print(f'[hf_edit {time.strftime("%H:%M:%S")}] {message}', flush=True)


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


def model_source(config) -> str:
  """The model's folder or .gguf file, with one clear error for what is missing."""
  if not config.model.path:
    raise ValueError('config.model.path is empty; pass --config.model.path=DIR (a Hugging Face '
                     'folder with config.json, safetensors and tokenizer.json), a .gguf file, or '
                     f'a packaged model name ({", ".join(sorted(packaged.PACKAGED))})')
  path = packaged.resolve(config.model.path)
  if not packaged.is_gguf(path):
    hf.read_config(path)  # a clear error for a missing folder or config.json
    if not os.path.isfile(os.path.join(path, hf.TOKENIZER_FILE)):
      raise FileNotFoundError(f'{path} has no {hf.TOKENIZER_FILE}; hf_edit tokenizes the text and '
                              'the recitation pairs with the folder\'s tokenizer')
  return path


def heldout_texts(config, tokenizer, heldout) -> dict[str, np.ndarray]:
  """{name: tokens}: the held-out part of data.path ('main'), then each of data.heldout_paths."""
  out = {'main': heldout}
  paths = config.data.heldout_paths
  for path in ([p for p in paths.split(',') if p] if isinstance(paths, str) else paths):
    out[pathlib.Path(path).stem] = text_lib.encode_text(text_lib.read_text(path), tokenizer)
  return out


def load_data(config, tokenizer):
  """(train tokens, held-out tokens of data.path) from the configured files."""
  d = config.data
  if not d.path:
    raise ValueError('config.data.path is empty; pass --config.data.path=TEXT (a UTF-8 file)')
  tokens = text_lib.encode_text(text_lib.read_text(d.path), tokenizer)
  if d.heldout_path:
    return tokens, text_lib.encode_text(text_lib.read_text(d.heldout_path), tokenizer)
  return text_lib.split_tokens(tokens, d.heldout_fraction)


def cache_file(workdir: str, kind: str, settings: dict) -> str:
  """WORKDIR/cache/<kind>-<hash of settings>.<ext>: one file per distinct setting."""
  key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
  folder = os.path.join(workdir, 'cache')
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f'{kind}-{key}.{"json" if kind == "memorized" else "npz"}')


def model_identity(path: str) -> dict:
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith(('.safetensors', '.json')))
  return {'path': os.path.abspath(path),
          'files': [(os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]}


def leading_special_tokens(tokenizer) -> list[int]:
  """The ids the tokenizer puts before a text (a BOS), not those it appends (an EOS)."""
  plain = tokenizer.encode('a', add_special_tokens=False).ids
  full = tokenizer.encode('a', add_special_tokens=True).ids
  for i in range(len(full) - len(plain) + 1):
    if full[i:i + len(plain)] == plain:
      return full[:i]
  return []


def with_special_prefix(batch: dict, special: list[int]) -> dict:
  """A text window behind the tokenizer's special prefix (BOS), as the model saw text in training.

  Inputs gain the prefix; the positions that predict it or from within it
  are masked, so the same text tokens are scored and sampled as without it
  (Gemma's outputs, for one, are far off without a BOS).
  """
  if not special:
    return batch
  rows, lead = batch['inputs'].shape[0], len(special)
  prefix = np.tile(np.asarray(special, np.int32), (rows, 1))
  inputs = np.concatenate([prefix, batch['inputs']], axis=1)
  targets = np.concatenate([prefix[:, 1:], batch['inputs'][:, :1], batch['targets']], axis=1)
  mask = np.concatenate([np.zeros((rows, lead), np.float32),
                         np.asarray(batch.get('mask', np.ones(batch['targets'].shape)),
                                    np.float32)], axis=1)
  mask[:, lead - 1] = 0.0  # the first text token, predicted from the prefix alone
  return {'inputs': inputs, 'targets': targets, 'mask': mask}


def memorized_set(config, workdir, ckpt, tokenizer, identity, mesh) -> list:
  """The memorized passages: the recitation pairs, or the scan's (cached)."""
  if config.data.recitation_path:
    pairs = text_lib.encode_pairs(data_lib.read_recitation_pairs(config.data.recitation_path),
                                  tokenizer)
    return [memorization.Passage('pairs', 'verbatim', i, tuple(p), tuple(s), float('nan'),
                                 float('nan'), False) for i, (p, s) in enumerate(pairs)]
  m = config.memorized
  if not m.scan:
    return []
  settings = {'model': identity, **m.to_dict()}
  path = cache_file(workdir, 'memorized', settings)
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)
    log(f'memorized set: {len(stored)} passages from {path}')
    return [memorization.Passage.from_dict(d) for d in stored]
  texts = recitable_lib.recitable_texts(m.texts_dir or None)
  encoded = {n: (text_lib.encode_text(t.text, tokenizer), t.kind) for n, t in texts.items()}
  special = leading_special_tokens(tokenizer) if m.special_prefix else []
  log(f'scanning {len(texts)} texts ({sum(len(t) for t, _ in encoded.values())} tokens) for '
      'recited passages')
  report = memorization.scan(
      ckpt.model.apply, ckpt.params, encoded, special_prefix=special, prefix_len=m.prefix_len,
      suffix_len=m.suffix_len, stride=m.stride, chunk_len=m.chunk_len,
      screen_threshold=m.screen_threshold, loose_threshold=m.loose_threshold,
      batch_size=m.batch_size, mesh=mesh, log=log)
  tmp = f'{path}.{os.getpid()}.partial'
  with open(tmp, 'w') as f:
    json.dump([p.as_dict() for p in report.passages], f)
  os.replace(tmp, path)
  return list(report.passages)


def factors_and_bases(config, workdir, ckpt, train, identity, mesh, special):
  """(K-FAC factors, eigenbases) of the candidate layers, from WORKDIR/cache when stored."""
  cv, seq = config.curvature, config.data.seq_len
  batches = [with_special_prefix(b, special) for b in evaluate.factor_batches(
      train, cv.factor_batches, cv.factor_batch_size, seq, config.seed)]
  settings = {'model': identity, 'dtype': config.model.dtype, 'data': config.data.path,
              'seq_len': seq, 'seed': config.seed, 'tokens': int(len(train)),
              **({'special_prefix': special} if special else {}),
              **{k: cv[k] for k in ('layers', 'fisher_type', 'factor_batches',
                                    'factor_batch_size', 'eigh')}}
  f_path, b_path = (cache_file(workdir, kind, settings) for kind in ('factors', 'bases'))
  views = capture.find_layers(ckpt.model.apply, ckpt.params, batches[0]['inputs'],
                              select=cv.layers)
  if os.path.isfile(f_path) and os.path.isfile(b_path):
    log(f'factors and eigenbases of {len(views)} layers from {os.path.dirname(f_path)}')
    return storage.load_factors(f_path, views), storage.load_bases(b_path, views), batches
  log(f'estimating K-FAC factors of {len(views)} layers on {len(batches)} batches of '
      f'{cv.factor_batch_size} x {seq} tokens')
  f = factors.estimate_factors(ckpt.model.apply, ckpt.params, batches, select=cv.layers,
                               mesh=mesh, rng=jax.random.key(77 + config.seed),
                               fisher_type=cv.fisher_type)
  bases = eigen.eigenbasis(f, cv.eigh)
  storage.save_factors(f_path, f)
  storage.save_bases(b_path, bases)
  return f, bases, batches


def memorized_counts(passages) -> dict:
  """The memorized set's size by kind and by text (which texts the model recites)."""
  by_text: dict[str, dict] = {}
  for p in passages:
    row = by_text.setdefault(p.source, {'kind': p.kind, 'passages': 0, 'strict': 0})
    row['passages'] += 1
    row['strict'] += int(p.strict)
  return {'passages': len(passages),
          'by_kind': {k: sum(p.kind == k for p in passages)
                      for k in sorted({p.kind for p in passages})},
          'strict_by_kind': {k: sum(p.kind == k and p.strict for p in passages)
                             for k in sorted({p.kind for p in passages})},
          'by_text': by_text}


def passage_rows(passages, tokenizer) -> list[dict]:
  return [{'source': p.source, 'kind': p.kind, 'start': p.start,
           'prefix_text': tokenizer.decode(list(p.prefix)),
           'suffix_text': tokenizer.decode(list(p.suffix))} for p in passages]


def copy_tokenizer(source: str, folder: str) -> None:
  """The tokenizer files (and chat template) of a folder or a GGUF file into `folder`."""
  if packaged.is_gguf(source):
    gguf.save_tokenizer(folder, source)
    return
  for name in ('chat_template.jinja', 'chat_template.json'):  # hf.save copies the rest
    if os.path.isfile(os.path.join(source, name)):
      shutil.copy(os.path.join(source, name), os.path.join(folder, name))


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  source = model_source(config)
  cv, seq, e, rep = config.curvature, config.data.seq_len, config.eval, config.report
  eigen.check_eigh_method(cv.eigh)  # before loading the model and estimating the factors
  mesh = common.build_mesh(config.mesh, cv.factor_batch_size)
  log(f'loading {source}')
  ckpt = packaged.load(source, dtype=dtype_of(config.model.dtype, 'dtype'), tokenizer=True,
                       mesh=mesh, param_rules=common.param_rules(config))
  common.check_seq_len(ckpt.model, seq, 'data.seq_len')
  tok, identity = ckpt.tokenizer, model_identity(source)
  train, heldout = load_data(config, tok)
  special = leading_special_tokens(tok) if config.data.special_prefix else []
  evaluators = {name: evaluate.LMEvaluator(ckpt.model.apply, [
      with_special_prefix(b, special) for b in evaluate.heldout_batches(
          tokens, e.ppl_batches, e.ppl_batch_size, seq, config.seed)], mesh=mesh)
                for name, tokens in heldout_texts(config, tok, heldout).items()}
  ev = evaluators['main']
  passages = memorized_set(config, workdir, ckpt, tok, identity, mesh)
  f, bases, batches = factors_and_bases(config, workdir, ckpt, train, identity, mesh, special)
  results = {'model': config.model.path, 'train_tokens': len(train),
             'factor_tokens': float(next(iter(f.values())).count),
             'memorized': memorized_counts(passages)}
  ppl_before = {n: v.perplexity(ckpt.params) for n, v in evaluators.items()}
  log(f'perplexity before: {ppl_before}')

  reported = passages
  if config.selection.enabled:
    half_a, reported = memorization.split_halves(passages, config.seed)
    if not half_a or not reported:
      raise ValueError(f'the memorized set has {len(passages)} passages; selection needs at least '
                       'two (one per half): scan more text or lower memorized.loose_threshold')
    pa = np.array([p.prefix for p in half_a], np.int32)
    sa = np.array([p.suffix for p in half_a], np.int32)
    s = config.selection
    choice = selection.select_layers_and_rho(
        ckpt.params, bases, ev, pa, sa, candidate_blocks=s.candidate_blocks,
        max_blocks=s.max_blocks, rhos=s.rhos, max_ppl_ratio=s.max_ppl_ratio,
        ppl_before=ppl_before['main'], rho_overrides=tuple(cv.rho_overrides), log=log)
    chosen, rho = {n: bases[n] for n in choice.layers}, choice.rho
    results['selection'] = {'half_a': len(half_a), 'sweep': [p.as_dict() for p in choice.sweep]}
  else:
    chosen, rho = bases, cv.rho
  rhos = selection.rho_by_layer(chosen, rho, tuple(cv.rho_overrides))
  masses = None
  if cv.ekfac:  # EK-FAC's corrected masses for the chosen layers (the selection ranks by K-FAC)
    log(f'estimating the EK-FAC eigencorrection of {len(chosen)} layers')
    masses = eigen.estimate_eigencorrection(ckpt.model.apply, ckpt.params, chosen, batches,
                                            mesh=mesh, rng=jax.random.key(78 + config.seed),
                                            fisher_type=cv.fisher_type)
  edited = edit.curvature_edit(ckpt.params, chosen, rhos, masses)
  kept = controls.kept_counts(chosen, rhos, masses)
  results.update(layers=list(chosen), rho=rho, rho_by_layer=rhos,
                 method='ekfac' if cv.ekfac else 'kfac',
                 kept_fraction={n: kept[n] / v for n, v in controls.pair_counts(chosen).items()})

  variants = {'before': ckpt.params, 'edit': edited}
  ppl = {'before': ppl_before, 'edit': {n: v.perplexity(edited) for n, v in evaluators.items()}}
  if rep.controls:
    for kind in rep.controls:
      c = controls.matched_control(kind, ckpt.params, chosen, ev, ppl['edit']['main'],
                                   steps=e.bisect_steps, rng=jax.random.key(99 + config.seed))
      variants[kind] = c.params
      ppl[kind] = {n: v.perplexity(c.params) for n, v in evaluators.items()}
      results.setdefault('control_knobs', {})[kind] = c.knob
      log(f'control {kind}: knob {c.knob:.4f}, perplexity {ppl[kind]["main"]:.4f} '
          f'(edit {ppl["edit"]["main"]:.4f})')
  results['perplexity'] = ppl
  results['perplexity_ratio'] = {k: {n: v[n] / ppl_before[n] for n in v} for k, v in ppl.items()}

  if reported:
    rows = passage_rows(reported, tok)
    results['recitation'] = {}
    for name, params in variants.items():
      scores = recitation.recite(ckpt.model.apply, params, reported, batch_size=e.decode_batch)
      results['recitation'][name] = recitation.rates_by_kind(
          reported, scores, loose_threshold=config.memorized.loose_threshold, seed=config.seed)
      for row, sim, strict in zip(rows, scores.similarity, scores.strict):
        row[name] = {'similarity': float(sim), 'strict': bool(strict)}
      log(f'recitation {name}: {results["recitation"][name]}')
    results['reported_passages'] = len(reported)
    with atomic.staged(os.path.join(workdir, 'passages.jsonl')) as tmp:
      with open(tmp, 'w') as out:
        out.writelines(json.dumps(r) + '\n' for r in rows)
    if rep.rhos:
      results['rho_sweep'] = {'rhos': list(rep.rhos), 'strict': [], 'loose': [],
                              'perplexity': []}
      for r in rep.rhos:
        p = edit.curvature_edit(ckpt.params, chosen,
                                selection.rho_by_layer(chosen, r, tuple(cv.rho_overrides)), masses)
        rates = recitation.rates_by_kind(
            reported, recitation.recite(ckpt.model.apply, p, reported, batch_size=e.decode_batch),
            loose_threshold=config.memorized.loose_threshold)['all']
        for k in ('strict', 'loose'):
          results['rho_sweep'][k].append(rates[k])
        results['rho_sweep']['perplexity'].append(ev.perplexity(p))
        log(f'rho sweep {r}: strict {rates["strict"]:.3f}, loose {rates["loose"]:.3f}, '
            f'perplexity {results["rho_sweep"]["perplexity"][-1]:.4f}')

  out = jax.tree.map(lambda x: x.astype(save_dtype(config, ckpt.hf_config)),
                     jax.device_get(edited))
  # Each output is written under a temporary name and, under launch.analyze, moved into place
  # with results.json once the run returns: a killed re-run leaves the old outputs or the new.
  edited_dir = os.path.join(workdir, 'edited')
  with atomic.staged(edited_dir) as tmp:
    if packaged.is_gguf(source):
      hf.save(tmp, out, ckpt.config, base_config=ckpt.hf_config)
    else:
      hf.save(tmp, out, ckpt.config, base_config=ckpt.hf_config, tokenizer_from=source)
    copy_tokenizer(source, tmp)
  results['edited_dir'] = edited_dir
  with atomic.staged(os.path.join(workdir, 'spectra.png')) as tmp:
    plots.plot_spectra(chosen, tmp)
  with atomic.staged(os.path.join(workdir, 'kept_mass.png')) as tmp:
    plots.plot_kept_mass(chosen, tmp, sorted(set(rhos.values())))
  results['seconds'] = time.perf_counter() - t0
  legacy_keys(results)
  return results


def legacy_keys(results: dict) -> None:
  """The flat keys of earlier versions (perplexity_before/after, recitation_*_before/after)."""
  ppl = results['perplexity']
  results['perplexity_before'] = ppl['before']['main']
  results['perplexity_after'] = ppl['edit']['main']
  if 'recitation' in results:
    for when, name in (('before', 'before'), ('after', 'edit')):
      rates = results['recitation'][name]['all']
      results[f'recitation_strict_{when}'] = rates['strict']
      results[f'recitation_loose_{when}'] = rates['loose']
      results[f'recitation_levenshtein_{when}'] = 1.0 - rates['similarity']
    results['recitation_pairs'] = results['reported_passages']
