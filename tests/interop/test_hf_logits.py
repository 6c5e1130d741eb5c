"""lossland logits of the Hugging Face fixtures against transformers' float32 logits."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import (FIXTURES, NAMES, STORED_DTYPES, checkpoint, forward, logit_tolerance,
                         reference)

from lossland import models
from lossland.interop import hf
from lossland.models.hf_lm import CausalLMConfig, rope_inv_frequencies


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name):
  tokens, want = reference(name)
  got = np.asarray(forward(name)(checkpoint(name).params, jnp.asarray(tokens)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))


@pytest.mark.parametrize('name', ['llama_tied', 'qwen2'])
def test_half_precision_params_run_in_float32(name):
  """bfloat16/float16 params kept as stored give the logits of the float32 upcast."""
  tokens, _ = reference(name)
  stored = checkpoint(name, dtype=None)
  assert {x.dtype.name for x in jax.tree.leaves(stored.params)} == {STORED_DTYPES[name]}
  np.testing.assert_array_equal(forward(name)(stored.params, tokens),
                                forward(name)(checkpoint(name).params, tokens))


EXPECTED = {
    'llama3_gqa': dict(num_kv_heads=2, head_dim=16, rope_theta=500000.0, rope_type='llama3',
                       rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                       rope_original_max_positions=64, norm_eps=1e-6, tie_embeddings=False),
    'llama_tied': dict(num_kv_heads=4, rope_theta=10000.0, rope_type='default',
                       tie_embeddings=True, norm_eps=1e-6),
    'qwen2': dict(num_kv_heads=2, qkv_bias=True, out_bias=False, rope_theta=1e6, norm_eps=1e-6),
    'olmo2': dict(num_kv_heads=2, qk_norm=True, norm_placement='post', norm_eps=1e-5),
    'gpt2': dict(norm='layer', positions='learned', max_positions=64, mlp='plain',
                 activation='gelu_tanh', mlp_dim=128, qkv_bias=True, out_bias=True,
                 mlp_bias=True, norm_eps=1e-5, tie_embeddings=True),
}


@pytest.mark.parametrize('name', NAMES)
def test_config_fields(name):
  config = checkpoint(name).config
  assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads) == (320, 64, 2, 4)
  for field, value in EXPECTED[name].items():
    assert getattr(config, field) == value, field


def test_legacy_rope_spelling(tmp_path):
  """rope_theta + rope_scaling (transformers < 5) read like rope_parameters."""
  folder = tmp_path / 'legacy'
  shutil.copytree(FIXTURES / 'llama3_gqa', folder)
  config = json.loads((folder / 'config.json').read_text())
  rope = config.pop('rope_parameters')
  config['rope_theta'] = rope.pop('rope_theta')
  rope['type'] = rope.pop('rope_type')  # the oldest spelling
  config['rope_scaling'] = rope
  (folder / 'config.json').write_text(json.dumps(config))
  assert hf.load(folder, tokenizer=False).config == checkpoint('llama3_gqa').config


def test_llama3_rope_bands():
  """Short wavelengths kept, long ones divided by the factor, the band between interpolated."""
  base = CausalLMConfig(vocab_size=8, d_model=64, num_layers=1, num_heads=4, num_kv_heads=4,
                        head_dim=16, mlp_dim=8, rope_theta=500000.0)
  scaled = CausalLMConfig(**{**base.__dict__, 'rope_type': 'llama3', 'rope_factor': 8.0,
                             'rope_original_max_positions': 64})
  inv, new = rope_inv_frequencies(base), rope_inv_frequencies(scaled)
  wavelen = 2 * np.pi / inv
  short, long = wavelen < 64 / 4, wavelen > 64 / 1
  assert short.any() and long.any() and (~short & ~long).any()
  np.testing.assert_array_equal(new[short], inv[short])
  np.testing.assert_allclose(new[long], inv[long] / 8, rtol=1e-6)
  mid = ~short & ~long
  assert np.all((new[mid] < inv[mid]) & (new[mid] > inv[mid] / 8))


def test_transformer_lm_runs_as_llama(tmp_path):
  """A TransformerLM's params give its logits in CausalLM and after a Llama export."""
  lm = models.TransformerLM(vocab_size=40, d_model=32, num_layers=2, num_heads=4, mlp_dim=48)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 40)
  params = jax.jit(lm.init)(jax.random.key(0), tokens)
  config = models.config_from_transformer_lm(lm)
  want = jax.jit(lm.apply)(params, tokens)
  apply = jax.jit(models.CausalLM(config).apply)
  got = apply(params, tokens)
  # Same maths, einsums of other shapes: equal up to float32 reassociation.
  np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))
  hf.save(tmp_path, params, config)
  back = hf.load(tmp_path)
  assert back.hf_config['model_type'] == 'llama' and back.config == config
  np.testing.assert_array_equal(apply(back.params, tokens), got)
