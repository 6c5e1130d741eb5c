"""K-FAC on DenseGeneral, Einsum and Conv layers, biases, shared layers and other likelihoods.

Each estimate is checked against an exact computation that does not use the
estimator: the Fisher block of one example at one position (where the
Kronecker factorization is exact), or the K-FAC formula evaluated from
per-sample inputs and output gradients computed by hand.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import parallel
from lossland.curvature import capture, edit, eigen, factors, layer_views

jax.config.update('jax_threefry_partitionable', True)

def _mesh1():
  """One device, for batches that do not divide over the 8 fake devices."""
  return parallel.make_mesh({'data': 1}, jax.devices()[:1])


class Head(nn.Module):
  """`layer` -> tanh -> flatten -> Dense head: a classifier or regressor around one layer."""
  layer: nn.Module
  outputs: int = 3

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(self.layer(x))
    return nn.Dense(self.outputs, name='head')(h.reshape(h.shape[0], -1))


def _init(model, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), shape)
  params = model.init(jax.random.key(seed), x)
  # Non-zero biases, so the homogeneous coordinate matters.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed + 2), p.shape),
                        params)
  return params, x


def _estimate(model, params, batch, layers, **kw):
  return factors.estimate_factors(model.apply, params, [batch], rng=jax.random.key(7),
                                  select=list(layers), mesh=_mesh1(), fisher_type='empirical',
                                  **kw)


def _grad_matrix(model, params, batch, path, view, loss):
  """The gradient of `loss` with respect to the layer matrix W [rows_in, d_out]."""
  grads = jax.grad(lambda p: loss(model.apply(p, batch['inputs'])))(params)
  return np.asarray(layer_views.kernel_matrix(view, grads['params'][path]))


def _nll(batch):
  return lambda logits: -jax.nn.log_softmax(logits)[0, batch['labels'][0]]


SINGLE_POSITION = {
    'dense_general': (nn.DenseGeneral((2, 3), axis=(-2, -1)), (1, 3, 2)),
    'einsum': (nn.Einsum((4, 2, 3), 'bc,chd->bhd'), (1, 4)),
    'conv_one_output_position': (nn.Conv(4, (3, 3), padding='VALID'), (1, 3, 3, 2)),
}


@pytest.mark.parametrize('homogeneous', [False, True])
@pytest.mark.parametrize('name', sorted(SINGLE_POSITION))
def test_single_position_block_equals_exact_fisher(name, homogeneous):
  """One example, one position: K-FAC's A ⊗ G is the exact Fisher block, bias row included."""
  layer, shape = SINGLE_POSITION[name]
  model = Head(layer)
  params, x = _init(model, shape)
  batch = {'inputs': x, 'labels': jnp.array([2])}
  f = _estimate(model, params, batch, ['layer'], homogeneous=homogeneous)['layer']
  assert f.count == 1 and f.view.homogeneous == homogeneous
  assert f.A.shape[0] == f.view.d_in + homogeneous
  v = _grad_matrix(model, params, batch, 'layer', f.view, _nll(batch)).ravel()
  # float32 products of O(1) numbers: rounding relative to the largest entry.
  np.testing.assert_allclose(np.kron(f.A, f.G), np.outer(v, v), rtol=1e-5,
                             atol=1e-5 * np.abs(v).max() ** 2)


def _manual_patches(x, kh, kw, stride, pad):
  """[n, oh, ow, cin*kh*kw] receptive fields, cin-major, by explicit slicing."""
  xp = np.pad(np.asarray(x), ((0, 0), pad[0], pad[1], (0, 0)))
  n, hp, wp, cin = xp.shape
  oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  out = np.zeros((n, oh, ow, cin * kh * kw), np.float32)
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]  # [n, kh, kw, c]
      out[:, i, j] = np.transpose(patch, (0, 3, 1, 2)).reshape(n, -1)
  return out


def test_conv_factors_equal_the_kfc_formula_from_per_position_samples():
  """KFC (Grosse & Martens 2016): A = mean over output positions of patch patchᵀ, G of g gᵀ."""
  conv = nn.Conv(3, (3, 2), strides=2, padding=((1, 1), (0, 1)))
  model = Head(conv, outputs=4)
  params, x = _init(model, (2, 5, 6, 2))
  labels = jnp.array([1, 3])
  batch = {'inputs': x, 'labels': labels}
  f = _estimate(model, params, batch, ['layer'], homogeneous=True)['layer']
  # By hand: the conv output y, the gradient of the summed NLL at y, and the patches.
  conv_params = params['params']['layer']
  head = params['params']['head']

  def nll_of_y(y):
    h = jnp.tanh(y).reshape(2, -1)
    logits = h @ head['kernel'] + head['bias']
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum()

  y = conv.apply({'params': conv_params}, x)
  g = np.asarray(jax.grad(nll_of_y)(y)).reshape(-1, 3)  # [n * oh * ow, cout]
  patches = _manual_patches(x, 3, 2, 2, ((1, 1), (0, 1)))
  a = np.concatenate([patches.reshape(-1, patches.shape[-1]), np.ones((len(g), 1))], 1)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3),
                             a @ np.asarray(layer_views.kernel_matrix(f.view, conv_params)),
                             rtol=1e-4, atol=1e-5)  # the hand-made patches are the layer's rows
  n = len(g)
  assert f.count == n == 2 * 3 * 3
  np.testing.assert_allclose(f.A, a.T @ a / n, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f.G, g.T @ g / n, rtol=1e-5, atol=1e-6 * np.abs(g).max() ** 2)

  # EK-FAC in the same basis: the second moment of the projected per-position samples.
  bases = eigen.eigenbasis({'layer': f})
  s = eigen.estimate_eigencorrection(model.apply, params, bases, [batch], rng=jax.random.key(0),
                                     mesh=_mesh1(), fisher_type='empirical')['layer']
  b = bases['layer']
  at, gt = a @ np.asarray(b.UA), g @ np.asarray(b.UG)
  np.testing.assert_allclose(s, (at ** 2).T @ gt ** 2 / n, rtol=1e-4,
                             atol=1e-6 * np.abs(s).max())


class Twice(nn.Module):
  """One Dense layer applied twice in a row (weight sharing), then a head."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(4, name='shared')
    h = shared(jnp.tanh(shared(x)))
    return nn.Dense(3, name='head')(h)


def test_layer_called_twice_contributes_both_calls_as_samples():
  model = Twice()
  params, x = _init(model, (3, 4))
  labels = jnp.array([0, 2, 1])
  batch = {'inputs': x, 'labels': labels}
  (first, second) = capture.find_layers(model.apply, params, x, select='shared')['shared']
  assert first.sample_shape == second.sample_shape == (3,)
  f = _estimate(model, params, batch, ['shared'], homogeneous=True)['shared']
  # By hand: explicit forward with perturbations e1, e2 on the two calls' outputs.
  p = params['params']
  w, bias = p['shared']['kernel'], p['shared']['bias']

  def nll(e1, e2):
    y1 = x @ w + bias + e1
    y2 = jnp.tanh(y1) @ w + bias + e2
    logits = y2 @ p['head']['kernel'] + p['head']['bias']
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum()

  zeros = jnp.zeros((3, 4))
  g1, g2 = jax.grad(nll, argnums=(0, 1))(zeros, zeros)
  a1, a2 = np.asarray(x), np.tanh(np.asarray(x @ w + bias))
  a = np.concatenate([np.concatenate([a1, a2]), np.ones((6, 1))], 1)  # call order, then the 1
  g = np.concatenate([g1, g2])
  assert f.count == 6
  np.testing.assert_allclose(f.A, a.T @ a / 6, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f.G, g.T @ g / 6, rtol=1e-5, atol=1e-6 * np.abs(g).max() ** 2)


class Regressor(nn.Module):
  outputs: int = 2

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.outputs, name='out')(jnp.tanh(nn.Dense(5, name='hidden')(x)))


@pytest.mark.parametrize('fisher_type', ['empirical', 'true'])
def test_gaussian_likelihood_single_example_block_is_exact(fisher_type):
  model = Regressor()
  params, x = _init(model, (1, 3))
  targets = jnp.array([[0.5, -1.0]])
  batch = {'inputs': x, 'targets': targets}
  rng = jax.random.key(4)
  f = factors.estimate_factors(model.apply, params, [batch], rng=rng, select=['hidden', 'out'],
                               mesh=_mesh1(), fisher_type=fisher_type, likelihood='gaussian',
                               homogeneous=True)
  if fisher_type == 'true':  # the same draw the estimator made: y ~ N(mean, I)
    mean = model.apply(params, x)
    targets = mean + jax.random.normal(jax.random.fold_in(rng, 0), mean.shape)
  loss = lambda out: 0.5 * jnp.sum((targets - out) ** 2)
  for path in ('hidden', 'out'):
    v = _grad_matrix(model, params, batch, path, f[path].view, loss).ravel()
    np.testing.assert_allclose(np.kron(f[path].A, f[path].G), np.outer(v, v), rtol=1e-5,
                               atol=1e-5 * np.abs(v).max() ** 2)


def test_gaussian_true_fisher_of_the_output_layer_has_unit_noise():
  """At the output layer g = mean - y = -noise, so G = E[noise noiseᵀ] -> I (unit variance)."""
  model = Regressor(outputs=3)
  params, x = _init(model, (4096, 3))
  f = factors.estimate_factors(model.apply, params, [{'inputs': x}], rng=jax.random.key(0),
                               select=['out'], mesh=_mesh1(), likelihood='gaussian')
  # 4096 samples: each entry's standard error is about 1/64; 0.08 is 5 of them.
  np.testing.assert_allclose(f['out'].G, np.eye(3), atol=0.08)


def test_categorical_on_a_regression_model_is_a_clear_error():
  model = Regressor(outputs=1)
  params, x = _init(model, (2, 3))
  with pytest.raises(ValueError, match="likelihood='gaussian'"):
    _estimate(model, params, {'inputs': x, 'targets': jnp.zeros((2, 1))}, ['out'])
  model = Regressor(outputs=2)
  params, x = _init(model, (2, 3))
  with pytest.raises(ValueError, match="targets are float32.*likelihood='gaussian'"):
    _estimate(model, params, {'inputs': x, 'targets': jnp.zeros((2, 2))}, ['out'])


def test_zero_output_gradients_are_an_error_naming_the_likelihood():
  model = Regressor(outputs=2)
  params, x = _init(model, (2, 3))
  batch = {'inputs': x, 'targets': jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match="layer 'out' are all zero.*likelihood"):
    factors.estimate_factors(model.apply, params, [batch], rng=jax.random.key(0), select=['out'],
                             mesh=_mesh1(), likelihood=lambda out, b, rng: 0.0 * out.sum(-1))


def test_custom_likelihood():
  """A callable's per-example losses: 1.5‖y - t‖² has g = 3(out - t), so G = 9 G_gaussian."""
  model = Regressor()
  params, x = _init(model, (4, 3))
  batch = {'inputs': x, 'targets': jax.random.normal(jax.random.key(9), (4, 2))}
  kw = dict(rng=jax.random.key(0), select=['hidden', 'out'], mesh=_mesh1())
  custom = factors.estimate_factors(
      model.apply, params, [batch],
      likelihood=lambda out, b, rng: 1.5 * jnp.sum((out - b['targets']) ** 2, -1), **kw)
  gauss = factors.estimate_factors(model.apply, params, [batch], likelihood='gaussian',
                                   fisher_type='empirical', **kw)
  for path in ('hidden', 'out'):
    np.testing.assert_allclose(custom[path].A, gauss[path].A, rtol=1e-6)
    np.testing.assert_allclose(custom[path].G, 9 * gauss[path].G, rtol=1e-5,
                               atol=1e-6 * np.abs(custom[path].G).max())
  # A callable that samples its own targets from the rng it is given: a Gaussian with σ = 2,
  # y = mean + 2ε, NLL ‖y - mean‖²/8, so g = -ε/2 at the output and G -> I/4.
  def sigma2(out, b, rng):
    y = jax.lax.stop_gradient(out) + 2.0 * jax.random.normal(rng, out.shape)
    return jnp.sum((y - out) ** 2, -1) / 8

  wide = {'inputs': jax.random.normal(jax.random.key(5), (4096, 3))}
  f = factors.estimate_factors(model.apply, params, [wide], likelihood=sigma2, **kw)
  # 4096 samples: each entry's standard error is about 0.25/64; 0.02 is 5 of them.
  np.testing.assert_allclose(f['out'].G, np.eye(2) / 4, atol=0.02)
  with pytest.raises(ValueError, match="fisher_type='empirical' has no meaning for a likelihood"):
    factors.estimate_factors(model.apply, params, [batch], fisher_type='empirical',
                             likelihood=lambda out, b, rng: out.sum(-1), **kw)
  with pytest.raises(ValueError, match="likelihood must be one of"):
    factors.estimate_factors(model.apply, params, [batch], likelihood='poisson', **kw)


class Dropped(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    h = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(nn.Dense(6, name='hidden')(x)))
    return nn.Dense(3, name='head')(h)


def test_apply_kwargs_and_the_default_mesh():
  model = Dropped()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  params = model.init(jax.random.key(1), x, train=False)
  batch = {'inputs': np.asarray(x), 'labels': np.arange(8) % 3}
  run = functools.partial(factors.estimate_factors, model.apply, params, [batch],
                          rng=jax.random.key(2), select=['head'])
  f = run(apply_kwargs={'train': False})  # mesh=None: all 8 local devices
  assert len(f['head'].A.sharding.device_set) == len(jax.local_devices()) == 8
  h = np.tanh(np.asarray(x @ params['params']['hidden']['kernel'] +
                         params['params']['hidden']['bias']))
  np.testing.assert_allclose(f['head'].A, h.T @ h / 8, rtol=1e-5, atol=1e-6)
  dropped = run(apply_kwargs={'train': True, 'rngs': {'dropout': jax.random.key(3)}})
  assert not np.allclose(dropped['head'].A, f['head'].A)  # dropout zeroed some inputs
  with pytest.raises(ValueError, match="each batch must be a dict with 'inputs'"):
    factors.estimate_factors(model.apply, params, [np.asarray(x)], rng=jax.random.key(2))


class Mixed(nn.Module):
  """A Conv stem, an Einsum and a DenseGeneral before a head: every layer type at once."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (2, 2), strides=2, name='stem')(x))  # [n, 2, 2, 3]
    h = h.reshape(h.shape[0], 4, 3)
    h = jnp.tanh(nn.Einsum((3, 2, 2), 'btc,chd->bthd', name='mix')(h))  # [n, 4, 2, 2]
    h = jnp.tanh(nn.DenseGeneral(5, axis=(-2, -1), name='proj')(h))  # [n, 4, 5]
    return nn.Dense(3, name='head')(h.mean(1))


def test_edit_of_every_layer_type_acts_in_the_eigenbasis():
  """Kernel and bias rows of each layer type are edited in its matrix form (homogeneous)."""
  model = Mixed()
  params, x = _init(model, (8, 4, 4, 2))
  f = factors.estimate_factors(model.apply, params, [{'inputs': x}], rng=jax.random.key(0),
                               mesh=_mesh1(), homogeneous=True)
  assert list(f) == ['stem', 'mix', 'proj', 'head']
  assert f['stem'].count == 8 * 2 * 2 and f['mix'].count == 8 * 4 and f['proj'].count == 8 * 4
  bases = eigen.eigenbasis(f)
  same = edit.curvature_edit(params, bases, 1.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), same, params)
  masks = edit.curvature_masks(bases, 0.6)
  edited = edit.masked_edit(params, bases, masks)
  for path, b in bases.items():
    before = capture.layer_matrix(params, b.view)
    after = capture.layer_matrix(edited, b.view)
    # The kept coefficients are unchanged and the dropped ones are zero (float32 rounding of
    # two orthogonal changes of basis, relative to the matrix's scale).
    np.testing.assert_allclose(eigen.coefficients(after, b.UA, b.UG),
                               eigen.coefficients(before, b.UA, b.UG) * masks[path],
                               atol=1e-5 * np.abs(before).max())
    assert not np.allclose(edited['params'][path]['bias'], params['params'][path]['bias'])
  # SVD control and EK-FAC on the same layers.
  views = {n: b.view for n, b in bases.items()}
  truncated = edit.svd_edit(params, views, {n: 1 for n in views})
  for n, view in views.items():
    assert np.linalg.matrix_rank(np.asarray(capture.layer_matrix(truncated, view)), tol=1e-5) == 1
  masses = eigen.estimate_eigencorrection(model.apply, params, bases, [{'inputs': x}],
                                          rng=jax.random.key(0), mesh=_mesh1())
  assert {n: m.shape for n, m in masses.items()} == {n: b.shape for n, b in bases.items()}
