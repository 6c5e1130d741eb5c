"""CKA: properties, exact references on tiny cases, and bad inputs."""
import itertools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as hst
from scipy.stats import ortho_group

from lossland import stitching as st
from lossland.parallel import make_mesh

SETTINGS = hypothesis.settings(max_examples=10, deadline=None)


def _features(seed, n=40, d=6):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _cka_ref(x, y):
  """Biased linear CKA from n x n Gram matrices in float64 (Kornblith Eq. 3)."""
  x, y = np.float64(x), np.float64(y)
  h = np.eye(len(x)) - 1.0 / len(x)
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def _hsic_u_ref(k, l):
  """Unbiased HSIC as the U-statistic over distinct 4-tuples (Song et al. 2012, Thm. 2)."""
  n = len(k)
  total, count = 0.0, 0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    count += 1
  return total / count


@SETTINGS
@hypothesis.given(seed=hst.integers(0, 10_000), kernel=hst.sampled_from(['linear', 'rbf']),
                  debiased=hst.booleans())
def test_cka_self_is_one(seed, kernel, debiased):
  x = _features(seed)
  np.testing.assert_allclose(st.cka(x, x, kernel=kernel, debiased=debiased), 1.0, atol=1e-5)


@SETTINGS
@hypothesis.given(seed=hst.integers(0, 10_000), scale=hst.floats(1e-2, 1e2),
                  debiased=hst.booleans())
def test_linear_cka_orthogonal_and_scale_invariant(seed, scale, debiased):
  x, y = _features(seed), _features(seed + 1, d=5)
  q = ortho_group.rvs(6, random_state=seed).astype(np.float32)
  base = st.cka(x, y, debiased=debiased)
  np.testing.assert_allclose(st.cka(scale * x @ q, y, debiased=debiased), base, atol=2e-5)
  np.testing.assert_allclose(st.cka(x, scale * y, debiased=debiased), base, atol=2e-5)


@SETTINGS
@hypothesis.given(seed=hst.integers(0, 10_000), scale=hst.floats(1e-2, 1e2))
def test_rbf_cka_orthogonal_and_scale_invariant(seed, scale):
  # The median-distance bandwidth scales with the data, so RBF CKA is scale invariant too.
  x, y = _features(seed), _features(seed + 1, d=5)
  q = ortho_group.rvs(6, random_state=seed).astype(np.float32)
  base = st.cka(x, y, kernel='rbf')
  np.testing.assert_allclose(st.cka(scale * x @ q, y, kernel='rbf'), base, atol=1e-4)


def test_linear_cka_matches_gram_reference():
  x, y = _features(0, n=30, d=8), _features(1, n=30, d=3) ** 2
  np.testing.assert_allclose(st.linear_cka(x, y), _cka_ref(x, y), rtol=1e-5)
  np.testing.assert_allclose(st.cka(x, y, kernel='linear'), _cka_ref(x, y), rtol=1e-5)


def test_unbiased_hsic_matches_u_statistic():
  x, y = _features(2, n=6, d=3), _features(3, n=6, d=2)
  k, l = np.float64(x @ x.T), np.float64(y @ y.T)
  np.testing.assert_allclose(st.hsic_unbiased(jnp.asarray(k, jnp.float32),
                                              jnp.asarray(l, jnp.float32)),
                             _hsic_u_ref(k, l), rtol=1e-4, atol=1e-5)


def test_small_batch_and_mismatch_errors():
  x = _features(0, n=3)
  with pytest.raises(ValueError, match='at least 4 examples'):
    st.cka(x, x, debiased=True)
  with pytest.raises(ValueError, match='at least 4 examples'):
    st.hsic_matrix_update(jnp.zeros((2, 2)), [x], [x])
  with pytest.raises(ValueError, match='x has 40 examples but y has 30'):
    st.cka(_features(0), _features(1, n=30))
  with pytest.raises(ValueError, match='flatten'):
    st.cka(np.zeros((4, 2, 2)), np.zeros((4, 4)))
  # Biased CKA works on 2 examples.
  assert np.isfinite(st.cka(_features(0, n=2), _features(1, n=2)))


@pytest.mark.parametrize('debiased', [False, True])
@pytest.mark.parametrize('kernel', ['linear', 'rbf'])
def test_degenerate_inputs_give_zero_not_nan(kernel, debiased):
  x = _features(0, n=5)
  const = np.ones((5, 4), np.float32)
  value = st.cka(x, const, kernel=kernel, debiased=debiased)
  assert np.isfinite(value) and value == 0.0
  # Under jit too: fused reductions leave ~1e-8 residues in a centered constant Gram, whose
  # ratio is not 0 (it was up to 1e-3); constancy is detected exactly instead.
  for c in (const, np.full((5, 4), 0.1, np.float32)):
    fn = jax.jit(lambda a, b: st.cka(a, b, kernel=kernel, debiased=debiased))
    assert fn(x, c) == 0.0
  # n = 4 with rank-1 features: the unbiased self-HSIC can be <= 0; no NaN.
  r1 = np.outer(np.arange(4.0), np.ones(3)).astype(np.float32)
  assert np.isfinite(st.cka(r1, _features(1, n=4), debiased=True))


def test_minibatch_cka_streams_over_devices_and_batches():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(64, d)).astype(np.float32) for d in (5, 7)]
  ys = [xs[0] @ rng.normal(size=(5, 4)).astype(np.float32) + 0.1 * rng.normal(size=(64, 4)),
        rng.normal(size=(64, 3))]
  ys = [y.astype(np.float32) for y in ys]
  # Reference: Σ over the 16 minibatches of 4 rows (2 batches x 8 devices) of unbiased HSIC.
  hsic = jnp.zeros((4, 4))
  for i in range(0, 64, 4):
    hsic = st.hsic_matrix_update(hsic, [x[i:i + 4] for x in xs], [y[i:i + 4] for y in ys])
  ref = st.cka_from_hsic(hsic, 2)
  mesh8 = make_mesh({'data': 8}, jax.devices()[:8])
  batches = [[f[i * 32:(i + 1) * 32] for f in xs + ys] for i in range(2)]
  out = st.minibatch_cka_matrix(batches, 2, mesh=mesh8)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  assert out.shape == (2, 2)
  # 1 device, batches of 4 rows: the same minibatches, the same numbers.
  mesh1 = make_mesh({'data': 1}, jax.devices()[:1])
  small = [[f[i:i + 4] for f in xs + ys] for i in range(0, 64, 4)]
  np.testing.assert_allclose(st.minibatch_cka_matrix(small, 2, mesh=mesh1), ref, rtol=1e-4,
                             atol=1e-6)
  with pytest.raises(ValueError, match='at least 4 per minibatch'):
    st.minibatch_cka_matrix([[f[:16] for f in xs + ys]], 2, mesh=mesh8)


def test_minibatch_cka_converges_to_full_cka():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2000, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 6)) + rng.normal(size=(2000, 6))).astype(np.float32)
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  mb = st.minibatch_cka_matrix([[x[i:i + 400], y[i:i + 400]] for i in range(0, 2000, 400)], 1,
                               mesh=mesh)
  np.testing.assert_allclose(mb[0, 0], _cka_ref(x, y), atol=0.03)


def test_cka_matrix_helpers_agree():
  xs = [_features(i, n=20, d=3 + i) for i in range(2)]
  ys = [_features(5 + i, n=20, d=2 + i) for i in range(3)]
  full = st.cka_matrix(xs, ys)
  assert full.shape == (2, 3)
  np.testing.assert_allclose(full[1, 2], _cka_ref(xs[1], ys[2]), rtol=1e-5)
  deb = st.cka_matrix(xs, ys, debiased=True)
  np.testing.assert_allclose(deb[0, 1], st.cka(xs[0], ys[1], debiased=True), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize('as_jax', [True, False])
def test_cka_matrix_names_non_finite_inputs(as_jax):
  xs = [_features(i, n=20, d=3) for i in range(2)]
  ys = [_features(5 + i, n=20, d=2) for i in range(3)]
  ys[1] = ys[1].copy()
  ys[1][3, 1] = np.nan
  ys[1][4, 0] = np.inf
  if as_jax:
    xs, ys = [jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys]
  with pytest.raises(ValueError, match=r'ys\[1\] has 2 non-finite entries \(1 NaN, 1 inf\)'):
    st.cka_matrix(xs, ys)
  traced = jax.jit(st.cka_matrix)(xs, ys)  # under jit: NaN in that column only
  assert np.isnan(traced[:, 1]).all() and np.isfinite(np.delete(traced, 1, axis=1)).all()


@pytest.mark.parametrize('blocks', [1, 2, 4])
def test_blocked_feature_hsic_matches_gram_formula(blocks):
  rng = np.random.default_rng(3)
  feats = [rng.normal(size=(12, d)).astype(np.float32) + 1.0 for d in (3, 5, 4)]
  out = st.hsic_matrix_update(jnp.zeros((3, 3)), feats[:1], feats[1:], blocks=blocks)
  for i in range(3):
    for j in range(3):
      k = np.float64(feats[i] @ feats[i].T); l = np.float64(feats[j] @ feats[j].T)
      np.testing.assert_allclose(out[i, j], _hsic_u_ref_fast(k, l), rtol=1e-4, atol=1e-4)


def _hsic_u_ref_fast(k, l):
  """Song et al. (2012) Eq. 5 written out in float64."""
  n = len(k)
  k = k.copy(); l = l.copy()
  np.fill_diagonal(k, 0); np.fill_diagonal(l, 0)
  return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
          - 2 / (n - 2) * k.sum(0) @ l.sum(1)) / (n * (n - 3))


def test_indices_are_jit_safe():
  x, y = _features(0, n=16), _features(1, n=16, d=3)
  for kernel in ('linear', 'rbf'):
    for debiased in (False, True):
      fn = jax.jit(lambda a, b: st.cka(a, b, kernel=kernel, debiased=debiased))
      np.testing.assert_allclose(fn(x, y), st.cka(x, y, kernel=kernel, debiased=debiased),
                                 rtol=1e-5, atol=2e-5)


def _debiased_ref(x, y):
  """Debiased linear CKA in float64 (Song et al. Eq. 5 on Grams of the float64 inputs)."""
  k, l = np.float64(x) @ np.float64(x).T, np.float64(y) @ np.float64(y).T
  return _hsic_u_ref_fast(k, l) / np.sqrt(_hsic_u_ref_fast(k, k) * _hsic_u_ref_fast(l, l))


def _wide_pair(seed, n=500, d=128):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x[:, :d // 2] @ rng.normal(size=(d // 2, d)) / np.sqrt(d) + rng.normal(size=(n, d))
  return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize('offset', [10.0, 30.0])
def test_debiased_cka_is_translation_invariant_in_float32(offset):
  # Unit-scale features, 500 examples: the uncentered Gram lost the answer (0.55 and 0.0
  # for a true 0.305). float32 rounds x + 30 by 30·ε/2 ≈ 2e-6 of the scale, so 1e-4 is ample.
  x, y = _wide_pair(0)
  xt, yt = x + np.float32(offset), y + np.float32(offset)
  want = _debiased_ref(xt, yt)
  np.testing.assert_allclose(want, _debiased_ref(x, y), atol=1e-4)  # the estimator is invariant
  np.testing.assert_allclose(st.cka(xt, yt, debiased=True), want, atol=1e-4)
  np.testing.assert_allclose(st.cka_matrix([xt], [yt], debiased=True)[0, 0], want, atol=1e-4)
  hsic = st.hsic_matrix_update(jnp.zeros((2, 2)), [xt], [yt])
  np.testing.assert_allclose(st.cka_from_hsic(hsic, 1)[0, 0], want, atol=1e-4)
  mesh = make_mesh({'data': 1}, jax.devices()[:1])
  np.testing.assert_allclose(st.minibatch_cka_matrix([[xt, yt]], 1, mesh=mesh)[0, 0], want,
                             atol=1e-4)
  np.testing.assert_allclose(st.cka(xt, yt, kernel='rbf', debiased=True),
                             st.cka(x, y, kernel='rbf', debiased=True), atol=1e-4)


@pytest.mark.parametrize('debiased', [False, True])
def test_rbf_distances_survive_large_offsets(debiased):
  # x + 1000 in float32 keeps x to 1000·ε/2 = 6e-5 of its scale; the RBF CKA moves by far less
  # than 5e-4. Distances from |x|² + |y|² − 2x·y of uncentered data were off by 1.4e-2.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(100, 20)).astype(np.float32)
  y = (x[:, :10] @ rng.normal(size=(10, 10)) + rng.normal(size=(100, 10))).astype(np.float32)
  base = st.cka(x, y, kernel='rbf', debiased=debiased)
  shifted = st.cka(x + np.float32(1000), y - np.float32(1000), kernel='rbf', debiased=debiased)
  np.testing.assert_allclose(shifted, base, atol=5e-4)


def test_linear_cka_does_not_overflow_at_large_activations():
  # std 100 and 1000, n = 10,000, width 512: ‖XᵀX‖⁴ passed float32's 3.4e38 and gave 0.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(10_000, 512)).astype(np.float32)
  b = (a + 0.25 * rng.normal(size=a.shape)).astype(np.float32)
  a64, b64 = np.float64(a) - a.mean(0), np.float64(b) - b.mean(0)
  want = np.sum((a64.T @ b64) ** 2) / np.linalg.norm(a64.T @ a64) / np.linalg.norm(b64.T @ b64)
  for std in (1e-3, 100.0, 1000.0):
    s = np.float32(std)
    np.testing.assert_allclose(st.linear_cka(s * a, s * b), want, atol=1e-4, err_msg=f'{std}')
  np.testing.assert_allclose(st.cka_matrix([1e3 * a], [1e3 * b])[0, 0], want, atol=1e-4)


def _poisoned(seed, n=16, d=4):
  y = _features(seed, n=n, d=d)
  y[2, 1] = np.nan
  y[5, 3] = np.inf
  return y


@pytest.mark.parametrize('call', [
    lambda x, y: st.cka(x, y), lambda x, y: st.cka(x, y, debiased=True),
    lambda x, y: st.cka(x, y, kernel='rbf'), lambda x, y: st.cka(x, y, kernel='rbf', debiased=True),
    st.linear_cka])
def test_non_finite_input_raises_naming_the_input(call):
  x, y = _features(0, n=16), _poisoned(1)
  with pytest.raises(ValueError, match=r'y has 2 non-finite entries \(1 NaN, 1 inf\)'):
    call(x, y)
  with pytest.raises(ValueError, match=r'x has 2 non-finite entries'):
    call(jnp.asarray(y), x[:, :4])  # device arrays are counted on device
  # Under jit the values cannot raise: the result is NaN, never a plausible number.
  assert np.isnan(jax.jit(call)(x, y))


def test_non_finite_feature_lists_raise_naming_the_feature():
  x, y = _features(0, n=16), _poisoned(1)
  with pytest.raises(ValueError, match=r'ys\[1\] has 2 non-finite'):
    st.hsic_matrix_update(jnp.zeros((3, 3)), [x], [x[:, :3], y])
  for debiased in (False, True):
    with pytest.raises(ValueError, match=r'xs\[0\] has 2 non-finite'):
      st.cka_matrix([y], [x], debiased=debiased)
  traced = jax.jit(lambda a, b: st.hsic_matrix_update(jnp.zeros((3, 3)), [a], [a[:, :3], b]))(x, y)
  bad = np.isnan(np.asarray(traced))
  assert bad[2].all() and bad[:, 2].all() and not bad[:2, :2].any()


def test_minibatch_cka_names_the_non_finite_feature_and_batch():
  rng = np.random.default_rng(0)
  feats = [rng.normal(size=(64, d)).astype(np.float32) for d in (3, 4, 5)]
  batches = [[f[i:i + 32].copy() for f in feats] for i in (0, 32)]
  batches[1][2][7, 0] = np.nan  # y_2 (index 2: x_1, y_1, y_2), second batch (batch 1)
  batches[1][2][9, 4] = -np.inf
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  with pytest.raises(ValueError, match=r'y_2 \(index 2 of each batch\): 2 non-finite entries, '
                                       r'first in batch 1 \(counting from 0\)'):
    st.minibatch_cka_matrix(batches, 1, mesh=mesh)


def test_minibatch_cka_over_many_batches_on_8_devices():
  """64 streamed updates in a row (each psums across 8 fake CPU devices) finish and add up."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, 4))).astype(np.float32) + 0.1 * rng.normal(size=(32, 4))
  mesh = make_mesh({'data': 8}, jax.devices()[:8])
  once = st.minibatch_cka_matrix([(x, y)], 1, mesh=mesh)
  many = st.minibatch_cka_matrix([(x, y)] * 64, 1, mesh=mesh)  # same minibatches, repeated
  np.testing.assert_allclose(many, once, rtol=1e-5)


def test_the_full_batch_matrix_equals_linear_cka_pair_by_pair_for_any_widths():
  rng = np.random.default_rng(3)
  xs = [rng.normal(size=(200, d)).astype(np.float32) + 7.0 for d in (5, 11, 3)]
  ys = [rng.normal(size=(200, d)).astype(np.float32) * 1e3 for d in (8, 2)]
  ys.append(xs[1] @ rng.normal(size=(11, 4)).astype(np.float32))  # related to xs[1]
  ys.append(np.ones((200, 3), np.float32))  # constant: CKA 0
  got = np.asarray(st.cka_matrix(xs, ys))
  want = np.array([[float(st.linear_cka(x, y)) for y in ys] for x in xs])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[1, 2] > 0.3 and np.all(got[:, 3] == 0.0)
