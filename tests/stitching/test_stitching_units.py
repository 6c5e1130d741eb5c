"""unit='tokens' / 'pooled' on a model with a token axis, against hand-flattened and
hand-pooled computations; models as apply_fn + apply_kwargs."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from lossland import stitching as st
from lossland.parallel import make_mesh


class Mix(nn.Module):
  @nn.compact
  def __call__(self, h):
    return nn.relu(nn.Dense(5)(h))


class TokenNet(nn.Module):
  """[N, T, 3] -> per-token Dense layers -> mean over tokens -> logits; a train-mode dropout."""

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    h = nn.Dense(5, name='embed')(x)
    h = nn.Dropout(0.5, deterministic=not train)(h)
    h = Mix(name='mix')(h)  # nonlinear: its output is not an affine map of embed's
    return nn.Dense(4, name='head')(h.mean(axis=1))


LAYERS = ['embed', 'mix']
EVAL = {'train': False}


def _tokens(a):
  return np.float64(a).reshape(-1, a.shape[-1])


def _pooled(a):
  return np.float64(a).mean(axis=tuple(range(1, a.ndim - 1)))


BY_HAND = {'tokens': _tokens, 'pooled': _pooled}


def _linear_cka(x, y):
  """Kornblith et al. (2019) Eq. 5 in float64."""
  x, y = x - x.mean(0), y - y.mean(0)
  return np.sum((x.T @ y) ** 2) / np.linalg.norm(x.T @ x) / np.linalg.norm(y.T @ y)


def _procrustes(x, y):
  """Ding et al. (2021) Eq. 3 in float64: 2 − 2‖XᵀY‖_* of centered, unit-norm X, Y."""
  x, y = x - x.mean(0), y - y.mean(0)
  x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
  return 2 - 2 * np.linalg.svd(x.T @ y, compute_uv=False).sum()


def _hsic1(x, y):
  """Unbiased HSIC of linear kernels (Song et al. 2012, Eq. 5) in float64."""
  n = len(x)
  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
          - 2 / (n - 2) * k.sum(0) @ l.sum(1)) / (n * (n - 3))


@pytest.fixture(scope='module')
def net():
  model = TokenNet()
  x = np.random.default_rng(0).normal(size=(32, 5, 3)).astype(np.float32)
  pa = model.init(jax.random.key(0), x[:1], train=False)
  pb = model.init(jax.random.key(1), x[:1], train=False)
  _, acts_a = st.capture(model, pa, x, LAYERS, apply_kwargs=EVAL)
  _, acts_b = st.capture(model.apply, pb, x, LAYERS, apply_kwargs=EVAL)  # an apply_fn works too
  return model, pa, pb, x, jax.device_get(acts_a), jax.device_get(acts_b)


@pytest.mark.parametrize('unit', ['tokens', 'pooled'])
def test_similarity_matrices_equal_the_hand_reshaped_index(net, unit):
  model, pa, pb, x, acts_a, acts_b = net
  by_hand = BY_HAND[unit]
  got = st.similarity_matrices(acts_a, acts_b, indices=['linear_cka', 'procrustes'], unit=unit)
  for name, fn in (('linear_cka', _linear_cka), ('procrustes', _procrustes)):
    m = got[name]
    assert m.rows == tuple(LAYERS) and m.cols == tuple(LAYERS) and m.unit == unit
    assert m.examples == (32 * 5 if unit == 'tokens' else 32)
    want = [[float(fn(by_hand(acts_a[a]), by_hand(acts_b[b]))) for b in LAYERS] for a in LAYERS]
    np.testing.assert_allclose(m.values, want, rtol=1e-5, atol=2e-6)  # float32 sums of ~200
  # The same through layer_similarity (captures on a batch dict with apply_kwargs).
  again = st.layer_similarity(model, pa, model, pb, {'inputs': x}, layers_a=LAYERS,
                              layers_b=LAYERS, unit=unit, apply_kwargs=EVAL)
  np.testing.assert_allclose(again['linear_cka'].values, got['linear_cka'].values, rtol=1e-5)


def test_tokens_and_pooled_differ_on_token_activations(net):
  *_, acts_a, acts_b = net
  tok = st.similarity_matrices(acts_a, acts_b, unit='tokens')['linear_cka'].values
  pool = st.similarity_matrices(acts_a, acts_b, unit='pooled')['linear_cka'].values
  assert np.abs(tok - pool).max() > 1e-3  # two different questions, two answers


@pytest.mark.parametrize('unit', ['tokens', 'pooled'])
def test_streamed_cka_equals_minibatch_cka_of_hand_reshaped_features(net, unit):
  model, pa, pb, x, acts_a, acts_b = net
  mesh = make_mesh({'data': 2}, jax.devices()[:2])
  batches = [{'inputs': x[:16]}, {'inputs': x[16:]}]
  got = st.streamed_cka(model, pa, model, pb, batches, layers_a=LAYERS, layers_b=r'mix',
                        unit=unit, mesh=mesh, apply_kwargs=EVAL)
  assert got.rows == tuple(LAYERS) and got.cols == ('mix',) and got.values.shape == (2, 1)
  by_hand = BY_HAND[unit]
  # Each of the 2 devices holds 8 inputs of a 16-input batch: 4 minibatches in all, and
  # minibatch CKA sums each HSIC over them (Nguyen et al. 2021, Eq. 2).
  hsic = lambda f, g: sum(_hsic1(f(i), g(i)) for i in range(0, 32, 8))
  a_rows = lambda k: lambda i: by_hand(acts_a[k][i:i + 8])
  b_rows = lambda i: by_hand(acts_b['mix'][i:i + 8])
  want = [[hsic(a_rows(k), b_rows) / np.sqrt(hsic(a_rows(k), a_rows(k)) * hsic(b_rows, b_rows))]
          for k in LAYERS]
  np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-6)
  assert got.examples == (32 * 5 if unit == 'tokens' else 32)


def test_axes_that_disagree_are_one_clear_error(net):
  model, pa, _, x, *_ = net
  rng = np.random.default_rng(1)
  conv_0 = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)  # spatial 8x8 and 4x4
  conv_1 = rng.normal(size=(8, 4, 4, 4)).astype(np.float32)
  with pytest.raises(ValueError, match=r"unit='tokens'.*same token/spatial axes.*\(8, 8\).*"
                                       r"\(4, 4\).*unit='pooled'"):
    st.similarity_matrices({'conv_0': conv_0}, {'conv_1': conv_1})
  pooled = st.similarity_matrices({'conv_0': conv_0}, {'conv_1': conv_1},
                                  unit='pooled')['linear_cka'].values
  np.testing.assert_allclose(pooled[0, 0], _linear_cka(_pooled(conv_0), _pooled(conv_1)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='unknown unit'):
    st.similarity_matrices({'conv_0': conv_0}, {'conv_1': conv_1}, unit='flat')
  with pytest.raises(ValueError, match='8 examples but'):
    st.similarity_matrices({'conv_0': conv_0}, {'conv_1': conv_1[:4]}, unit='pooled')
  # B sees the first 3 tokens only: 5 tokens against 3 cannot be matched position by position.
  short = lambda v, x, **kw: model.apply(v, x[:, :3], **kw)
  with pytest.raises(ValueError, match=r"A layer 'embed'.*\(5,\).*B layer 'mix' \(3,\)"):
    st.streamed_cka(model, pa, short, pa, [{'inputs': x}], layers_a=['embed'],
                    layers_b=['mix'], mesh=make_mesh({'data': 1}, jax.devices()[:1]),
                    apply_kwargs=EVAL)


@pytest.mark.parametrize('unit', ['tokens', 'pooled'])
def test_direct_matching_and_scores_by_unit(net, unit):
  model, pa, pb, x, acts_a, acts_b = net
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  pair = st.Pair('embed', 'mix')
  dm = st.dm_statistics(model, pa, model, pb, [{'inputs': x[:16]}, {'inputs': x[16:]}],
                        layers_a=['embed'], layers_b=['mix'], unit=unit, mesh=mesh,
                        apply_kwargs=EVAL)
  stitch = dm.solve(pair)
  by_hand = BY_HAND[unit]
  a, b = by_hand(acts_a['embed']), by_hand(acts_b['mix'])
  design = np.c_[a, np.ones(len(a))]
  # embed is affine in the 3 inputs: rank 3 of 6 columns, so the reference drops the
  # float32-rounding directions too (as DM's pseudo-inverse does).
  fit = design @ np.linalg.lstsq(design, b, rcond=1e-3)[0]
  np.testing.assert_allclose(a @ np.float64(stitch['w']) + np.float64(stitch['b']), fit,
                             atol=1e-4 * np.abs(b).max())
  mean, cov = dm.moments('mix')
  np.testing.assert_allclose(mean, b.mean(0), atol=1e-5)
  np.testing.assert_allclose(cov, np.cov(b.T, bias=True), atol=1e-5)
  # Scores: the stitch is applied per token inside B; the structural score and the OOD
  # rows are per token or per pooled input, as chosen.
  labels = np.asarray(model.apply(pb, x, train=False)).argmax(-1)
  g = dm.gaussians()
  scores = st.evaluate_stitches(model, pa, model, pb, {pair: stitch}, g,
                                [{'inputs': x, 'labels': labels}], unit=unit, mesh=mesh,
                                apply_kwargs=EVAL)[pair]
  t = np.asarray(st.apply_stitch(stitch, acts_a['embed'], acts_b['mix']))
  t, real = by_hand(t), by_hand(acts_b['mix'])
  np.testing.assert_allclose(scores.structural, np.sum((t - real) ** 2) / np.sum(real ** 2),
                             rtol=1e-4)
  prec, mu = np.float64(g['mix'].precision), np.float64(g['mix'].mean)
  mahal = lambda r: np.sqrt(np.maximum(np.einsum('md,de,me->m', r - mu, prec, r - mu), 0)).sum()
  np.testing.assert_allclose(scores.ood_ratio, mahal(t) / mahal(real), rtol=1e-4)
  logits = st.stitched_apply(model, pa, model, pb, x, layer_a='embed', layer_b='mix',
                             stitch=lambda s, tgt: st.apply_stitch(stitch, s, tgt),
                             apply_kwargs=EVAL)
  assert scores.accuracy == float(np.mean(np.asarray(logits).argmax(-1) == labels))


def test_tlm_and_apply_kwargs_reach_the_model(net):
  model, pa, pb, x, *_ = net
  labels = np.asarray(model.apply(pb, x, train=False)).argmax(-1)
  pair = st.Pair('embed', 'mix')
  start = st.init_stitches(jax.random.key(0), st.stitch_dims(model, pa, model, pb, x, [pair],
                                                             apply_kwargs=EVAL))
  batch_fn = lambda s: {'inputs': x, 'labels': labels}
  tlm = st.TaskLossMatching(model, model, [pair], st.tlm_optimizer(1e-2),
                            mesh=make_mesh({'data': 8}, jax.devices()[:8]), apply_kwargs=EVAL)
  result = tlm.fit(start, pa, pb, batch_fn, num_steps=4, steps_per_block=4)
  assert result.losses[pair][-1] < result.losses[pair][0]
  # Without train=False the dropout layer asks for an rng: the kwargs did reach the model.
  with pytest.raises(Exception, match='needs PRNG for "dropout"'):
    st.TaskLossMatching(model, model, [pair], mesh=make_mesh({'data': 8}, jax.devices()[:8])
                        ).fit(start, pa, pb, batch_fn, num_steps=1, steps_per_block=1)
