"""configs/stitching/hf_cka.py:runlocal on two tiny random Hugging Face folders made here."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from lossland.interop import hf
from lossland.models.hf_lm import CausalLM, CausalLMConfig

WORDS = [f'w{i}' for i in range(40)]
CONFIG = CausalLMConfig(vocab_size=48, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=8, mlp_dim=24)


def _tokenizer(words):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token=words[0]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return tok


def _folder(path, seed, words=WORDS):
  """A random-weight checkpoint (N(0, 0.2²) weights, unit norm scales; no init compile)."""
  shapes = jax.eval_shape(CausalLM(CONFIG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: np.ones(s.shape, np.float32) if 'scale' in str(p[-1]) else
      rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  hf.save(path, params, CONFIG)
  _tokenizer(words).save(str(path / 'tokenizer.json'))
  return path


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf_cka')
  text = root / 'text.txt'
  rng = np.random.default_rng(0)
  text.write_text(' '.join(rng.choice(WORDS, size=600)))
  return _folder(root / 'a', 0), _folder(root / 'b', 1), text, root


def _analyze(workdir, a, b, text, *extra):
  from launch import analyze
  analyze.main(['--config=configs/stitching/hf_cka.py:runlocal', f'--workdir={workdir}',
                f'--config.model_a={a}', f'--config.model_b={b}', f'--config.data.path={text}',
                *extra])
  with open(workdir / 'results.json') as f:
    return json.load(f)


def test_cka_of_a_model_with_itself_has_a_unit_diagonal(folders):
  a, b, text, root = folders
  r = _analyze(root / 'self', a, a, text)
  values = np.asarray(r['cka']['values'])
  assert r['cka']['rows'] == ['block_0', 'block_1'] == r['cka']['cols']
  # HSIC(X, X) / sqrt(HSIC(X, X)²): 1 up to the rounding of one sqrt and one division.
  np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-5)
  assert r['tokens'] == 4 * 8 * 16 and r['cka']['examples'] == 4 * 8 * 16
  saved = np.load(root / 'self' / 'cka.npz')
  np.testing.assert_array_equal(saved['values'], values)
  assert (root / 'self' / 'cka.png').is_file()


def test_mismatched_tokenizers_are_one_clear_error(folders, tmp_path):
  a, _, text, _ = folders
  other = _folder(tmp_path / 'other', 0, words=WORDS[::-1])  # same words, other ids
  with pytest.raises(SystemExit, match='have different tokenizers.*tokenize the text '
                                       'identically'):
    _analyze(tmp_path / 'w', a, other, text)
  with pytest.raises(SystemExit, match=r'set --config.model_b, --config.data.path'):
    _analyze(tmp_path / 'w2', a, '', '')
