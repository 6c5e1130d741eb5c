"""lossland.lowrank layers: exact reproduction, gradients only to factors, counts, bad input."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lossland import lowrank, parallel, train
from lossland.lowrank import layers
from lossland.models import TransformerLM

INIT = nn.initializers.normal(0.5)
EPS = float(np.finfo(np.float32).eps)


def _x(d_in, batch=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, 2, d_in))


def _recording(init=INIT):
  """A kernel_init that keeps what it drew (eager init), so tests see the layer's W0."""
  drawn = []

  def kernel_init(key, shape, dtype=jnp.float32):
    w = init(key, shape, dtype)
    drawn.append(np.asarray(w))
    return w
  return kernel_init, drawn


@pytest.mark.parametrize('kind', ['lost', 'lowrank', 'cola', 'sltrain'])
def test_init_follows_the_params_rng(kind):
  x = _x(20)
  layer = lowrank.dense_factory(kind, param_fraction=0.5)(8, name='q')
  v0, v0_again = layer.init(jax.random.key(0), x), jax.jit(layer.init)(jax.random.key(0), x)
  v123 = layer.init(jax.random.key(123), x)
  chex.assert_trees_all_equal(v0, v0_again)  # same key, same factors (eager or jitted)
  drawn = [name for name, leaf in v0['params'].items() if np.any(leaf)]  # not zeros-initialized
  assert 'lowrank_a' in drawn
  for name in drawn:
    assert not np.allclose(v0['params'][name], v123['params'][name]), name


def test_factorized_layers_default_to_nn_dense_bias():
  x = _x(20)
  for kind in ('lost', 'lowrank', 'cola', 'sltrain'):
    cls = layers.LAYERS[kind]
    assert cls.use_bias is nn.Dense.use_bias is True
    params = cls(8, rank=2).init(jax.random.key(0), x)['params']
    np.testing.assert_array_equal(params['bias'], np.zeros(8))  # nn.Dense's zeros bias_init
    assert 'bias' not in cls(8, rank=2, use_bias=False).init(jax.random.key(0), x)['params']


@pytest.mark.parametrize('cls,kwargs', [
    (lowrank.LowRankDense, {}),
    (lowrank.LostDense, dict(sparsity=0.0, gamma=1.0)),
    (lowrank.LostDense, dict(sparsity=0.0, gamma=1.0, activation=None, impl='gather')),
])
def test_full_rank_without_sparse_part_reproduces_dense(cls, kwargs):
  x = _x(6)
  kernel_init, drawn = _recording()
  layer = cls(5, rank=5, kernel_init=kernel_init, use_bias=False, name='q', **kwargs)
  params = layer.init(jax.random.key(0), x)
  (w0,) = drawn
  assert np.linalg.matrix_rank(w0) == 5  # a full-rank draw of the dense initializer
  # A B = W0 up to float32 SVD rounding: a few eps of ‖W0‖ per entry of the 6-term products.
  tol = 20 * EPS * float(np.abs(x).sum(-1).max()) * np.linalg.norm(w0, 2)
  np.testing.assert_allclose(layer.apply(params, x), x @ w0, atol=tol)


@pytest.mark.parametrize('activation,impl', [(None, 'fused'), ('silu', 'fused'),
                                             ('silu', 'gather')])
def test_lost_forward_matches_formula(activation, impl):
  d_in, d_out, gamma, rank, n_s = 20, 8, 0.3, 3, 4
  x = np.asarray(_x(d_in), np.float64)
  kernel_init, drawn = _recording()
  layer = lowrank.LostDense(d_out, rank=rank, sparsity=0.2, gamma=gamma, activation=activation,
                            impl=impl, kernel_init=kernel_init, use_bias=False, name='mlp')
  variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  (w0,) = drawn
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  idx = np.asarray(variables['constants']['channel_idx']).astype(int)

  # Initial factors, compared by invariants (SVD signs and last bits differ across LAPACKs):
  # A B is the best rank-r approximation of W0, the kept channels have the largest residual
  # scores and their sparse rows are W0's rows. Float32 SVD error ~ eps·σ₁·σ₁/(σ_r − σ_{r+1}).
  u, s, vt = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
  tol = 100 * EPS * s[0] * (1 + s[0] / (s[rank - 1] - s[rank]))
  best = (u[:, :rank] * s[:rank]) @ vt[:rank]
  np.testing.assert_allclose(p['lowrank_a'] @ p['lowrank_b'], best, atol=tol)
  k = min(rank, min(d_in, d_out) - rank)
  scores = np.linalg.norm((u[:, rank:rank + k] * s[rank:rank + k]) @ vt[rank:rank + k], axis=1)
  assert len(idx) == n_s and np.all(np.diff(idx) > 0)
  assert scores[idx].min() >= np.delete(scores, idx).max() - tol
  np.testing.assert_array_equal(p['sparse_values'], w0[idx].astype(np.float64))

  # The function the layer computes, from its own params, in float64. Float32 reordering of
  # sums of at most d_in + r terms: error ≤ (d_in + r)·eps·Σ|terms| (with margin 4).
  h = x @ p['lowrank_a']
  h = np.asarray(nn.silu(h)) if activation else h
  expected = gamma * (h @ p['lowrank_b']) + (1 - gamma) * (x[..., idx] @ p['sparse_values'])
  magnitude = (gamma * (np.abs(x) @ np.abs(p['lowrank_a'])) @ np.abs(p['lowrank_b'])
               + (1 - gamma) * np.abs(x[..., idx]) @ np.abs(p['sparse_values']))
  tol = 4 * (d_in + rank) * EPS * magnitude.max()
  np.testing.assert_allclose(layer.apply(variables, jnp.asarray(x, jnp.float32)), expected,
                             atol=tol)


@pytest.mark.parametrize('impl', ['fused', 'gather'])
def test_gradients_flow_only_to_trainable_factors(impl):
  d_in, d_out = 20, 8
  x = _x(d_in)
  layer = lowrank.LostDense(d_out, rank=3, sparsity=0.2, impl=impl, kernel_init=INIT, name='mlp')
  variables = layer.init(jax.random.key(0), x)
  assert set(variables) == {'params', 'constants'}
  assert set(variables['params']) == {'lowrank_a', 'lowrank_b', 'sparse_values', 'bias'}
  loss = lambda p: jnp.sum(jnp.sin(layer.apply(p, x)))
  all_grads = jax.grad(loss)(variables)  # what lossland.train.fit differentiates
  assert all(jnp.issubdtype(g.dtype, jnp.floating) for g in jax.tree.leaves(all_grads))
  assert float(jnp.abs(all_grads['constants']['channel_idx']).max()) == 0.0
  grads = all_grads['params']
  # Exact check: y's sparse part is (1 - γ) x[idx] W_s, so dL/dW_s is (1 - γ) times the
  # idx rows of the gradient of a dense layer with the same output.
  idx = np.asarray(variables['constants']['channel_idx']).astype(int)
  y = layer.apply(variables, x)
  dense_grad = jax.grad(lambda w: jnp.sum(jnp.sin(y + x @ w)))(jnp.zeros((d_in, d_out)))
  np.testing.assert_allclose(grads['sparse_values'], 0.5 * dense_grad[idx], atol=1e-5)
  # Reverse-mode gradients agree with finite differences.
  jax.test_util.check_grads(lambda p: loss(dict(variables, params=p)), (variables['params'],),
                            order=1, modes=['rev'], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('optimizer', [
    train.adamw(learning_rate=1e-2, weight_decay=0.1),
    lowrank.galore_adamw(1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)])
def test_optimizers_leave_the_channel_indices_unchanged(optimizer):
  x = _x(20)
  layer = lowrank.LostDense(8, rank=3, sparsity=0.2, kernel_init=INIT, name='mlp')
  variables = layer.init(jax.random.key(0), x)
  state = optimizer.init(variables)
  loss = lambda v: jnp.sum(jnp.sin(layer.apply(v, x)))
  updated = variables
  for _ in range(3):
    updates, state = optimizer.update(jax.grad(loss)(updated), state, updated)
    updated = optax.apply_updates(updated, updates)
  np.testing.assert_array_equal(updated['constants']['channel_idx'],
                                variables['constants']['channel_idx'])
  assert not np.allclose(updated['params']['lowrank_a'], variables['params']['lowrank_a'])


def test_apply_without_the_constants_is_a_clear_error():
  x = _x(20)
  layer = lowrank.LostDense(8, rank=3, sparsity=0.2, name='mlp')
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="layer 'mlp': LostDense keeps its input channels in the "
                                       "'constants' collection"):
    layer.apply({'params': variables['params']}, x)


def test_sltrain_densified_weight_matches_formula():
  d_in, d_out = 16, 12
  x = _x(d_in)
  layer = lowrank.SLTrainDense(d_out, rank=2, density=0.1, alpha=4.0, name='up')
  params = layer.init(jax.random.key(0), x)['params']
  assert float(jnp.abs(params['lowrank_b']).max()) == 0.0  # B starts at zero
  params = dict(params, lowrank_b=jax.random.normal(jax.random.key(3), (2, d_out)))
  support = layers.sltrain_layer_support(0, 'up', d_in, d_out, round(0.1 * d_in * d_out))
  np.testing.assert_array_equal(params['bias'], np.zeros(d_out))
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
  # The experiments' init: `launch.tasks` draws params from key(config.seed).
  from launch import tasks
  s0, s1 = (tasks._init_fn(model, seed, tokens)() for seed in (0, 1))
  chex.assert_trees_all_equal(s0, v1)
  for layer in ('query', 'out'):
    assert not np.allclose(s0['params']['block_0']['attn'][layer]['lowrank_a'],
                           s1['params']['block_0']['attn'][layer]['lowrank_a'])
  assert not np.array_equal(s0['constants']['block_0']['mlp']['up']['channel_idx'],
                            s1['constants']['block_0']['mlp']['up']['channel_idx'])

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
