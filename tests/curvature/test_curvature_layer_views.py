"""Every supported linen layer as rows(x) @ W: the function, the round trip, the refusals."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland.curvature import layer_views

LAYERS = {
    'dense': (nn.Dense(5), (2, 3, 4)),
    'dense_general_two_axes': (nn.DenseGeneral((2, 3), axis=(-2, -1)), (4, 3, 2)),
    'dense_general_middle_axis': (nn.DenseGeneral(5, axis=1), (2, 4, 3)),
    'einsum_heads': (nn.Einsum((4, 2, 3), 'btc,chd->bthd'), (2, 5, 4)),
    'einsum_transposed_output': (nn.Einsum((4, 3), 'btc,cd->tbd'), (2, 5, 4)),
    'conv_same': (nn.Conv(5, (3, 2)), (2, 6, 5, 3)),
    'conv_strided_dilated': (nn.Conv(4, (3, 3), strides=2, kernel_dilation=(1, 2),
                                     padding=((1, 0), (2, 2))), (2, 7, 6, 3)),
    'conv_1d_valid': (nn.Conv(3, (2,), padding='VALID'), (2, 6, 4)),
}


class _Wrap(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)


def _view_and_output(name, homogeneous=False):
  layer, shape = LAYERS[name]
  x = jax.random.normal(jax.random.key(0), shape)
  model = _Wrap(layer.clone())
  variables = model.init(jax.random.key(1), x)
  params = variables['params']['layer']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  y = model.apply({'params': {'layer': params}}, x)
  bound = model.bind({'params': {'layer': params}}).layer
  view = layer_views.view_of('layer', bound, shape, homogeneous=homogeneous)
  return view, params, x, y


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('homogeneous', [False, True])
def test_rows_times_matrix_is_the_layer(name, homogeneous):
  view, params, x, y = _view_and_output(name, homogeneous)
  w = layer_views.kernel_matrix(view, params)
  rows = layer_views.input_rows(view, x)
  assert rows.shape == (int(np.prod(view.sample_shape)), view.rows_in)
  assert w.shape == (view.rows_in, view.d_out)
  out = rows @ w
  if 'bias' in params and not homogeneous:
    out = out + params['bias'].reshape(1, view.d_out)  # the bias in d_out's order
  np.testing.assert_allclose(out, layer_views.output_rows(view, y), rtol=1e-5, atol=1e-5)
  back = layer_views.params_from_matrix(view, w, params)
  for key in params:
    np.testing.assert_array_equal(back[key], params[key])


def test_refusals_name_the_layer():
  x = jnp.ones((2, 5, 4))
  batched = _Wrap(nn.Einsum((2, 4, 3), 'bsc,bcd->bsd'))
  v = batched.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="layer 'layer'.*not one matrix"):
    layer_views.view_of('layer', batched.bind(v).layer, x.shape)
  grouped = _Wrap(nn.Conv(4, (3,), feature_group_count=2))
  v = grouped.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='grouped'):
    layer_views.view_of('layer', grouped.bind(v).layer, x.shape)
  norm = _Wrap(nn.LayerNorm())
  v = norm.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='LayerNorm; K-FAC supports'):
    layer_views.view_of('layer', norm.bind(v).layer, x.shape)
