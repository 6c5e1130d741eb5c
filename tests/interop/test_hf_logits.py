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
from lossland.models.hf_lm import CausalLMConfig, apply_rope, rope_inv_frequencies


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name):
  tokens, want = reference(name)
  got = np.asarray(forward(name)(checkpoint(name).params, jnp.asarray(tokens)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))


@pytest.mark.parametrize('name', ['llama_tied', 'qwen2', 'gemma3', 'gpt_neox'])
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
    'gemma3': dict(d_model=48, num_layers=3, num_heads=3, num_kv_heads=1, head_dim=24,
                   activation='gelu_tanh', norm_placement='sandwich', norm_offset=1.0,
                   qk_norm=True, qk_norm_per_head=True, scale_embeddings=True,
                   query_pre_attn_scalar=20.0, attn_softcap=None, final_softcap=5.0,
                   sliding_window=5, layer_types=('sliding', 'full', 'sliding'),
                   rope_type='linear', rope_factor=4.0, rope_theta=1e5, rope_local_theta=1000.0,
                   tie_embeddings=True),
    'qwen3': dict(num_heads=6, num_kv_heads=2, head_dim=12, qk_norm=True, qk_norm_per_head=True,
                  qkv_bias=False, rope_theta=1e6, sliding_window=None),
    'mistral': dict(num_kv_heads=1, head_dim=20, sliding_window=7, layer_types=None,
                    qkv_bias=False),
    'olmo3': dict(num_kv_heads=2, qk_norm=True, qk_norm_per_head=False, norm_placement='post',
                  sliding_window=5, layer_types=('sliding', 'full'), rope_type='linear',
                  rope_factor=2.0, rope_theta=5e5, rope_local_theta=1e4, norm_eps=1e-5),
    'gemma2': dict(num_layers=3, num_kv_heads=2, head_dim=16, norm_placement='sandwich',
                   norm_offset=1.0, qk_norm=False, scale_embeddings=True,
                   query_pre_attn_scalar=24.0, attn_softcap=3.0, final_softcap=4.0,
                   sliding_window=6, layer_types=('sliding', 'full', 'sliding'),
                   rope_local_theta=None, tie_embeddings=False),
    'phi3': dict(num_kv_heads=2, rotary_dim=8, sliding_window=8, norm_eps=1e-5, qkv_bias=False,
                 tie_embeddings=False),
    'gpt_neox': dict(norm='layer', parallel_residual=True, rotary_dim=4, mlp='plain',
                     activation='gelu', mlp_dim=128, qkv_bias=True, out_bias=True,
                     mlp_bias=True, norm_eps=1e-5, tie_embeddings=False),
    'qwen3_moe': dict(d_model=48, num_heads=5, num_kv_heads=1, head_dim=12, mlp_dim=80,
                      num_experts=6, experts_per_token=2, expert_mlp_dim=24,
                      normalize_expert_weights=True, qk_norm=True, qk_norm_per_head=True,
                      rope_theta=1e6, tie_embeddings=False),
}


@pytest.mark.parametrize('name', NAMES)
def test_config_fields(name):
  config = checkpoint(name).config
  want = {'vocab_size': 320, 'd_model': 64, 'num_layers': 2, 'num_heads': 4, **EXPECTED[name]}
  for field, value in want.items():
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


def _edited(tmp_path, name, edit):
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  config = json.loads((folder / 'config.json').read_text())
  edit(config)
  (folder / 'config.json').write_text(json.dumps(config))
  return hf.load(folder, tokenizer=False).config


def test_legacy_rope_spellings_of_layered_and_partial_rotary_families(tmp_path):
  """Gemma 3's rope_local_base_freq, GPT-NeoX's rotary_emb_base / rotary_pct (transformers < 5)."""
  def gemma3(config):
    config.pop('rope_parameters')
    config.update(rope_theta=100000.0, rope_scaling={'type': 'linear', 'factor': 4.0},
                  rope_local_base_freq=1000.0)
  assert _edited(tmp_path, 'gemma3', gemma3) == checkpoint('gemma3').config

  def neox(config):
    config.pop('rope_parameters')
    config.update(rotary_emb_base=10000.0, rotary_pct=0.25)
  assert _edited(tmp_path, 'gpt_neox', neox) == checkpoint('gpt_neox').config

  def neox_default(config):  # GPT-NeoX's default rotary_pct is 0.25, not 1
    config.pop('rope_parameters')
  assert _edited(tmp_path / 'd', 'gpt_neox', neox_default).rotary_dim == 4

  def olmo3(config):  # transformers 5 gives the sliding layers its default base, not rope_theta
    config.pop('rope_parameters')
    config.update(rope_theta=1234.0, rope_scaling=None)
  got = _edited(tmp_path, 'olmo3', olmo3)
  assert (got.rope_theta, got.rope_local_theta, got.rope_type) == (1234.0, 500000.0, 'default')


def test_default_layer_patterns():
  """Without layer_types: Gemma 3 slides on 5 of 6 layers, Gemma 2 on every other, OLMo-3 on 3
  of 4 (transformers' config defaults)."""
  def types(name, **changes):
    config = {**hf.read_config(FIXTURES / name), 'num_hidden_layers': 8, **changes}
    config.pop('layer_types')
    return ''.join(t[0] for t in hf.from_hf_config(config).layer_types)
  assert types('gemma3') == 'sssssfss'
  assert types('gemma3', sliding_window_pattern=3) == 'ssfssfss'
  assert types('gemma2') == 'sfsfsfsf'
  assert types('olmo3') == 'sssfsssf'


def test_partial_rotary_leaves_the_other_channels():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  inv = np.array([1.0, 0.1], np.float32)  # rotary over the first 4 of 8 channels
  got = apply_rope(x, jnp.arange(5), inv)
  np.testing.assert_array_equal(got[..., 4:], x[..., 4:])
  np.testing.assert_array_equal(got[:, 0], x[:, 0])  # position 0 is not rotated
  np.testing.assert_allclose(got[..., :4], apply_rope(x[..., :4], jnp.arange(5), inv), atol=0)
