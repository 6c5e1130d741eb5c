"""K-FAC samples of mixture-of-experts layers: an expert's factors average over its own tokens.

`lossland.models.moe` runs each expert at every position with the tokens not
routed to it zeroed, and marks the routed ones in its layers' `sample_mask`;
`capture.layer_samples` weights the samples by it. The factors of an expert's
projection must equal the direct computation over the routed, unmasked tokens.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.curvature import capture, factors
from lossland.models.hf_lm import CausalLM, CausalLMConfig

CONFIG = CausalLMConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=3, num_kv_heads=1,
                        head_dim=8, mlp_dim=20, num_experts=4, experts_per_token=2,
                        expert_mlp_dim=12, normalize_expert_weights=True, qk_norm=True,
                        qk_norm_per_head=True)
EXPERT = 'block_1/mlp/experts_2'


@functools.cache
def _setup():
  model = CausalLM(CONFIG)
  tokens = jax.random.randint(jax.random.key(1), (4, 10), 0, CONFIG.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  params = jax.tree.map(lambda p: p * 8.0 if p.ndim == 2 else p, params)  # O(1) logits
  mask = np.ones((4, 10), np.float32)
  mask[1, 6:] = 0  # padding
  mask[3, :2] = 0
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1), 'mask': jnp.asarray(mask)}
  return model, params, batch


def _factors(layers):
  model, params, batch = _setup()
  views = capture.find_layers(model.apply, params, batch['inputs'], select=list(layers))
  sums = jax.jit(functools.partial(factors.factor_sums, model.apply, layers=tuple(layers),
                                   fisher_type='empirical'))(params, batch, jax.random.key(0))
  return factors.finalize(sums, views)


def _routed(model, params, tokens, block: int, expert: int) -> np.ndarray:
  """[batch, seq] True where `expert` is among the token's top-k router probabilities."""
  _, state = model.apply(params, tokens, mutable=['intermediates'])
  probs = np.asarray(state['intermediates'][f'block_{block}']['mlp']['router_probs'][0])
  top = np.argsort(-probs, axis=-1)[..., :CONFIG.experts_per_token]
  return (top == expert).any(-1)


def _direct(layer: str):
  """(A, G, n) of `layer` from its inputs and the loss gradient at its output, over the routed
  unmasked tokens, with the model run through a hand-written interceptor (not `taps`)."""
  model, params, batch = _setup()
  seen = {}

  def run(delta):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and '/'.join(context.module.path) == layer:
        seen['x'] = args[0]
        out = out + delta
      return out

    with nn.intercept_methods(interceptor):
      logits = model.apply(params, batch['inputs'])
    loss, _ = factors.batch_loss(batch, jax.random.key(0), fisher_type='empirical')(logits)
    return loss, seen['x']

  width = _layer_width(params, layer)
  g, x = jax.grad(run, has_aux=True)(jnp.zeros(batch['inputs'].shape + (width,)))
  routed = _routed(model, params, batch['inputs'], 1, 2)
  keep = routed & (np.asarray(batch['mask']) > 0)
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  assert np.all(x[~routed] == 0) and np.all(g[~routed] == 0)  # zero rows, zero gradients
  xs, gs = x[keep], g[keep]
  n = keep.sum()
  return xs.T @ xs / n, gs.T @ gs / n, n, routed


def _layer_width(params, layer: str) -> int:
  node: Any = params['params']
  for part in layer.split('/'):
    node = node[part]
  return node['kernel'].shape[-1]


@pytest.mark.parametrize('projection', ['gate', 'down'])
def test_expert_factors_average_over_its_routed_tokens(projection):
  layer = f'{EXPERT}/{projection}'
  got = _factors([layer])[layer]
  A, G, n, routed = _direct(layer)
  assert 0 < routed.sum() < routed.size  # the expert serves some tokens, not all
  assert got.count == n
  np.testing.assert_allclose(got.A, A, rtol=2e-5, atol=1e-7 * np.abs(A).max())
  np.testing.assert_allclose(got.G, G, rtol=2e-5, atol=1e-7 * np.abs(G).max())


def test_every_expert_and_the_router_are_layers():
  model, params, batch = _setup()
  views = capture.find_layers(model.apply, params, batch['inputs'], select=r'block_0/mlp/.*')
  assert list(views) == ['block_0/mlp/router'] + [
      f'block_0/mlp/experts_{e}/{p}' for e in range(4) for p in ('gate', 'up', 'down')]
  f = _factors(list(views))
  unmasked = float(np.asarray(batch['mask']).sum())
  assert f['block_0/mlp/router'].count == unmasked  # the router sees every token
  # Each unmasked token is counted by exactly top-k experts.
  total = sum(f[f'block_0/mlp/experts_{e}/gate'].count for e in range(4))
  assert total == CONFIG.experts_per_token * unmasked


class _Marked(nn.Dense):
  sample_mask: Any = None


class _TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    keep = x[..., 0] > 0
    h = _Marked(6, sample_mask=keep, name='marked')(x)
    return nn.Dense(3, name='plain')(jnp.tanh(h))


def test_a_layer_sample_mask_multiplies_the_loss_mask():
  model = _TwoLayers()
  x = jax.random.normal(jax.random.key(2), (5, 4))
  params = model.init(jax.random.key(0), x)
  mask = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
  batch = {'inputs': x, 'labels': jnp.array([0, 1, 2, 0, 1]), 'mask': mask}
  samples = jax.jit(functools.partial(factors.layer_samples, model.apply,
                                      layers=('marked', 'plain'), fisher_type='empirical'))(
      params, batch, jax.random.key(0))
  np.testing.assert_array_equal(samples['marked'].mask, mask * (x[:, 0] > 0))
  np.testing.assert_array_equal(samples['plain'].mask, mask)


class _BadMark(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Marked(3, sample_mask=jnp.ones((2,)), name='marked')(x)


def test_a_sample_mask_of_another_shape_is_an_error():
  model = _BadMark()
  x = jnp.ones((5, 4))
  params = model.init(jax.random.key(0), x)
  batch = {'inputs': x, 'labels': jnp.zeros((5,), jnp.int32)}
  with pytest.raises(ValueError, match=r"layer 'marked' has sample_mask of shape \(2,\) but "
                                       r'samples of shape \(5,\)'):
    factors.layer_samples(model.apply, params, batch, jax.random.key(0), layers=('marked',),
                          fisher_type='empirical')
