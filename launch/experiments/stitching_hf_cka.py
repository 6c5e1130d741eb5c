"""Layer-by-layer minibatch CKA between two Hugging Face causal LMs; see configs/stitching/hf_cka.py.

`run(config, workdir) -> results dict`; also writes cka.npz and cka.png.
"""
from __future__ import annotations

import os
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from launch import common
from lossland import stitching as st
from lossland.interop import hf


def same_tokenizer(tok_a, tok_b, text: str, names: tuple[str, str]) -> np.ndarray:
  """The token ids of `text`, after checking that both tokenizers give the same ones."""
  vocab_a, vocab_b = (t.get_vocab(with_added_tokens=True) for t in (tok_a, tok_b))
  ids_a, ids_b = (np.asarray(t.encode(text).ids, np.int32) for t in (tok_a, tok_b))
  if vocab_a != vocab_b or not np.array_equal(ids_a, ids_b):
    diff = sorted(set(vocab_a.items()) ^ set(vocab_b.items()))[:3]
    raise ValueError(f'{names[0]} and {names[1]} have different tokenizers (vocabularies of '
                     f'{len(vocab_a)} and {len(vocab_b)} tokens; differing entries such as '
                     f'{diff}): CKA compares the two models on the same token positions, so '
                     'both folders must tokenize the text identically')
  return ids_a


def windows(ids: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0) -> list:
  """Batches {'inputs': [batch_size, seq_len]} of consecutive non-overlapping windows."""
  per_batch = seq_len * batch_size
  count = len(ids) // per_batch
  if count == 0:
    raise ValueError(f'the text has {len(ids)} tokens, fewer than one batch of {batch_size} '
                     f'windows of {seq_len}; use a longer text or lower data.batch_size / '
                     'data.seq_len')
  count = min(count, max_batches) if max_batches else count
  return [{'inputs': ids[i * per_batch:(i + 1) * per_batch].reshape(batch_size, seq_len)}
          for i in range(count)]


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  missing = [k for k, v in (('model_a', config.model_a), ('model_b', config.model_b),
                            ('data.path', config.data.path)) if not v]
  if missing:
    raise ValueError(f'set {", ".join("--config." + k for k in missing)}: two Hugging Face '
                     'folders and a text file (see configs/stitching/hf_cka.py)')
  dtype = jnp.dtype(config.dtype)
  a, b = (hf.load(config[k], dtype=dtype, tokenizer=True) for k in ('model_a', 'model_b'))
  text = pathlib.Path(config.data.path).read_text()
  ids = same_tokenizer(a.tokenizer, b.tokenizer, text, (config.model_a, config.model_b))
  d = config.data
  batches = windows(ids, d.seq_len, d.batch_size, d.max_batches)
  mesh = common.build_mesh(config.mesh, d.batch_size)
  cka = st.streamed_cka(a.model, a.params, b.model, b.params, batches, layers_a=config.layers_a,
                        layers_b=config.layers_b, unit=config.unit, mesh=mesh)
  if workdir:
    np.savez(os.path.join(workdir, 'cka.npz'), values=cka.values, rows=np.array(cka.rows),
             cols=np.array(cka.cols))
    if config.figures:
      st.plots.save_heatmaps(os.path.join(workdir, 'cka.png'), {f'minibatch CKA ({cka.unit})':
                                                                cka.values},
                             rows=cka.rows, cols=cka.cols, xlabel='layer of B',
                             ylabel='layer of A', title='A: ' + str(config.model_a) + '\nB: ' +
                             str(config.model_b), max_cols=1)
  results = {'cka': cka.to_dict(), 'model_a': str(config.model_a),
             'model_b': str(config.model_b), 'tokens': int(len(batches) * d.batch_size * d.seq_len),
             'batches': len(batches), 'devices': int(mesh.devices.size)}
  if len(cka.rows) == len(cka.cols):
    results['cka_diagonal_mean'] = float(np.mean(np.diag(cka.values)))
  results['cka_mean'] = float(np.mean(cka.values))
  results['seconds'] = time.perf_counter() - t0
  return results
