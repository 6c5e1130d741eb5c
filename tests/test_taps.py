"""The tap module on a model written the way people write flax (not one of lossland's)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import parallel, taps


class UserModel(nn.Module):
  """Conv stem, DenseGeneral attention, an Einsum, a shared Dense called twice, dropout."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    h = nn.Conv(4, (3, 3))(images)  # auto-named Conv_0
    h = h.reshape(h.shape[0], -1, 4)  # [batch, positions, 4]
    q = nn.DenseGeneral((2, 3), name='query')(h)  # [batch, positions, heads, head_dim]
    k = nn.DenseGeneral((2, 3), name='key')(h)
    att = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), -1)
    h = jnp.einsum('bhqk,bkc->bqc', att, h)
    h = nn.Einsum((4, 5), '...c,cd->...d', name='mix')(h)
    shared = nn.Dense(5, name='shared')
    h = shared(nn.relu(shared(h)))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return nn.Dense(1)(h.mean(1))  # auto-named Dense_0: a regression head


def _setup():
  model = UserModel()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x


def test_paths_name_where_the_params_live():
  model, variables, x = _setup()
  layers = taps.find_layers(model.apply, variables, x)
  assert list(layers) == ['Conv_0', 'query', 'key', 'mix', 'shared', 'Dense_0']
  assert [l.kind for l in layers.values()] == ['Conv', 'DenseGeneral', 'DenseGeneral', 'Einsum',
                                               'Dense', 'Dense']
  assert layers['shared'].calls == 2 and layers['query'].calls == 1
  assert layers['query'].output_shape == (2, 16, 2, 3)
  for path in layers:
    assert set(taps.layer_params(variables, path)) >= {'kernel'}
  keys = [parallel.path_name(k) for k, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  assert 'params/query/kernel' in keys


@pytest.mark.parametrize('select, want', [
    (r'query|key', ['query', 'key']),
    (['mix', 'Dense_0'], ['mix', 'Dense_0']),
    (lambda path: path.startswith('s'), ['shared']),
])
def test_selectors(select, want):
  model, variables, x = _setup()
  assert list(taps.find_layers(model.apply, variables, x, select=select)) == want


def test_a_selection_that_matches_nothing_lists_the_layers():
  model, variables, x = _setup()
  with pytest.raises(ValueError, match=r"matches none.*'Conv_0'.*'shared'"):
    taps.find_layers(model.apply, variables, x, select='mlp/.*')


def test_any_module_type_with_types_none():
  model, variables, x = _setup()
  layers = taps.find_layers(model.apply, variables, x, types=None)
  assert 'Dropout_0' in layers and 'Conv_0' in layers


def test_capture_records_every_call_in_order_and_passes_apply_kwargs():
  model, variables, x = _setup()
  rngs = {'dropout': jax.random.key(2)}
  out, got = taps.capture(model.apply, variables, x, train=True, rngs=rngs)
  np.testing.assert_array_equal(out, model.apply(variables, x, train=True, rngs=rngs))
  first, second = got.outputs['shared']
  np.testing.assert_array_equal(got.inputs['shared'][1], jax.nn.relu(first))
  p = taps.layer_params(variables, 'shared')
  np.testing.assert_allclose(second, jax.nn.relu(first) @ p['kernel'] + p['bias'], rtol=1e-5,
                             atol=1e-6)
  assert taps.join_calls(got.outputs['shared']).shape == (4, 16, 5)


def test_output_gradients_match_autodiff_of_a_replaced_output():
  model, variables, x = _setup()
  loss_fn = lambda y: jnp.sum(y ** 2)
  loss, captured, grads = taps.output_gradients(loss_fn, model.apply, variables, x,
                                                select=['mix', 'shared'])
  np.testing.assert_allclose(loss, loss_fn(model.apply(variables, x)), rtol=1e-6)
  mix = captured.outputs['mix'][0]

  def loss_of_mix(y):
    return loss_fn(taps.replace_outputs(model.apply, variables, x, select=['mix'],
                                        replace=lambda call, _: y))

  np.testing.assert_allclose(grads['mix'][0], jax.grad(loss_of_mix)(mix), rtol=1e-5, atol=1e-7)
  assert len(grads['shared']) == 2  # one gradient per call
  # The gradient at the shared layer's first output reaches the loss through the second call.
  assert float(jnp.abs(grads['shared'][0]).max()) > 0


def test_replace_outputs_sees_each_call():
  model, variables, x = _setup()
  seen = []

  def replace(call, y):
    seen.append((call.path, call.index))
    return y

  np.testing.assert_array_equal(
      taps.replace_outputs(model.apply, variables, x, replace=replace, select='shared'),
      model.apply(variables, x))
  assert seen == [('shared', 0), ('shared', 1)]


class LowRank(nn.Module):
  features: int
  rank: int = 2

  @nn.compact
  def __call__(self, x):
    a = self.param('lowrank_a', nn.initializers.normal(), (x.shape[-1], self.rank))
    b = self.param('lowrank_b', nn.initializers.normal(), (self.rank, self.features))
    return x @ a @ b


def test_swap_layers_puts_the_replacement_at_the_original_path():
  model, _, x = _setup()
  make = lambda call: LowRank(call.module.features)
  with taps.swap_layers(make, select='shared', types=(nn.Dense,)):
    variables = model.init(jax.random.key(1), x)
    out = model.apply(variables, x)
  assert set(variables['params']['shared']) == {'lowrank_a', 'lowrank_b'}
  assert set(variables['params']['Dense_0']) == {'kernel', 'bias'}  # not selected
  p = variables['params']['shared']
  assert p['lowrank_a'].shape == (5, 2)  # one set of params for both calls

  # The same function as the unswapped model given the product as its kernel.
  dense_params = dict(variables['params'], shared={'kernel': p['lowrank_a'] @ p['lowrank_b'],
                                                   'bias': jnp.zeros(5)})
  np.testing.assert_allclose(out, model.apply({'params': dense_params}, x), rtol=1e-5, atol=1e-6)


class _Attend(nn.Module):
  @nn.compact
  def __call__(self, q, k, mask):
    logits = jnp.einsum('bqd,bkd->bqk', nn.Dense(3, name='query')(q), k)
    return taps.AttentionWeights(name='probs')(logits, mask[:, None, :])


def test_attention_weights_are_a_capturable_layer_without_params():
  q = jax.random.normal(jax.random.key(0), (2, 4, 3))
  k = jax.random.normal(jax.random.key(1), (2, 5, 3))
  mask = jnp.array([[True] * 5, [True, True, False, False, False]])
  model = _Attend()
  variables = model.init(jax.random.key(2), q, k, mask)
  assert list(variables['params']) == ['query']  # the probabilities layer adds no params
  probs, captured = taps.capture(model.apply, variables, q, k, mask,
                                 types=(taps.AttentionWeights,))
  assert list(captured.outputs) == ['probs']
  np.testing.assert_array_equal(captured.outputs['probs'][0], probs)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert float(probs[1, :, 2:].max()) == 0.0  # masked keys get exactly 0
  logits = jnp.einsum('bqd,bkd->bqk', q @ variables['params']['query']['kernel']
                      + variables['params']['query']['bias'], k)
  np.testing.assert_allclose(probs[0], jax.nn.softmax(logits[0], -1), rtol=1e-5)
  np.testing.assert_allclose(probs[1, :, :2], jax.nn.softmax(logits[1, :, :2], -1), rtol=1e-5)


class _CachingBlock(nn.Module):
  """Returns (hidden, cache) as decoder blocks do; cache None outside decoding."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x), None


class _Decoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    h, _ = _CachingBlock()(x)
    return h


def test_find_layers_reads_the_hidden_state_of_a_tuple_output():
  x = jnp.ones((2, 4))
  variables = _Decoder().init(jax.random.key(0), x)
  found = taps.find_layers(_Decoder().apply, variables, x, types=None)
  assert found['_CachingBlock_0'].output_shape == (2, 3)
  assert found['_CachingBlock_0/Dense_0'].input_shape == (2, 4)
