"""Linear CKA between two LMs with different tokenizers, with a permutation null.

See configs/stitching/real_lm_cka.py. `run(config, workdir) -> results dict`;
also writes cka.npz and cka.png. The work is in lossland.stitching
(`token_alignment`: units, windows and features; `permutation_null`: CKA and
its null); this module loads, wires and reports.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from launch import atomic, common
from lossland import stitching as st
from lossland.data import recitable
from lossland.interop import packaged, text as text_lib
from lossland.stitching import token_alignment as ta

# The default text: the public-domain prose and verse committed in lossland/data/texts.
DEFAULT_TEXTS = ('prose-novel-openings', 'prose-declaration-of-independence',
                 'prose-gettysburg-address', 'prose-us-constitution', 'shakespeare', 'poems',
                 'songs-and-rhymes', 'scripture-kjv')
# Keys that change only speed or display, not the numbers.
RERUN_FREE_KEYS = ('data.batch_size', 'null.chunk', 'null.group', 'figures')


def read_text(path: str) -> tuple[str, str]:
  """(text, where it came from): a UTF-8 file, a folder's *.txt files, or '' for DEFAULT_TEXTS."""
  if not path:
    files = [recitable.TEXTS_DIR / f'{name}.txt' for name in DEFAULT_TEXTS]
    source = f'lossland/data/texts: {", ".join(DEFAULT_TEXTS)}'
  elif os.path.isdir(path):
    files = sorted(pathlib.Path(path).glob('*.txt'))
    if not files:
      raise FileNotFoundError(f'data.path={path!r} is a folder without .txt files; pass a UTF-8 '
                              'file or a folder of *.txt files')
    source = path
  else:
    return text_lib.read_text(path), path
  return '\n\n'.join(text_lib.read_text(str(f)).strip() for f in files) + '\n', source


def _logger(config):
  def log(message: str) -> None:
    if config.progress:
      print(f'[real_lm_cka {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)
  return log


def _load(spec: str, side: str, dtype):
  ckpt = packaged.load(spec, dtype=dtype, tokenizer=True)
  if ckpt.tokenizer is None:
    raise ValueError(f'model_{side}={spec!r} has no tokenizer (tokenizer.json, or GGUF tokenizer '
                     'metadata): the text is aligned by each model\'s own token offsets')
  return ckpt


def depth_summary(observed: np.ndarray) -> dict:
  """For each row, the column of highest CKA, and the Spearman correlation of that map with depth.

  Near 1: the layers of A match B's in order (early with early, late with late).
  """
  best = np.argmax(observed, axis=1)
  rows, cols = observed.shape
  out = {'best_b_per_a': best.tolist()}
  if rows > 2 and cols > 1 and np.ptp(best) > 0:
    out['depth_spearman'] = float(stats.spearmanr(np.arange(rows), best).statistic)
  return out


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  log = _logger(config)
  d = config.data
  if 1 / (config.null.draws + 1) > config.alpha:
    raise ValueError(f'with null.draws={config.null.draws} the smallest p-value is '
                     f'1/{config.null.draws + 1}, above alpha={config.alpha:g}, so no entry could '
                     f'be above chance; use null.draws >= {int(np.ceil(1 / config.alpha)) - 1} or '
                     'a larger alpha')
  text, source = read_text(d.path)
  dtype = jnp.dtype(config.dtype)
  mesh = common.build_mesh(config.mesh, d.batch_size)
  seconds = {}

  tokenized, names, paths = {}, {}, {}
  for side in ('a', 'b'):  # tokenize with each tokenizer; models are loaded one at a time below
    spec = config[f'model_{side}']
    paths[side] = packaged.resolve(spec)
    log(f'model {side.upper()}: {spec} ({paths[side]})')
  ckpts = {'a': _load(paths['a'], 'a', dtype)}
  tokenized['a'] = ta.tokenize(ckpts['a'].tokenizer, text)
  seconds['load_a'] = time.perf_counter() - t0

  t = time.perf_counter()
  ckpts['b'] = _load(paths['b'], 'b', dtype)
  tokenized['b'] = ta.tokenize(ckpts['b'].tokenizer, text)
  seconds['load_b'] = time.perf_counter() - t
  alignment = ta.align(tokenized['a'], tokenized['b'])
  windows = ta.make_windows(tokenized['a'], tokenized['b'], alignment, seq_len=d.seq_len,
                            num_windows=d.num_windows, units_per_window=d.units_per_window)
  u, w = windows.units_per_window, len(windows.inputs_a)
  log(f'{len(text)} characters: {len(tokenized["a"].ids)} tokens of A, {len(tokenized["b"].ids)} '
      f'of B, {len(alignment)} units; {w} windows of {u} units '
      f'({windows.inputs_a.shape[1]} tokens of A, {windows.inputs_b.shape[1]} of B)'
      + (f', the first {d.skip_units} of each left out' if d.skip_units else ''))
  windows = windows.drop_first_units(d.skip_units)
  u = windows.units_per_window

  feats = {}
  for side in ('a', 'b'):
    t = time.perf_counter()
    ckpt = ckpts.pop(side)
    names[side], feats[side] = ta.aligned_features(
        ckpt.model, ckpt.params, getattr(windows, f'inputs_{side}'),
        getattr(windows, f'last_{side}'), getattr(windows, f'first_{side}'),
        layers=config[f'layers_{side}'], reduce=config.reduce, batch_size=d.batch_size,
        mesh=mesh, log=lambda m, s=side: log(f'features of {s.upper()}: {m}'))
    del ckpt
    seconds[f'features_{side}'] = time.perf_counter() - t

  masked = np.zeros(windows.num_units, bool)
  if config.outlier_ratio:
    masked = ta.massive_units(feats['a'] + feats['b'], ratio=config.outlier_ratio)
    feats = {s: ta.mask_units(f, masked) for s, f in feats.items()}
  where = [(int(i) // u, int(i) % u + d.skip_units) for i in np.flatnonzero(masked)]
  if masked.any():
    log(f'{int(masked.sum())} units masked (norm above {config.outlier_ratio:g}x the median): '
        f'(window, unit) {where[:8]}')

  t = time.perf_counter()
  n = config.null
  log(f'CKA of {len(names["a"])} x {len(names["b"])} layers over {windows.num_units} units, '
      f'{n.draws} {n.kind} permutations')
  res = st.cka_null(feats['a'], feats['b'], key=jax.random.key(n.seed), draws=n.draws,
                    null=n.kind, block=u, chunk=n.chunk, group=n.group,
                    log=lambda m: log(f'null: {m}'))
  seconds['cka_and_null'] = time.perf_counter() - t
  above = res.above_chance(config.alpha)
  rows, cols = names['a'], names['b']

  if workdir:
    with atomic.staged(os.path.join(workdir, 'cka.npz')) as tmp:
      np.savez(tmp, observed=res.observed, null_mean=res.null_mean, null_p95=res.null_p95,
               null_p99=res.null_p99, p_values=res.p_values, rows=np.array(rows),
               cols=np.array(cols), null=res.null.astype(np.float32))
    if config.figures:
      with atomic.staged(os.path.join(workdir, 'cka.png')) as tmp:
        st.plots.save_heatmaps(
            tmp, {'linear CKA': res.observed,
                  f'above chance (p ≤ {config.alpha:g}; blank: not)': np.where(
                      above, res.observed, np.nan),
                  f'null mean ({n.kind}, {n.draws} draws)': res.null_mean},
            rows=rows, cols=cols, xlabel='layer of B', ylabel='layer of A',
            title=f'A: {config.model_a}   B: {config.model_b}   ({windows.num_units} units)',
            max_cols=3)

  results = {
      'model_a': str(config.model_a), 'model_b': str(config.model_b),
      'path_a': paths['a'], 'path_b': paths['b'],
      'text': source, 'text_chars': len(text),
      'text_sha256': hashlib.sha256(text.encode('utf-8')).hexdigest(),
      'tokens_a': int(len(tokenized['a'].ids)), 'tokens_b': int(len(tokenized['b'].ids)),
      'aligned_units': int(len(alignment)), 'units': int(windows.num_units),
      'windows': w, 'units_per_window': u, 'skip_units': int(d.skip_units),
      'units_compared': int(windows.num_units - masked.sum()),
      'masked_units': int(masked.sum()), 'masked_where': [list(x) for x in where[:50]],
      'chars_used': int(windows.chars[-1, 1]),
      'seq_len_a': int(windows.inputs_a.shape[1]), 'seq_len_b': int(windows.inputs_b.shape[1]),
      'window_tokens_a': int(windows.tokens_a.sum()),
      'window_tokens_b': int(windows.tokens_b.sum()),
      'reduce': config.reduce, 'devices': int(mesh.devices.size),
      'cka': {'rows': list(rows), 'cols': list(cols), **res.to_dict()},
      'alpha': float(config.alpha), 'entries': int(above.size),
      'above_chance': int(above.sum()),
      'above_null_p99': int((res.observed > res.null_p99).sum()),
      'cka_mean': float(res.observed.mean()), 'null_mean_mean': float(res.null_mean.mean()),
      'cka_max': float(res.observed.max()),
      **depth_summary(res.observed),
  }
  if len(rows) == len(cols):
    results['cka_diagonal_mean'] = float(np.mean(np.diag(res.observed)))
  seconds['total'] = time.perf_counter() - t0
  results['seconds'] = seconds['total']
  results.update({f'seconds_{k}': v for k, v in seconds.items() if k != 'total'})
  log(f'{int(above.sum())}/{above.size} entries above chance (p ≤ {config.alpha:g}); '
      f'{seconds["total"]:.0f} s')
  return results
