"""CLIP tokenizer and text encoder of Stable Diffusion folders against transformers.

References: tests/fixtures/sd/tiny_sd{1,2}/reference.npz, written by
scripts/make_sd_fixtures.py: `tok_ids` = CLIPTokenizer(tok_prompts,
padding='max_length', max_length=77) and `text_hidden` = CLIPTextModel
(text_ids).last_hidden_state in float32 (tiny_sd2 stores float16 weights).
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lossland.interop import clip_tokenizer, diffusers_text

SD = pathlib.Path(__file__).resolve().parent.parent / 'fixtures' / 'sd'
FOLDERS = ('tiny_sd1', 'tiny_sd2')
# float32 throughout (~1e-7 relative rounding) over 2 layers of D=32, |h| <= ~3.6:
# differences in summation order versus torch stay around 1e-6; 2e-5 leaves margin
# while a wrong activation, scale or mask is off by >= 1e-2.
ATOL = 2e-5


def reference(name):
  return np.load(SD / name / 'reference.npz')


@pytest.fixture(scope='module')
def tok():
  return clip_tokenizer.load_clip_tokenizer(SD / 'tiny_sd1' / 'tokenizer')


@pytest.mark.parametrize('name', FOLDERS)
def test_tokenizer_matches_transformers(name):
  t = clip_tokenizer.load_clip_tokenizer(SD / name / 'tokenizer')
  ref = reference(name)
  ids = t.encode(list(ref['tok_prompts']))
  assert ids.dtype == np.int32 and ids.shape == (5, 77)
  np.testing.assert_array_equal(ids, ref['tok_ids'])
  assert (t.start_id, t.end_id, t.max_length) == (587, 588, 77)
  assert t.pad_id == (588 if name == 'tiny_sd1' else t.vocab['!'])


def test_too_long_prompt_is_an_error(tok):
  assert tok.encode(['cat ' * 75])[0, -1] == tok.end_id  # 75 tokens + start + end fit
  with pytest.raises(ValueError, match=r"'cat cat .*' has 76 tokens.*at most 75"):
    tok.encode(['a dog', 'cat ' * 76])


def test_tokens_and_word_positions(tok):
  prompt = 'an Elephant and a horse'
  tokens = tok.tokens(prompt)
  assert tokens[0] == '<|startoftext|>' and tokens[-1] == '<|endoftext|>'
  ids = tok.encode([prompt])[0]
  names = {i: t for t, i in tok.vocab.items()}
  assert [names[i] for i in ids[:len(tokens)]] == tokens and ids[len(tokens)] == tok.pad_id
  (elephant,) = tok.word_positions(prompt, 'elephant')
  assert [tokens[p] for p in elephant] == ['ele', 'phant</w>']
  assert tok.word_positions('a cat and a dog and a CAT', 'Cat') == [(2,), (8,)]
  assert tok.word_positions('a catalog', 'cat') == []
  assert tok.word_positions('A photo of a Tiger, with a bowl.', 'tiger,') == [(5, 6)]


@pytest.mark.parametrize('name', FOLDERS)
def test_text_encoder_matches_transformers(name):
  module, variables = diffusers_text.load_text_encoder(SD / name / 'text_encoder')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  ref = reference(name)
  out = jax.jit(module.apply)(variables, jnp.asarray(ref['text_ids'], jnp.int32))
  assert out.shape == (5, 77, 32) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref['text_hidden'], rtol=0, atol=ATOL)


def test_transformers4_names_load(tmp_path):
  """SD releases store text_model.* and a position_ids buffer (transformers 4.x)."""
  source = SD / 'tiny_sd1' / 'text_encoder'
  shutil.copy(source / 'config.json', tmp_path / 'config.json')
  state = safetensors.numpy.load_file(source / 'model.safetensors')
  state = {'text_model.' + k: v for k, v in state.items()}
  state['text_model.embeddings.position_ids'] = np.arange(77)[None]
  safetensors.numpy.save_file(state, tmp_path / 'model.fp16.safetensors')
  _, got = diffusers_text.load_text_encoder(tmp_path)
  _, want = diffusers_text.load_text_encoder(source)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_unsupported_config_is_one_error(tmp_path):
  source = SD / 'tiny_sd1' / 'text_encoder'
  config = json.loads((source / 'config.json').read_text())
  config.update(hidden_act='relu', architectures=['CLIPTextModelWithProjection'])
  (tmp_path / 'config.json').write_text(json.dumps(config))
  shutil.copy(source / 'model.safetensors', tmp_path / 'model.safetensors')
  with pytest.raises(ValueError, match=r"(?s)architectures=.*CLIPTextModelWithProjection.*"
                     r"hidden_act='relu'"):
    diffusers_text.load_text_encoder(tmp_path)
