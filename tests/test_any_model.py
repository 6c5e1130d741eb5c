"""Every method's public entry point on models that are not lossland's.

The two models (tests/twin_models.py) are written the way people write flax: `nn.compact`,
auto-named submodules (`Dense_0`, `Attention_0/DenseGeneral_1`), attention
through `DenseGeneral` heads, an `Einsum` layer, a `Conv` stem, a regression
head, a `train` flag and dropout rngs. Nothing in lossland was written for
them; each test checks a property the method promises against a computation
that does not use the method.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lossland import curvature, lowrank, parallel, taps
from lossland import stitching as st

from twin_models import CLASSES, SEQ, VOCAB, WIDTH, ConvRegressor, TokenClassifier

EPS = float(np.finfo(np.float32).eps)


TOKEN_LAYERS = ['Attention_0/DenseGeneral_0', 'Attention_0/DenseGeneral_1',
                'Attention_0/DenseGeneral_2', 'Attention_0/DenseGeneral_3', 'Dense_0', 'Einsum_0',
                'Dense_1']


def _mesh():
  return parallel.make_mesh({'data': 8}, jax.devices()[:8])


def _token_batch(seed=0, batch=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'inputs': jax.random.randint(k1, (batch, SEQ), 0, VOCAB),
          'labels': jax.random.randint(k2, (batch,), 0, CLASSES)}


def _image_batch(seed=0, batch=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(k1, (batch, 6, 6, 1))
  return {'inputs': images, 'targets': images.mean(axis=(1, 2)) + 0.1 * jax.random.normal(
      k2, (batch, 1))}


def _token_model():
  model = TokenClassifier()
  return model, model.init(jax.random.key(0), _token_batch()['inputs'])


def _per_sample(values: jax.Array, d: int) -> np.ndarray:
  return np.asarray(values, np.float64).reshape(-1, d)


def _inputs_and_output_gradients(model, params, batch, select, dims):
  """path -> (a [samples, d_in], g [samples, d_out]) of the summed cross-entropy, from taps."""
  def loss(logits):
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), batch['labels'][:, None], 1))

  _, captured = taps.capture(model.apply, params, batch['inputs'], select=select, train=False)
  _, _, grads = taps.output_gradients(loss, model.apply, params, batch['inputs'], select=select,
                                      train=False)
  return {path: (_per_sample(taps.join_calls(captured.inputs[path]), dims[path][0]),
                 _per_sample(taps.join_calls(grads[path]), dims[path][1])) for path in select}


def test_kfac_factors_are_the_input_and_output_gradient_second_moments_of_every_layer():
  """A = E[a aᵀ], G = E[g gᵀ] over every token of every call, for every linear layer found."""
  model, params = _token_model()
  batch = _token_batch()
  found = curvature.find_layers(model.apply, params, batch['inputs'],
                                apply_kwargs={'train': False})
  assert list(found) == TOKEN_LAYERS  # found by type, in call order; the Embed is not linear
  checked = ['Attention_0/DenseGeneral_3', 'Einsum_0', 'Dense_1']
  f = curvature.estimate_factors(model.apply, params, [batch], rng=jax.random.key(1),
                                 select=checked, fisher_type='empirical', mesh=_mesh(),
                                 apply_kwargs={'train': False})
  samples = _inputs_and_output_gradients(
      model, params, batch, checked, {p: (f[p].A.shape[0], f[p].G.shape[0]) for p in checked})
  for path in checked:
    a, g = samples[path]
    assert f[path].count == len(a) == len(g)  # tokens are samples; the head sees one per example
    scale = np.abs(a).max() ** 2
    np.testing.assert_allclose(f[path].A, a.T @ a / len(a), atol=30 * EPS * scale)
    np.testing.assert_allclose(f[path].G, g.T @ g / len(g),
                               atol=30 * EPS * float(np.abs(g).max()) ** 2)


def test_the_edit_at_rho_one_keeps_the_model_and_below_one_changes_only_the_chosen_layers():
  model, params = _token_model()
  batches = [_token_batch(seed) for seed in range(2)]
  chosen = ['Dense_0', 'Einsum_0']
  f = curvature.estimate_factors(model.apply, params, batches, rng=jax.random.key(1),
                                 select=chosen, apply_kwargs={'train': False})
  bases = curvature.eigenbasis(f)
  kept = curvature.curvature_edit(params, bases, rho=1.0)
  x = batches[0]['inputs']
  want = model.apply(params, x)
  np.testing.assert_allclose(model.apply(kept, x), want, atol=100 * EPS * np.abs(want).max())
  edited = curvature.curvature_edit(params, bases, rho=0.5)
  flat, flat_edited = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (params, edited))
  changed = {parallel.path_name(k) for k in flat if not np.array_equal(flat[k], flat_edited[k])}
  assert changed == {'params/Dense_0/kernel', 'params/Einsum_0/kernel'}


def test_ekfac_pair_masses_sum_to_the_trace_of_the_per_sample_fisher():
  """Σ_ij S_ij = E[‖a‖² ‖g‖²]: the eigenbasis is orthonormal, so it must hold exactly."""
  model, params = _token_model()
  batch = _token_batch()
  select = ['Dense_0', 'Dense_1']
  kwargs = dict(rng=jax.random.key(1), fisher_type='empirical', apply_kwargs={'train': False})
  bases = curvature.eigenbasis(curvature.estimate_factors(model.apply, params, [batch],
                                                          select=select, **kwargs))
  masses = curvature.estimate_eigencorrection(model.apply, params, bases, [batch], **kwargs)
  samples = _inputs_and_output_gradients(model, params, batch, select,
                                         {p: bases[p].shape for p in select})
  for path in select:
    a, g = samples[path]
    want = np.mean(np.sum(a * a, 1) * np.sum(g * g, 1))
    assert np.all(np.asarray(masses[path]) >= -EPS * want)
    np.testing.assert_allclose(float(np.sum(masses[path])), want, rtol=1e-4)


def test_a_regression_model_gets_the_gaussian_fisher_with_conv_patches_as_samples():
  model = ConvRegressor()
  batch = _image_batch()
  params = model.init(jax.random.key(0), batch['inputs'])
  f = curvature.estimate_factors(model.apply, params, [batch], rng=jax.random.key(1),
                                 likelihood='gaussian', fisher_type='empirical',
                                 apply_kwargs={'train': False})
  assert list(f) == ['Conv_0', 'Dense_0', 'Dense_1']
  assert f['Conv_0'].count == 8 * 6 * 6  # KFC: every output position of every image
  assert f['Conv_0'].A.shape == (3 * 3 * 1, 3 * 3 * 1)  # over the 3x3x1 input patches
  residual = np.asarray(model.apply(params, batch['inputs']) - batch['targets'], np.float64)
  # The head's output gradient of ½(y - mean)² is the residual itself.
  np.testing.assert_allclose(f['Dense_1'].G, [[np.mean(residual ** 2)]], rtol=1e-5)


def test_kfac_with_dropout_on_takes_the_dropout_rng_through_apply_kwargs():
  model, params = _token_model()
  batch = _token_batch()

  def estimate(dropout_seed):
    return curvature.estimate_factors(
        model.apply, params, [batch], rng=jax.random.key(1), select=['Dense_0'],
        fisher_type='empirical',
        apply_kwargs={'train': True, 'rngs': {'dropout': jax.random.key(dropout_seed)}})

  # Two dropout rngs, two sets of dropped units: the factors see the masks of the rng given.
  assert not np.allclose(estimate(3)['Dense_0'].A, estimate(4)['Dense_0'].A)


@pytest.mark.parametrize('kind,kwargs', [('lowrank', {'rank': 4}), ('cola', {'rank': 4}),
                                         ('lost', {'param_fraction': 0.5}),
                                         ('sltrain', {'rank': 2, 'density': 0.1})])
def test_replace_dense_factorizes_a_user_model_without_touching_its_code(kind, kwargs):
  model, dense = _token_model()
  fm = lowrank.replace_dense(model, kind, select=r'Dense_0|Attention_0/DenseGeneral_\d', **kwargs)
  batch = _token_batch()
  variables = fm.init(jax.random.key(0), batch['inputs'])
  assert set(variables['params']['Dense_1']) == {'kernel', 'bias'}  # not selected: dense
  assert 'kernel' not in variables['params']['Dense_0']
  sizes = [int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params'])]
  assert sum(sizes) < sum(int(np.prod(v.shape)) for v in jax.tree.leaves(dense['params']))
  out = jax.jit(fm.apply, static_argnames='train')(
      variables, batch['inputs'], train=True, rngs={'dropout': jax.random.key(2)})
  assert out.shape == (8, CLASSES) and np.all(np.isfinite(out))


def test_dense_to_lowrank_conversion_at_full_rank_reproduces_the_user_model():
  model, dense = _token_model()
  select = ['Dense_0', 'Attention_0/DenseGeneral_3']  # min(d_in, d_out) = WIDTH for both
  fm = lowrank.replace_dense(model, 'lowrank', select=select, rank=WIDTH)
  x = _token_batch()['inputs']
  got = fm.apply(fm.convert(dense, x), x)
  want = model.apply(dense, x)
  # float32 forward passes through two re-associated layers of width <= 16, outputs O(1).
  np.testing.assert_allclose(got, want, rtol=0, atol=200 * EPS * float(np.abs(want).max()))


def _pooled_and_flat(acts):
  a = np.asarray(acts, np.float64)
  return a.mean(axis=1), a.reshape(-1, a.shape[-1])


def test_cka_between_layers_reads_token_activations_as_the_unit_says():
  model, params = _token_model()
  other = model.init(jax.random.key(9), _token_batch()['inputs'])
  batch = _token_batch(batch=16)
  layers = ['Dense_0', 'Einsum_0']
  _, acts_a = taps.capture(model.apply, params, batch['inputs'], select=layers)
  _, acts_b = taps.capture(model.apply, other, batch['inputs'], select=layers)
  for unit, read in (('pooled', 0), ('tokens', 1)):
    got = st.layer_similarity(model, params, model, other, batch, layers_a=layers,
                              layers_b=layers, unit=unit)['linear_cka']
    assert got.unit == unit and got.examples == 16 * (SEQ if unit == 'tokens' else 1)
    for i, a in enumerate(layers):
      for j, b in enumerate(layers):
        x = _pooled_and_flat(acts_a.outputs[a][0])[read]
        y = _pooled_and_flat(acts_b.outputs[b][0])[read]
        xc, yc = x - x.mean(0), y - y.mean(0)
        want = (np.linalg.norm(xc.T @ yc) ** 2
                / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))
        np.testing.assert_allclose(got.values[i, j], want, atol=1e-5)
  same = st.layer_similarity(model, params, model, params, batch, layers_a=layers,
                             layers_b=layers)['linear_cka']
  np.testing.assert_allclose(np.diag(same.values), 1.0, atol=1e-5)


def test_stitching_a_user_model_into_itself_by_direct_matching_is_the_identity():
  """A's Einsum_0 output into the same layer of the same model: W = I, b = 0, same accuracy."""
  model, params = _token_model()
  batches = [_token_batch(seed) for seed in range(2)]
  pair = st.Pair('Einsum_0', 'Einsum_0')
  dm = st.dm_statistics(model, params, model, params, batches, layers_a=[pair.source],
                        layers_b=[pair.target], unit='tokens', apply_kwargs={'train': False})
  stitch = dm.solve(pair)
  # 8 features of full rank over 80 token rows (Dense_0's 16 outputs span only 8 dimensions, so
  # they would not do): a well-posed least squares whose exact answer is I.
  np.testing.assert_allclose(stitch['w'], np.eye(WIDTH), atol=1e-4)
  np.testing.assert_allclose(stitch['b'], 0.0, atol=1e-4)
  scores = st.evaluate_stitches(model, params, model, params, {pair: stitch}, dm.gaussians(),
                                batches, apply_kwargs={'train': False})
  logits = np.concatenate([model.apply(params, b['inputs']) for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  assert scores[pair].accuracy == pytest.approx(np.mean(logits.argmax(-1) == labels))
  assert scores[pair].structural < 1e-6


def test_task_loss_matching_between_two_user_models_lowers_the_task_loss():
  model, params_a = _token_model()
  params_b = model.init(jax.random.key(5), _token_batch()['inputs'])
  pair = st.Pair('Dense_0', 'Dense_0')
  dm = st.dm_statistics(model, params_a, model, params_b, [_token_batch(0)],
                        layers_a=[pair.source], layers_b=[pair.target],
                        apply_kwargs={'train': False})
  tlm = st.TaskLossMatching(model, model, [pair], st.tlm_optimizer(3e-2),
                            apply_kwargs={'train': False})
  result = tlm.fit(dm.solve_all(), params_a, params_b, lambda step: _token_batch(0),
                   num_steps=20, steps_per_block=10)
  losses = result.losses[pair]
  assert losses.shape == (20,) and losses[-1] < losses[0]
