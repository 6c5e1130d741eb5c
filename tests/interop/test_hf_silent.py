"""Hugging Face folders that used to load wrongly without a word: each is refused by name.

A tied config with a stored lm_head.weight that differs from the embedding
(lossland used the embedding and dropped the head), and a sharded index whose
weight_map points outside the folder (lossland read a file from elsewhere).
"""
import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy

from lossland.interop import hf

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'hf'


def _tied_folder_with_head(tmp_path, head_of):
  folder = tmp_path / 'tied'
  shutil.copytree(FIXTURES / 'llama_tied', folder)
  weights = folder / hf.WEIGHTS_FILE
  tensors = safetensors.numpy.load_file(weights)
  tensors['lm_head.weight'] = head_of(tensors['model.embed_tokens.weight'])
  safetensors.numpy.save_file(tensors, weights)
  return folder


def test_a_tied_config_with_a_different_stored_head_is_refused(tmp_path):
  same = _tied_folder_with_head(tmp_path / 'a', lambda e: e.copy())
  want = hf.load(FIXTURES / 'llama_tied').params
  got = hf.load(same).params  # a stored copy of the embedding is what savers often write
  np.testing.assert_array_equal(got['params']['embed']['embedding'],
                                want['params']['embed']['embedding'])
  other = _tied_folder_with_head(tmp_path / 'b', lambda e: e + 1.0)
  with pytest.raises(ValueError, match='lm_head.weight that differs from it.*'
                                       'tie_word_embeddings": false'):
    hf.load(other)


def test_a_weight_map_pointing_outside_the_folder_is_refused(tmp_path):
  outside = tmp_path / 'other'
  outside.mkdir()
  shutil.copy(FIXTURES / 'llama_tied' / hf.WEIGHTS_FILE, outside / hf.WEIGHTS_FILE)
  folder = tmp_path / 'sharded'
  shutil.copytree(FIXTURES / 'llama_tied', folder)
  (folder / hf.WEIGHTS_FILE).unlink()
  names = safetensors.numpy.load_file(outside / hf.WEIGHTS_FILE)
  index = {'metadata': {}, 'weight_map': {n: f'../other/{hf.WEIGHTS_FILE}' for n in names}}
  (folder / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"'\.\./other/model\.safetensors', which is not a file "
                                       'name in the folder'):
    hf.load(folder)


def test_save_checks_the_tokenizer_source_first_and_writes_readable_weights(tmp_path):
  ckpt = hf.load(FIXTURES / 'llama_tied')
  empty = tmp_path / 'no_tokenizer'
  empty.mkdir()
  target = tmp_path / 'out'
  with pytest.raises(FileNotFoundError, match='has no tokenizer.json; nothing was written'):
    hf.save(target, ckpt.params, ckpt.config, base_config=ckpt.hf_config, tokenizer_from=empty)
  assert not target.exists()
  hf.save(target, ckpt.params, ckpt.config, base_config=ckpt.hf_config)
  modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
  assert modes[hf.WEIGHTS_FILE] == modes[hf.CONFIG_FILE]  # not owner-only
