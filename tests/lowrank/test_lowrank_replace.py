"""replace_dense and dense-to-factorized conversion on a model written the way people write flax."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import lowrank
from lossland.lowrank import layers
from lossland.models import TransformerLM

EPS = float(np.finfo(np.float32).eps)
D = 6  # every selected layer below has min(d_in, d_out) = D, so rank=D is full rank


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.gelu(nn.Dense(2 * D)(x))  # Mlp_0/Dense_0: 6 -> 12
    h = nn.Dropout(0.3, deterministic=not train)(h)
    return x + nn.Dense(D)(h)  # Mlp_0/Dense_1: 12 -> 6


class UserModel(nn.Module):
  """Auto-named submodules, DenseGeneral heads, an Einsum, a bias everywhere, a train flag."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(D)(x)  # Dense_0: 6 -> 6
    heads = nn.DenseGeneral((2, 3))(x)  # DenseGeneral_0: 6 -> (2, 3)
    heads = nn.Dropout(0.2, deterministic=not train)(nn.tanh(heads))
    x = x + nn.DenseGeneral(D, axis=(-2, -1))(heads)  # DenseGeneral_1: (2, 3) -> 6
    x = Mlp()(x, train)
    x = nn.Einsum((D, D), 'bld,de->ble')(x)  # Einsum_0
    return nn.Dense(3)(x.mean(axis=1))  # Dense_1 (head): 6 -> 3


SELECTED = ['Dense_0', 'DenseGeneral_0', 'DenseGeneral_1', 'Mlp_0/Dense_0', 'Mlp_0/Dense_1']
KEYS = {'lowrank': {'lowrank_a', 'lowrank_b', 'bias'}, 'cola': {'lowrank_a', 'lowrank_b', 'bias'},
        'lost': {'lowrank_a', 'lowrank_b', 'sparse_values', 'bias'},
        'sltrain': {'lowrank_a', 'lowrank_b', 'sparse_values', 'bias'}}
BUDGET = {'lowrank': dict(rank=2), 'cola': dict(rank=2),
          'lost': dict(rank=2, sparsity=0.5, gamma=0.7), 'sltrain': dict(rank=2, density=0.2)}
FULL = {'lowrank': dict(rank=D), 'cola': dict(rank=D),
        'lost': dict(rank=D, sparsity=0.0, gamma=0.7), 'sltrain': dict(rank=D, density=0.2)}


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (4, 7, D))  # [batch, seq, features]


def _node(tree, path):
  for part in path.split('/'):
    tree = tree[part]
  return tree


def _dense_variables():
  """A 'trained' dense model: its own init, with biases made nonzero so they count."""
  v = UserModel().init(jax.random.key(3), _x(), train=False)
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


@pytest.mark.parametrize('kind', ['lowrank', 'cola', 'lost', 'sltrain'])
def test_replace_dense_puts_factors_at_the_original_paths(kind):
  x = _x()
  fm = lowrank.replace_dense(UserModel(), kind, select=SELECTED, **BUDGET[kind])
  variables = fm.init(jax.random.key(0), x, train=False)
  params = variables['params']
  for path in SELECTED:
    assert set(_node(params, path)) == KEYS[kind], path
  assert set(params['Einsum_0']) == {'kernel', 'bias'} and set(params['Dense_1']) == {'kernel',
                                                                                         'bias'}
  assert _node(params, 'DenseGeneral_0/lowrank_a').shape == (D, 2)  # matrix view: 6 -> 2*3
  assert _node(params, 'DenseGeneral_1/lowrank_a').shape == (D, 2)
  assert _node(params, 'DenseGeneral_0/bias').shape == (D,)
  if kind == 'lost':
    assert set(variables[lowrank.CONSTANTS]) == {'Dense_0', 'DenseGeneral_0', 'DenseGeneral_1',
                                                 'Mlp_0'}
  # Parameter counts follow the plans (plus biases).
  plans = fm.plans(x, train=False)
  assert list(plans) == SELECTED  # call order
  for path, p in plans.items():
    count = sum(v.size for v in _node(params, path).values())
    assert count == p.params + p.d_out, path
  # The train flag and dropout rngs pass through; jit gives the same function.
  eval_out = fm.apply(variables, x, train=False)
  assert eval_out.shape == (4, 3)
  chex.assert_trees_all_close(jax.jit(fm.apply, static_argnames='train')(variables, x,
                                                                          train=False),
                              eval_out, rtol=1e-5, atol=1e-6)
  train_a = fm.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  train_b = fm.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)


def test_select_none_takes_every_dense_and_dense_general_and_keeps_einsum():
  fm = lowrank.replace_dense(UserModel(), 'lowrank', rank=2)
  assert list(fm.sites(_x(), train=False)) == SELECTED + ['Dense_1']
  params = fm.init(jax.random.key(0), _x(), train=False)['params']
  assert set(params['Einsum_0']) == {'kernel', 'bias'}
  assert set(params['Dense_1']) == KEYS['lowrank']
  # linear_layers on a model without a `dense` field: the same layers as matrices.
  found = lowrank.linear_layers(UserModel(), _x(), train=False)
  assert [(l.path, l.d_in, l.d_out) for l in found] == [
      ('Dense_0', D, D), ('DenseGeneral_0', D, D), ('DenseGeneral_1', D, D),
      ('Mlp_0/Dense_0', D, 2 * D), ('Mlp_0/Dense_1', 2 * D, D), ('Dense_1', D, 3)]
  plans = lowrank.layer_plans(UserModel(), _x(), kind='lost', select=r'Mlp_0/.*', rank=2,
                              sparsity=0.5, apply_kwargs={'train': False})
  assert list(plans) == ['Mlp_0/Dense_0', 'Mlp_0/Dense_1'] and plans['Mlp_0/Dense_1'].d_in == 12


@pytest.mark.parametrize('kind,budget', [('lost', dict(param_fraction=0.5, sparsity=0.1)),
                                         ('sltrain', dict(param_fraction=0.5))])
def test_replace_dense_on_transformer_lm_equals_its_dense_factory(kind, budget):
  """Same layer, same path, same params rng: the swap initializes exactly as the factory does."""
  kw = dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  tokens = jnp.zeros((2, 8), jnp.int32)
  want = TransformerLM(**kw, dense=lowrank.dense_factory(kind, **budget)).init(
      jax.random.key(0), tokens)
  fm = lowrank.replace_dense(TransformerLM(**kw), kind, select=r'block_\d+/(attn|mlp)/.*',
                             **budget)
  chex.assert_trees_all_equal(fm.init(jax.random.key(0), tokens), want)
  assert set(want['params']['head']) == {'kernel'}  # the head (not selected) stays dense


def _kernel(params):
  """The [d_in, d_out] matrix of a Dense or DenseGeneral's params."""
  k = np.asarray(params['kernel'], np.float64)
  d_out = params['bias'].size
  return k.reshape(-1, d_out)


@pytest.mark.parametrize('kind', ['lowrank', 'lost', 'sltrain'])
def test_conversion_at_full_rank_reproduces_the_dense_model(kind):
  x, dense = _x(1), _dense_variables()
  model = UserModel()
  fm = lowrank.replace_dense(model, kind, select=SELECTED, **FULL[kind])
  converted = fm.convert(dense, x, train=False)
  for path in SELECTED:
    np.testing.assert_array_equal(_node(converted['params'], path)['bias'],
                                  np.reshape(_node(dense['params'], path)['bias'], -1))
  for path in ('Einsum_0', 'Dense_1'):
    chex.assert_trees_all_equal(converted['params'][path], dense['params'][path])
  want = model.apply(dense, x, train=False)
  got = fm.apply(converted, x, train=False)
  # float32 forward passes through five re-associated layers of width <= 12, outputs O(1):
  # the factorized products differ from x @ W by a few ulps per layer.
  np.testing.assert_allclose(got, want, rtol=0, atol=200 * EPS * float(np.abs(want).max()))
  rngs = {'dropout': jax.random.key(5)}  # same dropout masks: the swap draws no dropout rng
  want_train = model.apply(dense, x, train=True, rngs=rngs)
  got_train = fm.apply(converted, x, train=True, rngs=rngs)
  np.testing.assert_allclose(got_train, want_train, rtol=0,
                             atol=200 * EPS * float(np.abs(want_train).max()))


def _best_rank(w, r):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r], s


def _with_kernel(dense, path, kernel):
  """`dense` with the kernel at `path` (a Dense) replaced."""
  params = jax.tree.map(lambda v: v, dense['params'])
  *parents, last = path.split('/')
  node = params
  for part in parents:
    node = node[part]
  node[last] = dict(node[last], kernel=jnp.asarray(kernel, jnp.float32))
  return {'params': params}


def test_conversion_below_full_rank_is_the_best_approximation_its_structure_allows():
  x, dense, model = _x(1), _dense_variables(), UserModel()
  path = 'Mlp_0/Dense_1'  # 12 -> 6, the layer's rows are its 12 input channels
  w = _kernel(_node(dense['params'], path))
  w_r, s = _best_rank(w, 2)

  def check(fm, variables, kernel):
    """The converted model computes the dense model with `kernel` at `path`."""
    want = model.apply(_with_kernel(dense, path, kernel), x, train=False)
    got = fm.apply(variables, x, train=False)
    # float32 passes as in the full-rank test, plus the float32 SVD cut's subspace error
    # (eps * s_1 / gap) propagated through the rest of the model (outputs O(1)).
    tol = 200 * EPS * float(np.abs(want).max()) * (1 + s[0] / (s[1] - s[2]))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)

  fm = lowrank.replace_dense(model, 'lowrank', select=[path], rank=2)
  v = fm.convert(dense, x, train=False)
  p = _node(v['params'], path)
  ab = np.asarray(p['lowrank_a'], np.float64) @ np.asarray(p['lowrank_b'], np.float64)
  # Eckart–Young: the best rank-2 kernel, ‖W − AB‖² = Σ_{i>2} σ_i² (float32 factors).
  np.testing.assert_allclose(np.linalg.norm(w - ab) ** 2, np.sum(s[2:] ** 2), rtol=1e-4)
  check(fm, v, w_r)

  fm = lowrank.replace_dense(model, 'lost', select=[path], rank=2, sparsity=0.25, gamma=0.7)
  v = fm.convert(dense, x, train=False)
  idx = np.asarray(_node(v[lowrank.CONSTANTS], path)['channel_idx']).astype(int)
  # LOST's channels: the largest rows of W_comp = components 3..4 of the trained kernel.
  np.testing.assert_array_equal(idx, np.asarray(lowrank.lost_factors(w, 2, 3).channel_idx))
  want = w_r.copy()
  want[idx] = w[idx]  # W_r + P_idx (W − W_r): the kept rows are exact
  check(fm, v, want)

  fm = lowrank.replace_dense(model, 'sltrain', select=[path], rank=2, density=0.3)
  v = fm.convert(dense, x, train=False)
  nnz = _node(v['params'], path)['sparse_values'].size
  assert nnz == round(0.3 * 12 * D)
  support = layers.sltrain_layer_support(0, path, 12, D, nnz)  # the layer's own support at `path`
  want = w_r.reshape(-1).copy()
  want[support] = w.reshape(-1)[support]  # W_r + S: exact on the support
  check(fm, v, want.reshape(12, D))


def test_cola_conversion_gives_svd_factors_whose_silu_changes_the_function():
  dense, path = _dense_variables(), 'Mlp_0/Dense_1'
  fm = lowrank.replace_dense(UserModel(), 'cola', select=[path], rank=D)
  p = _node(fm.convert(dense, _x(), train=False)['params'], path)
  w = _kernel(_node(dense['params'], path))
  np.testing.assert_allclose(np.asarray(p['lowrank_a'] @ p['lowrank_b'], np.float64), w,
                             atol=100 * EPS * float(np.abs(w).sum(0).max()))
  x = jax.random.normal(jax.random.key(0), (3, 12))
  cola = layers.ColaDense(D, rank=D).apply({'params': p}, x)
  assert not np.allclose(cola, x @ w + p['bias'], atol=1e-2)


def test_errors_name_the_argument_and_the_layers():
  x = _x()
  fm = lowrank.replace_dense(UserModel(), 'lost', select=r'.*attn/.*', rank=2)
  with pytest.raises(ValueError, match=r"select='\.\*attn/\.\*' matches none.*'Mlp_0/Dense_0'"):
    fm.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='matches none'):
    fm.sites(x, train=False)
  with pytest.raises(ValueError, match=r"'Einsum_0' is an nn.Einsum.*leave it out of `select`"):
    lowrank.replace_dense(UserModel(), 'lowrank', select=['Einsum_0'], rank=2).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match='unknown kind'):
    lowrank.replace_dense(UserModel(), 'dense')
  with pytest.raises(ValueError, match=r"has no field\(s\) \['sparsity'\]"):
    lowrank.replace_dense(UserModel(), 'lowrank', sparsity=0.1)

  class Batched(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(4, axis=-1, batch_dims=0)(x)
  with pytest.raises(ValueError, match='batch_dims'):
    lowrank.replace_dense(Batched(), 'lowrank', rank=1).init(jax.random.key(0), jnp.ones((2, 3)))
  # Converting variables that are not the dense model's.
  fm = lowrank.replace_dense(UserModel(), 'lowrank', select=SELECTED, rank=2)
  factorized = fm.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="layer 'Dense_0'.*unfactorized model"):
    fm.convert(factorized, x, train=False)
  with pytest.raises(ValueError, match='0 < gamma < 1'):
    lowrank.replace_dense(UserModel(), 'lost', select=SELECTED, rank=2, sparsity=0.5,
                          gamma=1.0).convert(_dense_variables(), x, train=False)


def test_a_layer_called_twice_keeps_one_set_of_factors_and_converts_once():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      shared = nn.Dense(D)
      return shared(nn.relu(shared(x)))  # the same Dense, called twice

  x, model = _x(2), Tied()
  dense = model.init(jax.random.key(0), x)
  fm = lowrank.replace_dense(model, 'lost', rank=D, sparsity=0.0)
  assert list(fm.sites(x)) == ['Dense_0']
  variables = fm.init(jax.random.key(0), x)
  assert set(variables['params']['Dense_0']) == KEYS['lost'] - {'sparse_values'}
  want = model.apply(dense, x)
  got = fm.apply(fm.convert(dense, x), x)
  np.testing.assert_allclose(got, want, rtol=0, atol=100 * EPS * float(np.abs(want).max()))
