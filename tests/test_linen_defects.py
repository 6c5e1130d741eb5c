"""Ordinary flax linen user code that lossland once mishandled: each case works or is refused.

* BatchNorm in train mode: `apply(..., mutable=['batch_stats'])` returns
  `(outputs, updates)`; the K-FAC likelihood reads `outputs`.
* A regressor with several outputs and float targets under the default
  categorical likelihood: refused (both Fisher types), pointing at
  likelihood='gaussian'; classifiers are unaffected.
* Direct matching from a layer called twice into a layer called once: refused
  from the shapes, before anything is computed, with both layers named.
* A layer called by keyword (`nn.Dense(8)(inputs=x)`): found, its input
  captured, factors and CKA computed as for a positional call.
* `replace_dense` of an `apply_fn` (a plain function of the variables) as of
  the module.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import curvature, lowrank, parallel, taps
from lossland import stitching as st

IN, CLASSES, VOCAB, SEQ = 4, 3, 7, 5


def _mesh():
  return parallel.make_mesh({'data': 8}, jax.devices()[:8])


# ----------------------------------------------------------------------------- BatchNorm
class BatchNormNet(nn.Module):
  """x [b, IN] -> logits [b, CLASSES], with BatchNorm between two Dense layers."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(6)(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.Dense(5)(nn.relu(h))
    return nn.Dense(CLASSES)(nn.relu(h))


def _class_batches(n=2, batch=16):
  out = []
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.key(10 + i))
    out.append({'inputs': jax.random.normal(k1, (batch, IN)),
                'labels': jax.random.randint(k2, (batch,), 0, CLASSES)})
  return out


@pytest.mark.parametrize('fisher_type', ['true', 'empirical'])
def test_batchnorm_train_mode_with_mutable_equals_output_only_wrapper(fisher_type):
  model = BatchNormNet()
  batches = _class_batches()
  variables = model.init(jax.random.key(0), batches[0]['inputs'])
  assert 'batch_stats' in variables
  kw = dict(rng=jax.random.key(3), mesh=_mesh(), fisher_type=fisher_type,
            apply_kwargs={'train': True, 'mutable': ['batch_stats']})
  got = curvature.estimate_factors(model.apply, variables, batches, **kw)
  want = curvature.estimate_factors(lambda v, x, **k: model.apply(v, x, **k)[0], variables,
                                    batches, **kw)
  assert list(got) == ['Dense_0', 'Dense_1', 'Dense_2']
  for path in got:
    for name in ('A', 'G'):
      a, b = np.asarray(getattr(got[path], name)), np.asarray(getattr(want[path], name))
      assert np.isfinite(a).all(), (path, name)
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(),
                                 err_msg=f'{path}.{name}')
    assert got[path].count == want[path].count == 32


def test_model_outputs_unwraps_only_a_mutable_pair():
  logits = jnp.zeros((2, 3))
  assert curvature.likelihoods.model_outputs((logits, {'batch_stats': {}})) is logits
  assert curvature.likelihoods.model_outputs(logits) is logits
  plain = (logits, jnp.ones(2))
  assert curvature.likelihoods.model_outputs(plain) is plain


# ----------------------------------------------------------------------------- regression targets
class TwoOutputRegressor(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='out')(jnp.tanh(nn.Dense(5, name='hidden')(x)))


class TokenModel(nn.Module):
  """tokens [b, t] -> next-token logits [b, t, VOCAB]."""

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(VOCAB)(nn.relu(nn.Dense(8)(nn.Embed(VOCAB, 6)(tokens))))


@pytest.mark.parametrize('fisher_type', ['true', 'empirical'])
@pytest.mark.parametrize('key', ['targets', 'labels'])
def test_float_targets_of_the_output_shape_under_categorical_are_refused(fisher_type, key):
  model = TwoOutputRegressor()
  x = jax.random.normal(jax.random.key(0), (8, 3))
  params = model.init(jax.random.key(1), x)
  batch = {'inputs': x, key: jax.random.normal(jax.random.key(2), (8, 2))}
  with pytest.raises(ValueError, match=rf"batch {key} are float32 with the model outputs' shape "
                     r"\(8, 2\): they look like regression targets.*likelihood='gaussian'"):
    curvature.estimate_factors(model.apply, params, [batch], rng=jax.random.key(3),
                               mesh=_mesh(), fisher_type=fisher_type)
  f = curvature.estimate_factors(model.apply, params, [batch], rng=jax.random.key(3),
                                 mesh=_mesh(), fisher_type=fisher_type, likelihood='gaussian')
  assert all(np.isfinite(v.G).all() and v.count == 8 for v in f.values())


@pytest.mark.parametrize('fisher_type', ['true', 'empirical'])
def test_classifiers_are_unaffected(fisher_type):
  model = BatchNormNet()
  batch = _class_batches(1, 8)[0]
  variables = model.init(jax.random.key(0), batch['inputs'])
  f = curvature.estimate_factors(model.apply, variables, [batch], rng=jax.random.key(1),
                                 mesh=_mesh(), fisher_type=fisher_type)
  assert set(f) == {'Dense_0', 'Dense_1', 'Dense_2'}
  toks = jax.random.randint(jax.random.key(2), (8, SEQ + 1), 0, VOCAB)
  lm = TokenModel()
  lm_batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:]}
  lm_params = lm.init(jax.random.key(3), lm_batch['inputs'])
  f = curvature.estimate_factors(lm.apply, lm_params, [lm_batch], rng=jax.random.key(4),
                                 mesh=_mesh(), fisher_type=fisher_type)
  assert all(v.count == 8 * SEQ and np.isfinite(v.G).all() for v in f.values())
  if fisher_type == 'true':  # no targets at all
    f = curvature.estimate_factors(model.apply, variables, [{'inputs': batch['inputs']}],
                                   rng=jax.random.key(1), mesh=_mesh())
    assert all(np.isfinite(v.G).all() for v in f.values())


# ----------------------------------------------------------------------------- stitching
class SharedDense(nn.Module):
  """One Dense submodule ('shared') applied twice, between layers called once."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(4, name='shared')
    h = nn.relu(nn.Dense(4, name='inp')(x))
    h = shared(nn.relu(shared(h)))
    return nn.Dense(CLASSES, name='head')(nn.relu(h))


@pytest.fixture(scope='module')
def shared_model():
  model = SharedDense()
  x = np.asarray(jax.random.normal(jax.random.key(0), (16, IN)))
  return model, model.init(jax.random.key(1), x), model.init(jax.random.key(2), x), x


def _no_compute(*args, **kwargs):
  raise AssertionError('direct matching computed statistics before refusing the layers')


@pytest.mark.parametrize('layers_a, layers_b, first, second', [
    (['shared'], ['inp'], "'shared' of A has 16", "'inp' of B has 8"),
    (['inp'], ['shared'], "'inp' of A has 8", "'shared' of B has 16"),
    (['shared', 'inp'], ['head'], "'inp' of A has 8", "'shared' of A has 16"),
])
def test_dm_from_a_layer_called_twice_is_refused_before_compute(shared_model, layers_a, layers_b,
                                                                first, second):
  model, pa, pb, x = shared_model
  batches = [{'inputs': x[:8]}, {'inputs': x[8:]}]
  msg = (rf'layer {first} rows on its leading axis but layer {second}: a layer called k times '
         r'per forward pass gives k samples per example .*one activation per example on both '
         r'sides; choose layers called once')
  dm = st.DirectMatching(model, model, layers_a=layers_a, layers_b=layers_b, mesh=_mesh())
  dm._first = dm.update = _no_compute  # the refusal comes from shapes, on the host
  with pytest.raises(ValueError, match=msg):
    dm(pa, pb, batches)
  with pytest.raises(ValueError, match=msg):
    st.dm_statistics(model, pa, model, pb, batches, layers_a=layers_a, layers_b=layers_b,
                     mesh=_mesh())


def test_dm_between_layers_called_once_still_works(shared_model):
  model, pa, pb, x = shared_model
  dm = st.dm_statistics(model, pa, model, pb, [{'inputs': x}], layers_a=['inp'],
                        layers_b=['head'], mesh=_mesh())
  stitch = dm.solve(st.Pair('inp', 'head'))
  assert stitch['w'].shape == (4, CLASSES) and np.isfinite(np.asarray(stitch['w'])).all()


def test_make_layout_names_both_layers():
  with pytest.raises(ValueError, match=r"'shared' of A has 16 .* 'inp' of B has 8"):
    st.make_layout({'shared': (16, 4)}, {'inp': (8, 4)})


# ----------------------------------------------------------------------------- keyword calls
class KeywordNet(nn.Module):
  """The same network twice over: its layers called by keyword, or positionally."""
  keyword: bool = True

  @nn.compact
  def __call__(self, x):
    call = (lambda layer, v: layer(inputs=v)) if self.keyword else (lambda layer, v: layer(v))
    h = nn.relu(call(nn.Dense(8), x))
    return call(nn.Dense(CLASSES), h)


def test_a_layer_called_by_keyword_is_tapped_as_one_called_positionally():
  x = jax.random.normal(jax.random.key(0), (8, IN))
  batch = {'inputs': x, 'labels': jnp.arange(8) % CLASSES}
  by_keyword, positional = KeywordNet(), KeywordNet(keyword=False)
  params = positional.init(jax.random.key(1), x)
  assert list(taps.find_layers(by_keyword.apply, params, x)) == ['Dense_0', 'Dense_1']
  _, got = taps.capture(by_keyword.apply, params, x)
  np.testing.assert_array_equal(got.inputs['Dense_0'][0], x)
  kw = dict(rng=jax.random.key(2), fisher_type='empirical', homogeneous=True)
  f = curvature.estimate_factors(by_keyword.apply, params, [batch], **kw)
  want = curvature.estimate_factors(positional.apply, params, [batch], **kw)
  for name in want:
    np.testing.assert_array_equal(f[name].A, want[name].A)
    np.testing.assert_array_equal(f[name].G, want[name].G)
  cka = st.layer_similarity(by_keyword, params, positional, params, batch,
                            layers_a=['Dense_0'], layers_b=['Dense_0'])['linear_cka']
  np.testing.assert_allclose(cka.values, [[1.0]], atol=1e-6)
  fm = lowrank.replace_dense(by_keyword, 'lowrank', rank=2)
  assert set(fm.sites(x)) == {'Dense_0', 'Dense_1'}


def test_replace_dense_takes_an_apply_fn_as_it_takes_the_module():
  x = jax.random.normal(jax.random.key(0), (8, IN))
  model = KeywordNet(keyword=False)
  params = model.init(jax.random.key(1), x)
  fm = lowrank.replace_dense(model.apply, 'lowrank', select='Dense_0', rank=3, params=params)
  converted = fm.convert(x)
  assert converted['params']['Dense_0']['kernel']['lowrank_a'].shape == (IN, 3)
  module_fm = lowrank.replace_dense(model, 'lowrank', select='Dense_0', rank=3)
  want = module_fm.apply(module_fm.convert(params, x), x)
  np.testing.assert_allclose(fm.apply(converted, x), want, atol=1e-5)
  with pytest.raises(ValueError, match='needs its params'):
    lowrank.replace_dense(model.apply, 'lowrank', rank=3).sites(x)
