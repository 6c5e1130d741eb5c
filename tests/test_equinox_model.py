"""An Equinox model (neither linen nor NNX) through `eqx.partition`: the same numbers as linen."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import curvature, lowrank, taps
from lossland import stitching as st

eqx = pytest.importorskip('equinox')

SIZES = (5, 8, 8, 3)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in SIZES[1:-1]:
      x = jnp.tanh(nn.Dense(width)(x))
    return nn.Dense(SIZES[-1])(x)


@pytest.fixture(scope='module')
def twins():
  x = jax.random.normal(jax.random.key(0), (16, SIZES[0]))
  linen = LinenMLP()
  variables = linen.init(jax.random.key(1), x)
  mlp = eqx.nn.MLP(SIZES[0], SIZES[-1], SIZES[1], len(SIZES) - 2, activation=jnp.tanh,
                   key=jax.random.key(2))
  for i, layer in enumerate(mlp.layers):  # Equinox keeps weight [out, in]: kernelᵀ
    dense = variables['params'][f'Dense_{i}']
    mlp = eqx.tree_at(lambda m, i=i: (m.layers[i].weight, m.layers[i].bias), mlp,
                      (dense['kernel'].T, dense['bias']))
  params, static = eqx.partition(mlp, eqx.is_array)

  def apply(p, x):  # one example at a time, vmapped over the batch, as Equinox code runs
    return jax.vmap(eqx.combine(p, static))(x)

  batch = {'inputs': x, 'labels': jnp.arange(16) % SIZES[-1]}
  return linen, variables, apply, params, static, batch


def test_equinox_layers_are_found_and_named_by_their_weights(twins):
  _, _, apply, params, _, batch = twins
  assert list(taps.find_layers(apply, params, batch['inputs'])) == [
      'layers/0', 'layers/1', 'layers/2']
  np.testing.assert_allclose(apply(params, batch['inputs']),
                             twins[0].apply(twins[1], batch['inputs']), atol=1e-6)


def test_equinox_factors_edit_and_cka_equal_linens(twins):
  linen, variables, apply, params, static, batch = twins
  kw = dict(rng=jax.random.key(3), homogeneous=True)
  want = curvature.estimate_factors(linen.apply, variables, [batch], **kw)
  got = curvature.estimate_factors(apply, params, [batch], **kw)
  for (name, f), w in zip(got.items(), want.values()):
    # the transposed weight: the same matrix W = kernel, read as weightᵀ
    np.testing.assert_allclose(f.A, w.A, atol=1e-6)
    np.testing.assert_allclose(f.G, w.G, atol=1e-6)
  edited = curvature.curvature_edit(params, curvature.eigenbasis(got), rho=0.5)
  edited_linen = curvature.curvature_edit(variables, curvature.eigenbasis(want), rho=0.5)
  model = eqx.combine(edited, static)  # the user's own structure comes back
  np.testing.assert_allclose(model.layers[1].weight,
                             edited_linen['params']['Dense_1']['kernel'].T, atol=1e-5)
  np.testing.assert_allclose(model.layers[2].bias, edited_linen['params']['Dense_2']['bias'],
                             atol=1e-5)
  cka = st.layer_similarity(apply, params, linen, variables, batch,
                            layers_a=['layers/0', 'layers/1'],
                            layers_b=['Dense_0', 'Dense_1'])['linear_cka'].values
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-5)


def test_equinox_replace_dense_at_full_rank_is_the_same_function(twins):
  _, _, apply, params, _, batch = twins
  fm = lowrank.replace_dense(apply, 'lowrank', select='layers/1', rank=8, params=params)
  x = batch['inputs']
  np.testing.assert_allclose(fm.apply(fm.convert(x), x), apply(params, x), atol=1e-5)
