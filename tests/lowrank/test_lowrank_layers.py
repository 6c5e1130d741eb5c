"""lossland.lowrank layers: exact reproduction, gradients only to factors, counts, bad input."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import lowrank, parallel
from lossland.lowrank import layers
from lossland.models import TransformerLM

INIT = nn.initializers.normal(0.5)


def _x(d_in, batch=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, 2, d_in))


def _w0(d_in, d_out, name, seed=0):
  return layers.initial_weight(seed, name, d_in, d_out, INIT)


def test_w0_is_the_dense_layers_initializer():
  w0 = _w0(6, 5, 'q')
  expected = INIT(lowrank.layer_key(0, 'q'), (6, 5), jnp.float32)
  np.testing.assert_array_equal(w0, expected)
  assert np.linalg.matrix_rank(w0) == 5  # full rank


@pytest.mark.parametrize('cls,kwargs', [
    (lowrank.LowRankDense, {}),
    (lowrank.LostDense, dict(sparsity=0.0, gamma=1.0)),
    (lowrank.LostDense, dict(sparsity=0.0, gamma=1.0, activation=None, impl='gather')),
])
def test_full_rank_without_sparse_part_reproduces_dense(cls, kwargs):
  x = _x(6)
  layer = cls(5, rank=5, kernel_init=INIT, name='q', **kwargs)
  params = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(layer.apply(params, x), x @ _w0(6, 5, 'q'), atol=2e-5)


@pytest.mark.parametrize('activation,impl', [(None, 'fused'), ('silu', 'fused'),
                                             ('silu', 'gather')])
def test_lost_forward_matches_formula(activation, impl):
  d_in, d_out, gamma = 20, 8, 0.3
  x = _x(d_in)
  layer = lowrank.LostDense(d_out, rank=3, sparsity=0.2, gamma=gamma, activation=activation,
                            impl=impl, kernel_init=INIT, name='mlp')
  params = layer.init(jax.random.key(0), x)
  f = lowrank.lost_factors(jnp.asarray(_w0(d_in, d_out, 'mlp')), 3, 4)
  p = params['params']
  np.testing.assert_allclose(p['lowrank_a'], f.a, atol=1e-6)
  np.testing.assert_allclose(p['sparse_values'], f.sparse_values, atol=1e-6)
  h = x @ f.a
  h = nn.silu(h) if activation else h
  expected = gamma * (h @ f.b) + (1 - gamma) * (x[..., np.asarray(f.channel_idx)] @ f.sparse_values)
  np.testing.assert_allclose(layer.apply(params, x), expected, atol=1e-5)


@pytest.mark.parametrize('impl', ['fused', 'gather'])
def test_gradients_flow_only_to_trainable_factors(impl):
  d_in, d_out = 20, 8
  x = _x(d_in)
  layer = lowrank.LostDense(d_out, rank=3, sparsity=0.2, impl=impl, kernel_init=INIT, name='mlp')
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {'params'}  # no constants collection to carry around
  assert set(variables['params']) == {'lowrank_a', 'lowrank_b', 'sparse_values'}
  loss = lambda p: jnp.sum(jnp.sin(layer.apply(p, x)))
  grads = jax.grad(loss)(variables)['params']
  assert all(jnp.issubdtype(g.dtype, jnp.floating) for g in jax.tree.leaves(grads))
  # Exact check: y's sparse part is (1 - γ) x[idx] W_s, so dL/dW_s is (1 - γ) times the
  # idx rows of the gradient of a dense layer with the same output.
  idx = np.asarray(lowrank.lost_factors(jnp.asarray(_w0(d_in, d_out, 'mlp')), 3, 4).channel_idx)
  y = layer.apply(variables, x)
  dense_grad = jax.grad(lambda w: jnp.sum(jnp.sin(y + x @ w)))(jnp.zeros((d_in, d_out)))
  np.testing.assert_allclose(grads['sparse_values'], 0.5 * dense_grad[idx], atol=1e-5)
  # Reverse-mode gradients agree with finite differences.
  jax.test_util.check_grads(loss, (variables,), order=1, modes=['rev'], atol=5e-2, rtol=5e-2)


def test_sltrain_densified_weight_matches_formula():
  d_in, d_out = 16, 12
  x = _x(d_in)
  layer = lowrank.SLTrainDense(d_out, rank=2, density=0.1, alpha=4.0, name='up')
  params = layer.init(jax.random.key(0), x)['params']
  assert float(jnp.abs(params['lowrank_b']).max()) == 0.0  # B starts at zero
  params = dict(params, lowrank_b=jax.random.normal(jax.random.key(3), (2, d_out)))
  support = layers._sltrain_support(0, 'up', d_in, d_out, round(0.1 * d_in * d_out))
  s = np.zeros(d_in * d_out)
  s[support] = params['sparse_values']
  w = params['lowrank_a'] @ params['lowrank_b'] * (4.0 / 2) + s.reshape(d_in, d_out)
  np.testing.assert_allclose(layer.apply({'params': params}, x), x @ w, atol=1e-5)
  assert np.all(np.abs(params['sparse_values']) <= 1 / np.sqrt(d_in))


def _tiny_lm(dense):
  return TransformerLM(vocab_size=32, d_model=32, num_layers=1, num_heads=2, mlp_dim=48,
                       dense=dense)


KINDS = [('dense', {}), ('lowrank', dict(param_fraction=0.5)),
         ('lowrank', dict(param_fraction=0.5, factor_init='xavier')),
         ('cola', dict(param_fraction=0.5)),
         ('lost', dict(param_fraction=0.5, sparsity=0.1)),
         ('lost', dict(param_fraction=0.5, sparsity=0.1, activation='silu')),
         ('sltrain', dict(param_fraction=0.5, density=0.05))]


@pytest.mark.parametrize('kind,kwargs', KINDS)
def test_lm_param_counts_match_the_formula(kind, kwargs):
  tokens = jnp.zeros((2, 8), jnp.int32)
  model = _tiny_lm(lowrank.dense_factory(kind, **kwargs))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  linear = lowrank.linear_layers(model, tokens)
  assert [l.path.split('/')[-1] for l in linear] == ['query', 'key', 'value', 'out', 'gate',
                                                     'up', 'down']
  plans = lowrank.layer_plans(model, tokens, kind=kind, **kwargs)
  count = lowrank.linear_param_count(params, [l.path for l in linear])
  assert count == sum(p.params for p in plans.values())
  # embeddings, norms and head stay dense
  p = params['params']
  assert p['embed']['embedding'].shape == (32, 32) and p['head']['kernel'].shape == (32, 32)
  if kind != 'dense':
    assert 0.4 < count / (4 * 32 * 32 + 3 * 32 * 48) <= 0.5


def test_lm_init_is_deterministic_per_seed_and_jits_once():
  tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, 32)
  model = _tiny_lm(lowrank.dense_factory('lost', param_fraction=0.5, sparsity=0.1, seed=3))
  v1 = jax.jit(model.init)(jax.random.key(0), tokens)
  v2 = jax.jit(model.init)(jax.random.key(0), tokens)
  chex.assert_trees_all_equal(v1, v2)
  other = _tiny_lm(lowrank.dense_factory('lost', param_fraction=0.5, sparsity=0.1, seed=4))
  v3 = jax.eval_shape(other.init, jax.random.key(0), tokens)
  v3 = jax.jit(other.init)(jax.random.key(0), tokens)
  assert not np.allclose(v1['params']['block_0']['attn']['query']['lowrank_a'],
                         v3['params']['block_0']['attn']['query']['lowrank_a'])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(v, t):
    return model.apply(v, t)

  y = apply(v1, tokens)
  apply(jax.tree.map(lambda a: a + 0.0, v1), tokens)
  # 8-device data-parallel apply equals the 1-device numbers.
  mesh = parallel.make_mesh({'data': 8, 'model': 1}, jax.devices()[:8])
  sharded = jax.device_put(tokens, NamedSharding(mesh, P('data')))
  y8 = jax.jit(model.apply)(v1, sharded)
  assert y8.sharding.spec[0] == 'data'
  np.testing.assert_allclose(y8, y, atol=1e-5)


def test_bad_input_names_the_layer():
  tokens = jnp.zeros((1, 4), jnp.int32)
  model = _tiny_lm(lowrank.dense_factory('lost', rank=40))
  with pytest.raises(ValueError, match="layer 'block_0/attn/query'.*rank 40"):
    model.init(jax.random.key(0), tokens)
  model = _tiny_lm(lowrank.dense_factory('lost', param_fraction=0.1, sparsity=0.5))
  with pytest.raises(ValueError, match="layer 'block_0/attn/query'.*no room"):
    model.init(jax.random.key(0), tokens)
  model = _tiny_lm(lowrank.dense_factory('lost', param_fraction=0.5, sparsity=1.5))
  with pytest.raises(ValueError, match="layer 'block_0/attn/query'.*sparsity"):
    model.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match='has no field.*gama'):
    lowrank.dense_factory('lost', gama=0.5)
  with pytest.raises(ValueError, match='unknown low-rank kind'):
    lowrank.dense_factory('tucker')
