"""Property tests of every similarity index in float32 against float64 NumPy references.

Each index is checked for the invariances it has by definition: translation of
either input by offsets up to 100x the feature scale, isotropic scaling by
1e-3..1e3, orthogonal maps (CKA, SVCCA, Procrustes) and invertible linear maps
(mean CCA; PWCCA on the side that does not weight), and for agreement with a
float64 NumPy computation of the same formula on the same float32 inputs.

Tolerances. float32 rounds each entry by up to ε/2 = 6e-8 relative; an input
translated by 100x its scale carries an extra rounding of 100·ε/2 = 6e-6 of
the feature scale. Each index is a smooth function of the (centered,
normalized) data with O(1) sensitivity on these well-conditioned inputs
(Gaussian features, invertible maps of condition <= 25), and the sums behind
it have at most n·d ~ 10³ terms, so the float32 error is ~1e-5 at worst:
ATOL = 2e-4 leaves a margin of 10x over that and sits far below the errors of
an implementation that loses the offset (1e-2 and more) or overflows (0 or NaN).
"""
import functools

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as hst

from lossland import stitching as st
from lossland.parallel import make_mesh

SETTINGS = hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
ATOL = 2e-4
N, DX, DY = 40, 6, 5
MB_N, MB_BATCH, MB_DEVICES = 128, 64, 8  # minibatches of 64 / 8 = 8 rows


# ---------------------------------------------------------------- float64 references

def _c64(x):
  x = np.float64(x)
  return x - x.mean(axis=0)


def _hsic_u64(k, l):
  """Unbiased HSIC, Song et al. (2012) Eq. 5."""
  n = len(k)
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * k.sum(0) @ l.sum(1)) / (n * (n - 3))


def _hsic_b64(k, l):
  n = len(k)
  h = np.eye(n) - 1.0 / n
  return np.sum(h @ k @ h * l) / (n - 1) ** 2


def _gram64(x, kernel):
  x = _c64(x)
  if kernel == 'linear':
    return x @ x.T
  d2 = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)  # exact differences
  median = np.median(d2[np.triu_indices(len(x), 1)])
  return np.exp(-d2 / (2.0 * median))


def _cka64(x, y, kernel='linear', debiased=False):
  k, l = _gram64(x, kernel), _gram64(y, kernel)
  h = _hsic_u64 if debiased else _hsic_b64
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def _minibatch_cka64(x, y):
  rows = MB_BATCH // MB_DEVICES
  kl = kk = ll = 0.0
  for i in range(0, len(x), rows):
    k, l = _gram64(x[i:i + rows], 'linear'), _gram64(y[i:i + rows], 'linear')
    kl, kk, ll = kl + _hsic_u64(k, l), kk + _hsic_u64(k, k), ll + _hsic_u64(l, l)
  return kl / np.sqrt(kk * ll)


def _basis64(x, keep=None):
  u, s, _ = np.linalg.svd(_c64(x), full_matrices=False)
  mask = s > 1e-6 * s[0]
  if keep is not None:
    frac = np.cumsum(s ** 2) / np.sum(s ** 2)
    mask &= np.concatenate([[True], frac[:-1] < keep])
  return u[:, mask]


def _mean_cca64(x, y, keep=None):
  qx, qy = _basis64(x, keep), _basis64(y, keep)
  return np.linalg.svd(qx.T @ qy, compute_uv=False).mean()


def _pwcca64(x, y):
  """Morcos et al. (2018) Eq. 2-3: weights Σⱼ |⟨hᵢ, xⱼ⟩| of x's canonical variates hᵢ."""
  qx, qy = _basis64(x), _basis64(y)
  u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
  alpha = np.abs(_c64(x).T @ (qx @ u)).sum(axis=0)[:len(rho)]
  return np.sum(alpha * rho) / alpha.sum()


def _procrustes64(x, y):
  x, y = _c64(x), _c64(y)
  x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
  return 2.0 - 2.0 * np.linalg.svd(x.T @ y, compute_uv=False).sum()


# ---------------------------------------------------------------- the indices under test

@functools.lru_cache(maxsize=1)
def _mesh():
  return make_mesh({'data': MB_DEVICES}, jax.devices()[:MB_DEVICES])


def _minibatch_cka(x, y):
  batches = [[x[i:i + MB_BATCH], y[i:i + MB_BATCH]] for i in range(0, len(x), MB_BATCH)]
  return st.minibatch_cka_matrix(batches, 1, mesh=_mesh())[0, 0]


# name -> (float32 index, float64 reference, data kind)
INDICES = {
    'linear_cka': (st.linear_cka, _cka64, 'plain'),
    'cka_linear_debiased': (functools.partial(st.cka, debiased=True),
                            functools.partial(_cka64, debiased=True), 'plain'),
    'cka_rbf': (functools.partial(st.cka, kernel='rbf'),
                functools.partial(_cka64, kernel='rbf'), 'plain'),
    'cka_rbf_debiased': (functools.partial(st.cka, kernel='rbf', debiased=True),
                         functools.partial(_cka64, kernel='rbf', debiased=True), 'plain'),
    'cka_matrix_debiased': (lambda x, y: st.cka_matrix([x], [y], debiased=True)[0, 0],
                            functools.partial(_cka64, debiased=True), 'plain'),
    'minibatch_cka': (_minibatch_cka, _minibatch_cka64, 'minibatch'),
    'mean_cca': (st.mean_cca, _mean_cca64, 'plain'),
    'svcca': (st.svcca, functools.partial(_mean_cca64, keep=0.99), 'spectrum'),
    'pwcca': (st.pwcca, _pwcca64, 'plain'),
    'procrustes': (st.procrustes, _procrustes64, 'plain'),
}
ORTHOGONAL = ['linear_cka', 'cka_linear_debiased', 'cka_rbf', 'cka_rbf_debiased',
              'cka_matrix_debiased', 'minibatch_cka', 'svcca', 'procrustes']


def _data(seed: int, kind: str):
  """Float32 (x, y) of related, unit-scale features."""
  rng = np.random.default_rng(seed)
  n = MB_N if kind == 'minibatch' else N
  x = rng.normal(size=(n, DX))
  if kind == 'spectrum':
    # Singular values (3, 2, 1, 0.01, 0.01, 0.01): SVCCA's 99% cut keeps exactly 3 directions
    # with a wide margin on both sides, so float32 rounding cannot move it.
    q, _ = np.linalg.qr(rng.normal(size=(DX, DX)))
    x = x @ np.diag([3.0, 2.0, 1.0, 0.01, 0.01, 0.01]) @ q
  y = x[:, :DY] @ rng.normal(size=(DY, DY)) + rng.normal(size=(n, DY))
  if kind == 'spectrum':
    y = np.concatenate([y[:, :2], 0.01 * y[:, 2:]], axis=1)
  return x.astype(np.float32), y.astype(np.float32)


def _offset(rng, d: int, factor: float) -> np.ndarray:
  return (factor * rng.uniform(0.5, 1.0, d) * rng.choice([-1.0, 1.0], d)).astype(np.float32)


def _orthogonal(rng, d: int) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


def _invertible(rng, d: int) -> np.ndarray:
  """Q diag(s) R with s in [0.2, 5]: condition number at most 25."""
  s = np.exp(rng.uniform(np.log(0.2), np.log(5.0), d))
  return (_orthogonal(rng, d) * s) @ _orthogonal(rng, d)


def _close(got, want, what):
  got = float(got)
  assert np.isfinite(got) and abs(got - want) <= ATOL, f'{what}: {got} vs {want}'


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize('name', sorted(INDICES))
@SETTINGS
@hypothesis.given(seed=hst.integers(0, 2 ** 16), factor=hst.floats(0.0, 100.0))
@hypothesis.example(seed=0, factor=100.0)
def test_translation_invariant_and_matches_float64(name, seed, factor):
  fn, ref, kind = INDICES[name]
  x, y = _data(seed, kind)
  rng = np.random.default_rng(seed + 1)
  xt, yt = x + _offset(rng, DX, factor), y + _offset(rng, DY, factor)
  want = ref(xt, yt)  # the same formula in float64 on the same float32 inputs
  _close(fn(xt, yt), want, f'{name} vs float64 at offset {factor:g}x')
  _close(fn(x, y), want, f'{name} translated by {factor:g}x vs untranslated')


@pytest.mark.parametrize('name', sorted(INDICES))
@SETTINGS
@hypothesis.given(seed=hst.integers(0, 2 ** 16), log_sx=hst.floats(-3.0, 3.0),
                  log_sy=hst.floats(-3.0, 3.0))
@hypothesis.example(seed=0, log_sx=3.0, log_sy=3.0)
@hypothesis.example(seed=0, log_sx=-3.0, log_sy=-3.0)
def test_isotropic_scale_invariant(name, seed, log_sx, log_sy):
  fn, ref, kind = INDICES[name]
  x, y = _data(seed, kind)
  xs, ys = np.float32(10.0 ** log_sx) * x, np.float32(10.0 ** log_sy) * y
  want = ref(x, y)
  _close(fn(xs, ys), want, f'{name} at scales 1e{log_sx:.2f}, 1e{log_sy:.2f}')


@pytest.mark.parametrize('name', ORTHOGONAL)
@SETTINGS
@hypothesis.given(seed=hst.integers(0, 2 ** 16))
def test_orthogonal_invariant(name, seed):
  fn, ref, kind = INDICES[name]
  x, y = _data(seed, kind)
  rng = np.random.default_rng(seed + 2)
  want = ref(x, y)
  _close(fn(x @ _orthogonal(rng, DX), y @ _orthogonal(rng, DY)), want, f'{name} rotated')


@pytest.mark.parametrize('name,both', [('mean_cca', True), ('pwcca', False)])
@SETTINGS
@hypothesis.given(seed=hst.integers(0, 2 ** 16))
def test_cca_invertible_map_invariant(name, both, seed):
  # PWCCA weights the correlations by x's neurons, so only maps of y leave it unchanged.
  fn, ref, kind = INDICES[name]
  x, y = _data(seed, kind)
  rng = np.random.default_rng(seed + 3)
  a, b = _invertible(rng, DX), _invertible(rng, DY)
  want = ref(x, y)
  _close(fn(x @ a if both else x, y @ b), want, f'{name} under invertible maps')
