"""CCA-family similarities and the orthogonal Procrustes distance.

* Mean CCA: the mean canonical correlation ρ̄ (Raghu et al., "SVCCA", NeurIPS
  2017, Sec. 2), from the singular values of Qxᵀ Qy where Qx, Qy are
  orthonormal bases of the centered representations.
* SVCCA (Raghu et al. 2017): CCA after keeping each side's top singular
  directions that explain `keep` (default 99%) of its variance.
* PWCCA (Morcos et al., "Insights on representational similarity", NeurIPS
  2018, Eq. 2-3): Σ αᵢρᵢ with αᵢ ∝ Σⱼ |⟨hᵢ, xⱼ⟩|, the canonical variate's
  absolute projection on x's neurons (weights from x: it is not symmetric).
* Procrustes (Ding et al., "Grounding representation similarity", NeurIPS
  2021, Eq. 3): d = ‖X‖²_F + ‖Y‖²_F − 2‖XᵀY‖_* for centered, unit-Frobenius X, Y;
  in [0, 2], 0 for identical shapes up to rotation.

Rank-deficient inputs: directions with singular value below `rtol`·σ_max are
dropped, and correlations are averaged over min(rank x, rank y). If
dx + dy > n − 1 the two spans must intersect and some correlations equal 1 by
construction (the "CCA ≈ 1 on random data" trap): that is an error here. For
SVCCA the same holds for the kept dimensions kx + ky, which depend on the data:
it raises on concrete inputs and returns NaN under `jit`.

Numerics: inputs are centered and scaled by an exact power of two first (see
`alignment`), so offsets and activation scales cost no float32 precision. NaN
or inf in concrete inputs raise one ValueError naming x or y and the counts;
under `jit` (a traced value cannot raise) the result is NaN. All functions are
jit-safe; shape checks raise at trace time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lossland.stitching import alignment as cka_lib

HIGHEST = jax.lax.Precision.HIGHEST


def _center(x: jax.Array) -> jax.Array:
  return cka_lib._center_scaled(x)[0]  # pylint: disable=protected-access


def _check_inputs(where: str, x: jax.Array, y: jax.Array) -> None:
  cka_lib._check_pair(x, y)  # pylint: disable=protected-access
  cka_lib._check_finite(where, x=x, y=y)  # pylint: disable=protected-access


def _nan_unless_finite(value: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  return cka_lib._nan_unless_finite(value, x, y)  # pylint: disable=protected-access


def _check_cca(where: str, x: jax.Array, y: jax.Array) -> None:
  _check_inputs(where, x, y)
  n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
  if dx + dy > n - 1:
    raise ValueError(f'CCA of {dx} + {dy} features needs more than {dx + dy} examples, got '
                     f'n={n}: with dx + dy > n − 1 the centered spans intersect and some '
                     'canonical correlations are 1 whatever the data. Use more examples, or '
                     'svcca / reduce the width first')


def _basis(x: jax.Array, rtol: float, keep: float | None = None):
  """Orthonormal basis of centered x with dropped directions zeroed: ([n, d'], mask [d'])."""
  u, s, _ = jnp.linalg.svd(x, full_matrices=False)
  mask = s > rtol * s[0]
  if keep is not None:
    var = s ** 2
    frac = jnp.cumsum(var) / jnp.maximum(var.sum(), jnp.finfo(var.dtype).tiny)
    mask &= jnp.concatenate([jnp.ones((1,), bool), frac[:-1] < keep])
  return u * mask, mask


def _correlations(x, y, rtol, keep=None):
  qx, mx = _basis(x, rtol, keep)
  qy, my = _basis(y, rtol, keep)
  u, rho, _ = jnp.linalg.svd(jnp.matmul(qx.T, qy, precision=HIGHEST), full_matrices=False)
  k = jnp.minimum(mx.sum(), my.sum())
  valid = jnp.arange(rho.shape[0]) < k
  return jnp.clip(rho, 0.0, 1.0), valid, qx, u, (mx.sum(), my.sum())


def canonical_correlations(x: jax.Array, y: jax.Array, *, rtol: float = 1e-6):
  """(ρ [min(dx, dy)] sorted descending, valid mask) for x: [n, dx], y: [n, dy]."""
  _check_cca('canonical_correlations', x, y)
  return _canonical_correlations(x, y, rtol)


def _canonical_correlations(x, y, rtol):
  rho, valid, _, _, _ = _correlations(_center(x), _center(y), rtol)
  return _nan_unless_finite(rho, x, y), valid


def mean_cca(x: jax.Array, y: jax.Array, *, rtol: float = 1e-6) -> jax.Array:
  """Mean canonical correlation over min(rank x, rank y) directions; 0 if either is constant."""
  _check_cca('mean_cca', x, y)
  return _mean_cca(x, y, rtol)


def _mean_cca(x, y, rtol):
  rho, valid, _, _, _ = _correlations(_center(x), _center(y), rtol)
  return _nan_unless_finite(jnp.sum(rho * valid) / jnp.maximum(valid.sum(), 1), x, y)


def svcca(x: jax.Array, y: jax.Array, *, keep: float = 0.99, rtol: float = 1e-6) -> jax.Array:
  """Mean CCA after keeping the top singular directions explaining `keep` of each side's variance.

  Only the kept dimensions kx, ky enter, so the n − 1 bound applies to them: if
  kx + ky > n − 1 some correlations are 1 by construction. That raises ValueError
  on concrete inputs and gives NaN under `jit` (kx, ky depend on the values).
  """
  _check_inputs('svcca', x, y)
  value, kx, ky = _svcca(x, y, keep, rtol)
  n = x.shape[0]
  if not isinstance(kx, jax.core.Tracer):
    kx, ky = int(kx), int(ky)
    if kx + ky > n - 1:
      raise ValueError(f'svcca keeps {kx} + {ky} directions (keep={keep}) of {n} examples: with '
                       'kx + ky > n − 1 the centered spans intersect and some canonical '
                       'correlations are 1 whatever the data. Use more examples, or a smaller '
                       'keep')
  return value


def _svcca(x, y, keep, rtol):
  """(SVCCA, NaN when kx + ky > n − 1; kx; ky)."""
  rho, valid, _, _, (kx, ky) = _correlations(_center(x), _center(y), rtol, keep)
  value = jnp.sum(rho * valid) / jnp.maximum(valid.sum(), 1)
  value = jnp.where(kx + ky > x.shape[0] - 1, jnp.nan, value)
  return _nan_unless_finite(value, x, y), kx, ky


def pwcca(x: jax.Array, y: jax.Array, *, rtol: float = 1e-6) -> jax.Array:
  """Projection-weighted CCA similarity Σ αᵢρᵢ (weights from x; Morcos et al. 2018)."""
  _check_cca('pwcca', x, y)
  return _pwcca(x, y, rtol)


def _pwcca(x, y, rtol):
  xc, yc = _center(x), _center(y)
  rho, valid, qx, u, _ = _correlations(xc, yc, rtol)
  h = jnp.matmul(qx, u, precision=HIGHEST)  # [n, k] canonical variates of x, unit norm
  alpha = jnp.abs(jnp.matmul(xc.T, h, precision=HIGHEST)).sum(axis=0) * valid
  total = alpha.sum()
  value = jnp.where(total > 0, jnp.sum(alpha * rho) / jnp.where(total > 0, total, 1.0), 0.0)
  return _nan_unless_finite(value, x, y)


def procrustes(x: jax.Array, y: jax.Array) -> jax.Array:
  """Orthogonal Procrustes distance 2 − 2‖XᵀY‖_* of centered, unit-norm X, Y (in [0, 2])."""
  _check_inputs('procrustes', x, y)
  return _procrustes(x, y)


def _procrustes(x, y):
  xc, yc = _center(x), _center(y)
  nx, ny = jnp.linalg.norm(xc), jnp.linalg.norm(yc)
  xc = xc / jnp.where(nx > 0, nx, 1.0)
  yc = yc / jnp.where(ny > 0, ny, 1.0)
  nuclear = jnp.linalg.svd(jnp.matmul(xc.T, yc, precision=HIGHEST), compute_uv=False).sum()
  return _nan_unless_finite(jnp.clip(2.0 - 2.0 * nuclear, 0.0, 2.0), x, y)
