"""Guided sampling reads an NNX model's cross-attention as it reads its linen twin's.

The twins (tests/twin_models.py) use flax's `MultiHeadDotProductAttention` and NNX's
`MultiHeadAttention`, both called with `sow_weights=True`, with the same weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lossland import guidance as G
from lossland import parallel
from lossland.data import shapes
from twin_models import DENOISER_NAMES as NAMES
from twin_models import HEADS, LinenDenoiser, NNXDenoiser

V = shapes.VOCAB
PROMPTS = ['a red circle and a blue square', 'a green triangle and a yellow circle']


@pytest.fixture(scope='module')
def twins():
  tokens = np.stack([shapes.tokenize(p) for p in PROMPTS])
  linen = LinenDenoiser()
  params = linen.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), tokens)
  module = NNXDenoiser(nnx.Rngs(0))
  for nnx_name, linen_name in NAMES.items():
    layer, source = module, params['params']
    for part in nnx_name.split('/'):
      layer = getattr(layer, part)
    for part in linen_name.split('/'):
      source = source[part]
    for leaf, value in source.items():
      getattr(layer, leaf)[...] = value
  batch = {'noise': jax.random.normal(jax.random.key(2), (2, 8, 8, 3)), 'tokens': tokens,
           'text_mask': G.text_mask(tokens, start_id=V.index('<s>'), end_id=V.index('</s>')),
           'token_indices': G.concept_indices(tokens, [['circle', 'square'],
                                                       ['triangle', 'circle']], V)}
  return linen, params, module, batch


def test_nnx_attention_maps_equal_the_linen_twins(twins):
  linen, params, module, batch = twins
  t = jnp.zeros((2,))
  source = G.AttentionSource(sown='attention_weights')
  want, want_maps = G.apply_with_attention(linen.apply, source)(params, batch['noise'], t,
                                                                batch['tokens'])
  for fn in (G.apply_with_attention(module, source),
             jax.jit(G.apply_with_attention(nnx.graphdef(module), source))):
    got, got_maps = fn(nnx.state(module), batch['noise'], t, batch['tokens'])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(got_maps) == len(want_maps) == 1
    assert got_maps[0].shape == (2, HEADS, 64, batch['tokens'].shape[1])
    np.testing.assert_allclose(got_maps[0], want_maps[0], atol=1e-6)
  with pytest.raises(ValueError, match='sow_weights=True'):
    G.apply_with_attention(module)


def test_astar_samples_of_an_nnx_model_equal_its_linen_twins(twins):
  linen, params, module, batch = twins
  mesh = parallel.make_mesh({'data': 2}, jax.devices()[:2])
  kw = dict(num_steps=3, null_tokens=jnp.asarray(shapes.tokenize('')),
            guidance=G.Guidance('astar', num_guided_steps=2, resolution=8),
            attention=G.AttentionSource(sown='attention_weights'), mesh=mesh)
  steps = G.step_size_schedule(20.0, 3)
  want = G.make_sampler(linen.apply, G.linear_schedule(), **kw)(
      params, batch, cfg_scale=3.0, step_sizes=steps)
  got = G.make_sampler(module, G.linear_schedule(), **kw)(
      nnx.state(module), batch, cfg_scale=3.0, step_sizes=steps)
  np.testing.assert_allclose(got.images, want.images, atol=1e-4)
  np.testing.assert_allclose(got.loss, want.loss, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(got.loss[:2]).min()) > 0.0  # the guided steps ran
