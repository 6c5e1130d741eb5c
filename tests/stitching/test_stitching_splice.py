"""Capture and splice on a layer called more than once: every call is a sample."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import stitching as st


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(4, name='shared')
    h = shared(jnp.tanh(shared(x)))
    return nn.Dense(2, name='head')(h)


def _setup():
  model = Twice()
  x = jax.random.normal(jax.random.key(0), (3, 4))
  return model, model.init(jax.random.key(1), x), x


def test_capture_joins_the_calls_in_order():
  model, params, x = _setup()
  _, acts = st.capture(model, params, x, ['shared'])
  p = params['params']['shared']
  first = x @ p['kernel'] + p['bias']
  second = jnp.tanh(first) @ p['kernel'] + p['bias']
  np.testing.assert_allclose(acts['shared'], jnp.concatenate([first, second]), rtol=1e-5,
                             atol=1e-6)
  assert st.layer_names(model, params, x) == ['shared', 'head']


def test_replace_layer_replaces_every_call():
  model, params, x = _setup()
  out = st.replace_layer(model, params, x, 'shared', jnp.zeros_like)
  np.testing.assert_allclose(out, jnp.broadcast_to(params['params']['head']['bias'], (3, 2)))


def test_stitching_a_layer_called_twice_is_refused():
  model, params, x = _setup()
  with pytest.raises(ValueError, match="'shared'.*called 2 times"):
    st.stitched_apply(model, params, model, params, x, layer_a='shared', layer_b='head',
                      stitch=lambda a, t: a)
  with pytest.raises(ValueError, match="'shared'.*more than once"):
    st.stitched_apply(model, params, model, params, x, layer_a='head', layer_b='shared',
                      stitch=lambda a, t: jnp.zeros(t.shape))
