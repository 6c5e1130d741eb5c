"""CCA family, Procrustes and mutual k-NN: invariances, references, bad inputs."""
import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as hst
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from lossland import stitching as st

SETTINGS = hypothesis.settings(max_examples=15, deadline=None)


def _x(seed, n=60, d=5):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _cca_ref(x, y):
  """Canonical correlations from whitened cross-covariance in float64."""
  x = np.float64(x) - x.mean(0)
  y = np.float64(y) - y.mean(0)
  def inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w ** -0.5) @ v.T
  m = inv_sqrt(x.T @ x) @ x.T @ y @ inv_sqrt(y.T @ y)
  return np.linalg.svd(m, compute_uv=False)


def test_mean_cca_matches_reference():
  x, y = _x(0), _x(1, d=4)
  y = y + x[:, :4]
  rho, valid = st.canonical_correlations(x, y)
  np.testing.assert_allclose(np.asarray(rho)[np.asarray(valid)], _cca_ref(x, y), atol=1e-4)
  np.testing.assert_allclose(st.mean_cca(x, y), _cca_ref(x, y).mean(), atol=1e-4)


@SETTINGS
@hypothesis.given(seed=hst.integers(0, 10_000))
def test_cca_invariant_to_invertible_linear_maps(seed):
  rng = np.random.default_rng(seed)
  x, y = _x(seed), _x(seed + 1, d=4)
  y = y + 0.5 * x[:, :4]
  a = (rng.normal(size=(5, 5)) + 3 * np.eye(5)).astype(np.float32)  # invertible (a.s.)
  b = (rng.normal(size=(4, 4)) + 3 * np.eye(4)).astype(np.float32)
  hypothesis.assume(np.linalg.cond(a) < 50 and np.linalg.cond(b) < 50)
  base = st.mean_cca(x, y)
  np.testing.assert_allclose(st.mean_cca(x @ a + 2.0, y @ b), base, atol=2e-4)
  np.testing.assert_allclose(st.pwcca(x, y @ b), st.pwcca(x, y), atol=2e-4)


def test_identical_and_pwcca_svcca():
  x = _x(3)
  np.testing.assert_allclose(st.mean_cca(x, x), 1.0, atol=1e-5)
  np.testing.assert_allclose(st.pwcca(x, x), 1.0, atol=1e-5)
  np.testing.assert_allclose(st.svcca(x, x), 1.0, atol=1e-5)
  # PWCCA weights: in [min rho, max rho].
  y = _x(4, d=3) + x[:, :3] * np.array([3.0, 0.3, 0.0], np.float32)
  rho, valid = st.canonical_correlations(x, y)
  pw = float(st.pwcca(x, y))
  assert float(rho[2]) - 1e-6 <= pw <= float(rho[0]) + 1e-6


def test_rank_deficient_inputs():
  x = _x(5, d=3)
  wide = np.concatenate([x, x @ np.ones((3, 2), np.float32)], axis=1)  # rank 3 in 5 columns
  np.testing.assert_allclose(st.mean_cca(wide, x), 1.0, atol=1e-4)
  rho, valid = st.canonical_correlations(wide, _x(6, d=4))
  assert int(valid.sum()) == 3 and np.all(np.isfinite(rho))
  const = np.ones((60, 3), np.float32)
  for fn in (st.mean_cca, st.pwcca, st.svcca, st.procrustes):
    assert np.isfinite(fn(const, x)), fn


def test_cca_needs_more_examples_than_features():
  # The anatome trap: with n <= dx + dy, random data gives CCA ~ 1. Here it is an error.
  with pytest.raises(ValueError, match='needs more than 10 examples'):
    st.mean_cca(_x(0, n=10, d=5), _x(1, n=10, d=5))
  with pytest.raises(ValueError, match='has 10 examples but y has 9'):
    st.pwcca(_x(0, n=10, d=2), _x(1, n=9, d=2))
  # Enough examples: random data has small correlations.
  assert float(st.mean_cca(_x(0, n=2000, d=5), _x(1, n=2000, d=5))) < 0.1


def test_svcca_keeps_variance_directions():
  rng = np.random.default_rng(0)
  signal = rng.normal(size=(500, 2))
  x = np.concatenate([10 * signal, 1e-3 * rng.normal(size=(500, 3))], 1).astype(np.float32)
  y = (signal @ rng.normal(size=(2, 2))).astype(np.float32)
  np.testing.assert_allclose(st.svcca(x, y, keep=0.99), 1.0, atol=1e-4)
  assert float(st.mean_cca(x, y)) > 0.99  # only 2 = min(rank) correlations, both 1


def test_procrustes_matches_scipy_and_is_zero_for_rotations():
  x, y = _x(7), _x(8)
  q = ortho_group.rvs(5, random_state=0).astype(np.float32)
  np.testing.assert_allclose(st.procrustes(x, 3.0 * x @ q), 0.0, atol=1e-5)
  xc = np.float64(x - x.mean(0)); yc = np.float64(y - y.mean(0))
  xc /= np.linalg.norm(xc); yc /= np.linalg.norm(yc)
  r, _ = orthogonal_procrustes(xc, yc)
  np.testing.assert_allclose(st.procrustes(x, y), np.sum((xc @ r - yc) ** 2), atol=1e-5)


def test_mutual_knn():
  x = _x(9, n=50)
  assert float(st.mutual_knn(x, 2.0 * x @ ortho_group.rvs(5, random_state=1), k=5)) == 1.0
  assert float(st.mutual_knn(x, _x(10, n=50), k=5)) < 0.5
  bad = np.asarray(x).copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match='mutual_knn: y has 1 non-finite'):
    st.mutual_knn(x, bad, k=5)  # NaN similarities would otherwise rank as neighbours silently
  with pytest.raises(ValueError, match='k < n'):
    st.mutual_knn(x, x, k=50)


def test_indices_jit_once():
  import chex
  x, y = _x(0), _x(1)
  fn = jax.jit(chex.assert_max_traces(st.pwcca, n=1))
  for s in range(3):
    fn(x + s, y)


@pytest.mark.parametrize('fn', [st.mean_cca, st.svcca, st.pwcca, st.procrustes,
                                lambda x, y: st.canonical_correlations(x, y)[0]])
def test_non_finite_input_raises_naming_the_input(fn):
  x, y = _x(0), _x(1, d=4)
  y[3, 0] = np.nan
  y[4, 1] = np.nan
  y[7, 2] = -np.inf
  with pytest.raises(ValueError, match=r'y has 3 non-finite entries \(2 NaN, 1 inf\)'):
    fn(x, y)
  with pytest.raises(ValueError, match=r'x has 3 non-finite entries'):
    fn(y, x)
  # Under jit the values cannot raise: NaN, never a plausible 0.
  assert np.isnan(np.asarray(jax.jit(fn)(x, y))).all()


def test_svcca_refuses_kept_dimensions_past_n_minus_1():
  # 20 examples, 15 + 15 features: the kept directions span more than the 19 centered
  # dimensions, so correlations are 1 by construction; it used to answer anyway.
  x, y = _x(0, n=20, d=15), _x(1, n=20, d=15)
  with pytest.raises(ValueError, match=r'svcca keeps \d+ \+ \d+ directions .* of 20 examples'):
    st.svcca(x, y)
  assert np.isnan(jax.jit(st.svcca)(x, y))
  # Kept dimensions that fit: an answer. (Few directions explain 99% of a low-rank x.)
  low = _x(2, n=20, d=2) @ np.ones((2, 15), np.float32) + 1e-4 * x
  assert np.isfinite(st.svcca(low, y))


def test_cca_family_keeps_precision_at_large_offsets_and_scales():
  x, y = _x(0), _x(1, d=4)
  y = y + 0.5 * x[:, :4]
  for fn in (st.mean_cca, st.svcca, st.pwcca, st.procrustes):
    base = float(fn(x, y))
    for s, t in ((1e3, 1e5), (1e-3, 0.1)):  # offsets of 100x the scale
      got = float(fn(np.float32(s) * x + np.float32(t), np.float32(s) * y - np.float32(t)))
      assert abs(got - base) < 2e-4, (fn, s, got, base)
