"""Capture/splice, direct matching from streamed statistics, TLM, OOD."""
import functools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as hst

from lossland import stitching as st
from lossland.models import CNN, MLP
from lossland.parallel import make_mesh

SETTINGS = hypothesis.settings(max_examples=6, deadline=None)


@pytest.fixture(scope='module')
def mlp():
  model = MLP(features=(12, 10, 8), num_classes=5)
  x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
  return model, model.init(jax.random.key(0), x[:1]), model.init(jax.random.key(1), x[:1]), x


def test_layer_names_and_unknown_layer(mlp):
  model, pa, _, x = mlp
  assert st.layer_names(model, pa, x) == ['dense_0', 'dense_1', 'dense_2', 'head']
  with pytest.raises(KeyError, match=r"no layer\(s\) \['dense_9'\].*available layers: "
                     r"\['dense_0', 'dense_1', 'dense_2', 'head'\]"):
    st.capture(model, pa, x, ['dense_9'])
  with pytest.raises(KeyError, match='available layers'):
    st.replace_layer(model, pa, x, 'nope', lambda t: t)


def test_capture_matches_manual_forward(mlp):
  model, pa, _, x = mlp
  out, acts = st.capture(model, pa, x, ['dense_0', 'dense_1'])
  p = pa['params']
  h0 = x @ p['dense_0']['kernel'] + p['dense_0']['bias']
  np.testing.assert_allclose(acts['dense_0'], h0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, model.apply(pa, x))


def test_identity_stitch_reproduces_model(mlp):
  model, pa, _, x = mlp
  ident = st.init_stitch(None, 10, 10, 'identity')
  out = st.stitched_apply(model, pa, model, pa, x, layer_a='dense_1', layer_b='dense_1',
                          stitch=functools.partial(st.apply_stitch, ident))
  np.testing.assert_allclose(out, model.apply(pa, x), rtol=1e-5, atol=1e-6)


def test_conv_stitch_is_resize_then_1x1():
  model = CNN(features=(4, 6), strides=(2, 1), num_classes=3)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
  pa = model.init(jax.random.key(0), x)
  _, acts = st.capture(model, pa, x, ['conv_0', 'conv_1'])
  assert acts['conv_0'].shape == (2, 4, 4, 4)
  target = jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32)  # upsample 4x4 -> 8x8
  stitch = st.init_stitch(jax.random.key(1), 4, 6)
  out = st.apply_stitch(stitch, acts['conv_0'], target)
  up = jax.image.resize(acts['conv_0'], (2, 8, 8, 4), 'bilinear')
  np.testing.assert_allclose(out, up @ stitch['w'] + stitch['b'], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='cannot stitch a layer of shape'):
    st.apply_stitch(stitch, acts['conv_0'], jax.ShapeDtypeStruct((2, 6), jnp.float32))


@SETTINGS
@hypothesis.given(seed=hst.integers(0, 10_000), d_in=hst.integers(1, 9),
                  d_out=hst.integers(1, 9))
def test_dm_recovers_known_affine_map(seed, d_in, d_out):
  rng = np.random.default_rng(seed)
  a = (rng.normal(size=(256, d_in)) * rng.uniform(0.5, 3, d_in) + rng.normal(size=d_in) * 5)
  w = rng.normal(size=(d_in, d_out))
  bias = rng.normal(size=d_out)
  b = a @ w + bias
  a, b = a.astype(np.float32), b.astype(np.float32)
  layout = st.make_layout({'a': a.shape}, {'b': b.shape})
  stats = st.init_stats(layout, {'a': a[:64]}, {'b': b[:64]})
  for i in range(0, 256, 64):  # streamed in 4 batches
    stats = st.update_stats(stats, layout, {'a': a[i:i + 64]}, {'b': b[i:i + 64]})
  sol = st.solve_direct(stats, layout, 'a', 'b')
  np.testing.assert_allclose(sol['w'], w, atol=2e-4 * max(1, np.abs(w).max()))
  np.testing.assert_allclose(sol['b'], bias, atol=2e-3 * max(1, np.abs(bias).max()))
  res, norm = st.structural_residual(sol, a, b)
  assert float(res / norm) < 1e-8


def _b(*xs):
  return [{'inputs': x} for x in xs]


def test_all_pairs_from_one_pass_match_per_pair_lstsq(mlp):
  model, pa, pb, x = mlp
  layers = ['dense_0', 'dense_1', 'dense_2']
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  dm = st.dm_statistics(model, pa, model, pb, _b(x[:32], x[32:]), layers_a=layers,
                        layers_b=layers, mesh=mesh)
  assert dm.stats[0]['gram'].sharding.is_fully_replicated
  _, acts_a = st.capture(model, pa, x, layers)
  _, acts_b = st.capture(model, pb, x, layers)
  solved = dm.solve_all()
  assert list(solved) == st.all_pairs(layers, layers)
  for src in layers:
    for tgt in layers:
      sol = solved[st.Pair(src, tgt)]
      a = np.float64(acts_a[src]); b = np.float64(acts_b[tgt])
      # dense_0 has rank 6 in 12 columns (6 inputs): the reference must drop the
      # float32-rounding directions too, or it fits b with rounding noise.
      ref = np.linalg.lstsq(np.c_[a, np.ones(len(a))], b, rcond=1e-3)[0]
      fit = np.c_[a, np.ones(len(a))] @ ref
      ours = a @ np.float64(sol['w']) + np.float64(sol['b'])
      np.testing.assert_allclose(ours, fit, atol=1e-3 * np.abs(b).max())
  # 1-device statistics agree with 8-device ones; mesh=None is every local device.
  mesh1 = make_mesh({'data': 1}, jax.devices()[:1])
  dm1 = st.dm_statistics(model, pa, model, pb, _b(x[:32], x[32:]), layers_a=layers,
                         layers_b=layers, mesh=mesh1)
  np.testing.assert_allclose(dm1.stats[0]['gram'], dm.stats[0]['gram'], rtol=1e-5, atol=1e-4)
  default = st.dm_statistics(model, pa, model, pb, _b(x[:32], x[32:]), layers_a=layers,
                             layers_b=layers)
  assert default.stats[0]['gram'].sharding.mesh.shape['data'] == len(jax.local_devices())
  with pytest.raises(ValueError, match=r"dict with \['inputs'\]"):
    st.dm_statistics(model, pa, model, pb, [x], layers_a=layers, layers_b=layers)


def test_self_stitch_recovers_identity_and_moments(mlp):
  model, pa, _, x = mlp
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  layers = ['dense_0', 'dense_1']
  dm = st.dm_statistics(model, pa, model, pa, _b(x), layers_a=layers, layers_b=layers, mesh=mesh)
  sol = dm.solve(st.Pair('dense_1', 'dense_1'))
  np.testing.assert_allclose(sol['w'], np.eye(10), atol=1e-4)
  _, acts = st.capture(model, pa, x, layers)
  mean, cov = dm.moments('dense_0')
  np.testing.assert_allclose(mean, np.mean(acts['dense_0'], 0), atol=1e-4)
  np.testing.assert_allclose(cov, np.cov(np.float64(acts['dense_0']).T, bias=True), atol=1e-4)
  with pytest.raises(KeyError, match='no b layer'):
    dm.solve(st.Pair('dense_0', 'head'))


def _labelled(x, labels, *cuts):
  edges = [0, *cuts, len(x)]
  return [{'inputs': x[i:j], 'labels': labels[i:j]} for i, j in zip(edges[:-1], edges[1:])]


def test_evaluator_scores_and_ood(mlp):
  model, pa, _, x = mlp
  labels = np.asarray(model.apply(pa, x)).argmax(-1)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  pairs = [st.Pair('dense_0', 'dense_0'), st.Pair('dense_0', 'dense_2')]
  dm = st.dm_statistics(model, pa, model, pa, _b(x), layers_a=['dense_0'],
                        layers_b=['dense_0', 'dense_2'], mesh=mesh)
  stitches, g = dm.solve_all(pairs), dm.gaussians()
  ev = st.StitchEvaluator(model, model, pairs, mesh=mesh)
  out = ev(pa, pa, stitches, g, _labelled(x, labels, 32))
  self_pair = out[st.Pair('dense_0', 'dense_0')]
  assert isinstance(self_pair, st.StitchScores)
  assert self_pair.accuracy == 1.0 and self_pair.structural < 1e-8
  np.testing.assert_allclose(self_pair.ood_ratio, 1.0, atol=1e-4)
  # Scaling a stitch far off makes it out of distribution.
  far = jax.tree.map(lambda v: 50 * v, stitches)
  far_out = st.evaluate_stitches(model, pa, model, pa, far, g, _labelled(x, labels), mesh=mesh)
  assert far_out[st.Pair('dense_0', 'dense_2')].ood_ratio > 10
  with pytest.raises(KeyError, match=r"no stitch for \['dense_0->dense_2'\]"):
    ev(pa, pa, {pairs[0]: stitches[pairs[0]]}, g, _labelled(x, labels))


def test_tlm_trains_stitches_independently(mlp):
  model, pa, pb, x = mlp
  labels = np.asarray(model.apply(pb, x)).argmax(-1)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  pairs = [st.Pair('dense_0', 'dense_1'), st.Pair('dense_2', 'dense_0')]
  dims = st.stitch_dims(model, pa, model, pb, x, pairs)
  assert dims == {pairs[0]: (12, 10), pairs[1]: (8, 12)}
  start = st.init_stitches(jax.random.key(0), dims)
  opt = st.tlm_optimizer(1e-2)
  tlm = st.TaskLossMatching(model, model, pairs, opt, mesh=mesh)
  halves = [(x[:32], labels[:32]), (x[32:], labels[32:])]
  batch_fn = lambda s: dict(zip(('inputs', 'labels'), halves[s % 2]))
  result = tlm.fit(start, pa, pb, batch_fn, num_steps=6, steps_per_block=3)  # 2 blocks, 1 trace
  for p in pairs:
    assert result.losses[p].shape == (6,) and result.losses[p][-1] < result.losses[p][0]
  # The joint run equals training one stitch alone (no coupling between stitches).
  alone = st.TaskLossMatching(model, model, pairs[:1], opt, mesh=mesh).fit(
      {pairs[0]: start[pairs[0]]}, pa, pb, batch_fn, num_steps=6, steps_per_block=3)
  np.testing.assert_allclose(alone.stitches[pairs[0]]['w'], result.stitches[pairs[0]]['w'],
                             rtol=1e-4, atol=1e-6)
  with pytest.raises(KeyError, match='this trainer trains'):
    tlm.init({pairs[0]: start[pairs[0]]})


def test_tlm_block_traces_once(mlp):
  model, pa, pb, x = mlp
  labels = np.zeros(64, np.int32)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  pairs = [st.Pair('dense_0', 'dense_1')]
  tlm = st.TaskLossMatching(model, model, pairs, optax.sgd(0.1), mesh=mesh)
  stitches = {pairs[0]: st.init_stitch(jax.random.key(0), 12, 10)}
  opt_state = tlm.init(stitches)
  for _ in range(3):
    stitches, opt_state, _ = tlm.train_block(stitches, opt_state, pa, pb,
                                             {'inputs': x[None], 'labels': labels[None]})
  assert tlm.block._cache_size() == 1


def test_passes_trace_once(mlp):
  model, pa, pb, x = mlp
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  layers = ['dense_0', 'dense_2']
  dm_fit = st.DirectMatching(model, model, layers_a=layers, layers_b=layers, mesh=mesh)
  for p in (pb, pa):
    dm = dm_fit(pa, p, _b(x[:16], x[16:32], x[32:48]))
  assert dm_fit.update._cache_size() == 1
  pairs = st.all_pairs(layers, layers)
  ev = st.StitchEvaluator(model, model, pairs, mesh=mesh)
  zeros = np.zeros(64, np.int32)
  for p in (pb, pa):
    ev(pa, p, dm.solve_all(), dm.gaussians(), _labelled(x, zeros, 16, 32, 48))
  assert ev.step._cache_size() == 1


MANY = 64  # back-to-back calls; without parallel.settle XLA:CPU deadlocks after ~30-40


def test_tlm_blocks_in_a_loop_match_one_block(mlp):
  """64 one-step blocks in a row on 8 devices (each all-reduces) equal one 64-step block."""
  model, pa, pb, x = mlp
  labels = np.asarray(model.apply(pb, x)).argmax(-1)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  pair = st.Pair('dense_0', 'dense_1')
  tlm = st.TaskLossMatching(model, model, [pair], st.tlm_optimizer(1e-2), mesh=mesh)
  start = {pair: st.init_stitch(jax.random.key(0), 12, 10)}
  idx = np.arange(MANY * 8).reshape(MANY, 8) % len(x)
  batch_fn = lambda s: {'inputs': x[idx[s]], 'labels': labels[idx[s]]}
  looped = tlm.fit(start, pa, pb, batch_fn, num_steps=MANY, steps_per_block=1).stitches
  fused = tlm.fit(start, pa, pb, batch_fn, num_steps=MANY, steps_per_block=MANY).stitches
  for k in ('w', 'b'):  # the same steps in one scan or many: float32 rounding only
    np.testing.assert_allclose(looped[pair][k], fused[pair][k], rtol=1e-4, atol=1e-6)


def test_evaluation_loop_over_many_batches(mlp):
  """The experiment's loop: one evaluator call per batch (each waits on CPU), many batches."""
  model, pa, pb, x = mlp
  labels = np.asarray(model.apply(pb, x)).argmax(-1)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  layers = ['dense_0', 'dense_2']
  dm = st.dm_statistics(model, pa, model, pb, _b(x), layers_a=layers, layers_b=layers, mesh=mesh)
  # The statistics loop too: MANY batches of 8 rows (x's 8 slices, 8 times over).
  looped_dm = st.dm_statistics(model, pa, model, pb, _b(*[x[i::8] for i in range(8)] * 8),
                               layers_a=layers, layers_b=layers, mesh=mesh)
  assert all(float(g['rows']) == MANY * 8 for g in jax.device_get(looped_dm.stats).values())
  stitches = dm.solve_all()
  _, acts = st.capture(model, pa, x, layers)
  for p, looped in looped_dm.solve_all().items():  # same least squares
    a = np.float64(acts[p.source])
    want = a @ np.float64(stitches[p]['w']) + np.float64(stitches[p]['b'])
    np.testing.assert_allclose(a @ np.float64(looped['w']) + np.float64(looped['b']), want,
                               atol=1e-3 * np.abs(want).max())
  g = dm.gaussians()
  ev = st.StitchEvaluator(model, model, st.all_pairs(layers, layers), mesh=mesh)
  idx = np.arange(MANY * 8) % len(x)
  looped = ev(pa, pb, stitches, g, [{'inputs': x[idx[8 * i:8 * (i + 1)]],
                                     'labels': labels[idx[8 * i:8 * (i + 1)]]}
                                    for i in range(MANY)])
  whole = ev(pa, pb, stitches, g, [{'inputs': x[idx], 'labels': labels[idx]}])
  for k in whole:
    assert looped[k].accuracy == whole[k].accuracy
    for metric in ('structural', 'ood_ratio'):  # ratios of float32 sums (self-pairs: ~0)
      np.testing.assert_allclose(getattr(looped[k], metric), getattr(whole[k], metric),
                                 rtol=1e-4, atol=1e-6)


def test_conv_dm_groups_by_target_resolution():
  model = CNN(features=(3, 4), strides=(1, 2), num_classes=3)
  x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
  pa, pb = model.init(jax.random.key(0), x), model.init(jax.random.key(1), x)
  layers = ['conv_0', 'conv_1']  # 8x8x3 and 4x4x4
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  dm = st.dm_statistics(model, pa, model, pb, _b(x[:8], x[8:]), layers_a=layers,
                        layers_b=layers, mesh=mesh)
  assert len(dm.layout.groups) == 2
  _, acts_a = st.capture(model, pa, x, layers)
  _, acts_b = st.capture(model, pb, x, layers)
  for src in layers:
    for tgt in layers:
      sol = dm.solve(st.Pair(src, tgt))
      a = np.float64(st.stitch_inputs(acts_a[src], acts_b[tgt].shape))  # resized, (N·H·W, C)
      b = np.float64(st.target_rows(acts_b[tgt]))
      design = np.c_[a, np.ones(len(a))]
      fit = design @ np.linalg.lstsq(design, b, rcond=1e-3)[0]
      ours = np.asarray(st.apply_stitch(sol, acts_a[src], acts_b[tgt])).reshape(b.shape)
      np.testing.assert_allclose(ours, fit, atol=1e-3 * np.abs(b).max())
