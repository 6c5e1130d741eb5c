"""Every method gives the same numbers on a linen model, its NNX twin and its plain-JAX twin.

The twins (tests/twin_models.py) carry the linen model's weights; the NNX
layers have their own names (`TOKEN_NNX_NAMES`), the plain functions run on
the linen variables and get the linen names. Factors, edits, EK-FAC masses,
CKA, direct-matching stitches and their scores must agree to float32
rounding, on 1 and 8 devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import twin_models as tm
from lossland import curvature, lowrank, parallel, taps
from lossland import stitching as st

EPS = float(np.finfo(np.float32).eps)


def _token_batch(seed=0, batch=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'inputs': jax.random.randint(k1, (batch, tm.SEQ), 0, tm.VOCAB),
          'labels': jax.random.randint(k2, (batch,), 0, tm.CLASSES)}


def _image_batch(seed=0, batch=8):
  k1, k2 = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(k1, (batch, 6, 6, 1))
  return {'inputs': images, 'targets': images.mean(axis=(1, 2)) + 0.1 * jax.random.normal(
      k2, (batch, 1))}


@pytest.fixture(scope='module')
def token_twins():
  model = tm.TokenClassifier()
  variables = model.init(jax.random.key(0), _token_batch()['inputs'])
  return {'linen': (model, variables), 'nnx': (tm.nnx_token_classifier(variables), None),
          'plain': (tm.plain_token_classifier, variables)}


@pytest.fixture(scope='module')
def conv_twins():
  model = tm.ConvRegressor()
  variables = model.init(jax.random.key(0), _image_batch()['inputs'])
  return {'linen': (model, variables), 'nnx': (tm.nnx_conv_regressor(variables), None),
          'plain': (tm.plain_conv_regressor, variables)}


def _linen_name(kind, name, names):
  return names.get(name, name) if kind == 'nnx' else name


def _mesh(n):
  return parallel.make_mesh({'data': n}, jax.devices()[:n])


def test_the_twins_compute_the_same_function(token_twins, conv_twins):
  x, images = _token_batch()['inputs'], _image_batch()['inputs']
  for twins, inputs in ((token_twins, x), (conv_twins, images)):
    want = twins['linen'][0].apply(twins['linen'][1], inputs)
    for kind in ('nnx', 'plain'):
      fn, params = taps.as_function(*twins[kind])
      np.testing.assert_allclose(fn(params, inputs), want, atol=1e-5)


def test_layers_are_found_in_call_order_with_their_own_names(token_twins):
  x = _token_batch()['inputs']
  found = {kind: list(taps.find_layers(*taps.as_function(*token_twins[kind]), x))
           for kind in token_twins}
  assert found['linen'] == found['plain']  # the plain function reads linen's variables
  assert [tm.TOKEN_NNX_NAMES[n] for n in found['nnx']] == found['linen']
  assert found['linen'] == ['Attention_0/DenseGeneral_0', 'Attention_0/DenseGeneral_1',
                            'Attention_0/DenseGeneral_2', 'Attention_0/DenseGeneral_3',
                            'Dense_0', 'Einsum_0', 'Dense_1']


@pytest.mark.parametrize('devices', [1, 8])
@pytest.mark.parametrize('homogeneous', [False, True])
def test_kfac_factors_agree_across_linen_nnx_and_plain(token_twins, devices, homogeneous):
  batches = [_token_batch(seed) for seed in range(2)]
  kw = dict(rng=jax.random.key(1), homogeneous=homogeneous, mesh=_mesh(devices),
            apply_kwargs={'train': False})
  got = {kind: curvature.estimate_factors(*token_twins[kind], batches, **kw)
         for kind in token_twins}
  want = got['linen']
  for kind in ('nnx', 'plain'):
    renamed = {_linen_name(kind, n, tm.TOKEN_NNX_NAMES): f for n, f in got[kind].items()}
    assert list(renamed) == list(want)
    for name, f in renamed.items():
      assert f.count == want[name].count
      scale = float(np.abs(want[name].A).max()) + float(np.abs(want[name].G).max())
      np.testing.assert_allclose(f.A, want[name].A, atol=20 * EPS * scale)
      np.testing.assert_allclose(f.G, want[name].G, atol=20 * EPS * scale)


def _leaves_by_linen_path(kind, params):
  """{linen 'params/…/kernel' path: array} of a (possibly NNX) params tree."""
  tree = taps.params_tree(params)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = parallel.path_name(path)
    if kind == 'nnx':
      parts = name.split('/')
      if parts[-1] == 'value':
        parts = parts[:-1]
      layer = '/'.join(parts[:-1])
      if layer not in tm.TOKEN_NNX_NAMES and layer not in tm.CONV_NNX_NAMES:
        continue
      names = tm.TOKEN_NNX_NAMES if layer in tm.TOKEN_NNX_NAMES else tm.CONV_NNX_NAMES
      name = f'params/{names[layer]}/{parts[-1]}'
    out[name] = np.asarray(leaf)
  return out


@pytest.mark.parametrize('homogeneous', [False, True])
def test_the_edit_agrees_across_linen_nnx_and_plain_and_comes_back_in_the_users_structure(
    token_twins, homogeneous):
  batches = [_token_batch(seed) for seed in range(2)]
  chosen = {'linen': ['Dense_0', 'Einsum_0', 'Attention_0/DenseGeneral_3'],
            'nnx': ['up', 'down', 'attention/out']}
  chosen['plain'] = chosen['linen']
  edited = {}
  for kind, (model, params) in token_twins.items():
    f = curvature.estimate_factors(model, params, batches, rng=jax.random.key(1),
                                   select=chosen[kind], homogeneous=homogeneous,
                                   apply_kwargs={'train': False})
    edited[kind] = curvature.curvature_edit(model if kind == 'nnx' else params,
                                            curvature.eigenbasis(f), rho=0.6)
  assert isinstance(edited['nnx'], tm.NNXTokenClassifier)  # an NNX module in, a module out
  want = _leaves_by_linen_path('linen', edited['linen'])
  before = _leaves_by_linen_path('linen', token_twins['linen'][1])
  changed = {k for k in want if not np.array_equal(want[k], before[k])}
  expected = {'params/Dense_0/kernel', 'params/Einsum_0/kernel',
              'params/Attention_0/DenseGeneral_3/kernel'}
  if homogeneous:
    expected |= {k.replace('kernel', 'bias') for k in expected}
  assert changed == expected
  for kind in ('nnx', 'plain'):
    got = _leaves_by_linen_path(kind, edited[kind])
    for key in want:
      if key in got:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f'{kind} {key}')
  x = batches[0]['inputs']
  np.testing.assert_allclose(edited['nnx'](x), token_twins['linen'][0].apply(edited['linen'], x),
                             atol=1e-5)


def test_ekfac_masses_agree_across_linen_nnx_and_plain(token_twins):
  batch = _token_batch()
  kw = dict(rng=jax.random.key(1), fisher_type='empirical', apply_kwargs={'train': False})
  masses = {}
  for kind, (model, params) in token_twins.items():
    select = ['up', 'head'] if kind == 'nnx' else ['Dense_0', 'Dense_1']
    bases = curvature.eigenbasis(curvature.estimate_factors(model, params, [batch],
                                                            select=select, **kw))
    got = curvature.estimate_eigencorrection(model, params, bases, [batch], **kw)
    masses[kind] = [np.asarray(got[n]) for n in select]
  for kind in ('nnx', 'plain'):
    for got, want in zip(masses[kind], masses['linen']):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_conv_factors_agree_across_linen_nnx_and_plain_nchw(conv_twins):
  """The plain twin convolves in NCHW/OIHW: the same KFC patches after the layout change."""
  batch = _image_batch()
  kw = dict(rng=jax.random.key(1), likelihood='gaussian', fisher_type='empirical',
            homogeneous=True, apply_kwargs={'train': False})
  got = {kind: curvature.estimate_factors(*conv_twins[kind], [batch], **kw)
         for kind in conv_twins}
  want = got['linen']
  assert want['Conv_0'].count == 8 * 6 * 6
  for kind in ('nnx', 'plain'):
    for name, f in got[kind].items():
      w = want[_linen_name(kind, name, tm.CONV_NNX_NAMES)]
      np.testing.assert_allclose(f.A, w.A, atol=1e-5 * float(np.abs(w.A).max()))
      np.testing.assert_allclose(f.G, w.G, atol=1e-5 * float(np.abs(w.G).max()))
  edited = {kind: curvature.curvature_edit(conv_twins[kind][0] if kind == 'nnx'
                                           else conv_twins[kind][1],
                                           curvature.eigenbasis(got[kind]), rho=0.5)
            for kind in conv_twins}
  x = batch['inputs']
  want_out = conv_twins['linen'][0].apply(edited['linen'], x)
  np.testing.assert_allclose(edited['nnx'](x), want_out, atol=1e-5)
  np.testing.assert_allclose(tm.plain_conv_regressor(edited['plain'], x), want_out, atol=1e-5)


def test_cka_agrees_across_linen_nnx_and_plain(token_twins):
  batch = _token_batch(batch=16)
  other = tm.TokenClassifier().init(jax.random.key(9), batch['inputs'])
  got = {}
  for kind, (model, params) in token_twins.items():
    layers = ['up', 'down'] if kind == 'nnx' else ['Dense_0', 'Einsum_0']
    for unit in ('pooled', 'tokens'):
      got[kind, unit] = st.layer_similarity(
          model, params, tm.TokenClassifier(), other, batch, layers_a=layers,
          layers_b=['Dense_0', 'Einsum_0'], unit=unit)['linear_cka'].values
  for kind in ('nnx', 'plain'):
    for unit in ('pooled', 'tokens'):
      np.testing.assert_allclose(got[kind, unit], got['linen', unit], atol=1e-5)


def test_direct_matching_stitches_agree_across_linen_nnx_and_plain(token_twins):
  batches = [_token_batch(seed) for seed in range(2)]
  results = {}
  for kind, (model, params) in token_twins.items():
    source = 'down' if kind == 'nnx' else 'Einsum_0'
    pair = st.Pair(source, 'Einsum_0')
    b_model, b_params = token_twins['linen']
    dm = st.dm_statistics(model, params, b_model, b_params, batches, layers_a=[source],
                          layers_b=['Einsum_0'], unit='tokens', apply_kwargs={'train': False})
    stitch = dm.solve(pair)
    scores = st.evaluate_stitches(model, params, b_model, b_params, {pair: stitch},
                                  dm.gaussians(), batches, apply_kwargs={'train': False})
    results[kind] = (stitch, scores[pair])
  w_linen, s_linen = results['linen']
  np.testing.assert_allclose(w_linen['w'], np.eye(tm.WIDTH), atol=1e-4)
  for kind in ('nnx', 'plain'):
    stitch, score = results[kind]
    np.testing.assert_allclose(stitch['w'], w_linen['w'], atol=1e-5)
    np.testing.assert_allclose(stitch['b'], w_linen['b'], atol=1e-5)
    assert score.accuracy == pytest.approx(s_linen.accuracy)


def test_stitching_into_an_nnx_layer_replaces_its_output(token_twins):
  model, _ = token_twins['nnx']
  x = _token_batch()['inputs']
  fn, params = taps.as_function(model)
  zeroed = st.replace_layer(model, None, x, 'down', jnp.zeros_like)
  # the residual branch through `down` (with its bias) contributes nothing
  h = model.embed(x)
  h = h + model.attention(h)
  want = model.head(h.mean(axis=1))
  np.testing.assert_allclose(zeroed, want, atol=1e-5)
  assert fn(params, x).shape == zeroed.shape


def test_a_weight_in_two_different_products_is_one_error_naming_its_path():
  def tied(p, x):
    h = x @ p['w']
    return h @ p['w'].T  # the same square weight as W and as Wᵀ

  p = {'w': jnp.eye(4)}
  x = jnp.ones((8, 4))
  with pytest.raises(ValueError, match=r"parameter 'w'.*2 different products"):
    curvature.estimate_factors(tied, p, [{'inputs': x}], rng=jax.random.key(0))


def test_a_batched_weight_is_one_error_naming_its_path():
  def experts(p, x):  # x [tokens, experts, d], one matrix per expert: a batched einsum
    return jnp.einsum('tex,exf->tef', x, p['experts']['w']).sum(1)

  p = {'experts': {'w': jnp.ones((3, 4, 5))}}
  with pytest.raises(ValueError, match=r"parameter 'experts/w'.*batched einsum"):
    curvature.estimate_factors(experts, p, [{'inputs': jnp.ones((8, 3, 4))}],
                               rng=jax.random.key(0))


def test_nnx_graphdef_and_state_are_a_model_too(token_twins):
  model, _ = token_twins['nnx']
  graphdef, state = nnx.split(model)
  batch = _token_batch()
  kw = dict(rng=jax.random.key(1), select=['head'], apply_kwargs={'train': False})
  a = curvature.estimate_factors(model, None, [batch], **kw)['head']
  b = curvature.estimate_factors(graphdef, state, [batch], **kw)['head']
  c = curvature.estimate_factors((graphdef, state), None, [batch], **kw)['head']
  np.testing.assert_array_equal(a.A, b.A)
  np.testing.assert_array_equal(a.G, c.G)


def test_the_any_model_bench_times_three_paths_that_agree():
  from configs.curvature import bench_any_model  # pylint: disable=g-import-not-at-top
  from launch.benches import curvature_any_model  # pylint: disable=g-import-not-at-top
  config = bench_any_model.get_config('runlocal')
  config.repeats = 1
  got = curvature_any_model.run(config)
  assert got['layers'] == 2 * 6 + 1  # q, k, v, o, up, down per block, and the head
  assert got['nnx_ms'] > 0 and got['plain_ms'] > 0 and got['linen_ms'] > 0
  assert got['max_relative_G_difference']['nnx'] < 1e-5
  assert got['max_relative_G_difference']['plain'] < 1e-5


@pytest.mark.parametrize('kind,kwargs', [('lowrank', {'rank': 3}),
                                         ('lost', {'param_fraction': 0.5, 'gamma': 0.5})])
def test_replace_dense_converts_the_same_factors_from_linen_nnx_and_plain(token_twins, kind,
                                                                          kwargs):
  x = _token_batch()['inputs']
  select = {'linen': ['Dense_0', 'Attention_0/DenseGeneral_3'],
            'nnx': ['up', 'attention/out']}
  select['plain'] = select['linen']
  outputs = {}
  for form, (model, params) in token_twins.items():
    fm = lowrank.replace_dense(model, kind, select=select[form],
                               params=params if form == 'plain' else None, **kwargs)
    variables = fm.convert(params, x) if form == 'linen' else fm.convert(x)
    outputs[form] = np.asarray(fm.apply(variables, x))
  dense = token_twins['linen'][0].apply(token_twins['linen'][1], x)
  assert not np.allclose(outputs['linen'], dense, atol=1e-4)  # below full rank: a change
  for form in ('nnx', 'plain'):
    np.testing.assert_allclose(outputs[form], outputs['linen'], atol=1e-5, err_msg=form)


def test_an_edit_finds_its_weights_by_path_in_params_with_more_collections(token_twins):
  """Factors from {'params'}; the edit applied to {'aux', 'params'} (leaves in another order)."""
  fn, variables = token_twins['plain']
  batch = _token_batch()
  f = curvature.estimate_factors(fn, variables, [batch], rng=jax.random.key(1),
                                 select=['Dense_0'], homogeneous=True)
  bases = curvature.eigenbasis(f)
  plain = curvature.curvature_edit(variables, bases, rho=0.5)
  more = curvature.curvature_edit({'aux': {'a': jnp.zeros(3)}, **variables}, bases, rho=0.5)
  np.testing.assert_array_equal(more['params']['Dense_0']['kernel'],
                                plain['params']['Dense_0']['kernel'])
  np.testing.assert_array_equal(more['aux']['a'], jnp.zeros(3))
  with pytest.raises(ValueError, match=r"no leaf \['params'\]\['Dense_0'\]\['kernel'\]"):
    curvature.curvature_edit({'params': {'other': jnp.ones(2)}}, bases, rho=0.5)


def test_streamed_cka_and_task_loss_matching_take_nnx_and_plain_models(token_twins):
  batches = [_token_batch(seed) for seed in range(2)]
  kw = dict(mesh=_mesh(2), apply_kwargs={'train': False})
  got = {}
  for form, (model, params) in token_twins.items():
    layers = ['up', 'down'] if form == 'nnx' else ['Dense_0', 'Einsum_0']
    got[form] = st.streamed_cka(model, params, *token_twins['linen'], batches, layers_a=layers,
                                layers_b=['Dense_0', 'Einsum_0'], **kw).values
  for form in ('nnx', 'plain'):
    np.testing.assert_allclose(got[form], got['linen'], atol=1e-5)
  model, _ = token_twins['nnx']
  b_model, b_params = token_twins['linen']
  other = b_model.init(jax.random.key(5), batches[0]['inputs'])
  pair = st.Pair('up', 'Dense_0')
  dm = st.dm_statistics(model, None, b_model, other, batches[:1], layers_a=['up'],
                        layers_b=['Dense_0'], apply_kwargs={'train': False})
  tlm = st.TaskLossMatching(model, b_model, [pair], st.tlm_optimizer(3e-2),
                            apply_kwargs={'train': False})
  result = tlm.fit(dm.solve_all(), nnx.state(model), other, lambda step: batches[0],
                   num_steps=10, steps_per_block=5)
  assert result.losses[pair][-1] < result.losses[pair][0]


def test_the_jitted_accumulator_takes_an_nnx_module_as_estimate_factors_does(token_twins):
  model, _ = token_twins['nnx']
  batch = _token_batch()
  mesh = _mesh(1)
  views = curvature.find_layers(model, None, batch['inputs'], select=['up'])
  acc = curvature.factors.make_factor_accumulator(model, list(views), mesh=mesh,
                                                  fisher_type='empirical')
  sums = acc(curvature.factors.zero_sums(views), nnx.state(model),
             parallel.shard_batch(batch, mesh), jax.random.key(1))
  want = curvature.estimate_factors(model, None, [batch], rng=jax.random.key(1), select=['up'],
                                    fisher_type='empirical', mesh=mesh)['up']
  np.testing.assert_allclose(sums['up'].A / sums['up'].count, want.A, rtol=1e-6)
