"""K-FAC factors checked against brute-force Fisher blocks; sharding; traces; bad input."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import models, parallel
from lossland.curvature import capture, eigen, factors

jax.config.update('jax_threefry_partitionable', True)


def _factors(apply_fn, params, batch, rng, layers, **kw):
  """One batch through the jitted factor_sums, finalized: {path: LayerFactors}."""
  homogeneous = kw.get('homogeneous', False)
  views = capture.find_layers(apply_fn, params, batch['inputs'], select=list(layers),
                              homogeneous=homogeneous, apply_kwargs=kw.get('apply_kwargs'))
  sums = jax.jit(functools.partial(factors.factor_sums, apply_fn, layers=tuple(layers), **kw))(
      params, batch, rng)
  return factors.finalize(sums, views)


def _mlp():
  model = models.MLP(features=(5,), num_classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  return model, params


@pytest.mark.parametrize('fisher_type', ['empirical', 'true'])
def test_single_example_block_equals_exact_fisher(fisher_type):
  model, params = _mlp()
  x = jax.random.normal(jax.random.key(1), (1, 4))
  batch = {'inputs': x, 'labels': jnp.array([2])}
  rng = jax.random.key(3)
  f = _factors(model.apply, params, batch, rng, ('dense_0', 'head'), fisher_type=fisher_type)
  label = batch['labels']
  if fisher_type == 'true':  # the same sample the estimator drew
    label = jax.random.categorical(rng, model.apply(params, x))

  def nll(p):
    logits = model.apply(p, x)
    return -jax.nn.log_softmax(logits)[0, label[0]]

  grads = jax.grad(nll)(params)['params']
  for name in ('dense_0', 'head'):
    v = grads[name]['kernel'].ravel()  # row-major vec of K [d_in, d_out]
    exact = np.outer(v, v)
    approx = np.kron(f[name].A, f[name].G)
    np.testing.assert_allclose(approx, exact, atol=1e-5, rtol=1e-5)


def _lm():
  model = models.TransformerLM(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mlp_dim=24)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 16, size=(8, 7))
  mask = np.ones((8, 6), np.float32)
  mask[:, -2:] = 0.0  # padding positions
  batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'mask': mask}
  return model, params, batch


def test_masked_positions_are_excluded():
  model, params, batch = _lm()
  layers = ('block_0/mlp/up',)
  f = _factors(model.apply, params, batch, jax.random.key(0), layers, fisher_type='empirical')
  assert f['block_0/mlp/up'].count == 8 * 4
  trimmed = {'inputs': batch['inputs'][:, :4], 'targets': batch['targets'][:, :4]}
  f2 = _factors(model.apply, params, trimmed, jax.random.key(0), layers, fisher_type='empirical')
  # Causal model: inputs at positions < 4 do not depend on later tokens, and the loss
  # of masked positions is excluded, so both g and a agree on the kept positions.
  # Same sums in another order: float32 rounding relative to each factor's scale.
  for key in ('A', 'G'):
    want = getattr(f2['block_0/mlp/up'], key)
    np.testing.assert_allclose(getattr(f['block_0/mlp/up'], key), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('fisher_type', ['empirical', 'true'])
def test_mesh_of_8_equals_one_device(fisher_type):
  model, params, batch = _lm()
  pattern = r'block_\d+/mlp/(gate|up|down)'
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.make_mesh({'data': -1}, devices)
    f = factors.estimate_factors(model.apply, params, [batch, batch], select=pattern, mesh=mesh,
                                 rng=jax.random.key(5), fisher_type=fisher_type)
    results.append(f)
    if len(devices) == 8:
      assert f['block_1/mlp/gate'].A.sharding.is_fully_replicated
      assert len(f['block_1/mlp/gate'].A.sharding.device_set) == 8
  assert set(results[0]) == {f'block_{i}/mlp/{p}' for i in range(2) for p in ('gate', 'up', 'down')}
  for name in results[0]:
    for key in ('A', 'G'):
      want = getattr(results[0][name], key)  # psum order differs: rounding relative to scale
      np.testing.assert_allclose(getattr(results[1][name], key), want, rtol=1e-5,
                                 atol=1e-5 * np.abs(want).max())


def test_accumulator_traces_once_per_shape():
  model, params, batch = _lm()
  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:8])
  layers = ('block_0/mlp/gate', 'block_1/mlp/down')
  views = capture.find_layers(model.apply, params, batch['inputs'], select=layers)
  acc = factors.make_factor_accumulator(model.apply, layers, mesh=mesh)
  sums = jax.device_put(factors.zero_sums(views), parallel.replicated(mesh))
  for i in range(3):
    sums = parallel.settle(acc(sums, params, parallel.shard_batch(batch, mesh), jax.random.key(i)))
  assert acc._cache_size() == 1
  corr = eigen.make_eigencorrection_accumulator(model.apply, mesh=mesh)
  bases = eigen.eigenbasis(factors.finalize(sums, views))
  s = jax.device_put(eigen.zero_eigencorrection_sums(bases), parallel.replicated(mesh))
  for i in range(3):
    s = parallel.settle(corr(s, params, bases, parallel.shard_batch(batch, mesh),
                             jax.random.key(i)))
  assert corr._cache_size() == 1


def test_estimate_factors_traces_once_across_calls():
  model, params, batch = _lm()
  traces = []

  def apply_fn(p, x):
    traces.append(1)  # runs only while jax traces the model
    return model.apply(p, x)

  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:8])
  layers = r'block_\d+/mlp/(gate|down)'
  first = factors.estimate_factors(apply_fn, params, [batch], rng=jax.random.key(0),
                                   select=layers, mesh=mesh)
  traced = len(traces)
  again = factors.estimate_factors(apply_fn, params, [batch, batch], rng=jax.random.key(0),
                                   select=layers, mesh=mesh)
  assert len(traces) == traced  # the layers and the compiled accumulator were reused
  assert list(again) == list(first)
  for name in first:  # batch 1 samples other targets; the A factor is the same
    np.testing.assert_allclose(again[name].A, first[name].A, rtol=1e-6)
  factors.estimate_factors(apply_fn, params, [batch], rng=jax.random.key(0),
                           select=[r'block_0/mlp/gate'], mesh=mesh)
  assert len(traces) > traced  # another selection is another program


def test_equal_linen_modules_share_the_compiled_accumulator(monkeypatch):
  model, params, batch = _lm()
  builds = []
  build = factors._build_layers_and_accumulator
  monkeypatch.setattr(factors, '_build_layers_and_accumulator',
                      lambda *a: (builds.append(1), build(*a))[1])
  layers = r'block_0/mlp/gate'
  for fresh in (model.clone(), model.clone()):  # equal modules, different objects
    factors.estimate_factors(fresh, params, [batch], rng=jax.random.key(0), select=layers)
  assert len(builds) == 1


@pytest.mark.parametrize('d', [7, 512, 1000, 1024])
def test_weighted_gram_equals_the_full_product(d):
  x = jax.random.normal(jax.random.key(0), (96, d))
  m = jax.random.uniform(jax.random.key(1), (96,))
  want = np.asarray(x * m[:, None], np.float64).T @ np.asarray(x, np.float64)
  got = np.asarray(jax.jit(factors.weighted_gram)(x, m))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  small = np.asarray(factors.weighted_gram(x, m, min_block=2, max_blocks=5))
  np.testing.assert_allclose(small, want, atol=1e-5 * np.abs(want).max())


def test_accumulation_compiles_to_in_graph_all_reduce():
  model, params, batch = _lm()
  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:8])
  layers = [f'block_{i}/mlp/{p}' for i in range(2) for p in ('gate', 'up', 'down')]
  views = capture.find_layers(model.apply, params, batch['inputs'], select=layers)
  acc = factors.make_factor_accumulator(model.apply, layers, mesh=mesh)
  hlo = acc.lower(factors.zero_sums(views), params, parallel.shard_batch(batch, mesh),
                  jax.random.key(0)).compile().as_text()
  # Per-device sums of all 6 layers are combined on device by one (tuple) all-reduce.
  assert len(re.findall(r'= .*all-reduce(-start)?\(', hlo)) == 1


def test_per_device_sums_need_no_collective_and_add_up_to_the_replicated_sums():
  model, params, batch = _lm()
  mesh = parallel.make_mesh({'data': -1}, jax.devices()[:8])
  layers = [f'block_{i}/mlp/{p}' for i in range(2) for p in ('gate', 'up', 'down')]
  views = capture.find_layers(model.apply, params, batch['inputs'], select=layers)
  batch = parallel.shard_batch(batch, mesh)
  acc = factors.make_factor_accumulator(model.apply, layers, mesh=mesh, per_device=True)
  zero = factors.zero_sums(views, parts=8)
  hlo = acc.lower(zero, params, batch, jax.random.key(0)).compile().as_text()
  assert not re.findall(r'(all-reduce|all-gather|all-to-all|collective-permute)(-start)?\(', hlo)
  parts = acc(jax.device_put(zero, jax.sharding.NamedSharding(mesh, jax.P('data'))), params,
              batch, jax.random.key(0))
  assert parts[layers[0]].A.shape[0] == 8
  got = factors.combine_parts(parts, mesh)
  assert got[layers[0]].A.sharding.is_fully_replicated
  want = factors.make_factor_accumulator(model.apply, layers, mesh=mesh)(
      factors.zero_sums(views), params, batch, jax.random.key(0))
  for name in layers:
    for x, y in zip(got[name], want[name]):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()))


def test_eigencorrection_equals_exact_diagonal_in_eigenbasis():
  model, params = _mlp()
  x = jax.random.normal(jax.random.key(1), (6, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  batch = {'inputs': x, 'labels': y}
  f = _factors(model.apply, params, batch, jax.random.key(0), ('dense_0',),
               fisher_type='empirical')
  bases = eigen.eigenbasis(f)
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  s = eigen.estimate_eigencorrection(model.apply, params, bases, [batch], mesh=mesh,
                                     rng=jax.random.key(0), fisher_type='empirical')['dense_0']

  def nll(p, xi, yi):
    return -jax.nn.log_softmax(model.apply(p, xi[None]))[0, yi]

  per_example = jax.vmap(jax.grad(nll), (None, 0, 0))(params, x, y)['params']['dense_0']['kernel']
  b = bases['dense_0']
  proj = jnp.einsum('ai,nab,bj->nij', b.UA, per_example, b.UG)  # [n, d_in, d_out]
  np.testing.assert_allclose(s, (proj ** 2).mean(0), rtol=1e-4, atol=1e-7)
  # K-FAC's λ_i μ_j has the same total as the exact diagonal only approximately, but the
  # full-Fisher trace equals Σ S exactly.
  full = jnp.einsum('nab,nab->', per_example, per_example) / 6
  np.testing.assert_allclose(s.sum(), full, rtol=1e-4)


def test_regex_selecting_nothing_names_the_layers():
  model, params = _mlp()
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  batch = {'inputs': np.zeros((2, 4), np.float32), 'labels': np.zeros(2, np.int32)}
  with pytest.raises(ValueError, match=r"matches none of the model's.*'dense_0'"):
    factors.estimate_factors(model.apply, params, [batch], select='mlp/up', mesh=mesh,
                             rng=jax.random.key(0))


def test_layer_without_tokens_and_nan_factors_are_errors():
  model, params = _mlp()
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  batch = {'inputs': np.ones((2, 4), np.float32), 'labels': np.zeros(2, np.int32),
           'mask': np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match="layer 'dense_0' has 0 recorded tokens"):
    factors.estimate_factors(model.apply, params, [batch], select='dense_0', mesh=mesh,
                             rng=jax.random.key(0))
  batch = {'inputs': np.full((2, 4), np.nan, np.float32), 'labels': np.zeros(2, np.int32)}
  with pytest.raises(ValueError, match="layer 'dense_0' contain NaN"):
    factors.estimate_factors(model.apply, params, [batch], select='dense_0', mesh=mesh,
                             rng=jax.random.key(0))


def test_bad_fisher_type():
  model, _ = _mlp()
  mesh = parallel.make_mesh({'data': 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match='fisher_type'):
    factors.make_factor_accumulator(model.apply, ('dense_0',), mesh=mesh, fisher_type='gold')


def test_find_layers_on_vit_and_lm():
  vit = models.ViT(num_classes=3, patch_size=2, d_model=8, num_layers=2, num_heads=2, mlp_dim=16)
  x = jnp.zeros((2, 4, 4, 1))
  params = vit.init(jax.random.key(0), x)
  layers = capture.find_layers(vit.apply, params, x, select=r'block_\d+/mlp/fc[12]')
  assert list(layers) == ['block_0/mlp/fc1', 'block_0/mlp/fc2', 'block_1/mlp/fc1',
                          'block_1/mlp/fc2']
  (fc1,) = layers['block_0/mlp/fc1']
  assert fc1.sample_shape == (2, 5) and fc1.d_out == 16
  # ViT layers see [batch, tokens] positions; a per-example mask is broadcast over tokens.
  f = _factors(vit.apply, params, {'inputs': x + 1.0, 'labels': jnp.array([0, 1])},
               jax.random.key(0), ('block_0/mlp/fc1',))
  assert f['block_0/mlp/fc1'].count == 2 * 5
